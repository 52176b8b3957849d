"""Typed training configuration, validated once at the edge (YAML file, UI form, API call).

Every option is a dataclass field whose ``metadata`` carries its documentation and the values it allows, so
validation, error messages, the commented templates in ``configs/`` and the UI all read one source.
Nothing here imports anything heavier than PyYAML: the WebUI host loads this module too.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Type

import yaml

from lora_trainer.errors import ConfigError
from lora_trainer.hub.reference import as_hub_reference
from lora_trainer.io.text_files import read_text
from lora_trainer.lora.registry import DEFAULT_LORA_RANK, NETWORK_TYPE_NAMES

TASK_TYPES = ("image-generation", "text-generation")
OUTPUT_NAME_MAX_CHARS = 120
# Letters (any script), digits, and _ first; then also spaces and . ( ) + -: no path separators, nothing that
# ends the <lora:name:weight> prompt syntax (:, <, >), nothing a Windows file name refuses.
_SAFE_OUTPUT_NAME = re.compile(r"^\w[\w .()+\-]*$")


def option(
    default: Any, doc: str, *, choices: tuple = (), minimum: float | None = None, maximum: float | None = None
) -> Any:
    """A config field with its documentation and allowed values."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "maximum": maximum}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class CommonConfig:
    """Options shared by every task type."""

    task_type: str = option(
        "image-generation", "What to train: a diffusion LoRA or a causal-LM LoRA.", choices=TASK_TYPES
    )
    base_model: str = option(
        "",
        "The model to train on: a diffusers/transformers folder, a single-file checkpoint (.safetensors), or a "
        "Hugging Face Hub id (owner/name[@revision], or owner/name/file.safetensors), downloaded on first use. "
        "Left empty for an image LoRA, the command line and the standalone app use "
        "stable-diffusion-v1-5/stable-diffusion-v1-5.",
    )
    train_data_dir: str = option("", "Folder with the training data.")
    output_dir: str = option("./output", "Where the LoRA, training states, config snapshot and logs go.")
    output_name: Optional[str] = option(None, "File stem of the saved LoRA; defaults to the output folder's name.")
    lora_rank: Optional[int] = option(
        None,
        f"LoRA rank (network dim). Image default {DEFAULT_LORA_RANK}, text default {DEFAULT_LORA_RANK}.",
        minimum=1,
        maximum=4096,
    )
    lora_alpha: Optional[float] = option(
        None,
        "LoRA alpha; the update is scaled by alpha/rank. Image default = rank (scale 1), text default 16.",
        minimum=0,
    )
    lora_dropout: Optional[float] = option(
        None, "Dropout on the LoRA input. Image default 0, text default 0.1.", minimum=0, maximum=1
    )
    batch_size: int = option(1, "Samples per step on each process.", minimum=1)
    epochs: int = option(1, "Passes over the dataset (ignored when max_train_steps is set).", minimum=1)
    max_train_steps: Optional[int] = option(None, "Stop after this many optimizer steps.", minimum=1)
    learning_rate: float = option(1e-4, "Learning rate.", minimum=0)
    optimizer: str = option(
        "AdamW",
        "Optimizer. AdamW8bit needs bitsandbytes; Prodigy needs prodigyopt (use learning_rate 1.0 with it).",
        choices=("AdamW", "AdamW8bit", "Prodigy", "SGD"),
    )
    weight_decay: float = option(0.01, "Optimizer weight decay.", minimum=0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm; 0 disables clipping.", minimum=0)
    lr_scheduler: str = option(
        "constant",
        "Learning-rate schedule after warm-up.",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    )
    lr_warmup_steps: int = option(0, "Linear warm-up steps.", minimum=0)
    lr_scheduler_num_cycles: int = option(1, "Restarts for cosine_with_restarts.", minimum=1)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.", minimum=1)
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    mixed_precision: str = option(
        "no", "Precision of the frozen base model's compute; LoRA weights stay fp32.", choices=("no", "fp16", "bf16")
    )
    seed: int = option(42, "Random seed; the same seed and data give the same LoRA.")
    save_steps: Optional[int] = option(None, "Save the LoRA and a training state every N optimizer steps.", minimum=1)
    save_every_n_epochs: Optional[int] = option(None, "Save the LoRA and a training state every N epochs.", minimum=1)
    save_precision: str = option("fp16", "Precision of the saved LoRA weights.", choices=("fp16", "bf16", "float"))
    save_state: bool = option(True, "Write a resumable training state with each save.")
    resume: Optional[str] = option(None, "A training-state folder (output_dir/state-<step>) to continue from.")
    network_weights: Optional[str] = option(
        None,
        "An existing LoRA to continue training from; its network type, rank, alpha (and LoKr factors, DoRA) are kept.",
    )
    logging_dir: Optional[str] = option(None, "TensorBoard folder; defaults to output_dir/logs.")
    num_threads: Optional[int] = option(
        None, "CPU threads for torch; defaults to all cores of this process's share.", minimum=1
    )


@dataclass
class ImageConfig(CommonConfig):
    """Options of ``task_type: image-generation``."""

    metadata_path: Optional[str] = option(
        None, "CSV of filename,prompt rows; defaults to train_data_dir/metadata.csv when present, else .txt sidecars."
    )
    caption_extension: str = option(".txt", "Extension of sidecar caption files.")
    resolution: int = option(
        512, "Training resolution (the bucket area is resolution squared).", minimum=64, maximum=4096
    )
    enable_bucket: bool = option(True, "Aspect-ratio bucketing; otherwise every image is centre-cropped square.")
    min_bucket_reso: int = option(256, "Smallest bucket side.", minimum=64)
    max_bucket_reso: int = option(1024, "Largest bucket side.", minimum=64)
    bucket_reso_steps: int = option(64, "Bucket sides are multiples of this.", minimum=8)
    random_flip: bool = option(False, "Randomly flip images horizontally (disables latent caching).")
    train_text_encoder: bool = option(False, "Also train LoRA on the text encoder(s).")
    unet_lr: Optional[float] = option(None, "UNet learning rate; defaults to learning_rate.", minimum=0)
    text_encoder_lr: Optional[float] = option(None, "Text-encoder learning rate; defaults to learning_rate.", minimum=0)
    noise_offset: float = option(0.0, "Noise offset (try 0.05-0.1 for darker/brighter images).", minimum=0)
    min_snr_gamma: Optional[float] = option(None, "Min-SNR loss weighting gamma (5 is usual).", minimum=0)
    prediction_type: Optional[str] = option(
        None, "Override the model's prediction type.", choices=("epsilon", "v_prediction")
    )
    clip_skip: int = option(
        1, "Use the output of the n-th last text-encoder layer (2 for anime models).", minimum=1, maximum=12
    )
    max_token_length: int = option(
        75,
        "Caption tokens the text encoder sees: 75 is one CLIP window; 150 or 225 encode longer captions in "
        "75-token windows, as sd-scripts' max_token_length does. Longer captions are cut at the end.",
        choices=(75, 150, 225),
    )
    shuffle_caption: bool = option(False, "Shuffle comma-separated tags of each caption every epoch.")
    keep_tokens: int = option(0, "Tags kept in place at the front when shuffling.", minimum=0)
    caption_dropout_rate: float = option(
        0.0, "Probability of training a sample with an empty caption.", minimum=0, maximum=1
    )
    cache_latents: bool = option(True, "Encode each image once and reuse its latents (off with random_flip).")
    cache_to_disk: bool = option(True, "Keep cached latents and text embeddings on disk between runs.")
    cache_dir: Optional[str] = option(None, "Disk cache folder; defaults to train_data_dir/.lora_trainer_cache.")
    target_modules: List[str] = option(
        [],
        "Extra module-name substrings to train besides sd-scripts' default "
        "(attention and feed-forward linears of the transformer blocks).",
    )
    network_type: str = option(
        "lora",
        "Network type. lora: sd-scripts' LoRA. locon: LoRA also on the ResNet 3x3 convolutions (styles). "
        "loha / lokr: Hadamard / Kronecker products (more capacity per parameter). dora: weight-decomposed "
        "LoRA (magnitude + direction). All but lora are written as LyCORIS writes them (lycoris.kohya).",
        choices=NETWORK_TYPE_NAMES,
    )
    conv_rank: Optional[int] = option(
        None,
        "Rank of the 3x3 convolution layers: locon trains them at lora_rank by default; set it to train them "
        "with loha, lokr or dora too.",
        minimum=1,
        maximum=4096,
    )
    conv_alpha: Optional[float] = option(
        None, "Alpha of the 3x3 convolution layers; defaults to the alpha/rank scale of the others.", minimum=0
    )
    factor: int = option(
        -1,
        "lokr: the Kronecker factor size (each weight splits into a small factor of at most this size and a "
        "low-rank large one); -1 splits as evenly as possible.",
        minimum=-1,
    )
    dora_wd: bool = option(
        False, "DoRA weight decomposition on top of locon, loha or lokr (network_type dora is LoRA with it)."
    )


@dataclass
class TextConfig(CommonConfig):
    """Options of ``task_type: text-generation``."""

    target_modules: List[str] = option(["q_proj", "v_proj"], "Module names that get LoRA layers.")
    max_seq_length: int = option(512, "Longer samples are truncated (and counted in the summary).", minimum=8)
    packing: bool = option(False, "Pack several short samples into one sequence.")
    merge_adapter: bool = option(False, "Also write the base model with the adapter merged in.")
    data_format: str = option(
        "auto",
        "Training data format; auto detects it from the files.",
        choices=("auto", "text", "prompt_completion", "alpaca", "chat"),
    )
    text_sample_unit: str = option(
        "line", "Plain .txt data: one sample per non-blank line, or one per file.", choices=("line", "file")
    )


CONFIG_CLASSES: Dict[str, Type[CommonConfig]] = {"image-generation": ImageConfig, "text-generation": TextConfig}
PATH_KEYS = (
    "base_model",
    "train_data_dir",
    "output_dir",
    "metadata_path",
    "resume",
    "network_weights",
    "logging_dir",
    "cache_dir",
)


def fields_of(cls: Type[CommonConfig]) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, annotation: Any, f: dataclasses.Field) -> Any:
    """Turn a YAML/UI value into the field's type, or raise ConfigError naming key, value and what is allowed."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        annotation = next(a for a in args if a is not type(None))
        origin = typing.get_origin(annotation)
    if origin in (list, List):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}.")
        return list(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {value!r}.")
    if annotation in (int, float):
        # YAML 1.1 reads 2e-4 (no dot) as a string: accept any numeric spelling as the number it means.
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if math.isnan(number) or math.isinf(number):
            raise ConfigError(f"{key}: expected a number, got {value!r}.")
        if annotation is int:
            if number != int(number):
                raise ConfigError(f"{key}: expected a whole number, got {value!r}.")
            number = int(number)
        lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {bounds}.")
        choices = f.metadata.get("choices") or ()
        if choices and number not in choices:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}.")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected text, got {value!r}.")
        value = str(value)
        choices = f.metadata.get("choices") or ()
        if choices and value not in choices:
            folded = {c.lower(): c for c in choices}
            if value.lower() in folded:
                return folded[value.lower()]
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(choices)}.")
        return value
    raise ConfigError(f"{key}: unsupported option type {annotation!r}.")  # pragma: no cover


def config_from_dict(
    raw: Mapping[str, Any], *, base_dir: str | None = None, default_base_model: str | None = None
) -> CommonConfig:
    """Validate a mapping of options and build the config of its ``task_type``.

    Relative paths are resolved against ``base_dir`` (the current directory when None), so a config file
    behaves the same wherever the command is run from only when its paths are absolute, as users expect.
    A ``base_model`` naming a Hub repository (and no local path) is kept as written. ``default_base_model``
    fills an empty ``base_model`` of an image config (the command line's and standalone app's default).
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"The config must be a mapping of key: value pairs, got {type(raw).__name__}.")
    task = raw.get("task_type", "image-generation")
    if task not in CONFIG_CLASSES:
        raise ConfigError(f"task_type: {task!r} is not a known task type; choose one of {', '.join(TASK_TYPES)}.")
    cls = CONFIG_CLASSES[task]
    known = fields_of(cls)
    hints = typing.get_type_hints(cls)
    values: Dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            other = "text-generation" if task == "image-generation" else "image-generation"
            if key in fields_of(CONFIG_CLASSES[other]):
                raise ConfigError(f"Unknown key {key!r} for task_type {task}: it is an option of {other}.")
            near = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            hint = f" Did you mean {near[0]!r}?" if near else " See configs/ for the documented keys."
            raise ConfigError(f"Unknown key {key!r}.{hint}")
        values[key] = _coerce(key, value, hints[key], known[key])
    if default_base_model and cls is ImageConfig and not values.get("base_model"):
        values["base_model"] = default_base_model
    for key in PATH_KEYS:
        if key in known and values.get(key):
            if key == "base_model" and as_hub_reference(values[key], base_dir) is not None:
                continue  # a Hub id, not a path
            values[key] = os.path.normpath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(values[key])))
    cfg = cls(**values)
    _check_required(cfg)
    return cfg


def _check_required(cfg: CommonConfig) -> None:
    for key in ("base_model", "train_data_dir", "output_dir"):
        if not getattr(cfg, key):
            raise ConfigError(f"{key} is required: set it in the config.")
    if isinstance(cfg, ImageConfig) and cfg.min_bucket_reso > cfg.max_bucket_reso:
        raise ConfigError(
            f"min_bucket_reso ({cfg.min_bucket_reso}) must not exceed max_bucket_reso ({cfg.max_bucket_reso})."
        )
    if isinstance(cfg, ImageConfig):
        _check_network_options(cfg)


def _check_network_options(cfg: ImageConfig) -> None:
    """Options that only some network types take must not be set for the others (they would do nothing)."""
    if cfg.network_type == "lora" and (cfg.conv_rank is not None or cfg.conv_alpha is not None):
        raise ConfigError(
            "conv_rank/conv_alpha: network_type lora trains no 3x3 convolutions; use network_type locon "
            "(or loha, lokr, dora with conv_rank)."
        )
    if cfg.factor == 0 or (cfg.factor != -1 and cfg.network_type != "lokr"):
        raise ConfigError(
            f"factor: {cfg.factor} is not allowed; it is the lokr Kronecker factor size (-1 or at least 1) and "
            f"network_type is {cfg.network_type}."
        )
    if cfg.dora_wd and cfg.network_type == "lora":
        raise ConfigError("dora_wd: network_type lora with weight decomposition is network_type dora; choose that.")


def load_config(
    path: str, overrides: Mapping[str, Any] | None = None, *, default_base_model: str | None = None
) -> CommonConfig:
    """Read a YAML config file (relative paths resolve against the working directory, as in lora-scripts);
    ``default_base_model`` as in ``config_from_dict``."""
    if not os.path.isfile(path):
        raise ConfigError(f"Config file not found: {path}")
    try:
        raw = yaml.safe_load(read_text(path, ConfigError)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold key: value pairs at the top level.")
    raw.update(overrides or {})
    return config_from_dict(raw, default_base_model=default_base_model)


def config_to_dict(cfg: CommonConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config_snapshot(cfg: CommonConfig, path: str) -> None:
    """Write the resolved config (every option, defaults included) as YAML, atomically."""
    from lora_trainer.io.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))


def lora_rank_of(cfg: CommonConfig) -> int:
    """The rank the run trains: ``lora_rank``, or ``DEFAULT_LORA_RANK`` when it is left out."""
    return cfg.lora_rank if cfg.lora_rank is not None else DEFAULT_LORA_RANK


def check_output_name(name: str) -> str:
    """The LoRA's file stem and ``<lora:name>`` alias, stripped (a trailing ``.safetensors`` dropped); ConfigError
    for what could escape the output folder or confuse the WebUI's Lora list. The one rule for every front end."""
    name = (name or "").strip()
    if not name:
        raise ConfigError("Output name is required: it becomes the file name and the <lora:name> alias.")
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _SAFE_OUTPUT_NAME.match(name) or ".." in name or len(name) > OUTPUT_NAME_MAX_CHARS:
        raise ConfigError(
            f"Output name {name!r} is not allowed: use letters, digits, spaces and _ . ( ) + - "
            f"(no path separators, no leading dot, at most {OUTPUT_NAME_MAX_CHARS} characters)."
        )
    return name


def resolved_output_name(cfg: CommonConfig) -> str:
    return cfg.output_name or os.path.basename(os.path.normpath(cfg.output_dir)) or "lora"
