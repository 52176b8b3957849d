"""The text task through the same command as the image task: ``python train.py --config x.yaml``."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from support.text_models import build_tiny_lm, capitals_records, write_jsonl
from waiting import CEILING_S

from lora_trainer.config import TextConfig, config_from_dict, fields_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(REPO, "configs", "text_lora_config.yaml")


def train_py(config: dict, folder) -> subprocess.CompletedProcess:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "train.py", "--config", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=CEILING_S,
    )


def test_train_py_trains_a_text_lora(tmp_path):
    model = build_tiny_lm(str(tmp_path / "lm"))
    data = write_jsonl(str(tmp_path / "data" / "caps.jsonl"), capitals_records())
    out = tmp_path / "out"
    done = train_py(
        {
            "task_type": "text-generation",
            "base_model": model,
            "train_data_dir": data,
            "output_dir": str(out),
            "max_train_steps": 3,
            "batch_size": 2,
            "num_threads": 1,
        },
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Saved the adapter to {out / 'out'}." in done.stdout
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(out / "out"))
    assert {"config.yaml", "logs", "state-3"} <= set(os.listdir(out))


def test_malformed_data_is_one_line_without_traceback(tmp_path):
    data = write_jsonl(str(tmp_path / "data" / "caps.jsonl"), capitals_records() + ['{"prompt": "a"}'])
    done = train_py(
        {
            "task_type": "text-generation",
            "base_model": str(tmp_path / "lm"),
            "train_data_dir": data,
            "output_dir": str(tmp_path / "out"),
        },
        tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f'error: {data} line 5: expected an object with "prompt" and "completion" '
        "strings (prompt_completion format), got an object with keys 'prompt'."
    )


def test_unknown_task_type_names_the_valid_ones(tmp_path):
    done = train_py({"task_type": "text-gen", "base_model": "m", "train_data_dir": "d"}, tmp_path)
    assert done.returncode == 2
    assert (
        "task_type: 'text-gen' is not a known task type; choose one of image-generation, text-generation" in done.stderr
    )


def test_template_documents_every_text_option():
    with open(TEMPLATE, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    assert set(raw) == set(fields_of(TextConfig))
    cfg = config_from_dict(raw, base_dir=REPO)
    assert isinstance(cfg, TextConfig) and cfg.target_modules == ["q_proj", "v_proj"]
