"""LoHa: a Hadamard product of two low-rank matrices (FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098).

``ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha / rank``, with ``w*_a`` (out, rank) and ``w*_b``
(rank, in·kh·kw): rank² capacity for 2·rank·(in+out) parameters. Stored as LyCORIS stores it:
``<name>.hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, ``alpha`` (and ``dora_scale``); the
WebUI (``network_hada.py``), ComfyUI and LyCORIS read the scale as ``alpha / w1_b.shape[0]``.
Initialisation as in LyCORIS: ``w1_b`` and ``w2_b`` ~ N(0, 1), ``w1_a`` ~ N(0, 0.1), ``w2_a`` = 0 (ΔW = 0).
"""

from __future__ import annotations

from typing import Dict, Mapping

import torch
from torch import nn

from lora_trainer.lora.base import Geometry, NetworkLayer, alpha_from, dora_magnitude, required

SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHaLayer(NetworkLayer):
    kind = "loha"
    marker_suffixes = ("hada_w1_a",)
    unsupported_suffixes = {"hada_t1": "Tucker (use_tucker/use_cp)"}

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
        columns = g.in_features * g.kernel_size
        self.hada_w1_a = nn.Parameter(torch.empty(g.out_features, rank).normal_(std=0.1))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, columns).normal_(std=1.0))
        self.hada_w2_a = nn.Parameter(torch.zeros(g.out_features, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, columns).normal_(std=1.0))

    def delta_weight(self) -> torch.Tensor:
        w1 = self.hada_w1_a @ self.hada_w1_b
        w2 = self.hada_w2_a @ self.hada_w2_b
        return (w1 * w2 * self.scale).view(self.geometry.weight_shape)

    def kohya_tensors(self) -> Dict[str, torch.Tensor]:
        return self._common_tensors({suffix: getattr(self, suffix) for suffix in SUFFIXES})

    def _load_kohya_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for suffix in SUFFIXES:
            getattr(self, suffix).copy_(tensors[suffix].float())

    @classmethod
    def from_kohya(cls, name, base, tensors, source, dropout=0.0) -> "LoHaLayer":
        cls.refuse_unsupported(name, tensors, source)
        rank = int(required(tensors, name, "hada_w1_b", source).shape[0])
        decompose = dora_magnitude(tensors, Geometry.of(base), name, source)
        layer = cls(name, base, rank, alpha_from(tensors, rank), dropout, weight_decompose=decompose)
        layer.load_kohya_tensors(tensors, source)
        return layer
