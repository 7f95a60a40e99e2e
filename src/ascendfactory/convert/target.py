"""Output folders of a conversion: built in a staging folder beside the target, renamed into place when
complete, so the target never holds a half-written conversion and is never overwritten unless it is ours."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ascendfactory.convert.fingerprint import MARKER, read_marker, write_marker
from ascendfactory.errors import UserError
from ascendfactory.fsutil import fsync_dir, pid_alive


def up_to_date(target: str | Path, fp: dict, flag: str, replace_ours: bool,
               complete: Callable[[Path], bool]) -> bool:
    """True when `target` already holds this exact, complete result; UserError when it holds anything we may
    not replace. An incomplete copy of the same result (a file deleted since) is ours: it is redone.

    replace_ours: a previous result of ours with another fingerprint may be replaced (the pipeline's own
    folders); otherwise (the CLI) it is refused, since it may be the user's only copy.
    """
    marker = ours(target, flag)
    if marker is None:
        return False
    if marker == fp:
        return complete(target)
    if replace_ours:
        return False
    raise UserError(f"{flag} {target}: holds a different conversion (from {marker.get('source')}, "
                    f"{_describe(marker)}); delete it or choose another folder")


def ours(target: str | Path, flag: str) -> dict | None:
    """The marker of a conversion of ours in `target` (None: absent or empty folder); UserError for anything
    else, which is never overwritten."""
    target = Path(target)
    if not target.exists():
        return None
    if not target.is_dir():
        raise UserError(f"{flag} {target}: exists and is not a folder; choose a new folder")
    if not any(target.iterdir()):
        return None
    marker = read_marker(target)
    if marker is None:
        raise UserError(f"{flag} {target}: folder is not empty and holds no ascendfactory conversion "
                        f"({MARKER} missing); choose an empty or new folder")
    return marker


def _describe(marker: dict) -> str:
    keys = ("tp", "pp", "num_layer_list", "dtype", "padded_vocab_size", "iteration")
    return ", ".join(f"{k}={marker[k]}" for k in keys if k in marker) or "unknown layout"


@contextmanager
def staged(target: str | Path, fp: dict) -> Iterator[Path]:
    """Yields the staging folder to write into; on success it replaces the target, on failure it is removed."""
    tmp = staging(target)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit(tmp, target, fp)


def _tag() -> str:
    """host-pid: nodes sharing an output_dir convert side by side without touching each other's folders."""
    return f"{socket.gethostname()}-{os.getpid()}"


def staging(target: str | Path) -> Path:
    """A fresh staging folder beside the target (same file system, so the final rename is atomic)."""
    target = Path(target).resolve()
    host = socket.gethostname()
    for left in target.parent.glob(f".{target.name}.partial-{host}-*"):
        pid = left.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)  # an interrupted attempt on this host
    tmp = target.parent / f".{target.name}.partial-{_tag()}"
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, target: str | Path, fp: dict) -> None:
    """Marker last, then swap the staging folder into place. Nodes sharing an output_dir may commit the same
    result at the same moment: when the swap loses that race to an identical result, ours is dropped."""
    target = Path(target).resolve()
    write_marker(tmp, fp)
    for attempt in range(3):
        old = target.parent / f".{target.name}.old-{_tag()}"
        try:
            if target.exists():
                if any(target.iterdir()):
                    os.replace(target, old)
                else:
                    target.rmdir()
            os.replace(tmp, target)
        except OSError:
            if read_marker(target) == fp:
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(old, ignore_errors=True)
                return
            if attempt == 2:
                raise
            time.sleep(0.2)
            continue
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
