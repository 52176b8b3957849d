"""LoRA on the q/k/v projections of a fused ``nn.MultiheadAttention`` (open_clip's text towers).

open_clip keeps q, k and v in one ``in_proj_weight`` and ``nn.MultiheadAttention`` multiplies by it inside a
functional call, so there is no Linear to put a LoRA on. ``InProjectionView`` is a parameter-less Linear over
one third of ``in_proj_weight``; ``split_projection_forward`` runs the attention with q, k, v (and the output
projection) computed through those views, so LoRA layers attached to them take effect. With no LoRA attached
the result equals the fused computation (the identity matrices it passes add nothing but exact copies).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

QKV = ("q_proj", "k_proj", "v_proj")


class InProjectionView(nn.Linear):
    """One of q/k/v of a fused in-projection, as a Linear that owns no parameters (views of the host's)."""

    def __init__(self, attention: nn.MultiheadAttention, index: int):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no weight of our own
        self.in_features = attention.embed_dim
        self.out_features = attention.embed_dim
        self.index = index
        self._attention = [attention]  # a list, so the host's module is not registered under ours

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        d = self.out_features
        return self._attention[0].in_proj_weight[self.index * d : (self.index + 1) * d]

    @property
    def bias(self) -> Optional[torch.Tensor]:  # type: ignore[override]
        bias = self._attention[0].in_proj_bias
        d = self.out_features
        return None if bias is None else bias[self.index * d : (self.index + 1) * d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def projection_views(attention: nn.MultiheadAttention) -> Sequence[InProjectionView]:
    if not getattr(attention, "_qkv_same_embed_dim", True) or attention.in_proj_weight is None:
        raise ValueError("only fused self-attention (one in_proj_weight) can be split into q/k/v views")
    return [InProjectionView(attention, i) for i in range(3)]


def split_projection_forward(attention: nn.MultiheadAttention, views: Sequence[InProjectionView]) -> Callable:
    """A replacement ``forward`` for ``attention`` that projects through ``views`` and ``attention.out_proj``."""

    def forward(
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if attention.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = views[0](query), views[1](key), views[2](value)
        eye = torch.eye(attention.embed_dim, dtype=q.dtype, device=q.device)
        # The projections are done: the functional attention gets identities for them and for the output
        # projection, which runs afterwards as a module call (a LoRA on out_proj needs its forward to run).
        out, weights = F.multi_head_attention_forward(
            q,
            k,
            v,
            attention.embed_dim,
            attention.num_heads,
            None,
            None,
            attention.bias_k,
            attention.bias_v,
            attention.add_zero_attn,
            attention.dropout,
            eye,
            None,
            training=attention.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=True,
            q_proj_weight=eye,
            k_proj_weight=eye,
            v_proj_weight=eye,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        out = attention.out_proj(out)
        if attention.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    return forward
