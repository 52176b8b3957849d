"""Shared set-up for the image-training tests: tiny checkpoints, image folders, configs, in-process runs."""

from __future__ import annotations

import os
from typing import Optional

import torch

from lora_trainer.config import config_from_dict
from lora_trainer.train.callbacks import TrainingCallback
from lora_trainer.train.image_trainer import train_image
from lora_trainer.train.runtime import LocalRuntime
from support.tiny_models import build_tiny, make_image_folder, save_single_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/support/ -> the repo


def tiny_checkpoint(folder, arch: str = "sd1", seed: int = 0, with_yaml: bool = False) -> str:
    path = os.path.join(str(folder), f"tiny_{arch}.safetensors")
    if not os.path.exists(path):
        save_single_file(build_tiny(arch, seed), path, with_yaml=with_yaml)
    return path


def image_config(tmp_path, base_model: str, **overrides):
    data = os.path.join(str(tmp_path), "data")
    if not os.path.isdir(data):
        make_image_folder(data, count=4)
    raw = {
        "train_data_dir": data,
        "base_model": base_model,
        "output_dir": os.path.join(str(tmp_path), "out"),
        "resolution": 64,
        "batch_size": 2,
        "lora_rank": 4,
        "learning_rate": 1e-3,
        "max_train_steps": 4,
        "save_precision": "float",
        "cache_to_disk": False,
    }
    raw.update(overrides)
    return config_from_dict(raw)


class StopAfter(TrainingCallback):
    """Asks the trainer to stop after ``steps`` steps (as the UI's Cancel does)."""

    def __init__(self, steps: int):
        self.steps = steps
        self.seen = 0

    def on_step_end(self, info):
        self.seen = info.step

    def should_stop(self) -> bool:
        return self.seen >= self.steps


def train(cfg, callbacks: Optional[list] = None, log=None):
    torch.set_num_threads(2)
    return train_image(
        cfg, callbacks=callbacks, runtime=LocalRuntime(torch.device("cpu")), log=log or (lambda *a: None)
    )


def assert_resume_equals_an_uninterrupted_run(make_config, tmp_path, stop_at: int = 2) -> None:
    """Trains ``make_config(folder)`` once through and once cancelled after ``stop_at`` steps then resumed from
    its ``state-<stop_at>``, and asserts the two final LoRA files are equal bit for bit. ``make_config(folder,
    **extra)`` builds the run's config under ``folder`` (its output in ``folder/out``), ``extra`` being
    ``resume=``."""
    from safetensors.torch import load_file

    full = train(make_config(tmp_path / "a"))
    stopped = train(make_config(tmp_path / "b"), callbacks=[StopAfter(stop_at)])
    assert stopped.status == "cancelled" and stopped.step == stop_at
    resumed = train(make_config(tmp_path / "b", resume=str(tmp_path / "b" / "out" / f"state-{stop_at}")))
    a, b = load_file(full.output_files[0]), load_file(resumed.output_files[0])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
