"""Launch training through `<scripts_dir>/train.sh`, which execs torchrun (one process per device).

Restarts are torchrun's own (--max-restarts): when a worker dies, every worker of the node is restarted
and the engine auto-resumes from the newest valid checkpoint. Logs go under <output_dir>/logs/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ascendfactory.config.paths import RunPaths
from ascendfactory.config.schema import ExpConfig
from ascendfactory.errors import UserError
from ascendfactory.launch.layout import Layout

EXIT_STOPPED_BY_SIGNAL = 143  # 128 + SIGTERM: stopped on request after saving; resume with train_auto_resume


def default_scripts_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "scripts_modellink"


def scripts_dir(cfg: ExpConfig) -> Path:
    d = Path(cfg.scripts_dir) if cfg.scripts_dir else default_scripts_dir()
    if not (d / "train.sh").is_file():
        raise UserError(f"scripts_dir: {d}/train.sh not found; point scripts_dir at a copy of scripts_modellink/")
    return d


def training_env(cfg: ExpConfig, paths: RunPaths, layout: Layout) -> dict:
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
        AF_MASTER_PORT=str(layout.master_port),
        AF_MAX_RESTARTS=str(cfg.max_restarts),
    )
    return env


class TrainingFailed(Exception):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def run_training(cfg: ExpConfig, paths: RunPaths, layout: Layout) -> None:
    """Run train.sh in the foreground, forwarding SIGTERM/SIGINT so workers save and stop."""
    script = scripts_dir(cfg) / "train.sh"
    paths.logs_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["bash", str(script)], env=training_env(cfg, paths, layout))
    stopped = []

    def forward(signum, _frame):
        stopped.append(signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc == 0:
        return
    log_dir = paths.logs_dir
    if stopped:
        raise TrainingFailed(f"training stopped by {signal.Signals(stopped[0]).name}; the last checkpoint is in "
                             f"{paths.save_dir}; run again with --train_auto_resume=true to continue",
                             EXIT_STOPPED_BY_SIGNAL)
    raise TrainingFailed(f"training failed (exit code {rc}) after up to {cfg.max_restarts} restart(s); "
                         f"see the worker logs in {log_dir}", rc if rc > 0 else 1)
