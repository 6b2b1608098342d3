"""The exceptions a user can act on. Their message is shown verbatim after `error: `."""


class LmkitError(Exception):
    """Something the user can fix; the message says what and how."""


class ConfigError(LmkitError):
    """A config value, key or file is invalid."""


class DataError(LmkitError):
    """An input file is missing, empty, binary, not UTF-8, or too small."""


class CheckpointError(LmkitError):
    """A checkpoint is missing, damaged, or does not fit the command or tokenizer."""


class TrainingError(LmkitError):
    """Training cannot go on: the loss stopped being a finite number."""
