"""The WebUI's live model (``shared.sd_model``) as the engine's ``DiffusionAdapter``.

SD1.x/SD2.x are ldm ``LatentDiffusion`` objects, SDXL is sgm's ``DiffusionEngine`` as the WebUI patches it
(``get_learned_conditioning`` returns ``{"crossattn", "vector"}``, ``apply_model`` runs the UNet, the VAE
encoding comes back scaled). Nothing from the WebUI (``modules.*``) is imported: the host glue hands over the
model object and a few facts (device, dtype, --medvram/--lowvram, fp8), so the real ldm classes can test this.

Training never copies the model: LoRA layers wrap the live Linears (see ``lora/layer.py``), the base is frozen,
the host's own checkpointing (which loses LoRA gradients when the base is frozen) is switched off, and
``restore()`` puts every flag, mode and attribute back exactly. The LoRA names are the standalone engine's:
SD1/SD2 UNet modules under diffusers-style names, SDXL under sgm names, text encoders under transformers'
CLIP names (open_clip's fused attention is split into q/k/v views to get there).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_trainer.errors import ConfigError, ModelLoadError
from lora_trainer.export.kohya_names import text_lora_name, unet_lora_name_from_ldm
from lora_trainer.hosts.fused_attention import QKV, projection_views, split_projection_forward
from lora_trainer.hosts.host_attention import sdpa_forward, slow_attention_layers
from lora_trainer.hosts.module_changes import ModuleChanges
from lora_trainer.lora.layer import is_lora_target
from lora_trainer.lora.targets import (
    NEVER_TRAINED,
    TEXT_CONTAINERS,
    UNET_CONTAINERS,
    UNET_CONV_CONTAINERS,
    find_targets,
)
from lora_trainer.models.adapter import Conditioning, DiffusionAdapter, SizeCondition
from lora_trainer.models.families import SD1, SD2, SDXL
from lora_trainer.models.families.unet_family import UNetFamily
from lora_trainer.models.ldm_names import UNetLayout, UNetNameMap, open_clip_to_hf
from lora_trainer.models.long_captions import window_count

CONTEXT_TOKENS = 77  # one CLIP window: the host encodes long prompts in chunks of start + 75 tokens + end
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")  # SDXL, time_ids order
UNET_BLOCKS = ("BasicTransformerBlock", "ResBlock")  # ldm and sgm UNets
TEXT_BLOCKS = ("CLIPEncoderLayer", "ResidualAttentionBlock")  # transformers CLIP, open_clip
# Flags of the host's own checkpointing (ldm/sgm helpers, open_clip, transformers); all must be off to train.
HOST_CHECKPOINT_FLAGS = ("checkpoint", "use_checkpoint", "grad_checkpointing", "gradient_checkpointing")
OPEN_CLIP_PARTS = ("attn.out_proj", "mlp.c_fc", "mlp.c_proj")

ClipSkipScope = Callable[[int], ContextManager]
_FLOAT8 = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


# ---------------------------------------------------------------- reading the host model


def unwrapped(embedder: nn.Module) -> nn.Module:
    """The original ldm/sgm text embedder behind the WebUI's prompt wrapper (``.wrapped``), or itself."""
    return getattr(embedder, "wrapped", embedder)


def open_clip_model(embedder: nn.Module) -> Optional[nn.Module]:
    """The open_clip model of an ldm/sgm OpenCLIP embedder, or None for a transformers CLIP embedder."""
    model = getattr(embedder, "model", None)
    return model if model is not None and hasattr(getattr(model, "transformer", None), "resblocks") else None


def text_embedders(model: nn.Module) -> List[nn.Module]:
    """The host's text embedders (wrapped or not), in the order of the standalone engine's text encoders."""
    if hasattr(model, "conditioner"):
        return [e for e in model.conditioner.embedders if getattr(unwrapped(e), "input_key", "txt") == "txt"]
    return [model.cond_stage_model]


def host_family(model: nn.Module) -> UNetFamily:
    """The family of the host's loaded ldm/sgm model, told by its text embedders (as its single file would)."""
    if hasattr(model, "conditioner"):
        kinds = [open_clip_model(unwrapped(e)) is None for e in text_embedders(model)]
        if kinds != [True, False]:
            raise ModelLoadError(
                "this SDXL model has no CLIP-L + OpenCLIP-G text encoder pair (the SDXL refiner "
                "has only one); train on an SDXL base model."
            )
        return SDXL
    embedder = unwrapped(model.cond_stage_model)
    if open_clip_model(embedder) is not None:
        return SD2
    if hasattr(embedder, "transformer"):
        return SD1
    raise ModelLoadError(
        f"unsupported host model: its text encoder ({type(embedder).__name__}) is neither "
        "transformers CLIP (SD1) nor open_clip (SD2/SDXL)."
    )


def host_architecture(model: nn.Module) -> str:
    """The family name (``sd1``, ``sd2``, ``sdxl``) of the host's loaded model; see ``host_family``."""
    return host_family(model).name


def ldm_unet_layout(unet: nn.Module) -> UNetLayout:
    """Levels, resnets per level and which levels attend, read from an ldm/sgm ``UNetModel``."""
    per_level = unet.num_res_blocks
    layers = int(per_level[0] if isinstance(per_level, (list, tuple)) else per_level)
    attends = tuple(
        any(type(m).__name__ in UNET_CONTAINERS for m in unet.input_blocks[1 + i * (layers + 1)])
        for i in range(len(unet.channel_mult))
    )
    return UNetLayout(layers, attends)


def prediction_type_of(model: nn.Module) -> str:
    parameterization = getattr(model, "parameterization", "eps")
    if parameterization not in ("eps", "v"):
        raise ModelLoadError(f"the host model predicts {parameterization!r}; only eps and v models can be trained.")
    return "v_prediction" if parameterization == "v" else "epsilon"


def checkpoint_info_value(model: nn.Module, *attributes: str) -> Optional[str]:
    """The first of ``attributes`` the WebUI's ``sd_checkpoint_info`` has (name, hash), if it has one."""
    info = getattr(model, "sd_checkpoint_info", None)
    for attribute in attributes:
        value = getattr(info, attribute, None)
        if value:
            return str(value)
    return None


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap identity when the host names no hash: parameter names, shapes and a few values."""
    digest = hashlib.sha1()
    for index, (name, param) in enumerate(model.named_parameters()):
        digest.update(f"{name}{tuple(param.shape)}".encode())
        if index % 64 == 0:  # a sample of values: a few device syncs, not one per tensor
            digest.update(param.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def ldm_unet_targets(
    unet: nn.Module, names: UNetNameMap, extra: Sequence[str] = (), conv: bool = False
) -> List[Tuple[str, nn.Module]]:
    """(ldm path, module) of an ldm-named UNet's standard LoRA targets (with ``conv``, the convolution blocks'
    too, as LoCon trains them), plus modules whose diffusers-style path contains an ``extra`` substring (the
    standalone engine matches ``target_modules`` against diffusers paths, so a host model does too), in model
    order."""
    found = dict(find_targets(unet, UNET_CONTAINERS, conv_containers=UNET_CONV_CONTAINERS if conv else ()))
    if extra:
        find_targets(nn.Module(), (), extra)  # refuses substrings that name never-trained layers
        for path, module in unet.named_modules():
            diffusers = names.to_diffusers(path) if path else None
            if path in found or diffusers is None or not is_lora_target(module, conv):
                continue
            if any(s in diffusers for s in extra) and not any(
                diffusers.startswith(b) or f".{b}" in diffusers for b in NEVER_TRAINED
            ):
                found[path] = module
    order = {path: i for i, (path, _) in enumerate(unet.named_modules())}
    return sorted(found.items(), key=lambda item: order[item[0]])


def _checkpointed(forward: Callable) -> Callable:
    """``forward`` under non-reentrant ``torch.utils.checkpoint`` (it keeps the graph to LoRA weights that are
    not among the block's inputs or parameters, which the host's reentrant helpers drop)."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def checkpoint_host_blocks(changes: ModuleChanges, unet: nn.Module, text_modules: Sequence[nn.Module]) -> None:
    """Wrap the forward of every UNet block (and of the given text encoders' blocks) in non-reentrant
    checkpointing, recorded in ``changes`` so that ``changes.undo()`` takes it off again."""
    roots: List[Tuple[nn.Module, Tuple[str, ...]]] = [(unet, UNET_BLOCKS)]
    roots += [(module, TEXT_BLOCKS) for module in text_modules]
    for root, block_names in roots:
        for module in root.modules():
            if type(module).__name__ in block_names:
                changes.wrap_forward(module, _checkpointed)


# ---------------------------------------------------------------- the adapter


class LdmHostAdapter(DiffusionAdapter):
    """Drives the host's loaded ldm/sgm model for the trainer; ``load``/``release`` are no-ops (the host owns
    the parts). Use as a context manager, or call ``restore()``, to undo every change training made."""

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        lowvram: bool = False,
        medvram: bool = False,
        fp8: bool = False,
        autocast: Optional[Callable[[], ContextManager]] = None,
        clip_skip_scope: Optional[ClipSkipScope] = None,
        model_name: Optional[str] = None,
        identity: Optional[str] = None,
        fast_attention: bool = True,
    ):
        """``autocast``: the host's compute context (the WebUI's ``devices.autocast``). ``clip_skip_scope(n)``:
        a context in which the host's prompt encoding stops n layers from the end (the WebUI's "Clip skip").
        ``fast_attention``: run UNet attention layers whose host implementation is not fused through torch's
        SDPA during training (``hosts/host_attention.py``); off where the host's own forward must run (the
        WebUI's hypernetworks hook into it)."""
        if lowvram:
            raise ConfigError(
                "The host runs with --lowvram, which moves model blocks between devices during every "
                "forward pass; training through that is not supported. Restart without --lowvram "
                "(--medvram works for UNet-only training)."
            )
        if fp8 or any(p.dtype in _FLOAT8 for p in model.parameters()):
            raise ConfigError(
                "The host stores the model's weights in fp8, which cannot be trained through. Turn "
                "fp8 weight storage off, reload the checkpoint, and try again."
            )
        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype
        self.medvram = medvram
        self.family = host_family(model)
        self.arch = self.family.name
        self.prediction_type = prediction_type_of(model)
        # The WebUI may swap in a rescaled schedule for sampling; training uses the model's own.
        ac = getattr(model, "alphas_cumprod_original", None)
        ac = model.alphas_cumprod if ac is None else ac
        self.alphas_cumprod = ac.detach().to(self.device, torch.float32).clone()
        self.unet: nn.Module = model.model.diffusion_model
        self.names = UNetNameMap(ldm_unet_layout(self.unet))
        self.model_name = (
            model_name or checkpoint_info_value(model, "name_for_extra", "model_name", "name") or type(model).__name__
        )
        self.identity = (
            identity or checkpoint_info_value(model, "sha256", "shorthash", "filename") or weights_fingerprint(model)
        )
        self.model_file = checkpoint_info_value(model, "filename")
        # The WebUI has both of the checkpoint's hashes already (its legacy 8-hex ``hash``, ``sha256``).
        legacy, sha256 = checkpoint_info_value(model, "hash"), checkpoint_info_value(model, "sha256")
        self.model_hashes = {"ss_sd_model_hash": legacy, "ss_new_sd_model_hash": sha256} if legacy and sha256 else None
        self._autocast = autocast or contextlib.nullcontext
        self._clip_skip_scope = clip_skip_scope
        self.fast_attention = fast_attention
        self._changes = ModuleChanges()
        self._windows = 1  # prompt chunks of 77 per caption: max_token_length / 75

    # ------------------------------------------------------------ the host owns the parts

    @property
    def encodes_during_training(self) -> bool:  # type: ignore[override]
        """Latents may be encoded as training first reaches them (``cache_latents_during_training``): the host
        holds its VAE anyway, so this costs no memory. Not under --medvram, where the host moves the UNet out
        to run the VAE, and not with an fp16 VAE, whose overflow (NaN latents, "--no-half-vae") should stop the
        run before its first step rather than in the middle."""
        vae_dtype = next(self.model.first_stage_model.parameters()).dtype
        return not self.medvram and vae_dtype in (torch.float32, torch.bfloat16)

    def text_encoder_bytes(self) -> Optional[int]:
        """Nothing beyond what the host holds: its text encoders stay loaded beside the UNet anyway."""
        return 0

    def load(self, *, unet: bool, vae: bool, text_encoders: bool) -> None:
        """Nothing to load: the host holds every part."""

    def release(self, *, vae: bool = False, text_encoders: bool = False) -> None:
        """Nothing to free: the parts are the host's, and it keeps using them."""

    def __enter__(self) -> "LdmHostAdapter":
        return self

    def __exit__(self, *_exc) -> None:
        self.restore()

    # ------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.model.first_stage_model.parameters()).dtype
        with self._autocast():
            posterior = self.model.encode_first_stage(pixels.to(self.device, vae_dtype))
            # The distribution's mean, as the standalone engine caches (ldm would sample; sgm in the WebUI
            # already returns the mean, as a tensor, whose own .mode() is the statistical mode).
            if not isinstance(posterior, torch.Tensor) and callable(getattr(posterior, "mode", None)):
                posterior = posterior.mode()
            latents = self.model.get_first_stage_encoding(posterior).float()
        if not torch.isfinite(latents).all():
            raise ConfigError(
                "The host's VAE produced NaN/inf latents (an fp16 VAE overflows on some images); "
                "start the WebUI with --no-half-vae and try again."
            )
        return latents

    def set_max_token_length(self, max_token_length: int) -> None:
        self._windows = window_count(max_token_length)

    def caption_token_counts(self, captions: Sequence[str]) -> Optional[List[int]]:
        """Counted by the host's prompt wrapper (``tokenize``: ids without start/end tokens), as it will chunk
        them; None when the embedder is not wrapped by the host."""
        embedder = text_embedders(self.model)[0]
        tokenize = getattr(embedder, "tokenize", None)
        if not hasattr(embedder, "wrapped") or not callable(tokenize):
            return None
        return [len(ids) for ids in tokenize(list(captions))]

    def encode_text(self, captions: Sequence[str], clip_skip: int) -> Conditioning:
        """The host's own prompt encoding (its chunks of 77, SDXL's pooled output from the first), cut or
        padded to ``max_token_length / 75`` chunks so that every caption has the same shape."""
        with self._clip_skip(clip_skip), self._autocast():
            cond = self.model.get_learned_conditioning(list(captions))
            crossattn = self._fit_windows(cond["crossattn"] if isinstance(cond, dict) else cond)
        if isinstance(cond, dict):  # SDXL: the vector is [pooled OpenCLIP-G, size embeddings]
            vector = cond["vector"]
            return {
                "crossattn": crossattn.float(),
                "pooled": vector[:, : vector.shape[1] - self._size_vector_width()].float(),
            }
        return {"crossattn": crossattn.float()}

    def _fit_windows(self, crossattn: torch.Tensor) -> torch.Tensor:
        """(B, 77 * chunks, C) -> (B, 77 * windows, C). Missing chunks are the host's encoding of an empty
        prompt: the tokens of the empty chunk the host itself pads a batch's shorter prompts with."""
        width = CONTEXT_TOKENS * self._windows
        if crossattn.shape[1] < width:
            empty = self.model.get_learned_conditioning([""])
            empty = (empty["crossattn"] if isinstance(empty, dict) else empty)[:, :CONTEXT_TOKENS]
            missing = (width - crossattn.shape[1]) // CONTEXT_TOKENS
            padding = empty.to(crossattn.dtype).expand(crossattn.shape[0], -1, -1).repeat(1, missing, 1)
            crossattn = torch.cat([crossattn, padding], dim=1)
        return crossattn[:, :width]

    def _clip_skip(self, clip_skip: int) -> ContextManager:
        if self._clip_skip_scope is not None:
            return self._clip_skip_scope(clip_skip)
        if clip_skip > 1 and not self.family.text_uses_penultimate_layer:  # SD2 always uses its penultimate
            raise ConfigError(
                f"clip_skip {clip_skip} needs the host's own Clip skip setting, and this host did not "
                "say how to set it; use clip_skip 1 or set Clip skip in the host's settings."
            )
        return contextlib.nullcontext()

    # ------------------------------------------------------------ denoiser

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        sizes: Optional[Sequence[SizeCondition]] = None,
    ) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        x = noisy.to(self.device, dtype)
        context = cond["crossattn"].to(self.device, dtype)
        with self._autocast():
            if self.family.size_conditioning:
                vector = self._sdxl_vector(cond["pooled"], sizes).to(dtype)
                return self.model.apply_model(x, timesteps, {"crossattn": context, "vector": vector})
            return self.model.apply_model(x, timesteps, context)

    def _size_embedders(self) -> List[nn.Module]:
        return [e for e in self.model.conditioner.embedders if getattr(e, "input_key", None) in SIZE_KEYS]

    def _size_vector_width(self) -> int:
        # Each of sgm's ConcatTimestepEmbedderND embeds two numbers with ``outdim`` channels each.
        return sum(2 * int(e.outdim) for e in self._size_embedders())

    def _sdxl_vector(self, pooled: torch.Tensor, sizes: Sequence[SizeCondition]) -> torch.Tensor:
        """sgm's ``y``: the pooled text embedding, then each sample's size/crop conditions embedded by the
        host's own embedders (the WebUI's conditioning would use one fixed size for the whole batch)."""
        ids = torch.tensor([s.time_ids() for s in sizes], device=self.device, dtype=torch.float32)
        columns = {key: ids[:, 2 * i : 2 * i + 2] for i, key in enumerate(SIZE_KEYS)}
        parts = [pooled.to(self.device)]
        parts += [e(columns[e.input_key]).to(pooled.dtype) for e in self._size_embedders()]
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------ LoRA wiring

    def _begin_training(self) -> None:
        """Freeze the host model, switch its own checkpointing off and its slow attention to SDPA; recorded for
        ``restore``."""
        if not self._changes.empty:
            return
        self._changes.remember_modes(self.model)
        self._changes.freeze(self.model)
        for module in self.model.modules():
            for flag in HOST_CHECKPOINT_FLAGS:
                if module.__dict__.get(flag) is True:
                    self._changes.set_attribute(module, flag, False)
        if self.fast_attention:
            for _path, module in slow_attention_layers(self.unet):
                self._changes.wrap_forward(module, lambda host, m=module: sdpa_forward(m, host))

    def lora_targets(
        self, train_text_encoder: bool, extra: Sequence[str] = (), conv: bool = False
    ) -> List[Tuple[str, nn.Module]]:
        if train_text_encoder and self.medvram:
            raise ConfigError(
                "Text-encoder training does not work under --medvram (the host moves the text "
                "encoder off the GPU between uses). Turn off train_text_encoder or restart the host "
                "without --medvram."
            )
        self._begin_training()
        targets = [
            (unet_lora_name_from_ldm(path, self.family, self.names), module)
            for path, module in self._unet_modules(extra, conv)
        ]
        if train_text_encoder:
            for index, embedder in enumerate(text_embedders(self.model)):
                targets += self._text_targets(unwrapped(embedder), index)
                if hasattr(self.model, "conditioner"):
                    # sgm's conditioner runs embedders that are not trainable under no_grad: no graph to LoRA.
                    self._changes.set_attribute(embedder, "is_trainable", True)
        return targets

    def _unet_modules(self, extra: Sequence[str], conv: bool = False) -> List[Tuple[str, nn.Module]]:
        return ldm_unet_targets(self.unet, self.names, extra, conv)

    def _text_targets(self, embedder: nn.Module, index: int) -> List[Tuple[str, nn.Module]]:
        clip = open_clip_model(embedder)
        if clip is None:  # transformers CLIP: the standalone engine's own module paths
            return [
                (text_lora_name(path, self.family, index), module)
                for path, module in find_targets(embedder.transformer, TEXT_CONTAINERS)
            ]
        targets = []
        for layer, block in enumerate(clip.transformer.resblocks[: self._open_clip_layers_used(embedder)]):
            hf = f"text_model.encoder.layers.{layer}."
            views = projection_views(block.attn)
            self._changes.wrap_forward(block.attn, lambda _old, a=block.attn, v=views: split_projection_forward(a, v))
            targets += [
                (text_lora_name(f"{hf}self_attn.{name}", self.family, index), view) for name, view in zip(QKV, views)
            ]
            for part in OPEN_CLIP_PARTS:
                name = open_clip_to_hf(f"transformer.resblocks.{layer}.{part}.weight")[: -len(".weight")]
                targets.append((text_lora_name(name, self.family, index), block.get_submodule(part)))
        return targets

    @staticmethod
    def _open_clip_layers_used(embedder: nn.Module) -> int:
        """ldm's SD2 embedder stops ``layer_idx`` blocks before the end (the standalone SD2 text encoder has
        no such layers); sgm's SDXL embedder runs every block (the last one makes the pooled output)."""
        blocks = len(open_clip_model(embedder).transformer.resblocks)
        if getattr(embedder, "return_pooled", False) or getattr(embedder, "always_return_pooled", False):
            return blocks
        return blocks - int(getattr(embedder, "layer_idx", 0) or 0)

    def text_encoder_modules(self) -> List[nn.Module]:
        modules = []
        for embedder in text_embedders(self.model):
            inner = unwrapped(embedder)
            modules.append(open_clip_model(inner) or inner.transformer)
        return modules

    def enable_gradient_checkpointing(self, text_encoders: bool) -> None:
        self._begin_training()
        checkpoint_host_blocks(self._changes, self.unet, self.text_encoder_modules() if text_encoders else [])

    def restore(self) -> None:
        """Undo every change training made: flags, modes, wrapped forwards, host checkpointing switches."""
        self._changes.undo()


__all__ = [
    "LdmHostAdapter",
    "host_architecture",
    "host_family",
    "ldm_unet_layout",
    "ldm_unet_targets",
    "text_embedders",
    "unwrapped",
]
