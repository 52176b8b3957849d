"""Loading Stable Diffusion models from disk, fully offline, with one copy of the weights in memory.

Two sources: a diffusers folder (``model_index.json``) or a single-file checkpoint (``.safetensors``; ``.ckpt``
only through ``torch.load(weights_only=True)``). Single files are read tensor by tensor with ``safe_open``
into models built on the meta device (``load_state_dict(assign=True)``), so the UNet never exists twice.
Configs come from the checkpoint's own keys (``architecture.py``); the tokenizer from open_clip's vocabulary.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from lora_trainer.errors import ModelLoadError
from lora_trainer.io.safetensors_stream import SafetensorsStream
from lora_trainer.io.text_files import read_text
from lora_trainer.models.architecture import (
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointSpec,
    TextEncoderSpec,
    infer_spec,
)
from lora_trainer.models.diffusers_folder import (
    check_text_to_image_unet,
    load_component,
    read_pipeline_folder,
    weight_file_variant,
    weights_variant,
)
from lora_trainer.models.families.unet_family import UNetFamily
from lora_trainer.models.ldm_names import UNetLayout, UNetNameMap, VaeNameMap, open_clip_to_hf


@dataclass
class StableDiffusionModel:
    """The parts the trainer needs; ``vae``/``text_encoders`` are None when not loaded (their outputs cached)."""

    family: UNetFamily
    unet: Optional[torch.nn.Module]
    vae: Optional[torch.nn.Module]
    text_encoders: Optional[List[torch.nn.Module]]
    tokenizers: List[object]
    prediction_type: str
    alphas_cumprod: torch.Tensor
    vae_scaling_factor: float
    name: str
    unet_layout: UNetLayout
    info: Dict[str, str] = field(default_factory=dict)
    zero_terminal_snr: bool = False
    # The text encoders' parameter count, read from the file headers whether or not they are loaded (None:
    # the files do not say, e.g. a folder with .bin weights).
    text_encoder_parameters: Optional[int] = None

    @property
    def arch(self) -> str:
        return self.family.name


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000, schedule: str = "scaled_linear"
) -> torch.Tensor:
    """The DDPM noise schedule every SD1/SD2/SDXL model was trained with."""
    if schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    else:
        raise ModelLoadError(f"unsupported beta_schedule {schedule!r} in the scheduler config.")
    return torch.cumprod(1.0 - betas, dim=0).float()


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule shifted and scaled so its last step has zero SNR and its first is unchanged
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1)."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return (root**2).to(alphas_cumprod.dtype)


def is_diffusers_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json"))


def load_stable_diffusion(
    path: str,
    *,
    load_unet: bool = True,
    load_vae: bool = True,
    load_text_encoders: bool = True,
    dtype: torch.dtype = torch.float32,
    prediction_type: Optional[str] = None,
    vae_encoder_only: bool = False,
) -> StableDiffusionModel:
    """Load a diffusers folder or single-file SD1/SD2/SDXL checkpoint for training (eval mode, frozen).

    Parts not asked for are None: the trainer loads the encoders first, caches their outputs and frees them
    before the UNet loads, so the peak holds the UNet and never the encoders beside it. ``vae_encoder_only``
    gives a VAE without its decoder (``encode`` works, ``decode`` does not): all that filling the latent cache
    needs, and for SD's VAE 34M of its 84M parameters (a single file's decoder weights are not even read).
    """
    if not os.path.exists(path):
        raise ModelLoadError(
            f"base_model not found: {path}. Point base_model at a .safetensors checkpoint or a "
            "diffusers folder (with model_index.json)."
        )
    if os.path.isdir(path):
        if not is_diffusers_folder(path):
            raise ModelLoadError(
                f"base_model {path} is a folder without model_index.json; give a diffusers "
                "folder or a single-file checkpoint."
            )
        model = _load_diffusers_folder(path, load_unet, load_vae, load_text_encoders, dtype, prediction_type)
        if model.vae is not None and vae_encoder_only:
            drop_vae_decoder(model.vae)
    else:
        model = _load_single_file(
            path, load_unet, load_vae, load_text_encoders, dtype, prediction_type, vae_encoder_only
        )
    for module in [model.unet, model.vae, *(model.text_encoders or [])]:
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return model


# ---------------------------------------------------------------- diffusers folders


def _load_diffusers_folder(
    path, load_unet, load_vae, load_text_encoders, dtype, prediction_type
) -> StableDiffusionModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = read_pipeline_folder(path)  # refuses what is not an SD1/SD2/SDXL text-to-image pipeline
    family = folder.family
    unet = (
        load_component(folder, "unet", UNet2DConditionModel, torch_dtype=dtype, low_cpu_mem_usage=True)
        if load_unet
        else None
    )
    vae = load_component(folder, "vae", AutoencoderKL, torch_dtype=dtype) if load_vae else None
    text_encoders = None
    if load_text_encoders:
        classes = [CLIPTextModel, CLIPTextModelWithProjection]
        text_encoders = [
            load_component(folder, name, classes[i], torch_dtype=dtype) for i, name in enumerate(folder.text_encoders)
        ]
    tokenizers = []
    for i, name in enumerate(["tokenizer", "tokenizer_2"][: len(folder.text_encoders)]):
        tokenizer_folder = os.path.join(path, name)
        tokenizers.append(_tokenizer(tokenizer_folder if os.path.isdir(tokenizer_folder) else None, family, i))
    return StableDiffusionModel(
        family=family,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        prediction_type=prediction_type or folder.prediction_type,
        alphas_cumprod=folder.alphas_cumprod,
        vae_scaling_factor=vae.config.scaling_factor if vae is not None else folder.vae_scaling_factor,
        name=os.path.basename(os.path.normpath(path)),
        unet_layout=UNetLayout.from_config(folder.unet_config),
        zero_terminal_snr=folder.zero_terminal_snr,
        text_encoder_parameters=_folder_parameters([os.path.join(path, name) for name in folder.text_encoders]),
    )


def _folder_parameters(folders: List[str]) -> Optional[int]:
    """Parameters in the .safetensors weights of component ``folders`` in the variant they load as (headers
    only); None where a folder's weights are not .safetensors."""
    total = 0
    for folder in folders:
        variant = weights_variant(folder)
        files = [
            f
            for f in sorted(glob.glob(os.path.join(folder, "*.safetensors")))
            if weight_file_variant(os.path.basename(f)) == variant
        ]
        if not files:
            return None
        for file in files:
            try:
                stream = SafetensorsStream(file)
            except (OSError, ValueError):  # damaged or a Git LFS pointer: loading the encoders will say so
                return None
            total += sum(math.prod(stream.shape(key)) for key in stream.keys())
    return total


def _tokenizer(folder: Optional[str], family: UNetFamily, index: int):
    from lora_trainer.models.tokenizer import load_clip_tokenizer

    # open_clip-trained encoders (SD2, SDXL's second) pad with "!" rather than the end token.
    pad = "!" if not family.tokenizer_pads_with_end_token(index) and folder is None else None
    return load_clip_tokenizer(folder, pad)


# ---------------------------------------------------------------- single files


class CheckpointReader:
    """Uniform tensor access for .safetensors (lazy) and weights-only .ckpt files."""

    def __init__(self, path: str):
        self.path = path
        ext = os.path.splitext(path)[1].lower()
        if ext == ".safetensors":
            try:
                self.stream = SafetensorsStream(path)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"{path} is not a readable .safetensors file ({exc}).") from None
            self.keys = self.stream.keys()
            self.tensors = None
        elif ext in (".ckpt", ".pt", ".pth", ".bin"):
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise ModelLoadError(
                    f"{path}: refusing to unpickle this checkpoint, it is not loadable with weights_only=True "
                    f"({type(exc).__name__}). Pickled checkpoints can run arbitrary code; convert it to "
                    ".safetensors with a tool you trust."
                ) from None
            self.tensors = blob.get("state_dict", blob) if isinstance(blob, dict) else {}
            self.keys = [k for k, v in self.tensors.items() if isinstance(v, torch.Tensor)]
        else:
            raise ModelLoadError(
                f"{path}: unsupported model file type {ext!r}; use .safetensors or a diffusers folder."
            )

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        if self.tensors is not None:
            return {k: tuple(self.tensors[k].shape) for k in self.keys}
        return {k: self.stream.shape(k) for k in self.keys}

    def get(self, key: str) -> torch.Tensor:
        if self.tensors is not None:
            return self.tensors[key]
        return self.stream.read(key)

    def items(self, prefix: str) -> Iterator[Tuple[str, torch.Tensor]]:
        for key in self.keys:
            if key.startswith(prefix):
                yield key[len(prefix) :], self.get(key)


def _prediction_type_from_yaml(path: str) -> Optional[str]:
    """The ldm config beside a checkpoint (``name.yaml``), as the WebUI reads it: only parameterization."""
    yaml_path = os.path.splitext(path)[0] + ".yaml"
    if not os.path.isfile(yaml_path):
        return None
    import yaml

    try:
        config = yaml.safe_load(read_text(yaml_path, ModelLoadError)) or {}
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"{yaml_path} (the config beside the checkpoint) is not valid YAML: {exc}") from None
    params = (config.get("model") or {}).get("params") or {}
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


def materialise(
    module: torch.nn.Module, state: Dict[str, torch.Tensor], what: str, path: str, optional: Tuple[str, ...] = ()
) -> None:
    missing, _unexpected = module.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith(optional)]
    if missing:
        raise ModelLoadError(
            f"{path}: the {what} is missing {len(missing)} weights (first: {missing[0]}); the "
            "checkpoint is incomplete or of an unsupported layout."
        )


def _convert_unet(reader: CheckpointReader, spec: CheckpointSpec, dtype) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    names = UNetNameMap(UNetLayout.from_config(spec.unet_config))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.unet_config)
    state = {}
    for key, tensor in reader.items(UNET_PREFIX):
        name = names.to_diffusers(key)
        if name is not None:
            state[name] = tensor.to(dtype)
    materialise(unet, state, "UNet", reader.path)
    return unet


def _convert_vae(reader: CheckpointReader, spec: CheckpointSpec, dtype, encoder_only: bool) -> torch.nn.Module:
    return convert_ldm_vae(reader, VAE_PREFIX, spec.vae_config, dtype, encoder_only=encoder_only)


VAE_ENCODER_PARTS = ("encoder.", "quant_conv.")  # what AutoencoderKL.encode runs


def drop_vae_decoder(vae: torch.nn.Module) -> torch.nn.Module:
    """``vae`` without the parts only ``decode`` uses (in place): its ``encode`` is unchanged."""
    vae.decoder = None
    vae.post_quant_conv = None
    return vae


def convert_ldm_vae(
    reader: CheckpointReader, prefix: str, vae_config: dict, dtype, *, encoder_only: bool = False
) -> torch.nn.Module:
    """A diffusers ``AutoencoderKL`` from the ldm-layout VAE weights under ``prefix``, one copy in memory;
    with ``encoder_only``, without its decoder (see ``drop_vae_decoder``), whose weights are then not read."""
    from diffusers import AutoencoderKL

    names = VaeNameMap(len(vae_config["block_out_channels"]), vae_config["layers_per_block"])
    with torch.device("meta"):
        vae = AutoencoderKL(**vae_config)
    if encoder_only:
        drop_vae_decoder(vae)
    state = {}
    for key in reader.keys:
        name = names.to_diffusers(key[len(prefix) :]) if key.startswith(prefix) else None
        if name is None or (encoder_only and not name.startswith(VAE_ENCODER_PARTS)):
            continue
        # ldm's VAE attention uses 1x1 convolutions where diffusers uses linears: drop the 1x1.
        state[name] = reader.get(key).to(dtype).reshape(vae.get_parameter(name).shape)
    materialise(vae, state, "VAE", reader.path)
    return vae


def convert_text_encoder(reader: CheckpointReader, te: TextEncoderSpec, dtype) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**te.config)
    cls = CLIPTextModelWithProjection if te.with_projection else CLIPTextModel
    with torch.device("meta"):
        model = cls(config)
    layers = config.num_hidden_layers
    state = {}
    for key, tensor in reader.items(te.prefix):
        if te.open_clip:
            name = open_clip_to_hf(key)
            if name is None:
                continue
            if name == "text_projection.weight":
                if not te.with_projection:
                    continue
                tensor = tensor.t()
            if ".self_attn.in_proj_" in name:
                base, kind = name.split(".self_attn.in_proj_")
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    state[f"{base}.self_attn.{part}.{kind}"] = chunk.to(dtype).clone()
                continue
        else:
            name = key if key.startswith(("text_model.", "text_projection")) else "text_model." + key
        state[name] = tensor.to(dtype)
    # Layers beyond the encoder's depth (SD2's last layer, which it never uses) are dropped here.
    state = {
        k: v
        for k, v in state.items()
        if not (k.startswith("text_model.encoder.layers.") and int(k.split(".")[3]) >= layers)
    }
    if not te.with_projection:
        state.pop("text_projection.weight", None)
    state = {hf_text_state_name(model, k): v for k, v in state.items()}
    materialise(model, state, "text encoder", reader.path, optional=("position_ids",))
    for module in model.modules():
        buffer = getattr(module, "position_ids", None)
        if isinstance(buffer, torch.Tensor) and buffer.is_meta:
            module.register_buffer(
                "position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0), persistent=False
            )
    return model


def hf_text_state_name(model: torch.nn.Module, name: str) -> str:
    """transformers 5 flattened CLIPTextModel (no ``text_model.`` level); 4.x and the files keep it."""
    has_level = hasattr(model, "text_model")
    if has_level or not name.startswith("text_model."):
        return name
    return name[len("text_model.") :]


def _load_single_file(
    path, load_unet, load_vae, load_text_encoders, dtype, prediction_type, vae_encoder_only=False
) -> StableDiffusionModel:
    reader = CheckpointReader(path)
    shapes = reader.shapes()
    spec = infer_spec(shapes, prediction_type or _prediction_type_from_yaml(path))
    check_text_to_image_unet(int(spec.unet_config["in_channels"]), path)
    unet = _convert_unet(reader, spec, dtype) if load_unet else None
    vae = _convert_vae(reader, spec, dtype, vae_encoder_only) if load_vae else None
    text_encoders = (
        [convert_text_encoder(reader, te, dtype) for te in spec.text_encoders] if load_text_encoders else None
    )
    tokenizers = [_tokenizer(None, spec.family, i) for i in range(len(spec.text_encoders))]
    alphas = scaled_linear_alphas_cumprod()
    if spec.zero_terminal_snr:
        alphas = rescale_zero_terminal_snr(alphas)
    return StableDiffusionModel(
        family=spec.family,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        prediction_type=spec.prediction_type,
        alphas_cumprod=alphas,
        vae_scaling_factor=spec.vae_config["scaling_factor"],
        name=os.path.basename(path),
        unet_layout=UNetLayout.from_config(spec.unet_config),
        zero_terminal_snr=spec.zero_terminal_snr,
        text_encoder_parameters=sum(
            math.prod(shape)
            for key, shape in shapes.items()
            if key.startswith(tuple(te.prefix for te in spec.text_encoders))
        ),
    )
