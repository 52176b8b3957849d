"""The standalone engine's Z-Image model: diffusers' ``ZImageTransformer2DModel``, transformers' ``Qwen3Model``
and diffusers' autoencoder, loaded from the files a Forge Neo (or ComfyUI) user has, or from a diffusers folder.

A Forge Neo user has the transformer in ``models/Stable-diffusion/z_image_turbo_bf16.safetensors`` (or
``models/diffusion_models``) in the original layout (fused ``attention.qkv``), Flux's autoencoder in
``models/VAE/ae.safetensors`` and the text encoder in ``models/text_encoder/qwen_3_4b.safetensors``
(transformers' ``Qwen3ForCausalLM`` names under ``model.``). The config's ``ae`` and ``qwen3`` options name the
files; left empty, each is looked for beside the transformer and in those sibling folders. The Qwen tokenizer
is not in those files: it comes from a diffusers folder's ``tokenizer/`` or, on first use, from the Hub
(Tongyi-MAI/Z-Image-Turbo's), cached like every download and honouring HF_HUB_OFFLINE.

Text conditioning is the diffusers pipeline's: the caption in Qwen's chat template (thinking enabled, the
generation prompt added), padded to 512 tokens, and the text encoder's second-to-last hidden states of the
real tokens. The transformer runs backwards in time (it takes ``1 - sigma`` and predicts ``x0 - noise``), so
``predict`` turns both round to give the flow-matching velocity the objective expects.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lora_trainer.errors import ConfigError, ModelLoadError
from lora_trainer.lora.targets import find_targets
from lora_trainer.models.adapter import Conditioning, SizeCondition, loaded
from lora_trainer.models.diffusers_adapter import file_identity
from lora_trainer.models.families.zimage import LORA_CONTAINERS, ZImageFamily, transformer_prefix
from lora_trainer.models.flow_adapter import FlowTransformerAdapter
from lora_trainer.models.flux.files import locate_parts
from lora_trainer.models.loading import CheckpointReader, materialise

TOKENIZER_REPO = "Tongyi-MAI/Z-Image-Turbo"
TOKENIZER_FOLDER = "tokenizer"
MAX_TEXT_TOKENS = 512  # the diffusers pipeline's max_sequence_length
PATTERNS = {
    "ae": ("ae.safetensors", "flux*ae*.safetensors", "z*image*vae*.safetensors"),
    "qwen3": ("qwen_3_4b.safetensors", "qwen*3*4b*.safetensors", "qwen3*.safetensors"),
}
DESCRIPTIONS = {
    "ae": "the Flux/Z-Image autoencoder (ae.safetensors)",
    "qwen3": "the Qwen3-4B text encoder (qwen_3_4b.safetensors)",
}


@dataclass(frozen=True)
class ZImageFiles:
    """A Z-Image model's parts: single files, or a diffusers ``folder`` (then the other fields are None)."""

    transformer: Optional[str] = None
    ae: Optional[str] = None
    qwen3: Optional[str] = None
    folder: Optional[str] = None

    def all_paths(self) -> List[str]:
        return [p for p in (self.folder, self.transformer, self.ae, self.qwen3) if p]


def locate_zimage_files(path: str, cfg=None) -> ZImageFiles:
    """The parts of the Z-Image model at ``path`` (a transformer file or a diffusers folder); ``cfg``'s ``ae``
    and ``qwen3`` win over the search. Raises ModelLoadError naming a part that cannot be found."""
    if os.path.isdir(path):
        return ZImageFiles(folder=path)
    return ZImageFiles(transformer=path, **locate_parts(path, cfg, PATTERNS, DESCRIPTIONS, "Z-Image"))


def transformer_config(shapes: Dict[str, Tuple[int, ...]]) -> dict:
    """``ZImageTransformer2DModel`` arguments from the tensor shapes of a file in the original or diffusers
    layout (prefix removed). Heads come from the query norm's width (the head size); the rotary axes split the
    head as Z-Image's (32, 48, 48) of 128 does."""
    dim, cap_dim = shapes["cap_embedder.1.weight"]
    norm = "noise_refiner.0.attention.k_norm.weight"
    head_dim = shapes[norm if norm in shapes else "noise_refiner.0.attention.norm_k.weight"][0]
    embedder = "x_embedder.weight" if "x_embedder.weight" in shapes else "all_x_embedder.2-1.weight"
    in_channels = shapes[embedder][1] // 4  # 2x2 patches

    def count(block: str) -> int:
        return len({k.split(".")[1] for k in shapes if k.startswith(block + ".")})

    return dict(
        in_channels=in_channels,
        dim=dim,
        n_layers=count("layers"),
        n_refiner_layers=count("noise_refiner"),
        n_heads=dim // head_dim,
        n_kv_heads=dim // head_dim,
        cap_feat_dim=cap_dim,
        axes_dims=[head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8],
        axes_lens=[1536, 512, 512],
        rope_theta=256.0,
        t_scale=1000.0,
    )


def qwen3_config(shapes: Dict[str, Tuple[int, ...]]):
    """transformers ``Qwen3Config`` of the text encoder with these shapes (``model.`` prefix removed); the
    constants are Qwen3-4B's."""
    from transformers import Qwen3Config

    vocab, hidden = shapes["embed_tokens.weight"]
    head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=len({k.split(".")[1] for k in shapes if k.startswith("layers.")}),
        num_attention_heads=shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim,
        num_key_value_heads=shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
    )


def load_qwen3(path: str, dtype: torch.dtype) -> nn.Module:
    """A frozen transformers ``Qwen3Model`` from a single file (``model.*`` names; ``lm_head`` ignored)."""
    from transformers import Qwen3Model

    reader = CheckpointReader(path)
    prefix = "model." if "model.embed_tokens.weight" in reader.keys else ""
    if prefix + "embed_tokens.weight" not in reader.keys:
        raise ModelLoadError(f"{path} is not a Qwen3 text encoder (no model.embed_tokens.weight).")
    shapes = {k[len(prefix) :]: s for k, s in reader.shapes().items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = Qwen3Model(qwen3_config(shapes))
    state = {k: t.to(dtype) for k, t in reader.items(prefix) if not k.startswith("lm_head.")}
    materialise(model, state, "Qwen3 text encoder", path)
    # Rotary frequencies are computed, not stored: rebuild them off the meta device.
    model.rotary_emb = type(model.rotary_emb)(model.config)
    return model.requires_grad_(False).eval()


def load_qwen_tokenizer(folder: Optional[str] = None, *, on_download=None, log=None):
    """Qwen's tokenizer from a diffusers folder's ``tokenizer/`` or, without one, from the Hub's cache
    (downloaded on first use)."""
    from transformers import AutoTokenizer

    if folder is None:
        from lora_trainer.hub.fetch import fetch_subfolder

        folder = fetch_subfolder(
            TOKENIZER_REPO,
            TOKENIZER_FOLDER,
            "Qwen tokenizer",
            required=(("tokenizer_config.json",), ("tokenizer.json", "vocab.json")),
            optional=("merges.txt", "vocab.json", "special_tokens_map.json", "*.jinja"),
            place_hint="or train from a diffusers Z-Image folder, which has its tokenizer/",
            on_progress=on_download,
            log=log,
        )
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def chat_prompt(tokenizer, caption: str) -> str:
    """The caption as the diffusers Z-Image pipeline gives it to Qwen3: one user turn in the chat template."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": caption}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )


class ZImageAdapter(FlowTransformerAdapter):
    def __init__(
        self,
        path: str,
        family: ZImageFamily,
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
        if cfg is not None and getattr(cfg, "train_text_encoder", False):
            raise ConfigError(
                "train_text_encoder: Z-Image's Qwen3 text encoder is not trained here (ComfyUI, Forge Neo and "
                "diffusers apply Z-Image LoRAs to the transformer only); set it to false."
            )
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
        self.files = locate_zimage_files(path, cfg)
        self.model_file = self.files.transformer
        self.identity = "|".join(file_identity(p) for p in self.files.all_paths()) + f"|qwen:{MAX_TEXT_TOKENS}"
        self._tokenizer = None

    # ------------------------------------------------------------ staged loading

    def tokenizer(self):
        if self._tokenizer is None:
            folder = os.path.join(self.files.folder, TOKENIZER_FOLDER) if self.files.folder else None
            self._tokenizer = load_qwen_tokenizer(
                folder if folder and os.path.isdir(folder) else None, on_download=self._on_download, log=self._log
            )
        return self._tokenizer

    def _load_text_encoders(self) -> List[nn.Module]:
        self.tokenizer()
        return [self._load_text_encoder()]

    def _load_text_encoder(self) -> nn.Module:
        if self.files.folder:
            from transformers import Qwen3Model

            model = Qwen3Model.from_pretrained(self.files.folder, subfolder="text_encoder", torch_dtype=self.dtype)
            return model.requires_grad_(False).eval()
        return load_qwen3(loaded(self.files.qwen3, "the Qwen3 text encoder file (qwen3)"), self.dtype)

    def _load_transformer(self) -> nn.Module:
        from diffusers import ZImageTransformer2DModel
        from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

        if self.files.folder:
            from safetensors.torch import load_file

            folder = os.path.join(self.files.folder, "transformer")
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
                config = {k: v for k, v in json.load(fh).items() if not k.startswith("_")}
            state = {}
            for shard in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
                state.update(load_file(shard))
            source = self.files.folder
        else:
            source = loaded(self.files.transformer, "the Z-Image transformer file")
            reader = CheckpointReader(source)
            prefix = loaded(transformer_prefix(reader.keys), "the Z-Image transformer's key prefix")
            shapes = {k[len(prefix) :]: s for k, s in reader.shapes().items() if k.startswith(prefix)}
            config = transformer_config(shapes)
            state = dict(reader.items(prefix))
            if "layers.0.attention.qkv.weight" in state:  # the original layout: diffusers' own converter
                state = convert_z_image_transformer_checkpoint_to_diffusers(state)
        with torch.device("meta"):
            model = ZImageTransformer2DModel(**config)
        materialise(model, {k: v.to(self.dtype) for k, v in state.items()}, "Z-Image transformer", source)
        model.requires_grad_(False).eval()
        if self.fp8_base:
            from lora_trainer.models.fp8 import store_linears_in_fp8

            store_linears_in_fp8(model, LORA_CONTAINERS, compute_dtype=self.dtype)
        return model

    # ------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str], clip_skip: int) -> Conditioning:
        """``text`` (B, 512, C): Qwen3's second-to-last hidden states, zero past each caption's end; ``mask``
        (B, 512) bool: its real tokens. Fixed length, so cached captions stack into batches."""
        tokenizer = self.tokenizer()
        batch = tokenizer(
            [chat_prompt(tokenizer, c) for c in captions],
            padding="max_length",
            max_length=MAX_TEXT_TOKENS,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device).bool()
        hidden = loaded(self.text_encoders, "the text encoder")[0](
            input_ids=ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states[-2]
        return {"text": hidden * mask[..., None].to(hidden.dtype), "mask": mask}

    # ------------------------------------------------------------ denoiser

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        sizes: Optional[Sequence[SizeCondition]] = None,
    ) -> torch.Tensor:
        """Velocity ``noise - x0`` for ``noisy`` latents (B, 16, H, W) at noise levels ``timesteps`` in [0, 1]."""
        text, mask = cond["text"].to(self.device, self.dtype), cond["mask"].to(self.device).bool()
        frames = list(noisy.to(self.device, self.dtype).unsqueeze(2).unbind(0))  # (16, 1, H, W) each
        captions = [text[i][mask[i]] for i in range(text.shape[0])]
        t = 1.0 - timesteps.to(self.device, torch.float32)
        out = loaded(self.transformer, "the Z-Image transformer")(
            frames, t.to(self.dtype), captions, return_dict=False
        )[0]
        return -torch.stack(out).squeeze(2)

    # ------------------------------------------------------------ LoRA wiring

    def lora_targets(
        self, train_text_encoder: bool, extra: Sequence[str] = (), conv: bool = False
    ) -> List[Tuple[str, nn.Module]]:
        """``conv`` adds nothing: the transformer has no convolution blocks (the factory refuses conv options)."""
        from lora_trainer.models.families.zimage import file_module_name

        targets = []
        for path, module in find_targets(self.transformer, LORA_CONTAINERS, extra):
            name = "lora_unet_" + path.replace(".", "_")
            try:
                file_module_name(name)
            except ValueError:
                raise ConfigError(
                    f"target_modules: {path} is outside the Z-Image blocks' attention, feed-forward and modulation "
                    "Linears, which are all that ComfyUI, Forge Neo and diffusers apply; remove it."
                ) from None
            targets.append((name, module))
        return targets

    def text_encoder_modules(self) -> List[nn.Module]:
        return list(self.text_encoders or [])

    def enable_gradient_checkpointing(self, text_encoders: bool) -> None:
        loaded(self.transformer, "the Z-Image transformer").enable_gradient_checkpointing()

    def restore(self) -> None:
        if self.transformer is not None:
            if self.transformer.gradient_checkpointing:
                self.transformer.disable_gradient_checkpointing()
            self.transformer.eval()
