"""Resumable training states: ``output_dir/state-<step>/`` with the trainable weights, optimizer, schedule,
step counters and RNG states. Written as a whole folder and renamed into place, so a crash mid-save leaves
the previous state intact."""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lora_trainer.errors import ConfigError
from lora_trainer.io.atomic import atomic_directory

STATE_DIR = re.compile(r"^state-(\d+)$")


@dataclass
class TrainingState:
    step: int
    epoch: int
    weights: Dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict
    info: dict


def rng_state() -> dict:
    """RNG states as tensors and plain lists, so ``torch.load(weights_only=True)`` reads them back."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    folder: str, *, step: int, epoch: int, weights: Dict[str, torch.Tensor], optimizer, scheduler, info: dict
) -> None:
    with atomic_directory(folder) as tmp:
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in weights.items()},
            os.path.join(tmp, "trainable.safetensors"),
        )
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
            os.path.join(tmp, "optimizer.pt"),
        )
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as fh:
            json.dump({"step": step, "epoch": epoch, **info}, fh, indent=2)


def load_training_state(folder: str) -> TrainingState:
    meta_path = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(
            f"resume: {folder} is not a training state (no trainer_state.json). Point it at an "
            "output_dir/state-<step> folder."
        )
    with open(meta_path, encoding="utf-8") as fh:
        info = json.load(fh)
    blob = torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True)
    weights = load_file(os.path.join(folder, "trainable.safetensors"))
    return TrainingState(
        step=int(info.pop("step")),
        epoch=int(info.pop("epoch")),
        weights=weights,
        optimizer=blob["optimizer"],
        scheduler=blob["scheduler"],
        rng=blob["rng"],
        info=info,
    )


def latest_state_dir(output_dir: str) -> Optional[str]:
    best = None
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = STATE_DIR.match(name)
            if match and (best is None or int(match.group(1)) > best[0]):
                best = (int(match.group(1)), os.path.join(output_dir, name))
    return best[1] if best else None
