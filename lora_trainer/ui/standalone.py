"""``python -m lora_trainer ui``: the trainer tab as a plain gradio app, training through the standard engine
path (``run_training`` with the default runtime) on a base model given by path."""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

from lora_trainer.jobs import JobRunner

DEFAULT_HOST = "127.0.0.1"  # local only unless the user asks: the app can read and write files on this machine
DEFAULT_PORT = 7861  # 7860 is the WebUI's


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora_trainer ui", description=__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--output-root",
        default="./output",
        help="folder for trained LoRAs; each run gets a subfolder (default ./output)",
    )
    return parser


def build_app(output_root: str, runner: Optional[JobRunner] = None):
    """The standalone app's Blocks (queue enabled) for ``output_root``; tests pass a runner with a fake trainer."""
    from lora_trainer.ui import gradio_compat as compat
    from lora_trainer.ui.backend import StandaloneBackend
    from lora_trainer.ui.tab import build_tab

    app = build_tab(StandaloneBackend(output_root), runner or JobRunner())
    return compat.enable_queue(app)


def read_css() -> str:
    """The extension's style.css (the WebUI injects it itself; the standalone app passes it to gradio)."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "style.css")
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return ""


def launch(app, host: str, port: int, block: bool = True):
    """Serve ``app``; with ``block=False`` return at once (tests), else until Ctrl+C."""
    from lora_trainer.ui import gradio_compat as compat

    return app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        quiet=not block,
        inbrowser=False,
        **compat.launch_kwargs(css=read_css()),
    )


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local tool
    args = build_parser().parse_args(argv)
    os.makedirs(args.output_root, exist_ok=True)
    launch(build_app(args.output_root), args.host, args.port)
    return 0
