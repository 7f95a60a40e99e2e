"""One run per output_dir: `<output_dir>/.ascendfactory.lock`, flock()ed by every process of the run, and the
run's processes stop when the CLI dies.

`train` takes the lock exclusively (no process holds it), then shares it; torchrun's agent and every worker
take a shared lock of their own on the same file (AF_LOCK_FILE) as they start. The kernel drops a process's
lock when the process ends, however it ends, so a second `train` gets in exactly when the CLI, torchrun and
every worker are gone: the lock cannot go stale, and a killed CLI does not let a second run in while its
workers still write. The file's text (host, pid, start time) only names the holder in messages. A file that
nobody holds is taken over when it names this host; one that names another host (whose flock may not reach
this host) or that cannot be read is left alone, with the command that clears it.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from ascendfactory.errors import UserError
from ascendfactory.fsutil import pid_alive

LOCK_ENV = "AF_LOCK_FILE"
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def lock_path(output_dir: str | Path, node_rank: int = 0) -> Path:
    # One lock per node: on a shared output_dir every node of the same run writes its own.
    name = ".ascendfactory.lock" if node_rank == 0 else f".ascendfactory.node{node_rank}.lock"
    return Path(output_dir) / name


def die_with_parent(sig: int, parent: int | None = None) -> None:
    """Linux: the kernel sends `sig` to this process when its parent ends, however it ends (kept across exec,
    so it also serves as a Popen preexec_fn). `parent`: the pid expected as parent (default: the current
    one); if it is already gone, `sig` is sent now."""
    if _LIBC is None:
        return
    parent = os.getppid() if parent is None else parent
    if _LIBC.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent ended before the prctl took effect
        os.kill(os.getpid(), sig)


def share_run_lock() -> None:
    """In torchrun's agent and each worker: hold the run's lock (AF_LOCK_FILE, set by `train`) until this process
    ends (the descriptor is never closed). Launched without `train` (torchrun by hand) there is none to join."""
    path = os.environ.get(LOCK_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise UserError(f"{path}: the run's lock file is gone (deleted while the run was starting); "
                        "run `train` again") from None
    if not _try_lock(fd, fcntl.LOCK_SH, path):
        raise UserError(f"{path}: another launch holds this run's lock; run `train` again once it is refused")


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags, 0o644)
    except (FileExistsError, FileNotFoundError):
        raise
    except OSError as e:
        raise UserError(f"{path}: cannot open the lock file ({e.strerror}); fix its permissions, or use another "
                        "output_dir") from None


def _try_lock(fd: int, op: int, path: Path | str) -> bool:
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        raise UserError(f"{path}: cannot lock it ({e.strerror}); put output_dir on a file system with file "
                        "locks") from None
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the open file (its last holder may have removed it meanwhile)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _holder(fd: int) -> tuple[dict, str | None]:
    """The holder the file names, or the reason it names none."""
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return {}, "the lock file is empty"
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    if not isinstance(holder, dict) or not isinstance(holder.get("host"), str) or type(holder.get("pid")) is not int:
        return {}, f"the lock file does not name a host and a process id ({text[:80]!r})"
    return holder, None


class RunLock:
    def __init__(self, output_dir: str | Path, node_rank: int = 0):
        self.path = lock_path(output_dir, node_rank)
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> RunLock:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(3):  # another launch may create or remove the file between our steps
            try:
                fd = _open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR)
            except FileExistsError:
                self._take_over(me)
                continue
            # Locked at once (a new file: only a launch racing this one could hold it), then shared, so that
            # torchrun and the workers can join while a second launch's exclusive try fails.
            if _try_lock(fd, fcntl.LOCK_EX, self.path):
                os.write(fd, json.dumps(me).encode())
                if _try_lock(fd, fcntl.LOCK_SH, self.path):
                    self.fd = fd
                    return self
            os.close(fd)
            break
        raise UserError(f"{self.path}: another launch is taking this lock right now; wait for it, or use "
                        "another output_dir")

    def _take_over(self, me: dict) -> None:
        """Remove an existing lock file that no process holds and that a run of this host left; refuse otherwise."""
        try:
            fd = _open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            if not _try_lock(fd, fcntl.LOCK_EX, self.path):
                raise UserError(self._in_use(fd))
            if not _same_file(fd, self.path):
                return
            holder, problem = _holder(fd)
            if problem:
                raise UserError(f"{self.path}: {problem}, so the run that left it is unknown; if no run uses "
                                f"{self.path.parent} any more, clear it with: rm {self.path}")
            if holder["host"] != me["host"]:
                raise UserError(
                    f"{self.path}: output_dir was locked by pid {holder['pid']} on host {holder['host']} (since "
                    f"{holder.get('started', '?')}), which this host cannot check; if that run has ended, clear "
                    f"it with: rm {self.path}")
            logging.getLogger(__name__).warning(f"taking over {self.path}, left by pid {holder['pid']} (since "
                                                f"{holder.get('started', '?')}); no process of that run is left")
            self.path.unlink()
        finally:
            os.close(fd)

    def _in_use(self, fd: int) -> str:
        holder, problem = _holder(fd)
        if problem:
            return f"{self.path}: output_dir is in use by another run; wait for it, or use another output_dir"
        gone = holder["host"] == socket.gethostname() and not pid_alive(holder["pid"])
        note = "; that process has ended, its torchrun and workers are still stopping" if gone else ""
        return (f"{self.path}: output_dir is in use by pid {holder['pid']} on host {holder['host']} (since "
                f"{holder.get('started', '?')}){note}; wait for that run, or use another output_dir")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            # Only the last holder removes the file (after a failure the workers may still hold it).
            if _try_lock(self.fd, fcntl.LOCK_EX, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
