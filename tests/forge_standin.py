"""A stand-in for the SD1/SDXL model Forge Neo holds, written from reading Forge's code (not copied from it).

It keeps the interface ``lora_trainer.hosts.forge_adapter`` and the Forge glue touch, and reproduces each trap
of the real host as Forge has it:

- the model is built and loaded inside ``torch.inference_mode()`` (Forge's ``forge_model_reload``): every weight
  is an inference tensor, and the text-encoder weights arrive with ``requires_grad=True``;
- Forge's own ``Linear`` (an ``nn.Module`` holding ``weight``/``bias`` and Forge's ``weight_function`` hooks, not
  an ``nn.Linear``), swapped in for ``torch.nn.Linear`` while the model is built, text encoders included;
- transformer blocks that add residuals in place (``x += attn(norm(x))``);
- a Sage-like attention function (the module's ``attention_function``) that has no backward;
- ``KModel.apply_model(x, sigma, c_crossattn=..., y=...)``: sigma, not a timestep, in ``x = x0 + sigma * eps``
  form; the input scaled by ``1/sqrt(sigma^2+1)``; the denoised latent out; a ``predictor`` with ``sigmas``,
  ``alphas_cumprod``, ``prediction_type`` and ``timestep(sigma)``;
- ``get_learned_conditioning`` and ``encode_first_stage`` under inference mode; the VAE encoding samples;
- text-processing engines (``encode_with_transformers`` with Forge's clip-skip rule: the layer is
  ``-max(clip_skip, minimal_clip_skip)``, SD1 applies the final norm, SDXL's G encoder returns the projected
  pooled output) and a textual-inversion wrapper whose ``weight`` is the token embedding's (a tied tensor);
- model patchers whose LoRA merge runs under inference mode and replaces the weights with new inference
  tensors, backed up and restored by ``load_models_gpu`` when another patcher of the same model loads.

Weights come from the tiny single-file checkpoints of ``tiny_models.py`` (UNet by its ldm names; VAE and text
encoders through the engine's own loader), so the standalone engine can train the same model for comparison.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import types
import uuid
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

# ---------------------------------------------------------------- Forge's operations


class Linear(nn.Module):
    """Forge's Linear: weight and bias as parameters, ``weight_function`` hooks applied at each call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **_ignored):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.weight_function: List[Any] = []
        self.bias_function: List[Any] = []
        self.parameters_manual_cast = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        for fn in self.weight_function:
            weight = fn(weight)
        for fn in self.bias_function:
            bias = fn(bias)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


@contextlib.contextmanager
def forge_operations():
    """While the model is built, ``torch.nn.Linear`` is Forge's (as ``using_forge_operations`` does)."""
    original = torch.nn.Linear
    torch.nn.Linear = Linear
    try:
        yield
    finally:
        torch.nn.Linear = original


# ---------------------------------------------------------------- attention


class _SageLike(torch.autograd.Function):
    """Forward as attention; no backward, like SageAttention's kernels."""

    @staticmethod
    def forward(ctx, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("attention_sage has no backward: its kernels are inference-only")


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def attention_sage(q, k, v, heads, mask=None):
    return _merge(_SageLike.apply(_heads(q, heads), _heads(k, heads), _heads(v, heads)))


def attention_pytorch(q, k, v, heads, mask=None):
    return _merge(F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads)))


attention_function = attention_sage  # what Neo picks when SageAttention is installed


# ---------------------------------------------------------------- the UNet (ldm names)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class Timestep(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: Optional[int], heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        module = sys.modules[__name__]  # looked up at each call, as Forge's module-level attention_function
        out = module.attention_function(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Residuals added in place, as Forge's block does."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = False  # Forge raises NotImplementedError if its own checkpointing is switched on

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006 (Forge's signature)
        n = self.attn1(self.norm1(x))
        x += n
        n = self.attn2(self.norm2(x), context=context)
        x += n
        skip = x
        x = self.ff(self.norm3(x))
        x += skip
        return x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.use_linear = use_linear
        self.proj_in = nn.Linear(channels, channels) if use_linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(channels, channels) if use_linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c).contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context, transformer_options=transformer_options)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.use_checkpoint = False

    def forward(self, x, emb, transformer_options={}):  # noqa: B006
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, output_shape=None):
        size = output_shape[2:] if output_shape is not None else (x.shape[2] * 2, x.shape[3] * 2)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None, transformer_options={}, output_shape=None):  # noqa: B006
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, transformer_options)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape=output_shape)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """An ldm-layout UNet: ``depths[level]`` transformer blocks after each resnet of an attending level, and
    ``middle_depth`` (default: the deepest level's) in the middle block."""

    def __init__(
        self,
        channels: int,
        mult: Sequence[int],
        res_blocks: int,
        depths: Sequence[int],
        heads: int,
        context_dim: int,
        use_linear: bool,
        adm_in: Optional[int] = None,
        middle_depth: Optional[int] = None,
    ):
        super().__init__()
        self.model_channels = channels
        self.channel_mult = list(mult)
        self.num_res_blocks = [res_blocks] * len(mult)
        emb = channels * 4
        self.time_embed = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.num_classes = "sequential" if adm_in else None
        if adm_in:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in, emb), nn.SiLU(), nn.Linear(emb, emb)))

        def attention(ch: int, depth: int) -> List[nn.Module]:
            return [SpatialTransformer(ch, heads, depth, context_dim, use_linear)] if depth else []

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(4, channels, 3, padding=1))])
        skips, ch = [channels], channels
        for level, m in enumerate(mult):
            for _ in range(res_blocks):
                layers = [ResBlock(ch, emb, m * channels)]
                ch = m * channels
                self.input_blocks.append(TimestepEmbedSequential(*layers, *attention(ch, depths[level])))
                skips.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skips.append(ch)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb, ch),
            *attention(ch, depths[-1] if middle_depth is None else middle_depth),
            ResBlock(ch, emb, ch),
        )
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb, m * channels)]
                ch = m * channels
                layers += attention(ch, depths[level])
                if level and i == res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(channels, 4, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, transformer_options)
            hs.append(h)
        h = self.middle_block(h, emb, context, transformer_options)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = block(h, emb, context, transformer_options, hs[-1].shape if hs else None)
        return self.out(h).type(x.dtype)


# ---------------------------------------------------------------- sampling: predictor and KModel


class Predictor(nn.Module):
    """The discrete DDPM schedule in k-diffusion's sigma form (Forge's ``Prediction``)."""

    def __init__(self, prediction_type: str = "epsilon", steps: int = 1000):
        super().__init__()
        self.prediction_type = prediction_type
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma.log()[None, :] - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    def calculate_input(self, sigma, x):
        return x / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5

    def calculate_denoised(self, sigma, output, x):
        s = sigma.view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return x / (s**2 + 1) - output * s / (s**2 + 1) ** 0.5
        return x - output * s


class KModel(nn.Module):
    def __init__(self, unet: nn.Module, predictor: Predictor):
        super().__init__()
        self.diffusion_model = unet
        self.predictor = predictor
        self.storage_dtype = self.computation_dtype = torch.float32
        unet.requires_grad_(False)

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        sigma = t
        xc = self.predictor.calculate_input(sigma, x).to(self.computation_dtype)
        timesteps = self.predictor.timestep(sigma).float()
        extra = {k: v.to(self.computation_dtype) for k, v in kwargs.items()}
        out = self.diffusion_model(xc, timesteps, context=c_crossattn.to(self.computation_dtype), **extra).float()
        return self.predictor.calculate_denoised(sigma, out, x)


# ---------------------------------------------------------------- patchers and Forge's loader


def _get(root: nn.Module, key: str) -> torch.Tensor:
    for part in key.split("."):
        root = getattr(root, part)
    return root


def _set(root: nn.Module, key: str, tensor: torch.Tensor) -> None:
    *path, name = key.split(".")
    for part in path:
        root = getattr(root, part)
    setattr(root, name, nn.Parameter(tensor, requires_grad=False))  # as Forge's utils.set_attr does


class ModelPatcher:
    """Weight patches merged on load (under inference mode, new tensors), backed up and restored on unload."""

    def __init__(self, model: nn.Module, load_device=torch.device("cpu")):
        self.model = model
        self.load_device = load_device
        self.offload_device = torch.device("cpu")
        self.patches: Dict[str, List[torch.Tensor]] = {}
        self.patches_uuid = uuid.uuid4()
        self.backup: Dict[str, torch.Tensor] = {}
        for attr, value in (("model_lowvram", False), ("current_patches_uuid", None)):
            if not hasattr(model, attr):
                setattr(model, attr, value)

    def clone(self) -> "ModelPatcher":
        other = ModelPatcher(self.model, self.load_device)
        other.patches = {k: list(v) for k, v in self.patches.items()}
        other.patches_uuid = self.patches_uuid
        other.backup = self.backup  # shared, as Forge's clones share it
        return other

    def add_patches(self, deltas: Dict[str, torch.Tensor]) -> None:
        for key, delta in deltas.items():
            self.patches.setdefault(key, []).append(delta)
        self.patches_uuid = uuid.uuid4()

    def patch_model(self) -> None:
        for key, deltas in self.patches.items():
            weight = _get(self.model, key)
            self.backup.setdefault(key, weight)
            merged = weight.detach().clone()
            for delta in deltas:
                merged += delta
            _set(self.model, key, merged)
        self.model.current_patches_uuid = self.patches_uuid

    def unpatch_model(self) -> None:
        for key, weight in self.backup.items():
            _set(self.model, key, weight)
        self.backup.clear()
        self.model.current_patches_uuid = None


class MemoryManagement(types.ModuleType):
    """``backend.memory_management``: which patcher of each model is loaded; loading another unpatches."""

    def __init__(self):
        super().__init__("backend.memory_management")
        self.current_loaded_models: List[ModelPatcher] = []
        self.outside_inference_mode = 0  # loads not made in inference mode (Forge's callers always are)

    def load_models_gpu(self, patchers: List[ModelPatcher], *args, **kwargs) -> None:
        self.outside_inference_mode += not torch.is_inference_mode_enabled()
        with torch.inference_mode():  # what its merges make either way, since Forge's callers are in it
            for patcher in patchers:
                for loaded in list(self.current_loaded_models):
                    if loaded.model is patcher.model and loaded is not patcher:
                        self.current_loaded_models.remove(loaded)
                if patcher.model.current_patches_uuid != patcher.patches_uuid:
                    if patcher.model.current_patches_uuid is not None or patcher.backup:
                        patcher.unpatch_model()
                    patcher.patch_model()
                if patcher not in self.current_loaded_models:
                    self.current_loaded_models.insert(0, patcher)

    def load_model_gpu(self, patcher: ModelPatcher) -> None:
        self.load_models_gpu([patcher])

    def unload_all_models(self) -> None:
        for patcher in self.current_loaded_models:
            patcher.unpatch_model()
        self.current_loaded_models.clear()

    def soft_empty_cache(self, force: bool = False) -> None:
        pass


# ---------------------------------------------------------------- text encoders and their engines


class IntegratedCLIP(nn.Module):
    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.logit_scale = nn.Parameter(torch.tensor(4.6055))


class EmbeddingsWithFixes(nn.Module):
    """The textual-inversion wrapper around the token embedding: ``weight`` is the wrapped one (tied)."""

    def __init__(self, wrapped: nn.Module, embeddings: Any):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.weight = wrapped.weight

    def forward(self, input_ids):
        self.embeddings.fixes = None
        return self.wrapped(input_ids)


def text_model(transformer: nn.Module) -> nn.Module:
    """transformers 4 keeps CLIP's layers under ``text_model`` (Forge's pins); 5 has them at the top."""
    return getattr(transformer, "text_model", transformer)


class TextProcessingEngine:
    """Forge's classic engine for prompts without weights, embeddings or BREAK: 75-token chunks chained."""

    def __init__(self, text_encoder, tokenizer, minimal_clip_skip: int, final_layer_norm: bool, return_pooled: bool):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.minimal_clip_skip = minimal_clip_skip
        self.clip_skip = minimal_clip_skip
        self.final_layer_norm = final_layer_norm
        self.return_pooled = return_pooled
        self.id_start = tokenizer.bos_token_id
        self.id_end = tokenizer.eos_token_id
        self.id_pad = tokenizer.pad_token_id
        self.embeddings = types.SimpleNamespace(fixes=None)
        embeddings = text_model(text_encoder.transformer).embeddings
        embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding, self.embeddings)

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        transformer = self.text_encoder.transformer
        embeddings = text_model(transformer).embeddings
        # As Forge: the embeddings are computed in fp32 whatever the encoder's storage dtype (a Module.to).
        embeddings.token_embedding = embeddings.token_embedding.to(dtype=torch.float32)
        embeddings.position_embedding = embeddings.position_embedding.to(dtype=torch.float32)
        outputs = transformer(tokens, output_hidden_states=True)
        z = outputs.hidden_states[-max(self.clip_skip, self.minimal_clip_skip)]
        if self.final_layer_norm:
            z = text_model(transformer).final_layer_norm(z)
        if self.return_pooled:
            z.pooled = transformer.text_projection(outputs.pooler_output)
        return z

    def tokenize_line(self, text: str) -> List[List[int]]:
        """As Forge's: tokens appended one by one into chunks of 75; a chunk that fills up with a comma among its
        last 20 tokens is cut after that comma. Each chunk: start, its tokens, end tokens up to 77."""
        comma = self.tokenizer.get_vocab()[",</w>"]
        chunks: List[List[int]] = []
        chunk: List[int] = []
        last_comma = -1

        def next_chunk() -> None:
            nonlocal chunk, last_comma
            chunks.append([self.id_start] + chunk + [self.id_end] * (76 - len(chunk)))
            chunk, last_comma = [], -1

        for token in self.tokenizer(text, add_special_tokens=False).input_ids:
            if token == comma:
                last_comma = len(chunk)
            elif len(chunk) == 75 and last_comma != -1 and len(chunk) - last_comma <= 20:
                moved = chunk[last_comma + 1 :]
                chunk = chunk[: last_comma + 1]
                next_chunk()
                chunk = moved
            if len(chunk) == 75:
                next_chunk()
            chunk.append(token)
        if chunk or not chunks:
            next_chunk()
        return chunks

    def __call__(self, texts: Sequence[str]) -> Any:
        """Chunk i of every prompt (Forge's empty chunk where a prompt has fewer) encoded together, the results
        joined along the tokens; the pooled output is the first chunk's."""
        lines = [self.tokenize_line(text) for text in texts]
        empty = [self.id_start] + [self.id_end] * 76
        zs = []
        for i in range(max(len(chunks) for chunks in lines)):
            tokens = torch.tensor([chunks[i] if i < len(chunks) else empty for chunks in lines])
            if self.id_end != self.id_pad:
                for row in tokens:
                    row[int((row == self.id_end).nonzero()[0]) + 1 :] = self.id_pad
            zs.append(self.encode_with_transformers(tokens))
        z = torch.hstack(zs)
        return (z, zs[0].pooled) if self.return_pooled else z


# ---------------------------------------------------------------- VAE


class IntegratedAutoencoderKL(nn.Module):
    def __init__(self, diffusers_vae: nn.Module, scale: float):
        super().__init__()
        self.encoder = diffusers_vae.encoder
        self.quant_conv = diffusers_vae.quant_conv
        self.decoder = diffusers_vae.decoder
        self.post_quant_conv = diffusers_vae.post_quant_conv
        self.scale = scale

    def encode(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)  # a sample

    def process_in(self, latent):
        return latent * self.scale


class VAE:
    def __init__(self, model: IntegratedAutoencoderKL):
        self.first_stage_model = model
        self.patcher = ModelPatcher(model)
        self.device = torch.device("cpu")
        self.vae_dtype = torch.float32


class CLIP:
    def __init__(self, encoders: Dict[str, nn.Module]):
        self.cond_stage_model = nn.ModuleDict(encoders)
        self.patcher = ModelPatcher(self.cond_stage_model)


class ForgeObjects:
    def __init__(self, unet, clip, vae):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, None

    def shallow_copy(self) -> "ForgeObjects":
        return ForgeObjects(self.unet, self.clip, self.vae)


# ---------------------------------------------------------------- the engine


UNETS = {  # the shapes of tiny_models.build_tiny's UNets, in ldm form
    "sd1": dict(channels=32, mult=(1, 2), res_blocks=2, depths=(0, 1), heads=8, context_dim=64, use_linear=False),
    "sdxl": dict(
        channels=32,
        mult=(1, 2, 2),
        res_blocks=2,
        depths=(0, 1, 2),
        heads=1,
        context_dim=128,
        use_linear=True,
        adm_in=80,
    ),
    # The real SD1.5 (v1-inference.yaml), for the benchmark: attention at the top three levels and the middle.
    "sd15": dict(
        channels=320,
        mult=(1, 2, 4, 4),
        res_blocks=2,
        depths=(1, 1, 1, 0),
        middle_depth=1,
        heads=8,
        context_dim=768,
        use_linear=False,
    ),
}
SIZE_EMBED_DIM = 8  # tiny SDXL: each size number embedded in 8 channels (1024 px SDXL: 256)


class ForgeEngine:
    """Forge's ``ForgeDiffusionEngine`` for SD1 (``StableDiffusion``) or SDXL (``StableDiffusionXL``)."""

    def __init__(self, arch: str, unet_patcher: ModelPatcher, clip: CLIP, vae: VAE, tokenizers: List[Any]):
        self.is_sd1 = arch in ("sd1", "sd15")
        self.is_sdxl = arch == "sdxl"
        self.is_sd2 = False
        cond = clip.cond_stage_model
        if self.is_sdxl:
            self.text_processing_engine_l = TextProcessingEngine(cond["clip_l"], tokenizers[0], 2, False, False)
            self.text_processing_engine_g = TextProcessingEngine(cond["clip_g"], tokenizers[1], 2, False, True)
            self.embedder = Timestep(SIZE_EMBED_DIM)
        else:
            self.text_processing_engine = TextProcessingEngine(cond["clip_l"], tokenizers[0], 1, True, False)
        self.forge_objects = ForgeObjects(unet_patcher, clip, vae)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.sd_checkpoint_info = None

    def set_clip_skip(self, clip_skip: int) -> None:
        for name in ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g"):
            if hasattr(self, name):
                getattr(self, name).clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts: Sequence[str]):
        if self.is_sdxl:
            cond_l = self.text_processing_engine_l(prompts)
            cond_g, pooled = self.text_processing_engine_g(prompts)
            sizes = self.embedder(torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0])).flatten()
            vector = torch.cat([pooled, sizes[None].repeat(len(prompts), 1).to(pooled)], dim=1)
            return {"crossattn": torch.cat([cond_l, cond_g], dim=2), "vector": vector}
        return self.text_processing_engine(prompts)

    @torch.inference_mode()
    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.forge_objects.vae.first_stage_model
        return vae.process_in(vae.encode(x))

    # --- what a generation does (txt2img, with the LoRA extension) ------------------------------------------
    def apply_loras(self, deltas: Dict[str, torch.Tensor]) -> None:
        """As the LoRA extension does for a prompt with ``<lora:...>``: patched clones become current."""
        original = self.forge_objects_original
        unet = original.unet.clone()
        unet.add_patches({k: v for k, v in deltas.items() if k.startswith("diffusion_model.")})
        clip_patcher = original.clip.patcher.clone()
        clip_patcher.add_patches({k: v for k, v in deltas.items() if not k.startswith("diffusion_model.")})
        clip = CLIP.__new__(CLIP)
        clip.cond_stage_model, clip.patcher = original.clip.cond_stage_model, clip_patcher
        self.forge_objects = ForgeObjects(unet, clip, original.vae)
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str(sorted(deltas))

    @torch.inference_mode()
    def sample(self, memory: MemoryManagement, prompt: str, seed: int = 0, steps: int = 2, size: int = 8):
        """A deterministic Euler txt2img in latent space: what a generation computes, for comparisons."""
        objects = self.forge_objects_after_applying_lora.shallow_copy()
        memory.load_models_gpu([objects.unet, objects.clip.patcher])
        cond = self.get_learned_conditioning([prompt])
        kmodel = objects.unet.model
        sigmas = kmodel.predictor.sigmas
        schedule = torch.linspace(float(sigmas[-1]), float(sigmas[0]), steps + 1)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 4, size, size, generator=g) * schedule[0]
        extra = {"y": cond["vector"]} if isinstance(cond, dict) else {}
        context = cond["crossattn"] if isinstance(cond, dict) else cond
        for s, s_next in zip(schedule[:-1], schedule[1:]):
            denoised = kmodel.apply_model(x, s.view(1), c_crossattn=context, **extra)
            x = x + (x - denoised) / s * (s_next - s)
        return x


def _unet_state(checkpoint: str) -> Dict[str, torch.Tensor]:
    prefix = "model.diffusion_model."
    return {k[len(prefix) :]: v for k, v in load_file(checkpoint).items() if k.startswith(prefix)}


def _forge_clip(hf_encoder: nn.Module) -> IntegratedCLIP:
    """A transformers CLIPTextModel built with Forge's Linear, holding ``hf_encoder``'s weights; an encoder with
    a projection keeps it as ``transformer.text_projection`` (as Forge's IntegratedCLIP does)."""
    from transformers import CLIPTextModel

    with forge_operations():
        model = CLIPTextModel(hf_encoder.config)
        if hasattr(hf_encoder, "text_projection"):
            model.text_projection = nn.Linear(
                hf_encoder.config.hidden_size, hf_encoder.config.projection_dim, bias=False
            )
    own = model.state_dict().keys()
    state = {}
    for key, value in hf_encoder.state_dict().items():  # transformers 5 drops text_model. from CLIPTextModel only
        for name in (key, key.removeprefix("text_model."), "text_model." + key):
            if name in own:
                state[name] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    if hasattr(hf_encoder, "text_projection"):
        model.text_projection.weight.copy_(hf_encoder.text_projection.weight)
    model.eval()
    return IntegratedCLIP(model)


def load_forge_engine(
    checkpoint: str, arch: str, prediction_type: str = "epsilon", text_dtype: torch.dtype = torch.float32
) -> ForgeEngine:
    """Build and load the stand-in inside inference mode, as ``forge_model_reload`` does. ``text_dtype``: the
    embeddings' storage dtype (Forge stores text encoders in fp16 by default, even on the CPU)."""
    from lora_trainer.models.loading import load_stable_diffusion

    parts = load_stable_diffusion(checkpoint, load_unet=False, load_vae=True, load_text_encoders=True)
    with torch.inference_mode():
        with forge_operations():
            unet = UNetModel(**UNETS[arch])
        unet.load_state_dict(_unet_state(checkpoint), strict=True)
        unet_patcher = ModelPatcher(KModel(unet.eval(), Predictor(prediction_type)))
        encoders = {"clip_l": _forge_clip(parts.text_encoders[0])}
        if arch == "sdxl":
            encoders["clip_g"] = _forge_clip(parts.text_encoders[1])
        for encoder in encoders.values():
            text_model(encoder.transformer).embeddings.to(text_dtype)
        clip = CLIP(encoders)
        vae = VAE(IntegratedAutoencoderKL(copy.deepcopy(parts.vae), parts.vae_scaling_factor).eval())
        engine = ForgeEngine(arch, unet_patcher, clip, vae, parts.tokenizers)
    return engine


def install_backend(monkeypatch) -> MemoryManagement:
    """Stand-in ``backend`` modules (Forge's package): ``memory_management`` and ``attention``."""
    backend = types.ModuleType("backend")
    backend.__path__ = []
    memory = MemoryManagement()
    attention = types.ModuleType("backend.attention")
    attention.attention_pytorch = attention_pytorch
    attention.attention_sage = attention_sage
    backend.memory_management, backend.attention = memory, attention
    for name, module in (("backend", backend), ("backend.memory_management", memory), ("backend.attention", attention)):
        monkeypatch.setitem(sys.modules, name, module)
    return memory
