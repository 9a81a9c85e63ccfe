"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class Exl2Error(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
