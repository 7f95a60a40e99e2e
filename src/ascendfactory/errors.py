"""User-facing errors: one clear line, exit code 2, no traceback (unless --debug).

Exit codes, of the CLI and of each training worker (engine/__init__.py says when a worker uses each):
  0  done;  1  failure (traceback), or training diverged;  2  bad input (UserError);  3  stopped by SIGTERM /
  SIGINT after saving a checkpoint.
"""

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
