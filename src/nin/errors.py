"""User-facing errors.  The CLI prints them in one line, without a traceback."""


class NinError(Exception):
    """A problem with the user's input or files (not a bug in nin).  CLI exit code 1."""

    exit_code = 1


class UsageError(NinError):
    """A bad option or argument.  CLI exit code 2, as argparse uses."""

    exit_code = 2


class DatasetError(NinError):
    """A dataset file is missing or malformed; the message names the file and what is wrong."""


class CheckpointError(NinError):
    """A checkpoint or weights file cannot be used; the message names the file and why."""
