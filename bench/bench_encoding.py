"""The encoding pass on a full-size model: speed of one-at-a-time vs batched encoding, and the error of
reduced precision (bf16, fp16) against fp32, for VAE latents and text-encoder outputs.

    .venv/bin/python bench/bench_encoding.py --workdir /tmp/lora_bench [--checkpoint X.safetensors]
        [--device cpu|cuda] [--images 8 --resolution 256 --dtypes bf16,fp16]

Uses the random full-size SD1.5 checkpoint bench_train.py builds under --workdir (built if missing), random
images in [-1, 1] and a few captions. Errors are the relative RMS error ||x - x_fp32|| / ||x_fp32|| and the
largest single difference relative to the std of the fp32 values. On a CPU without native bf16 (AVX2)
reduced precision is emulated and slower than fp32 (so the trainer stays in fp32 there); the errors still
show what a GPU would get.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench"), os.path.join(REPO, "tests")]

DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
CAPTIONS = ["photo of a red bicycle leaning on a wall, bench style", "portrait, soft light", "a cat", ""]


def errors(reduced, exact) -> str:
    diff = reduced.float() - exact
    return f"rms {float(diff.norm() / exact.norm()):.4f}, max/std {float(diff.abs().max() / exact.std()):.4f}"


def main() -> None:
    import torch

    from lora_trainer.models.diffusers_adapter import DiffusersAdapter
    from lora_trainer.train.runtime import default_thread_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/lora_bench")
    parser.add_argument("--checkpoint", help="default: the SD1.5 checkpoint bench_train.py builds in --workdir")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--dtypes", default="bf16,fp16", help="reduced precisions to compare with fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(default_thread_count())
    checkpoint = args.checkpoint or os.path.join(args.workdir, "sd15_random.safetensors")
    if not os.path.exists(checkpoint):
        from bench_train import build_checkpoint

        os.makedirs(args.workdir, exist_ok=True)
        build_checkpoint(checkpoint)
    adapter = DiffusersAdapter(checkpoint, device=device)
    adapter.load(unet=False, vae=True, text_encoders=True)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(args.images, 3, args.resolution, args.resolution, generator=g) * 2 - 1

    def timed(fn, *args):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return value, time.perf_counter() - start

    def encode(batch: bool, dtype):
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if batch:
                return adapter.encode_pixels(pixels).float().cpu()
            return torch.cat([adapter.encode_pixels(pixels[i : i + 1]).float().cpu() for i in range(len(pixels))])

    def text(dtype):
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return {k: v.float().cpu() for k, v in adapter.encode_text(CAPTIONS, 1).items()}

    encode(True, None)  # warm-up: first-call allocations and kernel selection
    print(
        f"{adapter.arch} VAE + text encoders (random weights), {args.images} images of {args.resolution} px, {device}"
        f"{' (' + str(torch.get_num_threads()) + ' threads)' if device.type == 'cpu' else ''}"
    )
    exact, single_s = timed(encode, False, None)
    print(f"  fp32, one image per call : {single_s / args.images:7.3f} s/image")
    batched, batch_s = timed(encode, True, None)
    print(f"  fp32, one batch          : {batch_s / args.images:7.3f} s/image ({errors(batched, exact)})")
    exact_text = text(None)
    for name in [d for d in args.dtypes.split(",") if d]:
        dtype = getattr(torch, DTYPES[name])
        try:
            reduced, seconds = timed(encode, True, dtype)
            reduced_text = text(dtype)
        except RuntimeError as exc:  # no kernel for this dtype on this device
            print(f"  {name}: not available here ({str(exc)[:80]})")
            continue
        finite = bool(torch.isfinite(reduced).all())
        print(
            f"  {name}, one batch          : {seconds / args.images:7.3f} s/image; latents "
            f"{errors(reduced, exact) if finite else 'NOT FINITE (the trainer re-encodes in fp32)'}; text "
            + "; ".join(f"{k} {errors(reduced_text[k], v)}" for k, v in exact_text.items())
        )


if __name__ == "__main__":
    main()
