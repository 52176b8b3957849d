"""The validation loss: the training loss on held-out images at fixed timesteps and fixed noise.

As sd-scripts' ``train_network`` measures it: every validation batch at four timesteps spread evenly over the
schedule (200, 400, 600, 800 of 1000), with the noise drawn from a generator seeded anew (``validation_seed``,
else ``seed``) at every measurement, with LoRA dropout off and no gradients. Only the LoRA changes between two
measurements, so the curve shows what training did to held-out data (with a learning rate of 0 it is flat).
sd-scripts reports running averages; this reports each measurement's plain mean, under ``loss/validation``.

``ValidationLoss`` is a training callback: at its steps (``validate_every_n_steps``) and epoch ends
(``validate_every_n_epochs``, every epoch when unset) it measures and adds the value to the step's
``StepInfo.extra``, which the callbacks after it (TensorBoard, the tab's loss plot) read.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from lora_trainer.train.callbacks import VALIDATION_LOSS, StepInfo, TrainingCallback

METRIC = VALIDATION_LOSS
TIMESTEP_COUNT = 4  # sd-scripts' NUM_VALIDATION_TIMESTEPS

# loss(indices, timesteps (B,), generator) -> the batch's mean loss at those timesteps
BatchLoss = Callable[[Sequence[int], torch.Tensor, torch.Generator], torch.Tensor]


def validation_timesteps(num_train_timesteps: int, count: int = TIMESTEP_COUNT) -> List[int]:
    """``count`` timesteps evenly inside (0, T): sd-scripts' ``linspace(0, T, count + 2)[1:-1]``."""
    return [int(t) for t in np.linspace(0, num_train_timesteps, count + 2, dtype=int)[1:-1]]


@torch.no_grad()
def measure_validation_loss(
    batches: Sequence[Sequence[int]],
    loss: BatchLoss,
    timesteps: Sequence[float],
    seed: int,
    device: torch.device,
) -> float:
    """The mean over ``batches`` and ``timesteps`` of ``loss``, the noise drawn from one generator seeded with
    ``seed`` (so two measurements of the same weights are equal)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    values = []
    for indices in batches:
        for t in timesteps:
            # An int timestep stays an integer index (DDPM); a float one is a flow-matching noise level.
            fixed = torch.full((len(indices),), t, device=device)
            values.append(float(loss(indices, fixed, generator)))
    return float(np.mean(values)) if values else float("nan")


class ValidationLoss(TrainingCallback):
    """Measures the validation loss on schedule (see the module docstring).

    ``measure()`` returns this process's share of the measurement averaged over processes (every process
    must call it together); ``network`` goes to eval mode meanwhile; ``log`` gets one line per measurement.
    """

    def __init__(
        self,
        measure: Callable[[], float],
        network: torch.nn.Module,
        every_n_steps: Optional[int],
        every_n_epochs: Optional[int],
        log: Callable[[str], None],
    ) -> None:
        self.measure = measure
        self.network = network
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.log = log
        self.history: List[tuple] = []  # (step, value)

    def due(self, info: StepInfo) -> bool:
        by_steps = bool(self.every_n_steps) and info.step % (self.every_n_steps or 1) == 0
        by_epochs = info.epoch_finished and info.epoch % (self.every_n_epochs or 1) == 0
        return by_steps or by_epochs

    def on_step_end(self, info: StepInfo) -> None:
        if not self.due(info):
            return
        was_training = self.network.training
        self.network.eval()
        try:
            value = self.measure()
        finally:
            self.network.train(was_training)
        info.extra[METRIC] = value
        self.history.append((info.step, value))
        self.log(f"validation loss at step {info.step}: {value:.6f}")
