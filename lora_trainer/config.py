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
PROMPT_FILE_EXTENSIONS = (".txt", ".json", ".toml")  # sd-scripts' prompt files
# sd-scripts' sample_sampler names (the k_ ones are aliases of the plain ones).
SAMPLE_SAMPLERS = (
    "ddim",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "dpmsolver",
    "dpmsolver++",
    "dpmsingle",
    "k_lms",
    "k_euler",
    "k_euler_a",
    "k_dpm_2",
    "k_dpm_2_a",
)


def option(
    default: Any,
    doc: str,
    *,
    choices: tuple = (),
    minimum: float | None = None,
    maximum: float | None = None,
    lines: bool = False,
) -> Any:
    """A config field with its documentation and allowed values. ``lines``: a list of text that a single
    string gives one item per line (prompts hold commas), where other lists split a string at commas."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "maximum": maximum, "lines": lines}
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
    bucket_no_upscale: bool = option(
        False,
        "Never upscale (sd-scripts' bucket_no_upscale): an image within the resolution's area gets a bucket of "
        "its own size, each side cut down to a multiple of bucket_reso_steps (cropped, not resized); a larger one "
        "is scaled down to the area first. min_bucket_reso and max_bucket_reso do not apply.",
    )
    random_flip: bool = option(False, "Randomly flip images horizontally (disables latent caching).")
    masked_loss: bool = option(
        False,
        "Weight the loss per pixel: by a mask image of the same name in a masks/ folder beside the image (white "
        "counts fully, black not at all), else by the image's alpha channel; images with neither count everywhere.",
    )
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
    caption_tag_dropout_rate: float = option(
        0.0,
        "Probability of leaving out each tag (comma-separated part) not held in place by keep_tokens or "
        "keep_tokens_separator, drawn anew every epoch.",
        minimum=0,
        maximum=1,
    )
    keep_tokens_separator: str = option(
        "",
        "A separator such as |||: tags before it stay first and tags after a second one stay last, whatever "
        "shuffling and tag dropout do (instead of keep_tokens); the separator itself is removed.",
    )
    caption_prefix: str = option(
        "", "Text put before every caption with a space (end it with a comma to make it a tag of its own)."
    )
    caption_suffix: str = option(
        "", "Text put after every caption with a space (start it with a comma to make it a tag of its own)."
    )
    secondary_separator: str = option(
        "",
        "A separator such as ;;; that binds words into one tag for shuffling and dropout "
        "(red hair;;;long hair); replaced by a comma afterwards.",
    )
    cache_latents: bool = option(True, "Encode each image once and reuse its latents (off with random_flip).")
    cache_latents_during_training: bool = option(
        True,
        "With cache_latents, start training once the captions are encoded and encode each image's latents when "
        "its first batch needs them, keeping the VAE's encoder (about 130 MB for SD) beside the model until "
        "every image is cached; false encodes every image before the model loads. The standalone engine only "
        "(in the WebUI the host's VAE encodes every image first).",
    )
    cache_text_during_training: bool = option(
        True,
        "With cached text-encoder outputs, encode the captions of the first step's batch when it starts and "
        "the rest before the next step that misses one, loading the text encoders beside the model for that "
        "only (never through a step), where they are smaller than the step's activations; false encodes every "
        "caption before the model loads.",
    )
    cache_to_disk: bool = option(True, "Keep cached latents and text embeddings on disk between runs.")
    cache_dir: Optional[str] = option(
        None, "Disk cache folder; defaults to .lora_trainer_cache in train_data_dir (or the first datasets folder)."
    )
    datasets: List[DatasetEntry] = option(
        [],
        "More image folders in one run (sd-scripts' dataset subsets), each a folder or a mapping of per-folder "
        "options; train_data_dir, when set, is one more folder with the top-level options. In the tab, one per "
        "line: a folder, or a mapping such as {image_dir: /path/reg, is_reg: true, num_repeats: 2}.",
    )
    prior_loss_weight: float = option(
        1.0, "Loss weight of regularisation images (datasets entries with is_reg: true).", minimum=0
    )
    validation_split: float = option(
        0.0,
        "Fraction of each training folder held out for the validation loss (regularisation folders are not split).",
        minimum=0,
        maximum=0.9,
    )
    validation_seed: Optional[int] = option(
        None, "Seed of the validation split and of the validation noise; defaults to seed."
    )
    validate_every_n_steps: Optional[int] = option(
        None, "Measure the validation loss every N steps (as well as every validate_every_n_epochs).", minimum=1
    )
    validate_every_n_epochs: Optional[int] = option(
        None, "Measure the validation loss every N epochs; unset, at every epoch's end.", minimum=1
    )
    max_validation_steps: Optional[int] = option(
        None, "Validation batches per measurement; unset, all of them.", minimum=1
    )
    sample_prompts: List[str] = option(
        [],
        "Sample images during training: prompts in sd-scripts' format (a prompt, then --n negative prompt, --w "
        "width, --h height, --s steps, --l guidance scale, --d seed, --ss sampler), one per line, or a .txt, "
        ".json or .toml prompt file. Written to output_dir/samples and TensorBoard, the LoRA at strength 1.",
        lines=True,
    )
    sample_every_n_steps: Optional[int] = option(None, "Sample images every N steps.", minimum=1)
    sample_every_n_epochs: Optional[int] = option(
        None, "Sample images every N epochs (instead of sample_every_n_steps).", minimum=1
    )
    sample_at_first: bool = option(False, "Also sample images before the first step.")
    sample_sampler: str = option(
        "ddim", "Sampler of the sample images (a prompt's --ss overrides it).", choices=SAMPLE_SAMPLERS
    )
    save_last_n_steps: Optional[int] = option(
        None,
        "Keep only the step saves (LoRA and state) of the last N steps; older ones are deleted after each save.",
        minimum=1,
    )
    save_last_n_epochs: Optional[int] = option(
        None, "Keep only the last N epoch saves (LoRA and state); older ones are deleted after each save.", minimum=1
    )
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
    # Flux.1 (sd-scripts' flux_train_network names). The transformer file is base_model; empty paths are looked
    # for beside it and in a WebUI's/ComfyUI's models/VAE, vae, text_encoder(s), clip folders.
    ae: Optional[str] = option(
        None,
        "Flux and Z-Image: the autoencoder file (ae.safetensors). Empty: looked for beside base_model, then in "
        "the models folder's VAE (WebUI) or vae (ComfyUI) folder.",
    )
    qwen3: Optional[str] = option(
        None,
        "Z-Image: the Qwen3-4B text encoder file (qwen_3_4b.safetensors). Empty: looked for beside base_model, "
        "then in the models folder's text_encoder (WebUI), text_encoders or clip (ComfyUI) folder.",
    )
    clip_l: Optional[str] = option(
        None,
        "Flux: the CLIP-L text encoder file (clip_l.safetensors). Empty: looked for beside base_model, then in "
        "the models folder's text_encoder (WebUI), text_encoders or clip (ComfyUI) folder.",
    )
    t5xxl: Optional[str] = option(
        None,
        "Flux: the T5-XXL text encoder file (t5xxl_fp16.safetensors, or t5xxl_fp8_e4m3fn.safetensors). Empty: "
        "looked for like clip_l.",
    )
    t5xxl_max_token_length: Optional[int] = option(
        None, "Flux: T5 tokens per caption; default 512 for [dev], 256 for [schnell].", minimum=1, maximum=512
    )
    guidance_scale: float = option(
        1.0, "Flux.1 [dev]: the guidance value the model is given while training (1.0 is usual for a LoRA).", minimum=0
    )
    timestep_sampling: str = option(
        "sigmoid",
        "Flow-matching families: how noise levels are drawn (sd-scripts' timestep_sampling): sigmoid of a normal "
        "sample, the same shifted by discrete_flow_shift, Flux's resolution-dependent shift, or uniform.",
        choices=("sigmoid", "shift", "flux_shift", "uniform"),
    )
    sigmoid_scale: float = option(1.0, "Flow matching: scale of the normal sample before the sigmoid.", minimum=0)
    discrete_flow_shift: float = option(3.0, "Flow matching: the shift of timestep_sampling: shift.", minimum=0)
    fp8_base: bool = option(
        False, "Store the frozen base transformer's weights in fp8 (half of bf16's memory); LoRA stays in bf16/fp32."
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


# The options a datasets entry may set for its own folder; unset, they take the top-level value.
FOLDER_OPTION_KEYS = (
    "caption_extension",
    "resolution",
    "random_flip",
    "masked_loss",
    "shuffle_caption",
    "keep_tokens",
    "keep_tokens_separator",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "caption_prefix",
    "caption_suffix",
    "secondary_separator",
)


def _folder_option() -> Any:
    """A datasets-entry field that defaults to the top-level option of its name (documented and checked there)."""
    return field(default=None, metadata={"doc": "", "inherited": True})


@dataclass
class DatasetEntry:
    """One folder of ``datasets:`` (sd-scripts' dataset subset); see ``FOLDER_OPTION_KEYS`` for the rest."""

    image_dir: str = option("", "The folder of images (required); kohya N_name sub-folders repeat N times.")
    metadata_path: Optional[str] = option(
        None, "CSV of filename,prompt rows; defaults to image_dir/metadata.csv when present, else sidecar files."
    )
    num_repeats: Optional[int] = option(
        None, "Times each image is seen per epoch; unset, the N of its N_name folder, else 1.", minimum=1
    )
    is_reg: bool = option(
        False,
        "Regularisation (class) images for prior preservation: balanced against the training images as "
        "sd-scripts does (repeated or left out until both count the same per epoch), loss times prior_loss_weight.",
    )
    is_val: bool = option(False, "Validation images: never trained on; the validation loss is measured on them.")
    class_tokens: Optional[str] = option(
        None, "Caption of the images that have none (sd-scripts' class_tokens); unset, their N_name folder's name."
    )
    caption_extension: Optional[str] = _folder_option()
    resolution: Optional[int] = _folder_option()
    random_flip: Optional[bool] = _folder_option()
    masked_loss: Optional[bool] = _folder_option()
    shuffle_caption: Optional[bool] = _folder_option()
    keep_tokens: Optional[int] = _folder_option()
    keep_tokens_separator: Optional[str] = _folder_option()
    caption_dropout_rate: Optional[float] = _folder_option()
    caption_tag_dropout_rate: Optional[float] = _folder_option()
    caption_prefix: Optional[str] = _folder_option()
    caption_suffix: Optional[str] = _folder_option()
    secondary_separator: Optional[str] = _folder_option()


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
    "ae",
    "clip_l",
    "t5xxl",
)


def fields_of(cls: type) -> Dict[str, dataclasses.Field]:
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
        if typing.get_args(annotation) == (DatasetEntry,):
            return _dataset_entries(key, value)
        if isinstance(value, str):
            parts = value.splitlines() if f.metadata.get("lines") else value.split(",")
            value = [v.strip() for v in parts if v.strip()]
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


def _dataset_entries(key: str, value: Any) -> List[DatasetEntry]:
    """``datasets:`` as entries: a list of folders and/or mappings of per-folder options (one alone is a list)."""
    if value is None:
        return []
    if isinstance(value, (str, Mapping)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(
            f"{key}: expected a list of folders or of mappings such as {{image_dir: ...}}, got {value!r}."
        )
    return [_dataset_entry(f"{key}[{i}]", item) for i, item in enumerate(value)]


def _dataset_entry(key: str, raw: Any) -> DatasetEntry:
    if isinstance(raw, str):
        raw = {"image_dir": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{key}: expected a folder or a mapping such as {{image_dir: ..., is_reg: true}}, got {raw!r}."
        )
    own, top = fields_of(DatasetEntry), fields_of(ImageConfig)
    hints = typing.get_type_hints(DatasetEntry)
    values: Dict[str, Any] = {}
    for name, value in raw.items():
        if name not in own:
            near = difflib.get_close_matches(str(name), list(own), n=1, cutoff=0.6)
            hint = f" Did you mean {near[0]!r}?" if near else f" Per-folder keys: {', '.join(own)}."
            if name in top:
                hint = " It is a top-level option only." + hint
            raise ConfigError(f"Unknown key {key}.{name}.{hint}")
        spec = top[name] if own[name].metadata.get("inherited") else own[name]
        values[name] = _coerce(f"{key}.{name}", value, hints[name], spec)
    if not values.get("image_dir"):
        raise ConfigError(f"{key}: image_dir is required (the folder of images).")
    return DatasetEntry(**values)


def _resolve_paths(values: Dict[str, Any], known: Mapping[str, dataclasses.Field], base_dir: str | None) -> None:
    """Relative paths against ``base_dir`` (the current directory when None); a Hub ``base_model`` stays as is."""

    def resolve(path: str) -> str:
        return os.path.normpath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(path)))

    for key in PATH_KEYS:
        if key in known and values.get(key):
            if key == "base_model" and as_hub_reference(values[key], base_dir) is not None:
                continue  # a Hub id, not a path
            values[key] = resolve(values[key])
    if values.get("datasets"):
        values["datasets"] = [
            dataclasses.replace(
                e, image_dir=resolve(e.image_dir), metadata_path=e.metadata_path and resolve(e.metadata_path)
            )
            for e in values["datasets"]
        ]
    if values.get("sample_prompts"):
        values["sample_prompts"] = [resolve(p) if is_prompt_file(p) else p for p in values["sample_prompts"]]


def is_prompt_file(item: str) -> bool:
    """Whether a ``sample_prompts`` item names a prompt file rather than being a prompt."""
    return item.lower().endswith(PROMPT_FILE_EXTENSIONS) and " --" not in item


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
    _resolve_paths(values, known, base_dir)
    cfg = cls(**values)
    _check_required(cfg)
    if isinstance(cfg, ImageConfig):
        _check_data_options(cfg)
    return cfg


def _check_required(cfg: CommonConfig) -> None:
    for key in ("base_model", "output_dir"):
        if not getattr(cfg, key):
            raise ConfigError(f"{key} is required: set it in the config.")
    if not cfg.train_data_dir and not (isinstance(cfg, ImageConfig) and cfg.datasets):
        more = " (or list folders in datasets)" if isinstance(cfg, ImageConfig) else ""
        raise ConfigError(f"train_data_dir is required: set it in the config{more}.")
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


def _check_data_options(cfg: ImageConfig) -> None:
    """Options that only make sense together: folders, regularisation/validation roles, samples, validation."""
    roles = [("train_data_dir", cfg.train_data_dir, False, False)] if cfg.train_data_dir else []
    roles += [(f"datasets[{i}]", e.image_dir, e.is_reg, e.is_val) for i, e in enumerate(cfg.datasets)]
    seen: Dict[str, str] = {}
    for key, folder, is_reg, is_val in roles:
        if is_reg and is_val:
            raise ConfigError(
                f"{key}: is_reg and is_val are both set; a folder is either regularisation or validation."
            )
        if folder in seen:
            raise ConfigError(f"{key}: the folder {folder} is also {seen[folder]}; list each folder once.")
        seen[folder] = key
    if not any(not is_reg and not is_val for *_, is_reg, is_val in roles):
        raise ConfigError("datasets: every folder is marked is_reg or is_val; at least one must hold training images.")
    scheduled = cfg.sample_every_n_steps or cfg.sample_every_n_epochs or cfg.sample_at_first
    if scheduled and not cfg.sample_prompts:
        raise ConfigError("sample_every_n_steps/sample_every_n_epochs/sample_at_first need sample_prompts.")
    if cfg.sample_prompts and not scheduled:
        raise ConfigError(
            "sample_prompts: say when to sample with sample_every_n_steps, sample_every_n_epochs or sample_at_first."
        )
    has_validation = cfg.validation_split > 0 or any(e.is_val for e in cfg.datasets)
    for key in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        if getattr(cfg, key) is not None and not has_validation:
            raise ConfigError(
                f"{key}: there are no validation images; set validation_split or add a datasets entry with is_val."
            )


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


def dataset_entry_to_dict(entry: DatasetEntry) -> Dict[str, Any]:
    """The options an entry sets (what differs from the field defaults), as a YAML mapping."""
    return {
        f.name: getattr(entry, f.name)
        for f in dataclasses.fields(DatasetEntry)
        if f.name == "image_dir" or getattr(entry, f.name) != f.default
    }


def config_to_dict(cfg: CommonConfig) -> Dict[str, Any]:
    data = dataclasses.asdict(cfg)
    if isinstance(cfg, ImageConfig):
        data["datasets"] = [dataset_entry_to_dict(e) for e in cfg.datasets]
    return data


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
