"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class SkipnetError(Exception):
    """A mistake in the user's input (bad name, missing file, inconsistent options)."""
