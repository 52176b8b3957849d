"""Flux's text side: CLIP-L and T5-XXL encoders from single files, and the T5 tokenizer.

The encoder files users have (``clip_l.safetensors``, ``t5xxl_fp16.safetensors``) hold transformers' own
parameter names, so they load into transformers' ``CLIPTextModel`` / ``T5EncoderModel`` built on the meta
device from configs read off the tensor shapes. The T5 tokenizer is not in those files: it comes from a
diffusers folder's ``tokenizer_2/``, or from the Hugging Face Hub on first use (FLUX.1 [schnell]'s, which is
public and the same for every Flux model), cached like every Hub download and honouring HF_HUB_OFFLINE.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.loading import CheckpointReader, materialise

T5_TOKENIZER_REPO = "black-forest-labs/FLUX.1-schnell"
T5_TOKENIZER_FOLDER = "tokenizer_2"


def t5_config(reader: CheckpointReader, prefix: str = ""):
    """transformers ``T5Config`` of the T5 encoder whose weights ``reader`` holds (under ``prefix``)."""
    from transformers import T5Config

    shapes = {k[len(prefix) :]: s for k, s in reader.shapes().items() if k.startswith(prefix)}
    try:
        vocab, d_model = shapes["shared.weight"]
        buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
        d_ff = shapes["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    except KeyError as exc:
        raise ModelLoadError(f"{reader.path} is not a T5 encoder in transformers' layout (no {exc.args[0]}).") from None
    layers = len({m.group(1) for k in shapes for m in [re.match(r"encoder\.block\.(\d+)\.", k)] if m})
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
    )


def load_t5_encoder(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen ``T5EncoderModel`` from a single T5-XXL file (fp16/bf16/fp32, or fp8 cast up to ``dtype``)."""
    from transformers import T5EncoderModel

    reader = CheckpointReader(path)
    if any(k.endswith(("scale_weight", "scaled_fp8")) for k in reader.keys):
        raise ModelLoadError(
            f"{path} is a 'scaled fp8' T5 file (ComfyUI's own format), which this trainer cannot read; use "
            "t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn.safetensors)."
        )
    config = t5_config(reader)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    state = {k: t.to(dtype) for k, t in reader.items("")}
    if "encoder.embed_tokens.weight" not in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied in T5; files keep one copy
    materialise(model, state, "T5 text encoder", path)
    return model.requires_grad_(False).eval()


def load_clip_l(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen transformers ``CLIPTextModel`` from a single ``clip_l.safetensors``."""
    from lora_trainer.models.architecture import TextEncoderSpec, text_encoder_config
    from lora_trainer.models.loading import convert_text_encoder

    reader = CheckpointReader(path)
    config, _ = text_encoder_config(reader.shapes(), "", open_clip=False, drop_last_layer=False)
    spec = TextEncoderSpec(prefix="", open_clip=False, config=config, with_projection=False)
    return convert_text_encoder(reader, spec, dtype).requires_grad_(False).eval()


def load_t5_tokenizer(folder: Optional[str] = None, *, on_download=None, log=None):
    """The T5 tokenizer from a diffusers folder's ``tokenizer_2`` or, without one, from the Hub's cache
    (downloaded on first use)."""
    from transformers import AutoTokenizer

    if folder is None:
        from lora_trainer.hub.fetch import fetch_subfolder

        folder = fetch_subfolder(
            T5_TOKENIZER_REPO,
            T5_TOKENIZER_FOLDER,
            "T5 tokenizer",
            required=(("tokenizer_config.json",), ("tokenizer.json", "spiece.model")),
            optional=("special_tokens_map.json",),
            place_hint="or train from a diffusers Flux folder, which has its tokenizer_2/",
            on_progress=on_download,
            log=log,
        )
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)
