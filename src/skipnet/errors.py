"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class SkipnetError(Exception):
    """A mistake in the user's input (bad name, missing file, inconsistent options)."""


class Interrupted(SkipnetError):
    """Training stopped by SIGINT / SIGTERM after writing a resumable checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int, stopped: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stopped = stopped or message  # what happened, without how to continue (a caller may say it its way)


FLOAT32_MAX = 3.4028234663852886e38


def check_value(option: str, value, test, what: str) -> None:
    """Raise a one-line error when ``value`` of ``--option`` fails ``test`` (``None``: option left unset)."""
    if value is None:
        return
    name = f"--{option.replace('_', '-')}"
    if value != value or not test(value):  # NaN fails every range
        raise SkipnetError(f"{name} must be {what}, got {value:.12g}")  # 12 digits: 1.0000001 is not "1"
    if abs(value) == float("inf"):
        raise SkipnetError(f"{name} must be finite, got {value:g}")
    if isinstance(value, float) and abs(value) > FLOAT32_MAX:  # the computations are float32: it would overflow
        raise SkipnetError(f"{name} must be at most {FLOAT32_MAX:.4g} in magnitude (float32), got {value!r}")
