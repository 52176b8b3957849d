"""Errors a user can act on. Each message names the file, key or value at fault and what to do."""


class LoraTrainerError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(LoraTrainerError):
    """A config key or value is wrong."""


class DatasetError(LoraTrainerError):
    """The training data cannot be used (missing folder, no usable images, malformed rows)."""


class ModelLoadError(LoraTrainerError):
    """The base model or a LoRA file cannot be loaded."""


class TrainingStopped(LoraTrainerError):
    """Training stopped early (NaN loss, out of memory); the last good save is kept."""


class TrainingCancelled(LoraTrainerError):
    """The user cancelled; the last good save is kept."""
