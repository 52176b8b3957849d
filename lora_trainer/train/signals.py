"""Ctrl+C and SIGTERM for command-line runs: the first one stops training after the current step, which then
saves the LoRA and a resumable state as Cancel does in the tab; a second one quits at once.

Signal handlers are process-wide, so only the command line installs them, for the length of one run, and puts
the previous handlers back afterwards (the WebUI and the standalone UI stop training with Cancel instead).
Files are written under temporary names and renamed (``io/atomic.py``), so quitting at once leaves no partial
file behind either.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable, Dict, Optional

from lora_trainer.train.callbacks import TrainingCallback

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class StopOnSignals(TrainingCallback):
    """Use as ``with StopOnSignals() as stop:`` around a run and pass ``stop`` as one of its callbacks.

    Before the first step nothing would be saved, so a signal then quits at once (KeyboardInterrupt).
    During training the first signal makes ``should_stop`` true; a second raises KeyboardInterrupt.
    """

    def __init__(self, notify: Callable[[str], None] = _to_stderr) -> None:
        self.notify = notify
        self.received: Optional[int] = None  # the first signal's number
        self.training = False
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopOnSignals":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, _frame) -> None:
        if self.received is not None or not self.training:
            raise KeyboardInterrupt
        self.received = number
        name = signal.Signals(number).name
        self.notify(
            f"\n{name}: stopping after this step to save the LoRA and a resumable state; "
            "press Ctrl+C again to quit at once without saving."
        )

    @property
    def exit_status(self) -> Optional[int]:
        """The shell's status for a run ended by the signal (128 + its number), None when none came."""
        return None if self.received is None else 128 + self.received

    def on_train_start(self, total_steps, start_step, summary) -> None:
        self.training = True

    def on_train_end(self, info, status) -> None:
        self.training = False

    def should_stop(self) -> bool:
        return self.received is not None
