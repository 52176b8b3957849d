"""Commented YAML templates rendered from the config fields' own documentation (``configs/*.yaml``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Type

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


def render_template(cls: Type[CommonConfig], values: Dict[str, Any]) -> str:
    """Every option of ``cls``: set ones as ``key: value``, the rest commented out at their default."""
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
    return "\n".join(lines) + "\n"
