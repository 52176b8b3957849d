"""The seams between the engine's parts: one rule, one default and one interface for each hand-off."""

import os
import subprocess
import sys

import pytest
import torch

from lora_trainer.config import DEFAULT_LORA_RANK, check_output_name, config_from_dict, lora_rank_of
from lora_trainer.errors import ConfigError
from lora_trainer.train.runtime import LocalRuntime, Runtime


def image_cfg(tmp_path, **extra):
    raw = {"base_model": str(tmp_path / "m"), "train_data_dir": str(tmp_path / "d"), "output_dir": str(tmp_path / "o")}
    return config_from_dict({**raw, **extra})


@pytest.mark.parametrize("bad", ["a:b", "<lora>", "a/b", "..", ".x", "a|b"])
def test_the_trainer_refuses_the_output_names_the_form_refuses(tmp_path, bad):
    from lora_trainer.train.image_trainer import train_image

    with pytest.raises(ConfigError, match="Output name"):
        check_output_name(bad)
    with pytest.raises(ConfigError, match="Output name"):  # before the dataset (missing here) is read
        train_image(image_cfg(tmp_path, output_name=bad), runtime=LocalRuntime(torch.device("cpu")))


def test_output_names_in_any_script_are_accepted():
    assert check_output_name(" chat noir (v2) ") == "chat noir (v2)"
    assert check_output_name("猫_style.safetensors") == "猫_style"


def test_the_rank_default_is_one_value_for_every_task(tmp_path):
    from lora_trainer.text.model import resolve_lora_settings

    assert lora_rank_of(image_cfg(tmp_path)) == DEFAULT_LORA_RANK == 8
    assert lora_rank_of(image_cfg(tmp_path, lora_rank=4)) == 4
    text = config_from_dict(
        {"task_type": "text-generation", "base_model": "m", "train_data_dir": str(tmp_path), "output_dir": "o"}
    )
    assert resolve_lora_settings(text).rank == DEFAULT_LORA_RANK


ACCELERATE_CHECK = """
import torch
from lora_trainer.errors import ConfigError
from lora_trainer.train.accelerate_runtime import AccelerateRuntime
from lora_trainer.train.runtime import Runtime
runtime = AccelerateRuntime("bf16", num_threads=1)
assert isinstance(runtime, Runtime)
assert runtime.dtype == torch.bfloat16 and runtime.scaler is None and runtime.is_main_process
runtime.end()
"""
FP16_CHECK = """
from lora_trainer.train.accelerate_runtime import AccelerateRuntime
AccelerateRuntime("fp16")
"""


def test_both_runtimes_are_runtimes_and_share_the_base_set_up():
    local = LocalRuntime(torch.device("cpu"), "bf16")
    assert isinstance(local, Runtime)
    assert local.dtype == torch.bfloat16 and local.scaler is None and local.is_main_process
    # accelerate keeps one state per process: each check gets its own interpreter.
    subprocess.run([sys.executable, "-c", ACCELERATE_CHECK], check=True, env=child_env())
    refused = subprocess.run([sys.executable, "-c", FP16_CHECK], capture_output=True, text=True, env=child_env())
    assert refused.returncode != 0 and "fp16 needs a GPU" in refused.stderr  # the base class's refusal


def child_env():
    """This interpreter's import path for the child, with the CPU pinned (no GPU on the test machines)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "CUDA_VISIBLE_DEVICES": ""}


def test_the_job_runner_and_the_caption_job_load_without_torch():
    modules = "lora_trainer.jobs, lora_trainer.ui.captioning, lora_trainer.ui.start"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=child_env())
    assert done.stdout.strip() == "False"
