"""Where the training loop runs: device, precision, gradient sync and which process writes files.

``Runtime`` is the interface the trainers call, and only that. ``LocalRuntime`` is plain torch on one device
(the WebUI host uses it: no accelerate there). ``lora_trainer.train.accelerate_runtime.AccelerateRuntime``
adds accelerate's multi-process launch for the standalone command line.
"""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager, Iterable, List, Optional, Protocol, runtime_checkable

import torch

from lora_trainer.errors import ConfigError

PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_thread_count(num_processes: int = 1) -> int:
    """All cores of this machine shared among the processes (accelerate launch would pin one each)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, num_processes))


def clip_grad_norm(params: List[torch.nn.Parameter], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` with batched (foreach) norms wherever torch has them: its default
    batches only on CUDA, and a LoRA's few hundred small gradients cost more per-tensor overhead than math."""
    try:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    except RuntimeError:  # no foreach kernels for this device in this torch
        torch.nn.utils.clip_grad_norm_(params, max_norm)


@runtime_checkable
class Runtime(Protocol):
    """What a trainer needs from where it runs. One process per device; every process runs the same steps.

    ``device``/``dtype``: where the models go and the autocast precision (``mixed_precision`` "no" keeps
    float32); ``process_index`` of ``num_processes``, the main process (index 0) alone writes files.
    """

    device: torch.device
    dtype: torch.dtype
    mixed_precision: str  # "no", "fp16" or "bf16"
    is_main_process: bool
    num_processes: int
    process_index: int

    def autocast(self) -> ContextManager[object]:
        """The forward pass's mixed-precision context."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (scaled under fp16)."""
        ...

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` across processes."""
        ...

    def clip_grad_norm(
        self, params: Iterable[torch.nn.Parameter], max_norm: float, optimizer: torch.optim.Optimizer
    ) -> None:
        """Clip the global gradient norm of ``params`` to ``max_norm`` (after unscaling under fp16)."""
        ...

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step; False when fp16 loss scaling skipped the step (inf/NaN gradients)."""
        ...

    def mean_across_processes(self, value: float) -> float:
        """``value`` averaged over every process."""
        ...

    def wait_for_everyone(self) -> None:
        """A barrier: return once every process got here."""
        ...

    def broadcast_flag(self, flag: bool) -> bool:
        """Whether any process raised ``flag``."""
        ...

    def end(self) -> None:
        """Release what the runtime holds (process groups, trackers)."""
        ...


class LocalRuntime:
    """One process, one device, plain torch. A ``Runtime``."""

    is_main_process = True
    num_processes = 1
    process_index = 0

    def __init__(self, device: Optional[torch.device] = None, mixed_precision: str = "no") -> None:
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if mixed_precision == "fp16" and self.device.type == "cpu":
            raise ConfigError("mixed_precision: fp16 needs a GPU; on the CPU use bf16 or no.")
        self.mixed_precision = mixed_precision
        self.dtype = PRECISION_DTYPES[mixed_precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if mixed_precision == "fp16" else None

    def autocast(self) -> ContextManager[object]:
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        context: ContextManager[object] = torch.autocast(self.device.type, dtype=self.dtype)
        return context

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average gradients across processes (nothing to do in one process)."""

    def clip_grad_norm(
        self, params: Iterable[torch.nn.Parameter], max_norm: float, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        clip_grad_norm(list(params), max_norm)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step; returns False when fp16 loss scaling skipped the step (inf/NaN gradients)."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return bool(self.scaler.get_scale() >= scale)

    def mean_across_processes(self, value: float) -> float:
        return value

    def wait_for_everyone(self) -> None:
        pass

    def broadcast_flag(self, flag: bool) -> bool:
        """Whether any process raised ``flag`` (one process: itself)."""
        return flag

    def end(self) -> None:
        pass
