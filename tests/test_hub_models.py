"""Models from the Hub where users meet them: the captioners' defaults (the seed's auto_label.py command with no
flag), the image route's default base model and ``owner/name/file.safetensors``, and the text route's Hub id.

Downloads go through the stand-in Hub (tests/hub_standin.py) in child processes, as in test_hub_download.py;
what a later run does with the cache is checked in this process, offline (tests/conftest.py sets
HF_HUB_OFFLINE=1), with huggingface_hub's cache constant pointed at the test's own cache (our code reads it at
each call).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from hub_standin import REPO, StandinHub, child_env, folder_files
from support.captioners import build_tiny_blip, write_test_images
from waiting import CEILING_S

from lora_trainer.data.captions import read_metadata_csv
from lora_trainer.models.hub_models import DEFAULT_BASE_MODEL

SEED_COMMAND = "python tools/auto_label.py --input data/cyberpunk_train --output data/cyberpunk_train/metadata.csv"


def run(args, env, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=CEILING_S)


def download(tmp_path, hub: StandinHub, model: str) -> subprocess.CompletedProcess:
    done = run([sys.executable, "-m", "lora_trainer", "download", model], child_env(tmp_path, hub.url))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """This process reads the cache the test's child processes filled (offline, as the suite runs)."""
    folder = str(tmp_path / "hf" / "hub")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", folder)
    return folder


def test_the_seed_auto_label_command_downloads_the_default_captioner_and_captions(tmp_path):
    served = folder_files(build_tiny_blip(str(tmp_path / "blip")))
    decoys = {"tf_model.h5": b"\0" * 20_000, "README.md": b"# BLIP", "pytorch_model.bin": b"\0" * 20_000}
    work = tmp_path / "work"  # a checkout as users have it: tools/, lora_trainer/, their data
    work.mkdir()
    for name in ("tools", "lora_trainer"):
        (work / name).symlink_to(os.path.join(REPO, name))
    write_test_images(str(work / "data" / "cyberpunk_train"), 3)
    with StandinHub() as hub:
        hub.add("Salesforce/blip-image-captioning-base", {**served, **decoys})
        args = shlex.split(SEED_COMMAND)
        done = run([sys.executable, *args[1:]], child_env(tmp_path, hub.url, pythonpath=[]), cwd=work)
        assert done.returncode == 0, done.stderr[-3000:]
        fetched = set(hub.downloaded())
    rows = read_metadata_csv(str(work / "data" / "cyberpunk_train" / "metadata.csv"))
    assert sorted(rows) == ["000.png", "001.png", "002.png"] and all(rows.values())
    assert "captioned 3 image(s)" in done.stdout
    assert "downloading" in done.stderr and "Salesforce/blip-image-captioning-base" in done.stderr
    assert "model.safetensors" in fetched and not fetched & set(decoys)


def test_with_no_base_model_the_command_line_trains_the_default_sd15_from_the_hub(tmp_path, cache, capsys):
    from safetensors import safe_open
    from support.tiny_models import build_tiny, make_image_folder, save_diffusers_folder

    from lora_trainer.cli import main

    served = folder_files(save_diffusers_folder(build_tiny("sd1"), str(tmp_path / "sd15")))
    decoys = {
        "v1-5-pruned-emaonly.safetensors": b"\0" * 20_000,
        "safety_checker/config.json": b"{}",
        "safety_checker/model.safetensors": b"\0" * 20_000,
        "unet/diffusion_pytorch_model.fp16.safetensors": b"\0" * 20_000,
        "feature_extractor/preprocessor_config.json": b"{}",
    }
    with StandinHub() as hub:
        hub.add(DEFAULT_BASE_MODEL, {**served, **decoys})
        printed = download(tmp_path, hub, "base").stdout
        assert sorted(hub.downloaded()) == sorted(served)  # all the training reads, nothing else
    assert printed.startswith(f"base: {cache}")

    make_image_folder(str(tmp_path / "data"), count=2)
    config = tmp_path / "only_data.yaml"  # a newcomer's config: the data folder, and a quick run
    config.write_text(
        f"train_data_dir: {tmp_path / 'data'}\noutput_dir: {tmp_path / 'out'}\nresolution: 64\n"
        "max_train_steps: 1\nbatch_size: 1\ncache_to_disk: false\n"
    )
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"base_model: {DEFAULT_BASE_MODEL} (SD 1.5 from the Hugging Face Hub" in out
    assert f"model: {DEFAULT_BASE_MODEL} (sd1" in out
    with safe_open(str(tmp_path / "out" / "out.safetensors"), framework="pt") as fh:
        assert fh.metadata()["ss_sd_model_name"] == DEFAULT_BASE_MODEL


def test_a_single_file_reference_fetches_the_file_and_its_yaml_and_loads_offline(tmp_path, cache):
    from support.image_fixtures import tiny_checkpoint

    from lora_trainer.config import config_from_dict
    from lora_trainer.models.hub_models import resolve_base_model
    from lora_trainer.models.loading import load_stable_diffusion

    checkpoint = tiny_checkpoint(tmp_path, "sd2")  # an SD2 single file is taken as v-prediction...
    with open(checkpoint, "rb") as fh:
        weights = fh.read()
    files = {
        "tiny_sd2.safetensors": weights,
        "tiny_sd2.yaml": b"model:\n  params:\n    linear_start: 0.00085\n",  # ...unless its yaml says eps
        "other.safetensors": b"\0" * 20_000,
    }
    reference = "acme/sd2-tiny/tiny_sd2.safetensors"
    with StandinHub() as hub:
        hub.add("acme/sd2-tiny", files)
        download(tmp_path, hub, reference)
        assert sorted(hub.downloaded()) == ["tiny_sd2.safetensors", "tiny_sd2.yaml"]

    cfg = config_from_dict({"base_model": reference, "train_data_dir": str(tmp_path), "output_dir": str(tmp_path)})
    assert cfg.base_model == reference  # a Hub id stays one; paths become absolute
    path, name = resolve_base_model(cfg.base_model)
    assert path.startswith(cache) and name == "tiny_sd2.safetensors"
    model = load_stable_diffusion(path, load_unet=False, load_vae=False, load_text_encoders=False)
    assert model.arch == "sd2" and model.prediction_type == "epsilon"


def test_the_text_route_takes_a_hub_id_for_the_model_and_its_tokenizer(tmp_path, cache):
    from support.text_models import build_tiny_lm, capitals_records, cpu_runtime, text_config, write_jsonl

    from lora_trainer.text.trainer import train_text

    served = folder_files(build_tiny_lm(str(tmp_path / "lm")))
    decoys = {"model.gguf": b"\0" * 20_000, "original/consolidated.pth": b"\0" * 20_000, "onnx/model.onnx": b"x"}
    with StandinHub() as hub:
        hub.add("acme/tiny-lm", {**served, **decoys})
        download(tmp_path, hub, "acme/tiny-lm")
        assert sorted(hub.downloaded()) == sorted(served)

    data = write_jsonl(str(tmp_path / "data" / "caps.jsonl"), capitals_records())
    cfg = text_config("acme/tiny-lm", data, str(tmp_path / "out"), max_train_steps=1)
    assert cfg.base_model == "acme/tiny-lm"
    result = train_text(cfg, runtime=cpu_runtime())
    assert result.status == "finished"
    with open(os.path.join(result.output_files[0], "adapter_config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["base_model_name_or_path"] == "acme/tiny-lm"  # loads anywhere, not a cache path


def test_nothing_reaches_the_hub_at_import_or_when_the_tab_is_built(tmp_path, monkeypatch):
    import importlib
    import pkgutil

    import huggingface_hub

    import lora_trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a Hub call at import or tab build")

    for target in ("hf_hub_download", "snapshot_download", "file_download.hf_hub_download"):
        monkeypatch.setattr(f"huggingface_hub.{target}", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)
    for module in pkgutil.walk_packages(lora_trainer.__path__, "lora_trainer."):
        if not module.name.endswith("__main__"):  # ``python -m``'s entry point runs the command line
            importlib.import_module(module.name)
    from lora_trainer.ui.standalone import build_app

    build_app(str(tmp_path / "out"))
