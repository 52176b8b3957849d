"""The metadata of our LoRA files is what sd-scripts writes, and every host classifies our files correctly.

The hosts' rules are re-implemented here from their code (read, not copied): AUTOMATIC1111 1.10
``extensions-builtin/Lora/network.py`` ``NetworkOnDisk.detect_version``; Forge and Forge Neo
``extensions-builtin/sd_forge_lora/network.py`` (the same function, reading ``modelspec.*`` first); SD.Next
``modules/lora/network.py``. The hashes are recomputed here with hashlib as sd-scripts' ``train_util`` does.
"""

import hashlib
import re

import pytest
from safetensors import safe_open
from support.image_fixtures import image_config, tiny_checkpoint, train

FLUX_IMPL = "https://github.com/black-forest-labs/flux"


def a1111_version(meta):
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if len(meta) else "Unknown"


def forge_version(meta):
    arch = str(meta.get("modelspec.architecture", ""))
    if str(meta.get("modelspec.implementation", "")) == FLUX_IMPL or arch == "flux-1-dev/lora":
        return "Flux"
    if arch == "stable-diffusion-xl-v1-base/lora" or str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if arch == "stable-diffusion-v1/lora" else "Unknown"


def sdnext_version(meta, name="lora"):
    base = str(meta.get("ss_base_model_version", "")).lower()
    arch = str(meta.get("modelspec.architecture", "")).lower()
    for prefix, version in (("sd_v1", "sd1"), ("sdxl", "xl"), ("flux", "f1"), ("chroma", "chroma")):
        if base.startswith(prefix):
            return version
    if base.startswith("zimage"):
        return "zimage"
    for prefix, version in (("stable-diffusion-v1", "sd1"), ("stable-diffusion-xl", "xl"), ("flux", "f1")):
        if arch.startswith(prefix):
            return version
    if str(meta.get("ss_v2", "")) == "True":
        return "sd2"
    return ""


EXPECTED = {
    "sd1": {
        "hosts": ("SD1", "SD1", "sd1"),
        "ss_base_model_version": "sd_v1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.prediction_type": "epsilon",
    },
    "sd2": {
        "hosts": ("SD2", "SD2", "sd2"),
        "ss_base_model_version": "sd_v2_v",
        "modelspec.architecture": "stable-diffusion-v2-768-v/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.prediction_type": "v",
    },
    "sdxl": {
        "hosts": ("SDXL", "SDXL", "xl"),
        "ss_base_model_version": "sdxl_base_v1-0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.prediction_type": "epsilon",
    },
}


def _metadata(path):
    with safe_open(path, framework="pt") as fh:
        return fh.metadata()


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_each_host_classifies_our_file_as_its_family_and_the_keys_are_sd_scripts(tmp_path, arch):
    base = tiny_checkpoint(tmp_path, arch)
    result = train(image_config(tmp_path, base, max_train_steps=1, clip_skip=2, output_name="mine"))
    meta = _metadata(result.output_files[0])
    expected = EXPECTED[arch]
    assert (a1111_version(meta), forge_version(meta), sdnext_version(meta)) == expected["hosts"]
    for key, value in expected.items():
        if key != "hosts":
            assert meta[key] == value, key
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.title"] == "mine"
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.encoder_layer"] == "2"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["modelspec.date"])

    blob = open(base, "rb").read()
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(blob).hexdigest()
    assert meta["ss_sd_model_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_total_batch_size"] == "2" and meta["ss_num_batches_per_epoch"] == "2"
    assert meta["ss_min_bucket_reso"] == "256" and meta["ss_max_bucket_reso"] == "1024"
    assert meta["ss_flip_aug"] == "False" and meta["ss_cache_latents"] == "True"
    assert meta["ss_session_id"].isdigit()


def test_legacy_hash_is_sd_scripts_over_the_ss_keys_only(tmp_path):
    import torch
    from safetensors.torch import save

    from lora_trainer.export.lora_file import serialize_lora

    # Large enough for the 64 KiB window at 1 MiB to hold tensor bytes.
    tensors = {"lora_unet_a.lora_down.weight": torch.arange(400_000, dtype=torch.float32).reshape(4, -1)}
    meta = {"ss_output_name": "x", "modelspec.title": "x"}
    blob = serialize_lora(tensors, meta)
    written = {}
    with open(tmp_path / "f.safetensors", "wb") as fh:
        fh.write(blob)
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as fh:
        written = fh.metadata()
    reference = save(tensors, metadata={"ss_output_name": "x"})
    assert written["sshs_legacy_hash"] == hashlib.sha256(reference[0x100000:0x110000]).hexdigest()[:8]
    assert written["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
