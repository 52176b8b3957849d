"""Flux.1 training speed and memory of our CLI against the floor (a bare PyTorch loop), in the same run.

Builds a Flux-shaped model at reduced width (all 19 double and 38 single blocks, 128-channel heads, the real
T5/CLIP conditioning widths; --heads sets the width, 3 heads = 384 channels by default) with random weights,
saved as a WebUI user has Flux (models/Stable-diffusion/flux1-dev.safetensors, models/VAE/ae.safetensors,
models/text_encoder/clip_l + t5xxl, small encoders), then runs:
  floor        bench/flux_floor_loop.py: the same transformer file and LoRA modules; embeddings given
  ours         python train.py --config ... (T5/CLIP outputs and latents cached first, then encoders freed)
and prints, for each: median seconds per step after warm-up, seconds from process start to the first step, peak
RSS of the whole process (GNU time), and the ratios against the floor.

    .venv/bin/python bench/bench_flux.py --workdir /tmp/lora_bench_flux [--steps 8 --resolution 256 --heads 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "bench"))

from bench_train import summarise, tensorboard_step_times, timed  # noqa: E402


def build_models(models_dir: str, heads: int) -> str:
    """The reduced-width Flux.1 [dev] in a WebUI's models folder; returns the transformer file."""
    import torch
    from diffusers import FluxTransformer2DModel
    from support.tiny_flux import _perturb, build_tiny_flux, save_webui_layout, seed_t5_tokenizer_cache

    torch.manual_seed(0)
    parts = build_tiny_flux(guidance=True)
    parts.transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=heads,
        joint_attention_dim=32,  # the small T5 of tiny_flux: the conditioning path's width barely matters
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    _perturb(parts.transformer, 1, scale=0.01)
    seed_t5_tokenizer_cache(os.environ["HF_HUB_CACHE"])
    return save_webui_layout(parts, models_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/lora_bench_flux")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--heads", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    os.environ["HF_HUB_CACHE"] = os.path.join(args.workdir, "hf_cache")
    models = os.path.join(args.workdir, "models")
    transformer = os.path.join(models, "Stable-diffusion", "flux1-dev.safetensors")
    if not os.path.exists(transformer):
        print(f"building a reduced-width Flux.1 [dev] ({args.heads * 128} channels) ...", flush=True)
        transformer = build_models(models, args.heads)
    data = os.path.join(args.workdir, "data")
    if not os.path.isdir(data):
        from support.tiny_models import make_image_folder

        make_image_folder(data, count=4, size=(args.resolution, args.resolution))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    python = sys.executable
    results = []
    import json

    proc, rss, start = timed(
        [
            python,
            os.path.join(REPO, "bench", "flux_floor_loop.py"),
            transformer,
            str(args.steps),
            str(args.resolution),
            str(args.rank),
        ],
        env,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    floor = summarise("floor", start, [line["time"] for line in lines], rss, args.warmup)
    results.append(floor)

    out = os.path.join(args.workdir, "out")
    config = {
        "train_data_dir": data,
        "base_model": transformer,
        "output_dir": out,
        "resolution": args.resolution,
        "batch_size": 1,
        "lora_rank": args.rank,
        "max_train_steps": args.steps,
        "learning_rate": 1e-4,
        "cache_to_disk": False,
        "save_state": False,
        "t5xxl_max_token_length": 256,  # the floor's text length
    }
    config_path = os.path.join(args.workdir, "bench.yaml")
    with open(config_path, "w") as fh:
        yaml.safe_dump(config, fh)
    shutil.rmtree(out, ignore_errors=True)
    proc, rss, start = timed([python, os.path.join(REPO, "train.py"), "--config", config_path], env)
    results.append(summarise("ours", start, tensorboard_step_times(os.path.join(out, "logs")), rss, args.warmup))

    print(
        f"\nFlux.1 [dev] shape (19 double + 38 single blocks, {args.heads * 128} channels), random weights, "
        f"{args.resolution} px, batch 1, rank {args.rank}, {args.steps} steps, median after {args.warmup} warm-up"
    )
    print(f"{'run':8s} {'s/step':>8s} {'x floor':>8s} {'start->1st step':>16s} {'peak RSS MB':>12s} {'x floor':>8s}")
    for r in results:
        print(
            f"{r['name']:8s} {r['step_s']:8.2f} {r['step_s'] / floor['step_s']:8.3f} {r['first_step_s']:16.1f} "
            f"{r['peak_rss_mb']:12d} {r['peak_rss_mb'] / floor['peak_rss_mb']:8.3f}"
        )


if __name__ == "__main__":
    main()
