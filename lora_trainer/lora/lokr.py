"""LoKr: a Kronecker product of a small full matrix and a low-rank one (KronA, Edalati et al. 2022,
arXiv:2212.10650, as LyCORIS implements it).

With ``out = a·b`` and ``in = c·d`` (each split by ``factorization``), ``ΔW = w1 ⊗ w2 · scale`` where ``w1`` is
(a, c) and ``w2`` (b, d[, kh, kw]) is ``w2_a · w2_b`` with ``w2_a`` (b, rank) and ``w2_b`` (rank, d·kh·kw), or a
full ``w2`` when the rank is at least half of max(b, d) (LyCORIS' rule). The scale is ``alpha / rank`` for a
low-rank ``w2`` and 1 for a full one (the WebUI's ``network_lokr.py``, ComfyUI and LyCORIS all read it so; we
store alpha = rank then). Keys as LyCORIS writes them: ``<name>.lokr_w1``, ``lokr_w2`` or ``lokr_w2_a`` /
``lokr_w2_b``, ``alpha`` (and ``dora_scale``). Initialisation as in LyCORIS: ``w1`` and ``w2_a``
Kaiming-uniform, ``w2_b`` (or a full ``w2``) zero, so ΔW starts at 0.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from lora_trainer.errors import ModelLoadError
from lora_trainer.lora.base import Geometry, NetworkLayer, alpha_from, dora_magnitude, required


def factorization(dimension: int, factor: int = -1) -> Tuple[int, int]:
    """Split ``dimension`` into ``(m, n)``, ``m <= n``, ``m * n == dimension``, the way LyCORIS does.

    A positive ``factor`` that divides ``dimension`` is taken as one side. Otherwise ``m`` is the largest
    divisor not above ``sqrt(dimension)`` nor above ``factor`` (no limit for -1): the most balanced split the
    limit allows. E.g. 320 -> (16, 20); 320 with factor 8 -> (8, 40); 127 -> (1, 127).
    """
    if factor > 0 and dimension % factor == 0:
        m, n = sorted((factor, dimension // factor))
        return m, n
    limit = dimension if factor <= 0 else factor
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0 and d <= limit)
    return m, dimension // m


class LoKrLayer(NetworkLayer):
    kind = "lokr"
    marker_suffixes = ("lokr_w1", "lokr_w1_a")
    unsupported_suffixes = {
        "lokr_w1_a": "decomposed w1 (decompose_both)",
        "lokr_t2": "Tucker (use_tucker/use_cp)",
    }

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        weight_decompose: bool = False,
        factor: int = -1,
        *,
        split: Optional[Tuple[int, int, bool]] = None,
    ):
        """``split`` = (a, c, low-rank w2) fixes the factor shapes (continuing a file); otherwise they follow
        from ``factor`` and ``rank``."""
        super().__init__(name, base, rank, alpha, dropout, weight_decompose)
        g = self.geometry
        if split is None:
            a, b = factorization(g.out_features, factor)
            c, d = factorization(g.in_features, factor)
            low_rank = rank < max(b, d) / 2
        else:
            a, c, low_rank = split
            b, d = g.out_features // a, g.in_features // c
        self.factors = (a, b, c, d)
        self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if low_rank:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, d * g.kernel_size))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *g.kernel))
            self.alpha = float(rank)  # a full w2 is applied at scale 1 by every loader
        self.low_rank = low_rank

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.low_rank else 1.0

    def _w2(self) -> torch.Tensor:
        a, b, c, d = self.factors
        if not self.low_rank:
            return self.lokr_w2
        return (self.lokr_w2_a @ self.lokr_w2_b).view(b, d, *self.geometry.kernel)

    def delta_weight(self) -> torch.Tensor:
        w1 = self.lokr_w1
        if self.geometry.is_conv:
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, self._w2()) * self.scale).view(self.geometry.weight_shape)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.geometry.is_conv:
            return super().delta(x)
        # (w1 ⊗ w2) x without building the product: x as (c, d) blocks, w2 on d, then w1 on c.
        a, b, c, d = self.factors
        blocks = x.reshape(*x.shape[:-1], c, d)
        if self.low_rank:
            inner = (blocks @ self.lokr_w2_b.t()) @ self.lokr_w2_a.t()
        else:
            inner = blocks @ self.lokr_w2.t()
        out = torch.einsum("ac,...cb->...ab", self.lokr_w1, inner)
        return out.reshape(*x.shape[:-1], a * b) * self.scale

    def kohya_tensors(self) -> Dict[str, torch.Tensor]:
        tensors = {"lokr_w1": self.lokr_w1}
        if self.low_rank:
            tensors.update(lokr_w2_a=self.lokr_w2_a, lokr_w2_b=self.lokr_w2_b)
        else:
            tensors["lokr_w2"] = self.lokr_w2
        return self._common_tensors(tensors)

    def _load_kohya_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for suffix in self.kohya_tensors():
            if suffix not in ("alpha", "dora_scale"):
                getattr(self, suffix).copy_(tensors[suffix].float())

    def load_kohya_tensors(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        super().load_kohya_tensors(tensors, source)
        if not self.low_rank:
            self.alpha = float(self.rank)

    @classmethod
    def from_kohya(cls, name, base, tensors, source, dropout=0.0) -> "LoKrLayer":
        cls.refuse_unsupported(name, tensors, source)
        g = Geometry.of(base)
        a, c = required(tensors, name, "lokr_w1", source).shape
        low_rank = "lokr_w2_a" in tensors
        if g.out_features % a or g.in_features % c:
            raise ModelLoadError(
                f"{source}: {name}.lokr_w1 has shape {(a, c)}, which does not divide the module's "
                f"{g.out_features}x{g.in_features} weight."
            )
        if low_rank:
            rank = int(tensors["lokr_w2_a"].shape[1])
            alpha = alpha_from(tensors, rank)
        else:
            w2 = required(tensors, name, "lokr_w2", source)
            rank = max(int(w2.shape[0]), int(w2.shape[1]))  # no rank in a full factor; scale is 1
            alpha = float(rank)
        decompose = dora_magnitude(tensors, g, name, source)
        layer = cls(name, base, rank, alpha, dropout, decompose, split=(int(a), int(c), low_rank))
        layer.load_kohya_tensors(tensors, source)
        return layer
