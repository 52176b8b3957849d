"""Commented YAML templates rendered from the config fields' own documentation (``configs/*.yaml``)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, Optional, Type

import yaml

from lora_trainer.config import DEFAULT_LORA_RANK, CommonConfig

SEED_VALUES: Dict[str, Any] = {
    "train_data_dir": "./data/cyberpunk_train",
    "metadata_path": "./data/cyberpunk_train/metadata.csv",
    "base_model": "./models/Stable-diffusion/v1-5-pruned.safetensors",
    "lora_rank": DEFAULT_LORA_RANK,
    "batch_size": 4,
    "epochs": 10,
    "learning_rate": 2e-4,
    "output_dir": "./output/cyberpunk_style",
    "save_steps": 100,
}
# A commented example under an option whose items are mappings (``datasets:``), keyed by the option.
ENTRY_EXAMPLES: Dict[str, List[Any]] = {
    "datasets": [
        "./data/cyberpunk_extra",
        {"image_dir": "./data/reg_city", "is_reg": True, "class_tokens": "a photo of a city"},
        {"image_dir": "./data/cyberpunk_val", "is_val": True},
        {"image_dir": "./data/closeups", "num_repeats": 3, "resolution": 768, "caption_prefix": "closeup,"},
    ]
}


def _flow_item(value: Any) -> str:
    """One list item in YAML flow style, on one line, keys in the example's order."""
    return yaml.safe_dump([value], default_flow_style=True, width=1000, sort_keys=False).strip()[1:-1]


def _entry_class(cls: Type[CommonConfig], name: str) -> Optional[type]:
    """The dataclass of a ``List[<dataclass>]`` option's items (``datasets`` -> ``DatasetEntry``), else None."""
    annotation = typing.get_type_hints(cls)[name]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (list, List) and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _entry_lines(name: str, entry_cls: type) -> List[str]:
    """The keys of one item of option ``name``, each with its documentation, and an example, all commented."""
    own = [f for f in dataclasses.fields(entry_cls) if not f.metadata.get("inherited")]
    inherited = [f.name for f in dataclasses.fields(entry_cls) if f.metadata.get("inherited")]
    lines = [f"# Each {name} entry is a folder, or a mapping of these keys:"]
    lines += [f"#   {f.name}: {f.metadata.get('doc', '')}" for f in own]
    if inherited:
        lines.append(
            "#   and, for its folder alone, any of these top-level options (unset, the top-level value applies): "
            + ", ".join(inherited)
            + "."
        )
    if name in ENTRY_EXAMPLES:
        lines.append("# For example:")
        lines.append(f"# {name}:")
        lines += [f"#   - {_flow_item(item)}" for item in ENTRY_EXAMPLES[name]]
    return lines


def render_template(cls: Type[CommonConfig], values: Dict[str, Any]) -> str:
    """Every option of ``cls``: set ones as ``key: value``, the rest commented out at their default; an option
    whose items are mappings (``datasets``) also lists the items' keys with their documentation."""
    lines = [f"# lora-trainer config ({cls.__doc__.strip()})", "# python train.py --config this.yaml", ""]
    for f in dataclasses.fields(cls):
        doc = f.metadata.get("doc", "")
        choices = f.metadata.get("choices") or ()
        if choices:
            doc += f" One of: {', '.join(map(str, choices))}."
        lines.append(f"# {doc}")
        if f.name in values:
            value = values[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()
        rendered = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()
        rendered = rendered[1:-1] if rendered.startswith("{") else rendered
        prefix = "" if f.name in values else "# "
        lines.append(f"{prefix}{rendered}")
        entry_cls = _entry_class(cls, f.name)
        if entry_cls is not None:
            lines += _entry_lines(f.name, entry_cls)
    return "\n".join(lines) + "\n"
