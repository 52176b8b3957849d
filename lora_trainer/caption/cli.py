"""``python -m lora_trainer caption`` / ``python tools/auto_label.py``: caption a folder into metadata.csv."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from lora_trainer.caption.registry import CaptionerOptions, load_captioner
from lora_trainer.caption.run import CaptionRunOptions, caption_folder
from lora_trainer.caption.tags import format_tag_summary
from lora_trainer.errors import LoraTrainerError, exit_status_of


def build_parser() -> argparse.ArgumentParser:
    """The ``caption`` command's options."""
    parser = argparse.ArgumentParser(
        prog="lora_trainer caption",
        description="Caption every image in a folder and write filename,prompt rows to metadata.csv. The default "
        "weights of blip, clip and wd14 are downloaded from the Hugging Face Hub on first use into its cache "
        "(HF_HOME, HF_HUB_CACHE) and read from there afterwards; HF_HUB_OFFLINE=1 forbids downloads.",
    )
    parser.add_argument("--input", required=True, help="folder of training images")
    parser.add_argument("--output", help="metadata.csv to write (default: INPUT/metadata.csv)")
    parser.add_argument(
        "--model",
        default="blip",
        help="blip | clip | wd14, or a local model folder/file whose kind is detected (default: blip)",
    )
    parser.add_argument(
        "--model-path",
        help="the --model captioner's weights: a local folder (or file), or a Hub repository owner/name[@revision] "
        "(default: the captioner's usual repository)",
    )
    parser.add_argument("--tags-csv", help="wd14: selected_tags.csv, when it is not beside the .onnx")
    parser.add_argument("--threshold", type=float, default=0.35, help="wd14: keep tags at least this likely")
    parser.add_argument(
        "--character-threshold", type=float, help="wd14: threshold for character tags (default: --threshold)"
    )
    parser.add_argument("--clip-arch", help="clip: open_clip architecture (e.g. ViT-L-14) of a single checkpoint file")
    parser.add_argument(
        "--clip-base",
        metavar="BLIP_FOLDER",
        help="clip: caption with BLIP from this folder or Hub repository ('cache': BLIP's default repository) and "
        "append CLIP phrases to it; default: CLIP phrases only",
    )
    parser.add_argument("--max-length", type=int, default=40, help="blip: most tokens per caption")
    parser.add_argument("--num-beams", type=int, default=1, help="blip: beam search width (1: greedy)")
    parser.add_argument("--prefix", default="", help="trigger word(s) put before each new caption")
    parser.add_argument("--suffix", default="", help="text put after each new caption")
    parser.add_argument("--sidecar", action="store_true", help="also write IMAGE.txt beside each image (kohya)")
    parser.add_argument("--overwrite", action="store_true", help="re-caption images that already have a caption")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call (default: 8)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--top-tags", type=int, default=20, help="tags listed in the closing summary")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (captioning, downloads)")
    return parser


def _captioner_options(args: argparse.Namespace) -> CaptionerOptions:
    from_cache = args.clip_base == "cache"
    return CaptionerOptions(
        model_path=args.model_path,
        device=args.device,
        tags_csv=args.tags_csv,
        threshold=args.threshold,
        character_threshold=args.character_threshold,
        max_new_tokens=args.max_length,
        num_beams=args.num_beams,
        clip_arch=args.clip_arch,
        clip_base=None if from_cache else args.clip_base,
        clip_base_from_cache=from_cache,
    )


def _hide_download_bars() -> None:
    """--no-progress also hides huggingface_hub's bars of a first-use download."""
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


def run(args: argparse.Namespace) -> int:
    """Caption as ``args`` say and print the outcome; raises LoraTrainerError for problems a user can fix."""
    if args.batch_size < 1:
        raise LoraTrainerError(f"--batch-size must be at least 1, not {args.batch_size}")
    run_options = CaptionRunOptions(
        output=args.output,
        prefix=args.prefix,
        suffix=args.suffix,
        sidecar=args.sidecar,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        show_progress=not args.no_progress,
    )
    if args.no_progress:
        _hide_download_bars()
    captioner = load_captioner(args.model, _captioner_options(args))
    try:
        report = caption_folder(args.input, captioner, run_options)
    finally:
        captioner.close()
    for name, reason in report.failed:
        print(f"warning: skipped {name}: {reason}", file=sys.stderr)
    print(
        f"captioned {len(report.captioned)} image(s), kept {len(report.skipped)} existing caption(s), "
        f"skipped {len(report.failed)} unreadable image(s); wrote {report.output}"
    )
    print(format_tag_summary(report.tag_counts, report.total_images, args.top_tags))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status (2 with a one-line ``error: ...`` for problems a user can fix)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return exit_status_of(lambda: run(args))
