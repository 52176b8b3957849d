"""The Flux.1 transformer in Black Forest Labs' own module layout (``double_blocks.N.img_attn.qkv``...).

Why our own module tree rather than diffusers' ``FluxTransformer2DModel``: the LoRA file format users and
hosts expect for Flux is sd-scripts', whose module names are BFL's, including the fused projections
(``img_attn.qkv``, a single block's ``linear1`` = q, k, v and the MLP input in one Linear). diffusers splits
those into separate Linears, on which a LoRA of the fused layer cannot be trained. With BFL's layout every
LoRA target is a plain Linear whose path is its kohya name, the user's ``flux1-dev.safetensors`` loads without
any conversion, and any network type (LoRA, LoCon, LoHa...) applies unchanged. The computation follows the
Flux.1 paper's architecture; ``tests/test_flux.py`` checks it against diffusers' implementation, weight for
weight, to fp32 precision.

Shapes: image tokens ``img`` (B, N, in_channels) are 2x2 patches of the 16-channel latent (``pack``), text
tokens ``txt`` (B, L, context_in_dim) the T5 hidden states, ``y`` (B, vec_in_dim) the pooled CLIP-L output,
positions ``img_ids`` (B, N, 3) / ``txt_ids`` (B, L, 3), ``timesteps`` and ``guidance`` (B,) with t in [0, 1].
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.errors import ModelLoadError


@dataclass(frozen=True)
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: Tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    @classmethod
    def from_shapes(cls, shapes: Dict[str, Tuple[int, ...]]) -> "FluxParams":
        """Read the configuration from a BFL-layout state dict's tensor shapes (full-size or tiny alike).

        The rotary axes are not in the weights: Flux splits its 128-channel heads 16/56/56; other head sizes
        split the same way (1/8, 7/16, 7/16), which needs a head size divisible by 32.
        """
        try:
            hidden, in_channels = shapes["img_in.weight"]
            if "double_blocks.0.img_attn.norm.query_norm.scale" in shapes:
                head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
                mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
            else:  # a model of single blocks only
                head_dim = shapes["single_blocks.0.norm.query_norm.scale"][0]
                mlp_hidden = shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
            params = cls(
                in_channels=in_channels,
                out_channels=shapes["final_layer.linear.weight"][0],
                vec_in_dim=shapes["vector_in.in_layer.weight"][1],
                context_in_dim=shapes["txt_in.weight"][1],
                hidden_size=hidden,
                mlp_ratio=mlp_hidden / hidden,
                num_heads=hidden // head_dim,
                depth=_count(shapes, r"double_blocks\.(\d+)\."),
                depth_single_blocks=_count(shapes, r"single_blocks\.(\d+)\."),
                axes_dim=rotary_axes(head_dim),
                qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
                guidance_embed="guidance_in.in_layer.weight" in shapes,
            )
        except KeyError as exc:
            raise ModelLoadError(f"not a Flux.1 transformer in BFL layout: it has no {exc.args[0]} tensor.") from None
        return params


def rotary_axes(head_dim: int) -> Tuple[int, int, int]:
    if head_dim % 32:
        raise ModelLoadError(f"Flux head size {head_dim} is not a multiple of 32; its rotary axes are unknown.")
    return (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)


def _count(shapes, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes for m in [regex.match(k)] if m})


# ---------------------------------------------------------------- positions and time


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0, factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``factor·t`` (cos half first), (B,) -> (B, dim) in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = factor * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(positions: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """Rotation matrices for one position axis: (B, N) -> (B, N, dim/2, 2, 2), fp64 angles, fp32 result."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
    omega = 1.0 / (theta**scale)
    angles = positions.double()[..., None] * omega
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*angles.shape, 2, 2).float()


def position_embedding(ids: torch.Tensor, axes_dim: Sequence[int], theta: int) -> torch.Tensor:
    """(B, N, len(axes_dim)) position ids -> (B, 1, N, head_dim/2, 2, 2) rotations."""
    return torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3).unsqueeze(1)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of (B, H, N, D) queries or keys."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = rotations[..., 0] * pairs[..., 0] + rotations[..., 1] * pairs[..., 1]
    return out.reshape(*x.shape).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) each -> (B, N, H·D)."""
    q, k = apply_rope(q, rotations), apply_rope(k, rotations)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


# ---------------------------------------------------------------- layers


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * self.scale.to(dtype)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    """(shift, scale, gate) triples from the conditioning vector: two for a double block, one for a single."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.chunks = 6 if double else 3
        self.lin = nn.Linear(dim, self.chunks * dim)

    def forward(self, vec: torch.Tensor):
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.chunks, dim=-1)
        return [out[i : i + 3] for i in range(0, self.chunks, 3)]


def _split_heads(qkv: torch.Tensor, heads: int):
    """(B, N, 3·H·D) -> three (B, H, N, D)."""
    b, n, _ = qkv.shape
    return qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _modulated(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (1 + scale) * norm(x) + shift


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.num_heads = num_heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(hidden, double=True))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(hidden, num_heads, qkv_bias))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(
                self,
                f"{stream}_mlp",
                nn.Sequential(
                    nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden)
                ),
            )

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, rotations: torch.Tensor):
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = self.img_mod(vec)
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = self.txt_mod(vec)
        img_q, img_k, img_v = _split_heads(
            self.img_attn.qkv(_modulated(self.img_norm1, img, img_shift1, img_scale1)), self.num_heads
        )
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_q, txt_k, txt_v = _split_heads(
            self.txt_attn.qkv(_modulated(self.txt_norm1, txt, txt_shift1, txt_scale1)), self.num_heads
        )
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)
        joint = attention(
            torch.cat([txt_q, img_q], dim=2),
            torch.cat([txt_k, img_k], dim=2),
            torch.cat([txt_v, img_v], dim=2),
            rotations,
        )
        txt_attn, img_attn = joint[:, : txt.shape[1]], joint[:, txt.shape[1] :]
        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(_modulated(self.img_norm2, img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(_modulated(self.txt_norm2, txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over the concatenated tokens; attention and MLP run in parallel from one fused Linear."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden = hidden
        self.num_heads = num_heads
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, hidden * 3 + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // num_heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        ((shift, scale, gate),) = self.modulation(vec)
        qkv, mlp = torch.split(
            self.linear1(_modulated(self.pre_norm, x, shift, scale)), [3 * self.hidden, self.mlp_hidden], dim=-1
        )
        q, k, v = _split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat([attention(q, k, v, rotations), self.mlp_act(mlp)], dim=2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


class FluxTransformer(nn.Module):
    """Flux.1 [dev] / [schnell] (and their fine-tunes such as Krea): see the module docstring."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        hidden = params.hidden_size
        if sum(params.axes_dim) != hidden // params.num_heads:
            raise ModelLoadError(f"rotary axes {params.axes_dim} do not add up to the head size.")
        self.img_in = nn.Linear(params.in_channels, hidden)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(params.vec_in_dim, hidden)
        self.guidance_in = MLPEmbedder(256, hidden) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, params.num_heads, params.mlp_ratio, params.qkv_bias) for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden, params.out_channels)
        self.gradient_checkpointing = False

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        dtype = self.img_in.weight.dtype if self.img_in.weight.is_floating_point() else img.dtype
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this Flux model is guidance-distilled ([dev]) and needs a guidance value.")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        rotations = position_embedding(torch.cat([txt_ids, img_ids], dim=1), self.params.axes_dim, self.params.theta)
        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, rotations)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, rotations)
        return self.final_layer(x[:, txt.shape[1] :], vec)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# ---------------------------------------------------------------- latents <-> tokens


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C): 2x2 patches, channel-major within a patch (BFL's ``rearrange``)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for a (height, width) latent."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(batch: int, height: int, width: int, device=None) -> torch.Tensor:
    """(B, H/2·W/2, 3) positions of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(1, -1, 3).expand(batch, -1, -1)
