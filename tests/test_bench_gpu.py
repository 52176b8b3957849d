"""bench/bench_gpu.py cannot rot between the days a GPU is lent: its reduced mode runs here on the CPU, and its
full-size model definitions are the real SD1.5 and SDXL (checked on the meta device, in no time)."""

import os
import re
import subprocess
import sys

import torch
from support.image_fixtures import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))

import bench_gpu  # noqa: E402


def test_reduced_mode_prints_the_table(tmp_path):
    """The whole script end to end on the tiny SDXL (the family with every optional path the script has: two
    text encoders, size conditioning, gradient checkpointing); SD1.5 differs only in its ``CASES`` entry and the
    full-size definitions, both checked below."""
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    command = [sys.executable, os.path.join(REPO, "bench", "bench_gpu.py"), "--tiny", "--models=sdxl"]
    command += ["--steps=2", "--warmup=1"]  # one step-to-step gap after the warm-up: the median of one
    command += ["--precision=no"]  # bf16 on a CPU without native support would only be slow
    # The budget is a ceiling only a hung run reaches; the phases finish in seconds each on a quiet machine.
    command += [f"--workdir={tmp_path}", "--budget-s=3000", "--phase-timeout-s=1500"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.rindex("\nmodel ") :]
    number = r"\s+\d+\.\d+"
    for run in ("floor", "ours"):
        # s/step, x floor, start->1st step, +s vs floor, then "-" for VRAM and the goal on the CPU, peak RSS
        row = rf"\nsdxl\s+{run}\s+no{number}{number}{number}\s+[+-]\d+\.\d+\s+-\s+-{number}"
        assert re.search(row, table), (run, table)
    assert proc.stdout.count("fp32, one batch") == 1 and "bf16, one batch" in proc.stdout  # the encoding phase
    assert "pooled rms" in proc.stdout  # the encoding phase compared SDXL's second encoder's pooled output


def _meta_parts(name):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from support.tiny_models import TinyPipelineParts
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if name == "sdxl":
            unet = UNet2DConditionModel(**bench_gpu.SDXL_UNET)
            vae = AutoencoderKL(**bench_gpu.vae_config(0.13025))
            encoders = [
                CLIPTextModel(CLIPTextConfig(**bench_gpu.clip_text_config(768, 12, "quick_gelu"))),
                CLIPTextModelWithProjection(CLIPTextConfig(**bench_gpu.clip_text_config(1280, 32, "gelu", 1280))),
            ]
        else:
            unet = UNet2DConditionModel(**bench_gpu.SD15_UNET)
            vae = AutoencoderKL(**bench_gpu.vae_config(0.18215))
            encoders = [CLIPTextModel(CLIPTextConfig(**bench_gpu.clip_text_config(768, 12, "quick_gelu")))]
    return TinyPipelineParts(bench_gpu.CASES[name].arch, unet, vae, encoders, "epsilon")


def test_full_size_models_are_sd15_and_sdxl_as_our_loader_reads_them():
    from support.tiny_models import to_single_file_state

    from lora_trainer.models.architecture import infer_spec

    # Parameter counts of the released models (UNet, VAE, text encoders), in millions.
    expected = {"sd15": (859.5, 83.7, [123.1]), "sdxl": (2567.5, 83.7, [123.1, 694.7])}
    for name, (unet_m, vae_m, text_m) in expected.items():
        parts = _meta_parts(name)
        millions = lambda module: sum(p.numel() for p in module.parameters()) / 1e6  # noqa: E731
        assert abs(millions(parts.unet) - unet_m) < 1, name
        assert abs(millions(parts.vae) - vae_m) < 1, name
        assert [round(millions(te), 1) for te in parts.text_encoders] == text_m, name
        spec = infer_spec({k: tuple(v.shape) for k, v in to_single_file_state(parts).items()})
        assert spec.arch == bench_gpu.CASES[name].arch
        config = dict(parts.unet.config)
        for key, value in spec.unet_config.items():
            wanted = config[key]
            assert list(value) == list(wanted) if isinstance(value, (list, tuple)) else value == wanted, (name, key)
