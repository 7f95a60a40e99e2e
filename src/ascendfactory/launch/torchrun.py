"""Launch training through `<scripts_dir>/train.sh`, which execs torchrun (ascendfactory.launch.agent: torch's
launcher with the run's rules; one process per device).

Restarts are torchrun's own (--max-restarts): when a worker dies, every worker of the node is restarted
and the engine auto-resumes from the newest valid checkpoint; a worker's bad input (exit 2) is not restarted.
A failure's cause is read from torchelastic's error files. Logs go under <output_dir>/logs/.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ascendfactory.config.paths import RunPaths
from ascendfactory.config.schema import ExpConfig
from ascendfactory.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from ascendfactory.launch.lock import LOCK_ENV, die_with_parent, lock_path
from ascendfactory.layout import RunLayout
from ascendfactory.logs import RUN


def default_scripts_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "scripts_modellink"


def scripts_dir(cfg: ExpConfig) -> Path:
    d = Path(cfg.scripts_dir) if cfg.scripts_dir else default_scripts_dir()
    if not (d / "train.sh").is_file():
        raise UserError(f"scripts_dir: {d}/train.sh not found; point scripts_dir at a copy of scripts_modellink/")
    return d


def config_problems(cfg: ExpConfig) -> list[str]:
    """What the launcher would refuse in the resolved config, for the pipeline's report before any stage."""
    try:
        scripts_dir(cfg)
    except UserError as e:
        return [str(e)]
    return []


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def master_port(layout: RunLayout) -> int:
    """The rendezvous port; on a single node a busy one is swapped for a free one (nobody else dials it)."""
    if layout.nnodes > 1 or _port_free(layout.master_port):
        return layout.master_port
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    logging.getLogger(RUN).info(f"master_port {layout.master_port} is busy on this single node; using {port}")
    return port


def training_env(cfg: ExpConfig, paths: RunPaths, layout: RunLayout) -> dict:
    env = dict(os.environ)
    env.update(
        AF_PYTHON=sys.executable,
        AF_CONFIG=str(paths.exp_config),
        AF_LOG_DIR=str(paths.logs_dir),
        AF_DEVICE=layout.device,
        AF_NNODES=str(layout.nnodes),
        AF_NODE_RANK=str(layout.node_rank),
        AF_NPROC_PER_NODE=str(layout.nproc_per_node),
        AF_MASTER_ADDR=layout.master_addr,
        AF_MASTER_PORT=str(master_port(layout)),
        AF_MAX_RESTARTS=str(cfg.max_restarts),
        # torchrun SIGKILLs workers this long after forwarding SIGTERM: leave them the grace period to save.
        AF_SHUTDOWN_TIMEOUT=str(int(cfg.save_grace_period) + 30),
        # torchrun's own error file: the root cause of a failure, written by launch/agent.py
        TORCHELASTIC_ERROR_FILE=str(error_file(paths, layout)),
    )
    env[LOCK_ENV] = str(lock_path(paths.output_dir, layout.node_rank))  # torchrun and the workers join the lock
    return env


def error_file(paths: RunPaths, layout: RunLayout) -> Path:
    return paths.logs_dir / "torchrun" / f"error-node{layout.node_rank}.json"


class TrainingFailed(Exception):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _root_cause(path: Path) -> dict | None:
    """The failure torchrun recorded in its torchelastic error file: message (the worker's reason), errorCode (its
    exit code, negative for a signal) and, from ascendfactory.launch.agent, extraInfo.local_rank."""
    try:
        message = json.loads(path.read_text())["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return message if isinstance(message, dict) and isinstance(message.get("errorCode"), int) else None


def _cause(failure: dict | None, rc: int) -> str:
    if failure is None:
        return f"torchrun exited with code {rc}"
    code, rank = failure["errorCode"], failure.get("extraInfo", {}).get("local_rank")
    who = "a worker" if rank is None else f"local rank {rank}"
    if code < 0:
        return f"{who} was killed by {signal.Signals(-code).name}"
    what = "stopped on bad input" if code == EXIT_USER_ERROR else f"exited with code {code}"
    reason = "; ".join(line for line in str(failure.get("message") or "").splitlines() if line.strip())
    return f"{who} {what}" + (f" ({reason})" if reason else "")


def _run_dirs(logs_dir: Path) -> set[Path]:
    """torchrun's log folders, one per launch (<log_dir>/<run id>_<random>/attempt_<restarts>/<local rank>/)."""
    return {p.parent for p in (logs_dir / "torchrun").glob("*/attempt_*")}


def _last_attempt(logs_dir: Path, earlier: set[Path]) -> Path | None:
    """This launch's newest attempt folder (none when torchrun stopped before starting workers)."""
    attempts = [a for d in _run_dirs(logs_dir) - earlier for a in d.glob("attempt_*")]
    return max(attempts, key=lambda a: int(a.name.removeprefix("attempt_")), default=None)


def _worker_log(attempt: Path | None, local_rank: int | None, logs_dir: Path) -> Path:
    """The failed rank's stderr in the newest attempt (or the attempt folder)."""
    if attempt is None:
        return logs_dir
    log = attempt / str(local_rank or 0) / "stderr.log"
    return log if log.exists() else attempt


def run_training(cfg: ExpConfig, paths: RunPaths, layout: RunLayout) -> None:
    """Run train.sh in the foreground; its output goes to the console and to logs/train-node{r}.log.
    SIGTERM/SIGINT are forwarded so that workers save and stop; if this process dies, torchrun gets SIGTERM."""
    script = scripts_dir(cfg) / "train.sh"
    paths.logs_dir.mkdir(parents=True, exist_ok=True)
    node_log = paths.logs_dir / f"train-node{layout.node_rank}.log"
    errors = error_file(paths, layout)
    errors.unlink(missing_ok=True)  # an earlier run's
    earlier = _run_dirs(paths.logs_dir)
    # preexec_fn: only prctl / getppid / kill run in the child, nothing that a thread of this process could hold.
    dies_with_us = functools.partial(die_with_parent, signal.SIGTERM, os.getpid())
    proc = subprocess.Popen(["bash", str(script)], env=training_env(cfg, paths, layout), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=dies_with_us)  # noqa: PLW1509
    stopped = []

    def forward(signum, _frame):
        stopped.append(signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with open(node_log, "a", encoding="utf-8") as log:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc == 0:
        return
    if stopped:
        raise TrainingFailed(f"training stopped by {signal.Signals(stopped[0]).name}; the last checkpoint is in "
                             f"{paths.save_dir}; run again with train_auto_resume to continue", EXIT_PREEMPTED)
    failure = _root_cause(errors)
    attempt = _last_attempt(paths.logs_dir, earlier)
    restarts = int(attempt.name.removeprefix("attempt_")) if attempt else 0
    local_rank = failure.get("extraInfo", {}).get("local_rank") if failure else None
    user_error = failure is not None and failure["errorCode"] == EXIT_USER_ERROR
    raise TrainingFailed(f"{_cause(failure, rc)}" + (f" after {restarts} restart(s)" if restarts else "") +
                         f"; see {_worker_log(attempt, local_rank, paths.logs_dir)} and {node_log}",
                         EXIT_USER_ERROR if user_error else (rc if rc > 0 else 1))
