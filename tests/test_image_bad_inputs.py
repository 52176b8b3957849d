"""Bad inputs give a clear message naming what is wrong, and never leave a partial file in output_dir."""

import os
import subprocess
import sys

import pytest
import torch
from support.image_fixtures import REPO, image_config, tiny_checkpoint, train
from support.tiny_models import make_image_folder
from waiting import CEILING_S

from lora_trainer.config import config_from_dict
from lora_trainer.errors import ConfigError, DatasetError, ModelLoadError


def _no_partial_files(folder):
    leftovers = [
        os.path.join(root, f) for root, dirs, files in os.walk(folder) for f in files + dirs if f.endswith(".tmp")
    ]
    assert not leftovers, leftovers


def test_corrupt_and_truncated_images_are_listed_and_skipped(tmp_path):
    data = tmp_path / "data"
    make_image_folder(str(data), count=3)
    (data / "broken.png").write_bytes(b"not an image at all")
    good = (data / "000.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    lines = []
    from lora_trainer.train.image_trainer import train_image
    from lora_trainer.train.runtime import LocalRuntime

    cfg = image_config(tmp_path, tiny_checkpoint(tmp_path), max_train_steps=1)
    result = train_image(cfg, runtime=LocalRuntime(torch.device("cpu")), log=lines.append)
    assert result.status == "finished"
    text = "\n".join(lines)
    assert "dataset: 3 images" in text
    assert "broken.png" in text and "truncated.png" in text
    _no_partial_files(cfg.output_dir)


def test_empty_folder_fails_before_any_model_loads(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = image_config(tmp_path, str(tmp_path / "no_such_model.safetensors"))
    with pytest.raises(DatasetError, match="no usable images in .*data"):
        train(cfg)
    assert not os.path.exists(cfg.output_dir)


def test_missing_caption_is_reported_by_file_name(tmp_path):
    data = tmp_path / "data"
    make_image_folder(str(data), count=3, metadata=False)
    (data / "metadata.csv").write_text("filename,prompt\n000.png,first\n001.png,second\n")
    lines = []
    from lora_trainer.data.dataset import ImageCaptionDataset

    dataset = ImageCaptionDataset(image_config(tmp_path, "unused"))
    lines = dataset.summary_lines()
    assert "captions missing: 1" in lines[0]
    assert any("002.png" in line and "no caption" in line for line in lines)


def test_missing_base_model_names_the_path(tmp_path):
    cfg = image_config(tmp_path, str(tmp_path / "models" / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="base_model not found: .*missing.safetensors"):
        train(cfg)
    _no_partial_files(tmp_path)


def test_unknown_key_suggests_the_nearest_valid_key():
    with pytest.raises(ConfigError, match="Unknown key 'learnig_rate'. Did you mean 'learning_rate'"):
        config_from_dict({"train_data_dir": "d", "base_model": "m", "output_dir": "o", "learnig_rate": 1e-4})


def test_bad_value_names_key_value_and_allowed_values():
    with pytest.raises(ConfigError, match="mixed_precision: 'fp8' is not allowed; choose one of no, fp16, bf16"):
        config_from_dict({"train_data_dir": "d", "base_model": "m", "mixed_precision": "fp8"})
    with pytest.raises(ConfigError, match="lora_rank: 0 is out of range"):
        config_from_dict({"train_data_dir": "d", "base_model": "m", "lora_rank": 0})
    with pytest.raises(ConfigError, match="learning_rate: expected a number, got 'fast'"):
        config_from_dict({"train_data_dir": "d", "base_model": "m", "learning_rate": "fast"})


class NotAWeight:
    """Any class in a pickle is something weights_only loading must refuse (it could run code)."""


def test_pickled_ckpt_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": NotAWeight()}, path)
    cfg = image_config(tmp_path, str(path))
    with pytest.raises(ModelLoadError, match="refusing to unpickle"):
        train(cfg)


def test_weights_only_ckpt_is_accepted(tmp_path):
    from safetensors.torch import load_file

    state = load_file(tiny_checkpoint(tmp_path))
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, path)
    result = train(image_config(tmp_path, str(path), max_train_steps=1))
    assert result.status == "finished"


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_save(tmp_path):
    cfg = image_config(
        tmp_path,
        tiny_checkpoint(tmp_path),
        optimizer="SGD",
        learning_rate=1e12,
        max_grad_norm=0,
        save_steps=1,
        max_train_steps=20,
    )
    result = train(cfg)
    assert result.status == "stopped"
    assert "loss became NaN/inf at step" in result.message and "is kept" in result.message
    kept = result.output_files[0]
    assert kept.endswith("-step00000001.safetensors") and os.path.isfile(kept)
    assert not os.path.exists(os.path.join(cfg.output_dir, "pytorch_lora_weights.safetensors"))
    _no_partial_files(cfg.output_dir)


def test_cli_prints_one_clear_line_for_user_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("train_data_dir: d\nbase_model: m\nbatch_sise: 2\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--config", "bad.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=CEILING_S,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: Unknown key 'batch_sise'. Did you mean 'batch_size'?"
