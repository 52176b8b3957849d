"""The engine options as form fields, generated from the config dataclass and its field metadata.

Pure Python (no gradio): which widget each option gets, which options are basic and which are folded away,
and the conversions form values <-> config. A new config option appears in the UI without touching this file.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import yaml

from lora_trainer.config import (  # noqa: F401 (check_output_name: the form's check, kept importable here)
    CommonConfig,
    ImageConfig,
    check_output_name,
    config_from_dict,
    dataset_entry_to_dict,
    resolved_output_name,
)
from lora_trainer.errors import ConfigError

# Options with a row of their own at the top of the tab instead of a generated widget.
OWN_ROW_KEYS = ("task_type", "base_model", "train_data_dir", "output_name", "output_dir")
# What most runs change; everything else is in the folded "Advanced" section.
BASIC_KEYS = (
    "resolution",
    "lora_rank",
    "lora_alpha",
    "network_type",
    "batch_size",
    "epochs",
    "max_train_steps",
    "learning_rate",
    "optimizer",
    "lr_scheduler",
    "mixed_precision",
    "gradient_checkpointing",
    "train_text_encoder",
    "save_steps",
    "seed",
)
AUTO = "auto"  # the dropdown entry of an optional choice that means "let the engine decide" (None)
LABEL_WORDS = {
    "lora": "LoRA",
    "lr": "LR",
    "unet": "UNet",
    "snr": "SNR",
    "reso": "resolution",
    "te": "TE",
    "n": "N",
    "dir": "folder",
    "csv": "CSV",
}

# The quick check: a few steps at low resolution and small rank, through the whole path.
QUICK_CHECK_STEPS = 4
QUICK_CHECK_RESOLUTION = 256
QUICK_CHECK_RANK = 4
QUICK_CHECK_SUFFIX = "_quickcheck"
# The tab's encoding cache, inside the run's output folder (the REST API uses the same name): the tab never
# writes into the user's dataset folder unless "Cache dir" says so.
CACHE_SUBFOLDER = "cache"


@dataclass(frozen=True)
class FormField:
    """One generated widget."""

    key: str
    label: str
    doc: str
    kind: str  # "checkbox", "dropdown", "number" or "text"
    default: Any  # the widget's initial value
    choices: Tuple[str, ...] = ()
    optional: bool = False  # blank / "auto" means None (the engine's default)
    integer: bool = False
    advanced: bool = False
    lines: bool = False  # a list edited one item per line (prompts, folders), not comma-separated
    mappings: bool = False  # a line may be a YAML mapping of the item's options ({image_dir: ..., is_reg: true})


def label_for(key: str) -> str:
    words = [LABEL_WORDS.get(w, w) for w in key.split("_")]
    text = " ".join(words)
    return text[0].upper() + text[1:]


def _unwrap_optional(annotation: Any) -> Tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return annotation, False


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _item_is_dataclass(annotation: Any) -> bool:
    """Whether ``annotation`` is ``List[<dataclass>]`` (``datasets``: its items may be mappings)."""
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) in (list, List) and bool(args) and dataclasses.is_dataclass(args[0])


def form_fields(cls: Type[CommonConfig] = ImageConfig) -> List[FormField]:
    """Every option of ``cls`` except those with their own row, in declaration order, basic ones first."""
    hints = typing.get_type_hints(cls)
    result: List[FormField] = []
    for f in dataclasses.fields(cls):
        if f.name in OWN_ROW_KEYS:
            continue
        annotation, optional = _unwrap_optional(hints[f.name])
        choices = tuple(str(c) for c in f.metadata.get("choices") or ())  # dropdowns hold text (75 -> "75")
        common = {
            "key": f.name,
            "label": label_for(f.name),
            "doc": f.metadata.get("doc", ""),
            "optional": optional,
            "advanced": f.name not in BASIC_KEYS,
        }
        if annotation is bool:
            spec = FormField(kind="checkbox", default=bool(_field_default(f)), **common)
        elif choices:
            options = ((AUTO,) if optional else ()) + choices
            default = _field_default(f)
            spec = FormField(
                kind="dropdown", default=AUTO if default is None else str(default), choices=options, **common
            )
        elif annotation in (int, float) and not optional:
            spec = FormField(kind="number", default=_field_default(f), integer=annotation is int, **common)
        elif f.metadata.get("lines") or _item_is_dataclass(annotation):  # one item per line
            if _item_is_dataclass(annotation):  # name the keys a mapping line may hold
                common["doc"] += (
                    " Keys: " + ", ".join(f.name for f in dataclasses.fields(typing.get_args(annotation)[0])) + "."
                )
            spec = FormField(kind="text", default="", lines=True, mappings=_item_is_dataclass(annotation), **common)
            spec = dataclasses.replace(spec, default=to_widget(_field_default(f), spec))
        else:  # text, optional numbers (blank = default) and lists (comma-separated)
            spec = FormField(kind="text", default=to_widget(_field_default(f)), integer=annotation is int, **common)
        result.append(spec)
    # basic options in BASIC_KEYS' order (most changed first), advanced ones in declaration order
    result.sort(key=lambda s: (s.advanced, BASIC_KEYS.index(s.key) if s.key in BASIC_KEYS else 0))
    return result


def _line_of(item: Any) -> str:
    """One item of a one-per-line list as its line: text as it is, a folder entry as its folder when it sets
    nothing else, else as a one-line YAML mapping."""
    if dataclasses.is_dataclass(item):
        item = dataset_entry_to_dict(item)
    if isinstance(item, Mapping):
        if set(item) == {"image_dir"}:
            return str(item["image_dir"])
        return yaml.safe_dump([dict(item)], default_flow_style=True, width=10**6, sort_keys=False).strip()[1:-1]
    return str(item)


def _items_of(spec: FormField, text: str) -> List[Any]:
    """A one-per-line widget's text as list items; with ``spec.mappings`` a line in braces is a YAML mapping."""
    items: List[Any] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if spec.mappings and line.startswith("{"):
            try:
                item = yaml.safe_load(line)
            except yaml.YAMLError as exc:
                raise ConfigError(
                    f"{spec.label}, line {number}: {line!r} is not a YAML mapping such as "
                    f"{{image_dir: /path, is_reg: true}} ({exc})."
                ) from None
            items.append(item)
        else:
            items.append(line)
    return items


def to_widget(value: Any, spec: Optional[FormField] = None) -> Any:
    """A config value as the widget shows it."""
    if spec is not None and spec.lines:
        items = [] if value is None else [value] if isinstance(value, (str, Mapping)) else list(value)
        return "\n".join(_line_of(item) for item in items)
    if spec is not None and spec.kind == "checkbox":
        return bool(value)
    if spec is not None and spec.kind == "number":
        return value
    if spec is not None and spec.kind == "dropdown":
        return AUTO if value is None else str(value)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value) if spec is not None else value


def from_widget(spec: FormField, value: Any) -> Any:
    """A widget value as a raw config value; config_from_dict validates and converts it."""
    if spec.kind == "dropdown" and value == AUTO:
        return None
    if spec.kind == "number" and isinstance(value, float) and spec.integer and value == int(value):
        return int(value)
    if spec.lines and isinstance(value, str):
        return _items_of(spec, value)
    if spec.kind == "text" and isinstance(value, str):
        value = value.strip()
        if spec.optional and not value:
            return None
    return value


@dataclass(frozen=True)
class FormRequest:
    """What the user typed in the rows above the generated options."""

    train_data_dir: str
    base_model: str
    output_name: str
    output_dir: str = ""  # blank: the backend's default folder for this name


def build_config(
    request: FormRequest,
    specs: Sequence[FormField],
    values: Sequence[Any],
    *,
    default_output_dir: str,
    cls: Type[CommonConfig] = ImageConfig,
    default_base_model: Optional[str] = None,
) -> CommonConfig:
    """Validate the form into a config (raises ConfigError naming the option at fault); an empty base model
    of an image run becomes ``default_base_model`` when given."""
    name = check_output_name(request.output_name)
    raw: Dict[str, Any] = {
        "task_type": "image-generation" if cls is ImageConfig else "text-generation",
        "train_data_dir": request.train_data_dir.strip(),
        "base_model": (request.base_model or "").strip(),
        "output_name": name,
        "output_dir": (request.output_dir or "").strip() or default_output_dir,
    }
    for spec, value in zip(specs, values, strict=True):
        raw[spec.key] = from_widget(spec, value)
    if not raw["train_data_dir"] and not raw.get("datasets"):
        raise ConfigError(
            "Dataset folder is required: the folder with your training images (or list folders under Advanced "
            "options, Datasets)."
        )
    return config_from_dict(raw, default_base_model=default_base_model)


def widget_values_from_mapping(
    specs: Sequence[FormField], raw: Mapping[str, Any], cls: Type[CommonConfig] = ImageConfig
) -> Tuple[List[Any], List[str]]:
    """Form values for the options present in ``raw`` (a loaded YAML); absent ones keep their defaults.

    Returns the values and the keys it did not know, so the page can say what it ignored.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [str(k) for k in raw if k not in known]
    values = [to_widget(raw[s.key], s) if s.key in raw else s.default for s in specs]
    return values, unknown


def quick_check_config(cfg: CommonConfig, output_dir: str) -> CommonConfig:
    """The same run cut down to a few steps at low resolution and small rank, saved under its own name."""
    changes: Dict[str, Any] = {
        "max_train_steps": QUICK_CHECK_STEPS,
        "lora_rank": QUICK_CHECK_RANK,
        "lora_alpha": float(QUICK_CHECK_RANK),
        "gradient_accumulation_steps": 1,
        "save_steps": None,
        "save_every_n_epochs": None,
        "save_state": False,
        "resume": None,
        "output_dir": output_dir,
        "output_name": (cfg.output_name or "lora") + QUICK_CHECK_SUFFIX,
    }
    if isinstance(cfg, ImageConfig):
        resolution = min(cfg.resolution, QUICK_CHECK_RESOLUTION)
        changes.update(
            resolution=resolution,
            min_bucket_reso=min(cfg.min_bucket_reso, resolution),
            max_bucket_reso=max(min(cfg.max_bucket_reso, resolution * 2), min(cfg.min_bucket_reso, resolution)),
            cache_to_disk=False,
        )
    return dataclasses.replace(cfg, **changes)


def final_lora_path(cfg: CommonConfig) -> str:
    """Where the engine writes the finished LoRA: output_dir/<output_name>.safetensors."""
    return os.path.join(cfg.output_dir, resolved_output_name(cfg) + ".safetensors")
