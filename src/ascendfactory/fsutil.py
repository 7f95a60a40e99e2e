"""File-system helpers every stage uses: atomic text writes, directory fsync, write probes, liveness of a pid.

Kept here, below every stage, so that a stage never imports another one for a file operation.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write + fsync + rename: readers see the old content or the new, never a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:  # whatever the locale: JSON and tokenizer files are UTF-8
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def probe_writable(folder: str | Path, name: str = ".write-test") -> None:
    """Create `folder` and a file in it, then remove the file: OSError now rather than after hours of work."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f"{name}-{os.getpid()}"
    probe.write_text("")
    probe.unlink()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
