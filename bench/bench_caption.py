"""Batched captioning against one image at a time, in images per second.

Builds small randomly initialised models in a temporary folder (nothing is downloaded) and times each
captioner's ``caption`` on the same in-memory images, first one image per call, then ``--batch-size`` per call:

    .venv/bin/python bench/bench_caption.py [--captioners blip,clip,wd14] [--images 32] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # the tests' builders: support.captioners

from support.captioners import (  # noqa: E402
    build_tiny_blip,
    build_tiny_clip,
    build_tiny_wd14,
    write_test_images,
)

from lora_trainer.caption.base import Captioner  # noqa: E402
from lora_trainer.caption.registry import CaptionerOptions, load_captioner  # noqa: E402
from lora_trainer.data.images import load_rgb  # noqa: E402

# Bigger than the test models, so that per-call overheads do not dominate; still seconds to build on a CPU.
BUILDERS = {
    "blip": lambda folder: build_tiny_blip(folder, hidden=128, layers=2, image_size=128, patch_size=16),
    "clip": lambda folder: build_tiny_clip(folder, width=128, layers=2, image_size=128, patch_size=16, embed_dim=64),
    "wd14": lambda folder: build_tiny_wd14(folder, image_size=224, channels=32),
}


def images_per_second(captioner: Captioner, images: Sequence, batch_size: int, repeats: int) -> float:
    """Best of ``repeats`` timed passes over ``images`` in calls of ``batch_size`` (after one warm-up call)."""
    captioner.caption(list(images[:batch_size]))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            captioner.caption(list(images[i : i + batch_size]))
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captioners", default="blip,clip,wd14")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
        f"{args.images} images, batch size {args.batch_size}"
    )
    with tempfile.TemporaryDirectory() as root:
        paths = write_test_images(os.path.join(root, "images"), args.images, size=(320, 256))
        images = [load_rgb(path) for path in paths]
        print(f"{'captioner':<10} {'1/call img/s':>13} {f'{args.batch_size}/call img/s':>14} {'ratio':>7}")
        for kind in args.captioners.split(","):
            folder = BUILDERS[kind](os.path.join(root, kind))
            options = CaptionerOptions(device=args.device, model_path=folder, max_new_tokens=20)
            captioner: Captioner = load_captioner(kind, options)
            single = images_per_second(captioner, images, 1, args.repeats)
            batched = images_per_second(captioner, images, args.batch_size, args.repeats)
            print(f"{kind:<10} {single:>13.1f} {batched:>14.1f} {batched / single:>6.2f}x")
            captioner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
