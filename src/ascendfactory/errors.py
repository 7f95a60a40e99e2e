"""User-facing errors: one clear line, exit code 2, no traceback (unless --debug)."""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user (config, files, flags). The message names the key or file and the fix."""

    exit_code = EXIT_USER_ERROR


class UserErrors(UserError):
    """Several problems found together (e.g. every violated layout rule); printed one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
