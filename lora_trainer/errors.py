"""Errors a user can act on. Each message names the file, key or value at fault and what to do."""

import sys
from typing import Callable


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


def exit_status_of(action: Callable[[], int]) -> int:
    """Run a command-line action; problems a user can fix become one ``error: ...`` line and exit status 2,
    Ctrl+C status 130. Here (not in ``cli``) so that every command's module can use it without a cycle."""
    try:
        return action()
    except LoraTrainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
