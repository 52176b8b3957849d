"""The standalone runtime: accelerate for device placement, mixed precision and multi-process launch.

We do not wrap the model in DistributedDataParallel: the trainable LoRA weights are not registered in the
model (they wrap ``forward``), so we average their gradients ourselves with one all-reduce per step.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from lora_trainer.train.runtime import LocalRuntime, default_thread_count


class AccelerateRuntime(LocalRuntime):
    """A ``Runtime`` on accelerate's device, one process per ``accelerate launch`` rank."""

    def __init__(self, mixed_precision: str = "no", num_threads: Optional[int] = None) -> None:
        from accelerate import Accelerator

        self.accelerator = Accelerator(mixed_precision=mixed_precision)
        # Device, precision, the fp16-on-CPU refusal and the loss scaler are the base class's.
        super().__init__(self.accelerator.device, mixed_precision)
        self.is_main_process = self.accelerator.is_main_process
        self.num_processes = self.accelerator.num_processes
        self.process_index = self.accelerator.process_index
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads or default_thread_count(self.num_processes))

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        if self.num_processes == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.num_processes
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean_across_processes(self, value: float) -> float:
        if self.num_processes == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item() / self.num_processes)

    def broadcast_flag(self, flag: bool) -> bool:
        if self.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def end(self) -> None:
        self.accelerator.end_training()
