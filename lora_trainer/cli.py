"""Command line: ``python -m lora_trainer train|caption|ui|download`` (``train.py`` and
``tools/auto_label.py`` are thin aliases). Errors a user can fix are printed as one clear line, without a
traceback."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from lora_trainer.errors import exit_status_of


def _train(args: argparse.Namespace) -> int:
    from lora_trainer.config import load_config
    from lora_trainer.models.hub_models import DEFAULT_BASE_MODEL
    from lora_trainer.train.callbacks import TqdmProgress
    from lora_trainer.train.cpu_launch import missing_cpu_ranks, start_missing_ranks
    from lora_trainer.train.run import run_training
    from lora_trainer.train.signals import StopOnSignals

    cfg = load_config(args.config, default_base_model=DEFAULT_BASE_MODEL)
    if cfg.task_type == "image-generation" and cfg.base_model == DEFAULT_BASE_MODEL:
        print(
            f"base_model: {DEFAULT_BASE_MODEL} (SD 1.5 from the Hugging Face Hub, the default when the config names "
            "none; downloaded on first use, then read from the cache)"
        )
    workers = start_missing_ranks(missing_cpu_ranks())
    try:
        # Ctrl+C / SIGTERM: stop after the step, save, print the resume line; a second one quits at once.
        with StopOnSignals() as stop:
            result = run_training(cfg, callbacks=[TqdmProgress(), stop])
    except BaseException:
        for worker in workers:  # they would wait for this process at the next step for ever
            worker.terminate()
        raise
    finally:
        failed_workers = sum(1 for w in workers if w.wait() != 0)
    if result.message:
        print(result.message, file=sys.stderr if result.status != "finished" else sys.stdout)
    if failed_workers:
        print(f"error: {failed_workers} of the other training processes failed", file=sys.stderr)
        return 1
    if result.status == "finished":
        return 0
    return stop.exit_status or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora_trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a LoRA from a YAML config")
    train.add_argument("--config", required=True, help="YAML config file (see configs/)")
    train.set_defaults(func=_train)
    caption = sub.add_parser("caption", help="caption a folder of images into metadata.csv", add_help=False)
    caption.set_defaults(func=None)
    ui = sub.add_parser("ui", help="serve the trainer tab as a standalone gradio app", add_help=False)
    ui.set_defaults(func=None)
    download = sub.add_parser(
        "download", help="fill the Hugging Face cache with models, for offline use later", add_help=False
    )
    download.set_defaults(func=None)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def dispatch() -> int:
        # caption and ui own their own option parsers; hand them the rest of the line untouched.
        if argv and argv[0] == "caption":
            from lora_trainer.caption.cli import main as caption_main

            return caption_main(argv[1:])
        if argv and argv[0] == "ui":
            from lora_trainer.ui.standalone import main as ui_main

            return ui_main(argv[1:])
        if argv and argv[0] == "download":
            from lora_trainer.hub.cli import main as download_main

            return download_main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)

    return exit_status_of(dispatch)
