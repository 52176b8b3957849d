"""The standalone engine's Flux.1 model: our BFL-layout transformer, diffusers' autoencoder, transformers' CLIP-L
and T5-XXL, loaded from the files a WebUI user has (see ``files.py``) or from a diffusers folder.

Loading is staged like the SD adapter's: the trainer loads the text encoders and autoencoder first, caches
their outputs (T5-XXL's included: a caption is encoded once per run, or once ever with ``cache_to_disk``),
frees them, and only then loads the transformer, so the peak never holds T5-XXL and the transformer together.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lora_trainer.export.kohya_names import text_lora_name
from lora_trainer.lora.targets import TEXT_CONTAINERS, find_targets
from lora_trainer.models.adapter import Conditioning, SizeCondition, loaded
from lora_trainer.models.diffusers_adapter import file_identity
from lora_trainer.models.families.flux import LORA_CONTAINERS, FluxFamily, transformer_prefix
from lora_trainer.models.flow_adapter import FlowTransformerAdapter
from lora_trainer.models.flux.files import FluxFiles, locate_flux_files
from lora_trainer.models.flux.transformer import FluxParams, FluxTransformer, image_ids, pack_latents, unpack_latents
from lora_trainer.models.loading import CheckpointReader


class FluxAdapter(FlowTransformerAdapter):
    family: FluxFamily

    def __init__(
        self,
        path: str,
        family: FluxFamily,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        cfg=None,
        model_name: Optional[str] = None,
        on_download=None,
        log: Optional[Callable[[str], None]] = None,
        reference: str = "",
        prediction_type: Optional[str] = None,
    ):
        self._set_up(
            path,
            family,
            device=device,
            dtype=dtype,
            cfg=cfg,
            model_name=model_name,
            on_download=on_download,
            log=log,
            prediction_type=prediction_type,
        )
        self.guidance_scale = float(getattr(cfg, "guidance_scale", 1.0))
        self.t5_max_length = family.t5_max_length(cfg)
        self.files: FluxFiles = locate_flux_files(path, cfg)
        self.model_file = self.files.transformer
        # The cached conditioning depends on every file that makes it and on the T5 length.
        self.identity = "|".join(file_identity(p) for p in self.files.all_paths()) + f"|t5:{self.t5_max_length}"
        self.params = self._params()
        self.transformer: Optional[FluxTransformer] = None
        self._tokenizers: Optional[Tuple[object, object]] = None

    # ------------------------------------------------------------ files

    def _params(self) -> FluxParams:
        if self.files.folder:
            with open(os.path.join(self.files.folder, "transformer", "config.json"), encoding="utf-8") as fh:
                config = json.load(fh)
            params = FluxParams.from_shapes(_shapes_from_diffusers_config(config))
            return dataclasses.replace(params, axes_dim=tuple(config.get("axes_dims_rope", params.axes_dim)))
        reader = CheckpointReader(loaded(self.files.transformer, "the Flux transformer file"))
        prefix = loaded(transformer_prefix(reader.keys), "the Flux transformer's key prefix")
        return FluxParams.from_shapes({k[len(prefix) :]: s for k, s in reader.shapes().items() if k.startswith(prefix)})

    def tokenizers(self):
        """(CLIP tokenizer, T5 tokenizer): built offline / read from the diffusers folder or the Hub cache."""
        if self._tokenizers is None:
            from lora_trainer.models.flux.text import load_t5_tokenizer
            from lora_trainer.models.tokenizer import load_clip_tokenizer

            folder = self.files.folder
            clip_folder = os.path.join(folder, "tokenizer") if folder else None
            t5_folder = os.path.join(folder, "tokenizer_2") if folder else None
            self._tokenizers = (
                load_clip_tokenizer(clip_folder if clip_folder and os.path.isdir(clip_folder) else None),
                load_t5_tokenizer(
                    t5_folder if t5_folder and os.path.isdir(t5_folder) else None,
                    on_download=self._on_download,
                    log=self._log,
                ),
            )
        return self._tokenizers

    # ------------------------------------------------------------ staged loading

    def _load_text_encoders(self) -> List[nn.Module]:
        from lora_trainer.models.flux.text import load_clip_l, load_t5_encoder

        self.tokenizers()

        if self.files.folder:
            from transformers import CLIPTextModel, T5EncoderModel

            folder = self.files.folder
            clip = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=self.dtype)
            t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", torch_dtype=self.dtype)
            return [clip.requires_grad_(False).eval(), t5.requires_grad_(False).eval()]
        return [
            load_clip_l(loaded(self.files.clip_l, "the CLIP-L file (clip_l)"), self.dtype),
            load_t5_encoder(loaded(self.files.t5xxl, "the T5-XXL file (t5xxl)"), self.dtype),
        ]

    def _load_transformer(self) -> FluxTransformer:
        from lora_trainer.models.flux.names import diffusers_to_bfl
        from lora_trainer.models.loading import materialise

        with torch.device("meta"):
            model = FluxTransformer(self.params)
        if self.files.folder:
            from safetensors.torch import load_file

            state = {}
            for shard in sorted(glob.glob(os.path.join(self.files.folder, "transformer", "*.safetensors"))):
                state.update(load_file(shard))
            state = {k: v.to(self.dtype) for k, v in diffusers_to_bfl(state).items()}
            source = self.files.folder
        else:
            source = loaded(self.files.transformer, "the Flux transformer file")
            reader = CheckpointReader(source)
            prefix = loaded(transformer_prefix(reader.keys), "the Flux transformer's key prefix")
            state = {k: t.to(self.dtype) for k, t in reader.items(prefix) if k.split(".")[0] in _TOP_LEVEL}
        materialise(model, state, "Flux transformer", source)
        model.requires_grad_(False).eval()
        if self.fp8_base:
            from lora_trainer.models.fp8 import store_linears_in_fp8

            store_linears_in_fp8(model, LORA_CONTAINERS, compute_dtype=self.dtype)
        return model

    # ------------------------------------------------------------ encoders

    def encode_text(self, captions: Sequence[str], clip_skip: int) -> Conditioning:
        clip_tok, t5_tok = self.tokenizers()
        clip, t5 = loaded(self.text_encoders, "the text encoders")
        clip_ids = clip_tok(
            list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        t5_ids = t5_tok(
            list(captions),
            padding="max_length",
            max_length=self.t5_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        with torch.no_grad():  # T5 is never trained here
            sequence = t5(t5_ids).last_hidden_state
        # Flux conditions on CLIP-L's pooled output (the end token's final hidden state, not projected).
        pooled = clip(clip_ids).pooler_output
        return {"t5": sequence, "pooled": pooled}

    # ------------------------------------------------------------ denoiser

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        sizes: Optional[Sequence[SizeCondition]] = None,
    ) -> torch.Tensor:
        """Velocity prediction for ``noisy`` latents (B, 16, H, W) at noise levels ``timesteps`` in [0, 1]."""
        b, _, h, w = noisy.shape
        dtype = self.dtype
        txt = cond["t5"].to(self.device, dtype)
        guidance = None
        if self.family.guidance:
            guidance = torch.full((b,), self.guidance_scale, device=self.device, dtype=torch.float32)
        out = loaded(self.transformer, "the Flux transformer")(
            pack_latents(noisy.to(self.device, dtype)),
            image_ids(b, h, w, self.device).to(dtype),
            txt,
            torch.zeros(b, txt.shape[1], 3, device=self.device, dtype=dtype),
            timesteps.to(self.device, torch.float32),
            cond["pooled"].to(self.device, dtype),
            guidance,
        )
        return unpack_latents(out, h, w)

    # ------------------------------------------------------------ LoRA wiring

    def lora_targets(
        self, train_text_encoder: bool, extra: Sequence[str] = (), conv: bool = False
    ) -> List[Tuple[str, nn.Module]]:
        """``conv`` adds nothing: the transformer has no convolution blocks (the factory refuses conv options)."""
        targets = [
            ("lora_unet_" + path.replace(".", "_"), module)
            for path, module in find_targets(self.transformer, LORA_CONTAINERS, extra)
        ]
        if train_text_encoder:
            clip = loaded(self.text_encoders, "the text encoders")[0]
            targets += [(text_lora_name(path, self.family, 0), m) for path, m in find_targets(clip, TEXT_CONTAINERS)]
        return targets

    def text_encoder_modules(self) -> List[nn.Module]:
        return list(self.text_encoders or [])[:1]

    def enable_gradient_checkpointing(self, text_encoders: bool) -> None:
        loaded(self.transformer, "the Flux transformer").gradient_checkpointing = True
        if text_encoders and self.text_encoders:
            self.text_encoders[0].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.text_encoders[0].train()

    def restore(self) -> None:
        if self.transformer is not None:
            self.transformer.gradient_checkpointing = False
            self.transformer.eval()
        for te in self.text_encoders or []:
            te.eval()


_TOP_LEVEL = {
    "img_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "txt_in",
    "double_blocks",
    "single_blocks",
    "final_layer",
}


def _shapes_from_diffusers_config(config: dict):
    """The BFL tensor shapes ``FluxParams.from_shapes`` reads, from a diffusers transformer config."""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    hidden = heads * head_dim
    in_channels = config.get("in_channels", 64)
    shapes = {
        "img_in.weight": (hidden, in_channels),
        "double_blocks.0.img_attn.norm.query_norm.scale": (head_dim,),
        "double_blocks.0.img_mlp.0.weight": (int(hidden * config.get("mlp_ratio", 4.0)), hidden),
        "double_blocks.0.img_attn.qkv.bias": (3 * hidden,),
        "final_layer.linear.weight": (config.get("out_channels") or in_channels, hidden),
        "vector_in.in_layer.weight": (hidden, config.get("pooled_projection_dim", 768)),
        "txt_in.weight": (hidden, config.get("joint_attention_dim", 4096)),
    }
    shapes.update({f"double_blocks.{i}.x": (1,) for i in range(config.get("num_layers", 19))})
    shapes.update({f"single_blocks.{i}.x": (1,) for i in range(config.get("num_single_layers", 38))})
    if config.get("guidance_embeds", False):
        shapes["guidance_in.in_layer.weight"] = (hidden, 256)
    return shapes
