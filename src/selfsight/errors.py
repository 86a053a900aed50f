"""Errors a user can act on. The command line prints them as one line, without a traceback."""


class SelfsightError(Exception):
    """Base class: a problem with the user's input or environment, with a message naming the cause."""


class DataError(SelfsightError):
    """A data path is missing, empty, unreadable, or has too many corrupt files."""


class ConfigError(SelfsightError):
    """An option, a backbone name or a method/backbone combination is not valid."""


class CheckpointError(SelfsightError):
    """No usable checkpoint where one was asked for."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds objects other than tensors and plain values: loading it could run code."""


class TrainingError(SelfsightError):
    """Training cannot go on (for example a NaN or infinite loss)."""
