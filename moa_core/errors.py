"""Errors raised for bad user input. Each message names the input, what was found, and the fix."""


class MoAError(ValueError):
    """Base class: ComfyUI shows the message on the node that raised it."""


class WeightsFormatError(MoAError):
    """The file is not a valid MoA weights file."""


class WeightsMismatchError(MoAError):
    """Valid MoA weights that do not fit the model or image encoder they are used with."""


class ConditioningError(MoAError):
    """A conditioning or prompt that the MoA patch cannot bind subjects to."""


class DataError(MoAError):
    """A training sample or dataset the trainer cannot read."""


class ConfigError(MoAError):
    """A trainer config (TOML) with a missing, unknown or out-of-range setting."""


class OptionsError(MoAError):
    """An MoA option (strength, schedule window, rows, sparse threshold, region) out of its range."""
