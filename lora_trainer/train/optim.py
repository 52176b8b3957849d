"""Optimizers and learning-rate schedules by name (torch-only, so the WebUI host can use them)."""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

from lora_trainer.errors import ConfigError

IMPLEMENTATION_FLAGS = ("fused", "foreach")


def _fastest(optimizer_class, param_groups: List[Dict[str, Any]], **options):
    """``optimizer_class`` with torch's fastest implementation for these parameters: ``fused=True`` (one kernel
    for all tensors; CPU, CUDA, MPS, XPU), else ``foreach=True`` (batched ops), else the per-tensor loop.

    torch's own default picks foreach only on CUDA and the per-tensor loop elsewhere; on the CPU a LoRA's few
    hundred small tensors then cost more in per-op overhead (and thread synchronisation on a busy machine) than
    in arithmetic. The implementations compute the same update up to floating-point rounding. torch refuses
    ``fused`` with a RuntimeError on devices or dtypes it has no kernel for, so we fall back by trying.
    """
    for flags in ({"fused": True}, {"foreach": True}):
        try:
            # Fresh group dicts each try: the constructor writes its defaults into the dicts it is given.
            return optimizer_class([dict(g) for g in param_groups], **options, **flags)
        except (RuntimeError, ValueError, TypeError):  # no such kernel here (or an older torch)
            continue
    return optimizer_class([dict(g) for g in param_groups], **options)


def build_optimizer(name: str, param_groups: List[Dict[str, Any]], lr: float, weight_decay: float):
    """An optimizer over ``param_groups`` (each may carry its own ``lr``); AdamW and SGD run torch's fastest
    implementation for the parameters' device (see ``_fastest``)."""
    if name == "AdamW":
        return _fastest(torch.optim.AdamW, param_groups, lr=lr, weight_decay=weight_decay)
    if name == "SGD":
        return _fastest(torch.optim.SGD, param_groups, lr=lr, weight_decay=weight_decay, momentum=0.9)
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


def load_optimizer_state(optimizer, state: Dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, keeping this run's implementation flags (``fused``/``foreach``).

    torch copies every group setting from the saved state, flags included: a state saved by an older version
    (per-tensor loop) would otherwise resume slowly, and one saved with ``fused`` on a GPU would fail to step
    on a device without a fused kernel.
    """
    flags = [{k: group[k] for k in IMPLEMENTATION_FLAGS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)


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
