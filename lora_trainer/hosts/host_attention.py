"""PyTorch's fused attention for the host UNet's ldm/sgm ``CrossAttention`` layers, for the length of a run.

The WebUI picks a cross-attention implementation per install (its "Cross attention optimization" setting
replaces ``CrossAttention.forward`` on the class): torch's ``scaled_dot_product_attention`` ("sdp"), xformers,
or one of the older einsum-based ones (ldm's own, "Doggettx", "V1", "InvokeAI", "sub-quadratic"), which
build the full attention matrix and cost more per training step. Where a layer runs one of the older ones we
set an instance-level ``forward`` that computes the same attention with ``scaled_dot_product_attention``
(same heads, same softmax scale ``dim_head**-0.5``, no mask); the host's class-level choice is untouched, and
removing our instance attribute (``ModuleChanges.undo``) restores it exactly.
"""

from __future__ import annotations

from typing import Callable, Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn

CROSS_ATTENTION_CLASSES = ("CrossAttention", "MemoryEfficientCrossAttention")  # ldm, sgm (same names)
# What a fused implementation calls (torch's SDPA, xformers), and the WebUI's names for its fused ones.
FUSED_CALLS = ("scaled_dot_product_attention", "memory_efficient_attention")
FUSED_NAME_PARTS = ("scaled_dot_product", "xformers", "sdp")


def is_cross_attention(module: nn.Module) -> bool:
    """An ldm/sgm attention layer: ``heads``, ``to_q``/``to_k``/``to_v`` Linears and a ``to_out`` stack."""
    return type(module).__name__ in CROSS_ATTENTION_CLASSES and all(
        hasattr(module, name) for name in ("heads", "to_q", "to_k", "to_v", "to_out")
    )


def runs_fused_attention(module: nn.Module) -> bool:
    """Whether the layer's current ``forward`` already uses a fused kernel (by the functions it calls or, for
    the WebUI's wrappers that delegate, by its name)."""
    forward = getattr(module.forward, "__func__", module.forward)
    code = getattr(forward, "__code__", None)
    if code is not None and any(name in code.co_names for name in FUSED_CALLS):
        return True
    name = getattr(forward, "__name__", "").lower()
    return any(part in name for part in FUSED_NAME_PARTS)


def _uses_standard_scale(module: nn.Module) -> bool:
    dim_head = module.to_q.out_features // module.heads
    scale = getattr(module, "scale", dim_head**-0.5)
    return abs(float(scale) - dim_head**-0.5) <= 1e-6 * dim_head**-0.5


def sdpa_forward(module: nn.Module, host_forward: Callable) -> Callable:
    """A ``forward`` for ``module`` computing softmax(q k^T / sqrt(d)) v with ``scaled_dot_product_attention``.

    Inputs: ``x`` (B, N, C), ``context`` (B, M, C') or None for self-attention. A mask or any non-default extra
    argument (sgm's ``additional_tokens``, ``n_times_crossframe_attn_in_self``) goes to ``host_forward``.
    The projections are module calls, so LoRA layers attached to them take effect.
    """

    def forward(x: torch.Tensor, context=None, mask=None, **extra):
        if mask is not None or any(value not in (None, 0) for value in extra.values()):
            return host_forward(x, context, mask, **extra)
        context = x if context is None else context
        batch, heads = x.shape[0], module.heads
        q, k, v = (
            t.reshape(batch, t.shape[1], heads, t.shape[-1] // heads).transpose(1, 2)
            for t in (module.to_q(x), module.to_k(context), module.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return module.to_out(out.transpose(1, 2).reshape(batch, x.shape[1], -1))

    return forward


def slow_attention_layers(unet: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """The UNet's attention layers that do not yet run a fused kernel and can switch to SDPA exactly."""
    if not hasattr(F, "scaled_dot_product_attention"):  # torch < 2.0
        return
    for path, module in unet.named_modules():
        if is_cross_attention(module) and not runs_fused_attention(module) and _uses_standard_scale(module):
            yield path, module
