"""One LoRA layer: ``y = base(x) + up(down(dropout(x))) * alpha / rank``.

The base module is neither replaced nor renamed: we set an instance-level ``forward`` on it and remove it on
detach, as sd-scripts does. That keeps the host's module tree, parameter names and state dict untouched,
which the WebUI (and Forge, whose Linear looks its weights up by name) rely on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_MISSING = object()


class LoRALayer(nn.Module):
    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.name = name
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            in_features, out_features = base.in_channels, base.out_channels
            self.lora_down = nn.Conv2d(in_features, rank, 1, bias=False)
            self.lora_up = nn.Conv2d(rank, out_features, 1, bias=False)
        else:
            in_features, out_features = base.in_features, base.out_features
            self.lora_down = nn.Linear(in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_features, bias=False)
        # Kaiming-uniform down, zero up: the LoRA starts as an exact no-op (as in the LoRA paper and kohya).
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.multiplier = 1.0
        self._base = [base]  # a list, so the base is not registered as our submodule
        self._saved_forward: object = _MISSING
        self._base_forward = None

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        weight_dtype = self.lora_down.weight.dtype
        h = self.lora_up(self.lora_down(self.dropout(x.to(weight_dtype))))
        return h * (self.scale * self.multiplier)

    def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self._base_forward(x, *args, **kwargs)
        return out + self.delta(x).to(out.dtype)

    @property
    def attached(self) -> bool:
        return self._base_forward is not None

    def attach(self) -> None:
        if self.attached:
            return
        base = self.base
        self._saved_forward = base.__dict__.get("forward", _MISSING)
        self._base_forward = base.forward
        base.forward = self._forward

    def detach(self) -> None:
        if not self.attached:
            return
        base = self.base
        if self._saved_forward is _MISSING:
            base.__dict__.pop("forward", None)
        else:
            base.forward = self._saved_forward
        self._saved_forward = _MISSING
        self._base_forward = None


def is_lora_target(module: nn.Module) -> bool:
    """Linears and 1x1 convolutions (SD1's proj_in/proj_out), by class name so host classes qualify too."""
    if isinstance(module, nn.Conv2d):
        return tuple(module.kernel_size) == (1, 1)
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Linear" and hasattr(module, "in_features") and hasattr(module, "out_features")
    )
