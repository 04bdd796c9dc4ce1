"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class SkipnetError(Exception):
    """A mistake in the user's input (bad name, missing file, inconsistent options)."""


class Interrupted(SkipnetError):
    """Training stopped by SIGINT / SIGTERM after writing a resumable checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
