"""Resumable training states: ``output_dir/state-<step>/`` with the trainable weights, optimizer, schedule,
step counters and RNG states. Written as a whole folder and renamed into place, so a crash mid-save leaves
the previous state intact.

The rules of resuming, shared by the image and text routes: what shapes the LoRA (rank, alpha, network type, the
trained modules, the base model) must be as the state recorded it, else the run is refused naming each difference;
the learning rates are the config's, applied at the schedule's saved position (``apply_config_rates``).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lora_trainer.errors import ConfigError
from lora_trainer.io.atomic import atomic_directory


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


def check_resumable(
    folder: str, state: TrainingState, settings: Mapping[str, Any], shapes: Mapping[str, Tuple[int, ...]]
) -> None:
    """Refuse ``state`` when this run's LoRA differs from the one it holds.

    ``settings``: what the state records and must match (``lora_rank``, ``lora_alpha``, ``base_model``; the
    image route's ``network_type`` and ``network_args`` too; a state written before they were recorded is
    checked on its weights alone). ``shapes``: this run's trainable tensors by the names the state stores them
    under. Raises ``ConfigError`` naming every setting that differs, with the state's value and the config's.
    """
    problems = [
        f"{key} is {state.info[key]!r} in the state but {value!r} in this config"
        for key, value in settings.items()
        if key in state.info and state.info[key] != value
    ]
    only_state = sorted(set(state.weights) - set(shapes))
    only_config = sorted(set(shapes) - set(state.weights))
    if only_state or only_config:
        example = (only_state or only_config)[0]
        problems.append(
            f"the trained modules differ ({len(only_state)} tensors only in the state, {len(only_config)} only "
            f"in this config, e.g. {example}): target_modules or train_text_encoder changed"
        )
    elif not problems:
        resized = [k for k, shape in shapes.items() if tuple(state.weights[k].shape) != tuple(shape)]
        if resized:
            problems.append(
                f"{resized[0]} is {tuple(state.weights[resized[0]].shape)} in the state but "
                f"{tuple(shapes[resized[0]])} in this config: lora_rank changed"
            )
    if problems:
        raise ConfigError(
            f"resume: {folder} cannot continue under this config: {'; '.join(problems)}. Rank, alpha, "
            "network type, target modules and base model cannot change on resume: set them back, or start a new run "
            "without resume."
        )


def apply_config_rates(optimizer, scheduler, rates: Sequence[float]) -> List[Tuple[str, float, float]]:
    """After a state is loaded: the config's base learning rates replace the saved ones, one per parameter
    group, and the current rates follow the schedule from its saved position (``LambdaLR``: rate = base rate
    x factor(step), as ``optim.build_scheduler`` builds it). Returns (group name, saved, config) for each group
    whose base rate changed."""
    changed = []
    for index, (group, rate) in enumerate(zip(optimizer.param_groups, rates, strict=True)):
        saved = float(group.get("initial_lr", group["lr"]))
        if saved != rate:
            changed.append((str(group.get("name", f"group {index}")), saved, float(rate)))
        group["initial_lr"] = rate
    scheduler.base_lrs = list(rates)
    for group, rate, factor in zip(optimizer.param_groups, rates, scheduler.lr_lambdas, strict=True):
        group["lr"] = rate * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
    return changed


def describe_rate_changes(changes: Sequence[Tuple[str, float, float]], step: int) -> List[str]:
    """Log lines for ``apply_config_rates``' changes."""
    return [
        f"learning rate of {name}: {rate:g} from the config from step {step} on (the state had {saved:g}); "
        "the schedule keeps its position"
        for name, saved, rate in changes
    ]


def state_folder(output_dir: str, step: int) -> str:
    """Where the state after ``step`` optimizer steps is saved: ``output_dir/state-<step>``."""
    return os.path.join(output_dir, f"state-{step}")


def resume_hint(folder: str) -> str:
    """How to continue from a saved state: the config line to add (the command line prints it on Ctrl+C)."""
    return f"To continue, add this line to the config:\nresume: {folder}"
