"""Training speed, trained-parameter count and memory of each network type, against plain LoRA in the same run.

Uses bench_train.py's full-size SD1.5-architecture checkpoint with random weights (built once under --workdir)
and its images; trains each type with ``python train.py`` (warm latent/text caches, so only the UNet step is
timed) and prints, per type: median seconds per step after warm-up, trained parameters (every tensor of the
saved file but the alphas), the saved file's size, peak RSS, and the ratios against lora.

    flock /tmp/lora_heavy.lock .venv/bin/python bench/bench_network_types.py --workdir /tmp/lora_bench \\
        [--steps 6 --resolution 256 --rank 8 --types lora,locon,loha,lokr,dora]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

from bench_train import build_checkpoint, make_images, summarise, tensorboard_step_times, timed  # noqa: E402


def trained_parameters(path: str) -> int:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        return sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys() if not k.endswith(".alpha"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/lora_bench")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--types", default="lora,locon,loha,lokr,dora")
    args = parser.parse_args()
    types = args.types.split(",")
    if types[0] != "lora":
        types = ["lora"] + [t for t in types if t != "lora"]  # the baseline comes first
    os.makedirs(args.workdir, exist_ok=True)
    checkpoint = os.path.join(args.workdir, "sd15_random.safetensors")
    if not os.path.exists(checkpoint):
        print("building a random full-size SD1.5 checkpoint ...", flush=True)
        build_checkpoint(checkpoint)
    data = os.path.join(args.workdir, "data")
    if not os.path.isdir(data):
        make_images(data, 8)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    cache = os.path.join(args.workdir, "cache")
    results = []
    for index, network_type in enumerate(types):
        out = os.path.join(args.workdir, f"out_{network_type}")
        shutil.rmtree(out, ignore_errors=True)
        config = {
            "train_data_dir": data,
            "base_model": checkpoint,
            "output_dir": out,
            "output_name": network_type,
            "resolution": args.resolution,
            "batch_size": 1,
            "lora_rank": args.rank,
            "network_type": network_type,
            "max_train_steps": args.steps,
            "learning_rate": 1e-4,
            "cache_dir": cache,
            "save_state": False,
        }
        config_path = os.path.join(args.workdir, f"bench_{network_type}.yaml")
        with open(config_path, "w") as fh:
            yaml.safe_dump(config, fh)
        if index == 0:  # fill the latent/text caches once, outside the timed runs
            subprocess.run(
                [sys.executable, os.path.join(REPO, "train.py"), "--config", config_path],
                env=env,
                check=True,
                capture_output=True,
            )
            shutil.rmtree(out, ignore_errors=True)
        print(f"training {network_type} ...", flush=True)
        proc, rss, start = timed([sys.executable, os.path.join(REPO, "train.py"), "--config", config_path], env)
        row = summarise(network_type, start, tensorboard_step_times(os.path.join(out, "logs")), rss, args.warmup)
        lora_file = os.path.join(out, f"{network_type}.safetensors")
        row["params"] = trained_parameters(lora_file)
        row["file_mb"] = os.path.getsize(lora_file) / 2**20
        results.append(row)

    base = results[0]
    print(
        f"\nSD1.5 architecture, random weights, {args.resolution} px, batch 1, rank {args.rank} (locon: conv rank "
        f"{args.rank}), {args.steps} steps, median after {args.warmup} warm-up steps, warm caches"
    )
    print(
        f"{'type':8s} {'s/step':>8s} {'x lora':>8s} {'params':>12s} {'x lora':>8s} {'file MB':>8s} "
        f"{'peak RSS MB':>12s} {'x lora':>8s}"
    )
    for r in results:
        print(
            f"{r['name']:8s} {r['step_s']:8.2f} {r['step_s'] / base['step_s']:8.2f} {r['params']:12,d} "
            f"{r['params'] / base['params']:8.2f} {r['file_mb']:8.1f} {r['peak_rss_mb']:12d} "
            f"{r['peak_rss_mb'] / base['peak_rss_mb']:8.2f}"
        )


if __name__ == "__main__":
    main()
