"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class SkipnetError(Exception):
    """A mistake in the user's input (bad name, missing file, inconsistent options)."""


class Interrupted(SkipnetError):
    """Training stopped by SIGINT / SIGTERM after writing a resumable checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int, stopped: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stopped = stopped or message  # what happened, without how to continue (a caller may say it its way)


def check_value(option: str, value, test, what: str) -> None:
    """Raise a one-line error when ``value`` of ``--option`` fails ``test`` (``None``: option left unset)."""
    if value is None:
        return
    if value != value or not test(value):  # NaN fails every range
        raise SkipnetError(f"--{option.replace('_', '-')} must be {what}, got {value:g}")
    if abs(value) == float("inf"):
        raise SkipnetError(f"--{option.replace('_', '-')} must be finite, got {value:g}")
