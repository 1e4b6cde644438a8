"""Every error nin raises for a user's mistake.  The CLI prints them in one line, without a traceback."""


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


class ExportError(CheckpointError):
    """An export could not be written, or does not reproduce the PyTorch model."""


class ImageError(NinError):
    """A file that cannot be used as an image; the message names the file."""


class TrainingDiverged(NinError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


class RunLocked(UsageError):
    """Another live process is training in the run folder."""


class UnknownModelError(UsageError, ValueError):
    """A model name that is not registered."""


class InputTooSmallError(UsageError, ValueError):
    """The input is smaller than (or has other channels than) what the network can take."""
