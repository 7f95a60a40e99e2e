"""User-facing errors: one clear line, exit code 2, no traceback (unless --debug).

Exit codes, of the CLI and of each training worker (engine/__init__.py says when a worker uses each):
  0  done;  1  failure (traceback), or training diverged;  2  bad input (UserError);  3  stopped by SIGTERM /
  SIGINT after saving a checkpoint.
"""

import errno
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 3


class UserError(Exception):
    """Bad input from the user (config, files, flags). The message names the key or file and the fix."""

    exit_code = EXIT_USER_ERROR


class UserErrors(UserError):
    """Several problems found together (e.g. every violated layout rule); printed one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class DiskFull(UserError):
    """An output could not be written for lack of space (or the file size limit): not the user's input, exit 1."""

    exit_code = 1


_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
         errno.EFBIG: "the file size limit was hit"}


def is_disk_full(e: OSError) -> bool:
    return e.errno in _FULL


@contextmanager
def disk_full_as_error(output) -> Iterator[None]:
    """A write refused for space inside the block becomes one DiskFull line naming `output` (the user's path) and
    the file. Callers remove their temporary files first (e.g. convert.target.staged), so nothing partial stays.
    torch.save reports the OSError of a Python file object only as the RuntimeError's context."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError) or not is_disk_full(cause):
            raise
        where = f" ({cause.filename})" if cause.filename else ""
        raise DiskFull(f"{output}: cannot write{where}: {_FULL[cause.errno]} ({cause.strerror}); nothing was kept; "
                       "free space or raise the limit and run again") from None
