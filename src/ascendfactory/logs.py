"""Every line ascendfactory writes while it works is a `logging` record under the "ascendfactory" logger, in one
format set up once per process (setup(): `ascendfactory-cli` in cli.main, each training worker in
engine/__main__.py, the torchrun agent in launch/agent.py):

    warning: msg / error: msg                 stderr, any logger
    [ascendfactory] HH:MM:SS msg              stdout, the pipeline's steps (logger RUN)
    [YYYY-MM-DD HH:MM:SS] msg                 stdout, the trainer's lines (logger TRAIN)
    msg                                       stderr, the rest: progress lines, which name their step themselves

A command's own result (`plan`, `list`, the demo's paths) is printed, not logged.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

ROOT = "ascendfactory"
RUN = "ascendfactory.run"
TRAIN = "ascendfactory.train"
_STAMPS = {RUN: "[ascendfactory] %H:%M:%S ", TRAIN: "[%Y-%m-%d %H:%M:%S] "}


class LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:  # every line of a multi-line error greps as one
            return "\n".join(f"{record.levelname.lower()}: {line}" for line in msg.splitlines() or [""])
        stamp = _STAMPS.get(record.name)
        return time.strftime(stamp, time.localtime(record.created)) + msg if stamp else msg


class _Console(logging.Handler):
    """sys.stdout / sys.stderr looked up at each line: pytest's capture (and anything else) may swap them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stdout = record.levelno < logging.WARNING and record.name in _STAMPS
            stream = sys.stdout if stdout else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def setup(rank: int = 0) -> None:
    """The console handler (idempotent). On a worker of rank > 0 only its errors reach the console (the ranks
    share torchrun's output); its log file (to_file) gets everything."""
    root = logging.getLogger(ROOT)
    root.setLevel(logging.INFO)
    root.propagate = False  # not again through the root logger's handlers (pytest's, a host application's)
    for h in [h for h in root.handlers if isinstance(h, _Console)]:
        root.removeHandler(h)
    console = _Console()
    console.setFormatter(LineFormatter())
    if rank:
        console.addFilter(lambda record: record.levelno >= logging.ERROR)
    root.addHandler(console)


def to_file(path: Path) -> None:
    """Every record of this process also into `path` (appended), in the same format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(LineFormatter())
    logging.getLogger(ROOT).addHandler(handler)
