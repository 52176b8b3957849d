"""diffusers' Flux transformer weights in Black Forest Labs' layout (what ``flux1-dev.safetensors`` holds).

A pure function from state dict to state dict, used to load a diffusers folder (``transformer/``) into our
BFL-layout model and, in the tests, to save a tiny diffusers-built model as a BFL file. diffusers splits what
BFL fuses (q/k/v; a single block's q/k/v and MLP input), stores the final modulation as (scale, shift) where BFL
has (shift, scale), and names everything differently; the mapping below undoes exactly that. diffusers' own
single-file converter (``convert_flux_transformer_checkpoint_to_diffusers``) is the inverse; the tests check
the round trip.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable

import torch

_RENAMES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}


def _fused(state: Dict[str, torch.Tensor], prefix: str, parts: Iterable[str], kind: str):
    tensors = [state.pop(f"{prefix}{part}.{kind}", None) for part in parts]
    if any(t is None for t in tensors):
        return None
    return torch.cat(tensors, dim=0)


def diffusers_to_bfl(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in BFL names (the input dict is consumed)."""
    out: Dict[str, torch.Tensor] = {}
    blocks = sorted({int(m.group(1)) for k in state for m in [re.match(r"transformer_blocks\.(\d+)\.", k)] if m})
    singles = sorted(
        {int(m.group(1)) for k in state for m in [re.match(r"single_transformer_blocks\.(\d+)\.", k)] if m}
    )
    for i in blocks:
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            for parts, target in (
                (("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.qkv"),
                (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.qkv"),
            ):
                fused = _fused(state, p, parts, kind)
                if fused is not None:
                    out[f"{q}{target}.{kind}"] = fused
            for source, target in _DOUBLE.items():
                if f"{p}{source}.{kind}" in state:
                    out[f"{q}{target}.{kind}"] = state.pop(f"{p}{source}.{kind}")
        for source, target in _DOUBLE_NORMS.items():
            out[q + target] = state.pop(p + source)
    for i in singles:
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            fused = _fused(state, p, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), kind)
            if fused is not None:
                out[f"{q}linear1.{kind}"] = fused
            for source, target in _SINGLE.items():
                if f"{p}{source}.{kind}" in state:
                    out[f"{q}{target}.{kind}"] = state.pop(f"{p}{source}.{kind}")
        for source, target in _SINGLE_NORMS.items():
            out[q + target] = state.pop(p + source)
    for kind in ("weight", "bias"):
        # diffusers' AdaLayerNormContinuous emits (scale, shift); BFL's LastLayer (shift, scale).
        scale, shift = state.pop(f"norm_out.linear.{kind}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale], dim=0)
        for source, target in _RENAMES.items():
            if f"{source}.{kind}" in state:
                out[f"{target}.{kind}"] = state.pop(f"{source}.{kind}")
    if state:
        raise KeyError(f"unmapped diffusers Flux weights: {sorted(state)[:5]}")
    return out
