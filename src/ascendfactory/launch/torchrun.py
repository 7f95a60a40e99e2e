"""Launch training through `<scripts_dir>/train.sh`, which execs torchrun (one process per device).

Restarts are torchrun's own (--max-restarts): when a worker dies, every worker of the node is restarted
and the engine auto-resumes from the newest valid checkpoint. Logs go under <output_dir>/logs/.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ascendfactory.config.paths import RunPaths
from ascendfactory.config.schema import ExpConfig
from ascendfactory.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from ascendfactory.layout import RunLayout



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
    print(f"[ascendfactory] master_port {layout.master_port} is busy on this single node; using {port}", flush=True)
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
    )
    return env


class TrainingFailed(Exception):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
# A worker's one-line reason (bad input, divergence), as torchrun's --tee prints it.
_ERROR = re.compile(r"^(?:\[\w+\]:)?error: (.*)$")


def _cause(line: str | None, error: str | None) -> str:
    m = _FAILED.search(line or "")
    if not m:
        return "a worker failed"
    code, rank = int(m.group(1)), m.group(2)
    if code < 0:
        return f"local rank {rank} was killed by {signal.Signals(-code).name}"
    what = "stopped on bad input" if code == EXIT_USER_ERROR else f"exited with code {code}"
    return f"local rank {rank} {what}" + (f" ({error})" if error else "")


def _worker_log(logs_dir: Path, local_rank: str | None) -> Path:
    """The newest torchrun attempt's stderr of the failed rank (or the attempt folder)."""
    attempts = sorted((logs_dir / "torchrun").glob("*/attempt_*"), key=lambda p: p.stat().st_mtime)
    if not attempts:
        return logs_dir
    log = attempts[-1] / (local_rank or "0") / "stderr.log"
    return log if log.exists() else attempts[-1]


def run_training(cfg: ExpConfig, paths: RunPaths, layout: RunLayout) -> None:
    """Run train.sh in the foreground; its output goes to the console and to logs/train-node{r}.log.
    SIGTERM/SIGINT are forwarded so that workers save and stop."""
    script = scripts_dir(cfg) / "train.sh"
    paths.logs_dir.mkdir(parents=True, exist_ok=True)
    node_log = paths.logs_dir / f"train-node{layout.node_rank}.log"
    proc = subprocess.Popen(["bash", str(script)], env=training_env(cfg, paths, layout), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    stopped, last_failure, last_error = [], None, None

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
                if _FAILED.search(line):
                    last_failure = line
                elif m := _ERROR.match(line.rstrip("\n")):
                    last_error = m.group(1)
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc == 0:
        return
    if stopped:
        raise TrainingFailed(f"training stopped by {signal.Signals(stopped[0]).name}; the last checkpoint is in "
                             f"{paths.save_dir}; run again with train_auto_resume to continue", EXIT_PREEMPTED)
    m = _FAILED.search(last_failure or "")
    user_error = bool(m) and int(m.group(1)) == EXIT_USER_ERROR
    raise TrainingFailed(f"{_cause(last_failure, last_error)} after {cfg.max_restarts} restart(s); see "
                         f"{_worker_log(paths.logs_dir, m.group(2) if m else None)} and {node_log}",
                         EXIT_USER_ERROR if user_error else (rc if rc > 0 else 1))
