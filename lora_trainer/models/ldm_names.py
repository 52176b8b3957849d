"""Parameter-name maps between diffusers models and the original (ldm / sgm / open_clip) checkpoints.

Pure functions from names to names, used four ways: loading single-file checkpoints into diffusers models,
naming SDXL LoRA keys the way sd-scripts does (sgm block names), mapping the WebUI's live compvis modules to
the diffusers-style names sd-scripts writes for SD1/SD2, and writing single-file checkpoints in the tests.

The UNet layout is described by a ``UNetLayout``: how many levels, how many resnets per level and which levels
carry attention. Every other detail of the block numbering follows from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

RESNET_UNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
RESNET_VAE = (("conv_shortcut", "nin_shortcut"),)
ATTENTION_VAE = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


@dataclass(frozen=True)
class UNetLayout:
    layers_per_block: int
    down_has_attention: Tuple[bool, ...]  # per level, top (full resolution) first

    @property
    def levels(self) -> int:
        return len(self.down_has_attention)

    @classmethod
    def from_config(cls, config: dict) -> "UNetLayout":
        return cls(int(config["layers_per_block"]), tuple("CrossAttn" in t for t in config["down_block_types"]))


def unet_block_prefixes(layout: UNetLayout) -> List[Tuple[str, str, str]]:
    """(diffusers prefix, ldm prefix, kind) for every block of the UNet; kind is resnet/attention/plain."""
    L, n = layout.layers_per_block, layout.levels
    pairs: List[Tuple[str, str, str]] = [
        ("conv_in", "input_blocks.0.0", "plain"),
        ("time_embedding.linear_1", "time_embed.0", "plain"),
        ("time_embedding.linear_2", "time_embed.2", "plain"),
        ("add_embedding.linear_1", "label_emb.0.0", "plain"),
        ("add_embedding.linear_2", "label_emb.0.2", "plain"),
        ("conv_norm_out", "out.0", "plain"),
        ("conv_out", "out.2", "plain"),
        ("mid_block.resnets.0", "middle_block.0", "resnet"),
        ("mid_block.attentions.0", "middle_block.1", "attention"),
        ("mid_block.resnets.1", "middle_block.2", "resnet"),
    ]
    for i, attention in enumerate(layout.down_has_attention):
        for j in range(L):
            block = 1 + i * (L + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{block}.0", "resnet"))
            if attention:
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{block}.1", "attention"))
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (L + 1)}.0.op", "plain"))
    for i, attention in enumerate(reversed(layout.down_has_attention)):
        for j in range(L + 1):
            block = i * (L + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{block}.0", "resnet"))
            if attention:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{block}.1", "attention"))
        if i < n - 1:
            pairs.append(
                (
                    f"up_blocks.{i}.upsamplers.0.conv",
                    f"output_blocks.{i * (L + 1) + L}.{2 if attention else 1}.conv",
                    "plain",
                )
            )
    return pairs


def _rename(
    name: str, pairs: Iterable[Tuple[str, str, str]], internal: Dict[str, Sequence[Tuple[str, str]]], reverse: bool
) -> Optional[str]:
    for diffusers_prefix, ldm_prefix, kind in pairs:
        src, dst = (ldm_prefix, diffusers_prefix) if reverse else (diffusers_prefix, ldm_prefix)
        if name == src or name.startswith(src + "."):
            rest = name[len(src) :]
            for d_name, l_name in internal.get(kind, ()):
                a, b = (l_name, d_name) if reverse else (d_name, l_name)
                if rest.startswith("." + a + ".") or rest == "." + a:
                    rest = "." + b + rest[len(a) + 1 :]
                    break
            return dst + rest
    return None


class PrefixNameMap:
    """Bidirectional diffusers <-> ldm name map from (diffusers prefix, ldm prefix, kind) block pairs."""

    def __init__(self, pairs: List[Tuple[str, str, str]], internal: Dict[str, Sequence[Tuple[str, str]]]):
        # Longest prefixes first so that e.g. "input_blocks.1.0" never matches "input_blocks.10.0".
        self.pairs = sorted(pairs, key=lambda p: -len(p[1]))
        self.pairs_by_diffusers = sorted(pairs, key=lambda p: -len(p[0]))
        self.internal = internal

    def to_ldm(self, name: str) -> Optional[str]:
        return _rename(name, self.pairs_by_diffusers, self.internal, reverse=False)

    def to_diffusers(self, name: str) -> Optional[str]:
        return _rename(name, self.pairs, self.internal, reverse=True)


class UNetNameMap(PrefixNameMap):
    """diffusers UNet2DConditionModel <-> ldm/sgm UNet names (parameters or module paths) for one layout."""

    def __init__(self, layout: UNetLayout):
        super().__init__(unet_block_prefixes(layout), {"resnet": RESNET_UNET})


def vae_block_prefixes(levels: int, layers_per_block: int) -> List[Tuple[str, str, str]]:
    pairs: List[Tuple[str, str, str]] = []
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv_in", f"{part}.conv_in", "plain"),
            (f"{part}.conv_norm_out", f"{part}.norm_out", "plain"),
            (f"{part}.conv_out", f"{part}.conv_out", "plain"),
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", "resnet"),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", "resnet"),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", "attention"),
        ]
    for i in range(levels):
        for j in range(layers_per_block):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", "resnet"))
        if i < levels - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", "plain"))
        ldm = levels - 1 - i
        for j in range(layers_per_block + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm}.block.{j}", "resnet"))
        if i < levels - 1:
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm}.upsample.conv", "plain"))
    pairs += [("quant_conv", "quant_conv", "plain"), ("post_quant_conv", "post_quant_conv", "plain")]
    return pairs


class VaeNameMap(PrefixNameMap):
    """diffusers AutoencoderKL <-> ldm first_stage_model names (attention weights also change shape)."""

    def __init__(self, levels: int, layers_per_block: int):
        super().__init__(
            vae_block_prefixes(levels, layers_per_block), {"resnet": RESNET_VAE, "attention": ATTENTION_VAE}
        )


OPEN_CLIP_LAYER = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)


# open_clip text-tower names <-> transformers CLIPTextModel names (outside the per-layer blocks).
OPEN_CLIP_TOP_LEVEL = (
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.weight", "text_model.final_layer_norm.weight"),
    ("ln_final.bias", "text_model.final_layer_norm.bias"),
    ("text_projection", "text_projection.weight"),
)
OPEN_CLIP_BLOCKS = ("transformer.resblocks.", "text_model.encoder.layers.")


def _clip_rename(name: str, reverse: bool) -> Optional[str]:
    top = {(b if reverse else a): (a if reverse else b) for a, b in OPEN_CLIP_TOP_LEVEL}
    if name in top:
        return top[name]
    src_blocks, dst_blocks = OPEN_CLIP_BLOCKS[::-1] if reverse else OPEN_CLIP_BLOCKS
    if not name.startswith(src_blocks):
        return None
    index, rest = name[len(src_blocks) :].split(".", 1)
    for open_clip_part, hf_part in OPEN_CLIP_LAYER:
        src, dst = (hf_part, open_clip_part) if reverse else (open_clip_part, hf_part)
        if rest.startswith(src + "."):
            return f"{dst_blocks}{index}.{dst}{rest[len(src) :]}"
    if not reverse and rest.startswith("attn.in_proj_"):
        return f"{dst_blocks}{index}.self_attn.in_proj_{rest[len('attn.in_proj_') :]}"
    return None


def open_clip_to_hf(name: str) -> Optional[str]:
    """open_clip text-tower name -> HF CLIPTextModel name (the fused in_proj is split by the caller)."""
    return _clip_rename(name, reverse=False)


def hf_clip_to_open_clip(name: str) -> Optional[str]:
    """HF CLIPTextModel name -> open_clip name (q/k/v projections are fused by the caller)."""
    return _clip_rename(name, reverse=True)
