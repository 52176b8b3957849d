"""Checkpoint retention: keep only the recent intermediate saves (``save_last_n_steps``, ``save_last_n_epochs``).

sd-scripts' rules (``get_remove_step_no``, ``get_remove_epoch_no``): a save made because of ``save_steps`` is
kept while it is at most ``save_last_n_steps`` steps old; of the saves made at the end of an epoch because of
``save_every_n_epochs``, the last ``save_last_n_epochs`` are kept. A save that is both is kept while either
rule keeps it. Each save is the ``<name>-stepNNNNNNNN.safetensors`` LoRA and its ``state-<step>`` folder; the
final save and a cancelled run's save are never removed.

``CheckpointRetention`` is a training callback: after each save it deletes what the rules no longer keep,
this run's saves and the earlier ones of the same name found in ``output_dir`` (a resumed run's), classified
by the same rules from their step numbers.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from lora_trainer.train.callbacks import StepInfo, TrainingCallback


@dataclass(frozen=True)
class SavedCheckpoint:
    step: int
    by_steps: bool  # saved because of save_steps
    by_epochs: bool  # saved at an epoch's end because of save_every_n_epochs


def expired(
    saves: Sequence[SavedCheckpoint], now: int, last_n_steps: Optional[int], last_n_epochs: Optional[int]
) -> List[SavedCheckpoint]:
    """The saves the rules (see the module docstring) no longer keep at step ``now``."""
    epoch_saves = sorted(s.step for s in saves if s.by_epochs)
    kept_epoch_saves = set(epoch_saves[-last_n_epochs:]) if last_n_epochs else set(epoch_saves)
    result = []
    for save in saves:
        reasons = []
        if save.by_steps:
            reasons.append(last_n_steps is None or save.step >= now - last_n_steps)
        if save.by_epochs:
            reasons.append(save.step in kept_epoch_saves)
        if reasons and not any(reasons):
            result.append(save)
    return result


class CheckpointRetention(TrainingCallback):
    """Deletes expired intermediate saves after each save (main process only; see the module docstring).

    ``lora_path(step)`` and ``state_path(step)`` name a save's files; ``steps_per_epoch`` classifies the saves
    of an earlier run found on disk.
    """

    def __init__(
        self,
        *,
        output_dir: str,
        output_name: str,
        save_steps: Optional[int],
        save_every_n_epochs: Optional[int],
        last_n_steps: Optional[int],
        last_n_epochs: Optional[int],
        lora_path: Callable[[int], str],
        state_path: Callable[[int], str],
        log: Callable[[str], None],
    ) -> None:
        self.output_dir = output_dir
        self.output_name = output_name
        self.save_steps = save_steps
        self.save_every_n_epochs = save_every_n_epochs
        self.last_n_steps = last_n_steps
        self.last_n_epochs = last_n_epochs
        self.lora_path = lora_path
        self.state_path = state_path
        self.log = log
        self.saves: Dict[int, SavedCheckpoint] = {}
        self.epoch_ends: Dict[int, int] = {}  # step -> the epoch that step finished
        self.removed: List[str] = []

    def _classify(self, step: int, epoch: Optional[int]) -> SavedCheckpoint:
        """Why the save at ``step`` was made; ``epoch``: the epoch that step finished (None: not an epoch end)."""
        by_steps = bool(self.save_steps) and step % (self.save_steps or 1) == 0
        by_epochs = (
            epoch is not None and bool(self.save_every_n_epochs) and epoch % (self.save_every_n_epochs or 1) == 0
        )
        return SavedCheckpoint(step, by_steps, by_epochs)

    def on_train_start(self, total_steps, start_step, summary):
        """Adopt the saves an earlier run of this name left (a resume): its LoRA files up to ``start_step``; one
        not on the save_steps grid is taken for an epoch save."""
        pattern = re.compile(re.escape(self.output_name) + r"-step(\d{8})\.safetensors$")
        try:
            names = os.listdir(self.output_dir)
        except OSError:
            return
        for name in names:
            match = pattern.match(name)
            step = int(match.group(1)) if match else start_step + 1
            if step <= start_step:
                by_steps = bool(self.save_steps) and step % self.save_steps == 0
                self.saves[step] = SavedCheckpoint(step, by_steps, not by_steps and bool(self.save_every_n_epochs))

    def on_step_end(self, info: StepInfo) -> None:
        if info.epoch_finished:
            self.epoch_ends[info.step] = info.epoch

    def on_save(self, path: str, step: int) -> None:
        if path == self.lora_path(step):
            save = self._classify(step, self.epoch_ends.get(step))
            if not (save.by_steps or save.by_epochs):
                return  # a cancel save
            self.saves[step] = save
        # else the final save, never removed: it stands for the step save sd-scripts also writes at the last
        # step, so the rules apply at that step as they would after that save
        for old in expired(list(self.saves.values()), step, self.last_n_steps, self.last_n_epochs):
            self._remove(old.step)

    def _remove(self, step: int) -> None:
        self.saves.pop(step, None)
        for path in (self.lora_path(step), self.state_path(step)):
            try:
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
                else:
                    continue
            except OSError as exc:
                self.log(f"could not remove the old save {path}: {exc}")
                continue
            self.removed.append(path)
            self.log(f"removed the old save {path}")
