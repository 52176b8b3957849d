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

RESNET_UNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
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
        return cls(int(config["layers_per_block"]),
                   tuple("CrossAttn" in t for t in config["down_block_types"]))


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
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv",
                          f"output_blocks.{i * (L + 1) + L}.{2 if attention else 1}.conv", "plain"))
    return pairs


def _rename(name: str, pairs: Iterable[Tuple[str, str, str]], internal: Dict[str, Sequence[Tuple[str, str]]],
            reverse: bool) -> Optional[str]:
    for diffusers_prefix, ldm_prefix, kind in pairs:
        src, dst = (ldm_prefix, diffusers_prefix) if reverse else (diffusers_prefix, ldm_prefix)
        if name == src or name.startswith(src + "."):
            rest = name[len(src):]
            for d_name, l_name in internal.get(kind, ()):
                a, b = (l_name, d_name) if reverse else (d_name, l_name)
                if rest.startswith("." + a + ".") or rest == "." + a:
                    rest = "." + b + rest[len(a) + 1:]
                    break
            return dst + rest
    return None


class UNetNameMap:
    """Bidirectional diffusers <-> ldm/sgm name map for one UNet layout (parameters or module paths)."""

    def __init__(self, layout: UNetLayout):
        # Longest prefixes first so that e.g. "input_blocks.1.0" never matches "input_blocks.10.0".
        self.pairs = sorted(unet_block_prefixes(layout), key=lambda p: -len(p[1]))
        self.pairs_by_diffusers = sorted(self.pairs, key=lambda p: -len(p[0]))
        self.internal = {"resnet": RESNET_UNET}

    def to_ldm(self, name: str) -> Optional[str]:
        return _rename(name, self.pairs_by_diffusers, self.internal, reverse=False)

    def to_diffusers(self, name: str) -> Optional[str]:
        return _rename(name, self.pairs, self.internal, reverse=True)


def vae_block_prefixes(levels: int, layers_per_block: int) -> List[Tuple[str, str, str]]:
    pairs: List[Tuple[str, str, str]] = []
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in", "plain"),
                  (f"{part}.conv_norm_out", f"{part}.norm_out", "plain"),
                  (f"{part}.conv_out", f"{part}.conv_out", "plain"),
                  (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", "resnet"),
                  (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", "resnet"),
                  (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", "attention")]
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


class VaeNameMap:
    """diffusers AutoencoderKL <-> ldm first_stage_model names (attention weights also change shape)."""

    def __init__(self, levels: int, layers_per_block: int):
        pairs = vae_block_prefixes(levels, layers_per_block)
        self.pairs = sorted(pairs, key=lambda p: -len(p[1]))
        self.pairs_by_diffusers = sorted(pairs, key=lambda p: -len(p[0]))
        self.internal = {"resnet": RESNET_VAE, "attention": ATTENTION_VAE}

    def to_ldm(self, name: str) -> Optional[str]:
        return _rename(name, self.pairs_by_diffusers, self.internal, reverse=False)

    def to_diffusers(self, name: str) -> Optional[str]:
        return _rename(name, self.pairs, self.internal, reverse=True)


OPEN_CLIP_LAYER = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                   ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))


def open_clip_to_hf(name: str) -> Optional[str]:
    """open_clip text-tower name -> HF CLIPTextModel name (fused in_proj is split by the caller)."""
    simple = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
              "positional_embedding": "text_model.embeddings.position_embedding.weight",
              "ln_final.weight": "text_model.final_layer_norm.weight",
              "ln_final.bias": "text_model.final_layer_norm.bias",
              "text_projection": "text_projection.weight"}
    if name in simple:
        return simple[name]
    if not name.startswith("transformer.resblocks."):
        return None
    index, rest = name[len("transformer.resblocks."):].split(".", 1)
    for src, dst in OPEN_CLIP_LAYER:
        if rest.startswith(src + "."):
            return f"text_model.encoder.layers.{index}.{dst}{rest[len(src):]}"
    if rest.startswith("attn.in_proj_"):
        return f"text_model.encoder.layers.{index}.self_attn.in_proj_{rest[len('attn.in_proj_'):]}"
    return None


def hf_clip_to_open_clip(name: str) -> Optional[str]:
    """HF CLIPTextModel name -> open_clip name (q/k/v projections are fused by the caller)."""
    simple = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
              "text_model.embeddings.position_embedding.weight": "positional_embedding",
              "text_model.final_layer_norm.weight": "ln_final.weight",
              "text_model.final_layer_norm.bias": "ln_final.bias",
              "text_projection.weight": "text_projection"}
    if name in simple:
        return simple[name]
    prefix = "text_model.encoder.layers."
    if not name.startswith(prefix):
        return None
    index, rest = name[len(prefix):].split(".", 1)
    for dst, src in OPEN_CLIP_LAYER:
        if rest.startswith(src + "."):
            return f"transformer.resblocks.{index}.{dst}{rest[len(src):]}"
    return None
