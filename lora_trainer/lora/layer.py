"""LoRA (and LoCon, and DoRA's low-rank part): ``ΔW = up · down · alpha / rank``.

On a Linear or 1x1 convolution ``down`` is (rank, in) and ``up`` (out, rank); on a 3x3 convolution (LoCon)
``down`` is a (rank, in, 3, 3) convolution with the base's stride and padding and ``up`` a 1x1 convolution,
as sd-scripts and LyCORIS store them: ``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``
(and ``<name>.dora_scale`` with weight decomposition).
"""

from __future__ import annotations

import math
from typing import Dict, Mapping

import torch
from torch import nn

from lora_trainer.lora.base import (
    Geometry,
    NetworkLayer,
    alpha_from,
    dora_magnitude,
    is_lora_target,
    required,
)

__all__ = ["LoRALayer", "is_lora_target"]


class LoRALayer(NetworkLayer):
    kind = "lora"
    marker_suffixes = ("lora_down.weight",)
    unsupported_suffixes = {"lora_mid.weight": "Tucker (use_tucker/use_cp)"}

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        weight_decompose: bool = False,
    ):
        super().__init__(name, base, rank, alpha, dropout, weight_decompose)
        g = self.geometry
        if g.is_conv:
            self.lora_down = nn.Conv2d(g.in_features, rank, g.kernel, g.stride, g.padding, g.dilation, bias=False)
            self.lora_up = nn.Conv2d(rank, g.out_features, 1, bias=False)
        else:
            self.lora_down = nn.Linear(g.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, g.out_features, bias=False)
        # Kaiming-uniform down, zero up: the LoRA starts as an exact no-op (as in the LoRA paper and kohya).
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        down = self.lora_down.weight.flatten(1)
        up = self.lora_up.weight.flatten(1)
        return ((up @ down) * self.scale).view(self.geometry.weight_shape)

    def kohya_tensors(self) -> Dict[str, torch.Tensor]:
        tensors = {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight}
        return self._common_tensors(tensors)

    def _load_kohya_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.lora_down.weight.copy_(tensors["lora_down.weight"].float())
        self.lora_up.weight.copy_(tensors["lora_up.weight"].float())

    @classmethod
    def from_kohya(cls, name, base, tensors, source, dropout=0.0) -> "LoRALayer":
        cls.refuse_unsupported(name, tensors, source)
        rank = int(required(tensors, name, "lora_down.weight", source).shape[0])
        decompose = dora_magnitude(tensors, Geometry.of(base), name, source)
        layer = cls(name, base, rank, alpha_from(tensors, rank), dropout, weight_decompose=decompose)
        layer.load_kohya_tensors(tensors, source)
        return layer
