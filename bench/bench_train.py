"""Training speed and memory of our CLI against the floor (a bare PyTorch loop), measured in the same run.

Builds a full-size SD1.5-architecture checkpoint with random weights (once, cached under --workdir), then runs:
  floor        bench/floor_loop.py: the same UNet, LoRA module set, optimizer; latents/embeddings given
  ours (cold)  python train.py --config ...: first run, encodes and caches latents and text embeddings (as
               training reaches them: the first step waits for its own image and caption only)
  ours (warm)  the same command again: caches on disk, so the VAE and text encoder are not even loaded
and prints, for each: median seconds per step after warm-up, seconds from process start to the first finished
step, peak RSS of the whole process (GNU time), the ratios against the floor, and seconds from process start to
the last step (a cold run encodes each image's latents during the first epoch, whose steps are then slower).
With --repeats N the three runs take turns N times and each figure is the median of its N runs.

    .venv/bin/python bench/bench_train.py --workdir /tmp/lora_bench [--steps 10 --resolution 256 --repeats 3]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
VIT_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


def build_checkpoint(path: str) -> None:
    """A random full-size SD1.5 single file (fp16, like the usual downloads), written atomically."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from support.tiny_models import TinyPipelineParts, _perturb_zero_outputs, to_single_file_state
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    _perturb_zero_outputs(unet, 1)
    parts = TinyPipelineParts(
        "sd1", unet, AutoencoderKL(**SD15_VAE), [CLIPTextModel(CLIPTextConfig(**VIT_L_TEXT))], "epsilon"
    )
    state = {k: v.half() for k, v in to_single_file_state(parts).items()}
    del parts, unet
    save_file(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def make_images(folder: str, count: int) -> None:
    from support.tiny_models import make_image_folder

    make_image_folder(folder, count=count, size=(320, 256), captions=[f"photo {i}, bench style" for i in range(count)])


def timed(cmd, env) -> tuple[subprocess.CompletedProcess, int, float]:
    """Run under GNU time; return the process, its peak RSS in MB and the wall-clock start."""
    start = time.time()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB=%M", *cmd], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stderr[-3000:]}")
    rss = int(proc.stderr.strip().splitlines()[-1].split("=")[1]) // 1024
    return proc, rss, start


METRICS = ("step_s", "first_step_s", "last_step_s", "peak_rss_mb")


def summarise(name: str, start: float, step_times: list[float], rss_mb: int, warmup: int) -> dict:
    durations = [b - a for a, b in zip(step_times, step_times[1:])][warmup - 1 :]
    return {
        "name": name,
        "step_s": statistics.median(durations),
        "first_step_s": step_times[0] - start,
        "last_step_s": step_times[-1] - start,
        "peak_rss_mb": rss_mb,
    }


def tensorboard_step_times(logdir: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")), key=os.path.getmtime)
    acc = EventAccumulator(files[-1])
    acc.Reload()
    return [e.wall_time for e in acc.Scalars("loss")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/lora_bench")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind; the table gives medians")
    parser.add_argument("--build-checkpoint", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_checkpoint:
        build_checkpoint(args.build_checkpoint)
        return
    os.makedirs(args.workdir, exist_ok=True)
    checkpoint = os.path.join(args.workdir, "sd15_random.safetensors")
    if not os.path.exists(checkpoint):
        print("building a random full-size SD1.5 checkpoint ...", flush=True)
        # In a child process: the build's few GB would otherwise stay resident in this one for the whole run.
        subprocess.run([sys.executable, os.path.abspath(__file__), "--build-checkpoint", checkpoint], check=True)
    data = os.path.join(args.workdir, "data")
    if not os.path.isdir(data):
        make_images(data, 8)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    python = sys.executable
    # Read the checkpoint once so that every run finds it in the page cache: otherwise the first run (the
    # floor) alone pays the disk, when the machine's other work has evicted it.
    with open(checkpoint, "rb") as fh:
        while fh.read(1 << 24):
            pass

    out = os.path.join(args.workdir, "out")
    cache = os.path.join(args.workdir, "cache")
    config = {
        "train_data_dir": data,
        "base_model": checkpoint,
        "output_dir": out,
        "resolution": args.resolution,
        "batch_size": 1,
        "lora_rank": args.rank,
        "max_train_steps": args.steps,
        "learning_rate": 1e-4,
        "cache_dir": cache,
        "save_state": False,
    }
    config_path = os.path.join(args.workdir, "bench.yaml")
    with open(config_path, "w") as fh:
        yaml.safe_dump(config, fh)
    import shutil

    names = ("floor", "ours (cold cache)", "ours (warm cache)")
    runs: dict = {name: [] for name in names}
    load_averages = []
    # With --repeats, the three runs take turns, so slow spells of a shared machine fall on each alike; the
    # table gives each metric's median over the repeats.
    for _ in range(args.repeats):
        load_averages.append(f"floor start {os.getloadavg()[0]:.2f}")
        proc, rss, start = timed(
            [
                python,
                os.path.join(REPO, "bench", "floor_loop.py"),
                checkpoint,
                f"--steps={args.steps}",
                f"--resolution={args.resolution}",
                f"--rank={args.rank}",
            ],
            env,
        )
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        runs["floor"].append(
            summarise("floor", start, [line["time"] for line in lines if "step" in line], rss, args.warmup)
        )
        shutil.rmtree(cache, ignore_errors=True)
        for name in names[1:]:
            shutil.rmtree(out, ignore_errors=True)
            load_averages.append(f"{name} start {os.getloadavg()[0]:.2f}")
            proc, rss, start = timed([python, os.path.join(REPO, "train.py"), "--config", config_path], env)
            steps = tensorboard_step_times(os.path.join(out, "logs"))
            runs[name].append(summarise(name, start, steps, rss, args.warmup))
    load_averages.append(f"end {os.getloadavg()[0]:.2f}")
    results = [
        {"name": name, **{key: statistics.median(r[key] for r in runs[name]) for key in METRICS}} for name in names
    ]
    floor = results[0]

    print(
        f"\nSD1.5 architecture, random weights, {args.resolution} px, batch 1, 8 images, rank {args.rank}, "
        f"{args.steps} steps, median after {args.warmup} warm-up steps"
    )
    print(
        f"{'run':20s} {'s/step':>8s} {'x floor':>8s} {'start->1st step':>16s} {'+s vs floor':>12s} "
        f"{'peak RSS MB':>12s} {'x floor':>8s} {'start->last step':>17s}"
    )
    for r in results:
        print(
            f"{r['name']:20s} {r['step_s']:8.2f} {r['step_s'] / floor['step_s']:8.3f} {r['first_step_s']:16.1f} "
            f"{r['first_step_s'] - floor['first_step_s']:12.1f} {r['peak_rss_mb']:12.0f} "
            f"{r['peak_rss_mb'] / floor['peak_rss_mb']:8.3f} {r['last_step_s']:17.1f}"
        )
    if args.repeats > 1:
        for name in names[1:]:
            deltas = [r["first_step_s"] - f["first_step_s"] for r, f in zip(runs[name], runs["floor"])]
            ratios = [r["step_s"] / f["step_s"] for r, f in zip(runs[name], runs["floor"])]
            print(
                f"{name}, each repeat against its floor: start->1st step "
                + ", ".join(f"{d:+.1f} s" for d in deltas)
                + "; s/step x "
                + ", ".join(f"{x:.3f}" for x in ratios)
            )
    print(f"load average (1 min, {os.cpu_count()} CPUs): " + ", ".join(load_averages))


if __name__ == "__main__":
    main()
