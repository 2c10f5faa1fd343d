"""Errors the harness reports as one clear line (``error: ...``) instead of a traceback."""


class HarnessError(Exception):
    """Base class: a problem the user can fix; the message names the key or file and the fix."""


class ConfigError(HarnessError):
    """A config value or combination of values is invalid."""


class DataError(HarnessError):
    """A data path, file, column or corpus size is unusable."""


class CheckpointError(HarnessError):
    """A checkpoint cannot be written or does not match the run."""


class NonFiniteError(HarnessError):
    """A non-finite loss or gradient norm under ``train.nonfinite=abort`` (or too many skipped steps)."""
