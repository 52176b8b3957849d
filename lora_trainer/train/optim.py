"""Optimizers and learning-rate schedules by name (torch-only, so the WebUI host can use them)."""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

from lora_trainer.errors import ConfigError


def build_optimizer(name: str, param_groups: List[Dict[str, Any]], lr: float, weight_decay: float):
    """An optimizer over ``param_groups`` (each may carry its own ``lr``)."""
    if name == "AdamW":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "SGD":
        return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay, momentum=0.9)
    if name == "AdamW8bit":
        try:
            import bitsandbytes as bnb
        except Exception as exc:  # ImportError, or its CUDA setup failing
            raise ConfigError(
                f"optimizer: AdamW8bit needs bitsandbytes, which could not be imported ({exc}). "
                "Install bitsandbytes or use optimizer: AdamW."
            ) from None
        return bnb.optim.AdamW8bit(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "Prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("optimizer: Prodigy needs the prodigyopt package (pip install prodigyopt).") from None
        return Prodigy(param_groups, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer: unknown optimizer {name!r}.")


def lr_lambda(name: str, warmup_steps: int, total_steps: int, num_cycles: int = 1):
    """The multiplier of the base learning rate at each step, as diffusers' schedules define them."""
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
        if name == "polynomial":
            return max(0.0, (1.0 - progress)) ** 1.0
        raise ConfigError(f"lr_scheduler: unknown schedule {name!r}.")

    return factor


def build_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int, num_cycles: int = 1):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(name, warmup_steps, total_steps, num_cycles))
