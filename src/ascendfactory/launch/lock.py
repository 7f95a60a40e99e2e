"""One run per output_dir: a lock file holding host and pid; a stale lock (dead pid here) is taken over."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from ascendfactory.errors import UserError
from ascendfactory.fsutil import pid_alive


def lock_path(output_dir: str | Path, node_rank: int = 0) -> Path:
    # One lock per node: on a shared output_dir every node of the same run writes its own.
    name = ".ascendfactory.lock" if node_rank == 0 else f".ascendfactory.node{node_rank}.lock"
    return Path(output_dir) / name


class RunLock:
    def __init__(self, output_dir: str | Path, node_rank: int = 0):
        self.path = lock_path(output_dir, node_rank)
        self.held = False

    def acquire(self) -> "RunLock":
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1))):
                    print(f"warning: taking over stale lock {self.path} (pid {holder.get('pid')} is not running)",
                          file=sys.stderr)
                    self.path.unlink(missing_ok=True)
                    continue
                raise UserError(
                    f"{self.path}: output_dir is in use by pid {holder.get('pid')} on host {holder.get('host')} "
                    f"(since {holder.get('started', '?')}); wait for that run, or use another output_dir"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UserError(f"{self.path}: could not take the lock; remove it if no run is using this output_dir")

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"host": "?", "pid": -1}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
