"""Serve the tab with a stub captioner on 127.0.0.1:<port> under whatever gradio this Python has, until killed.

The caption panel's browser test runs it with the AUTOMATIC1111-pinned environment (.venv-host, gradio 3.41)
to check the panel in the host's own gradio, where Playwright is not installed: the page is driven from the
main environment. Usage: python tests/serve_caption_panel.py <data folder> <port>
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from lora_trainer.caption.base import CallableCaptioner  # noqa: E402
from lora_trainer.jobs import JobRunner  # noqa: E402
from lora_trainer.ui import gradio_compat as compat  # noqa: E402
from lora_trainer.ui.backend import StandaloneBackend  # noqa: E402
from lora_trainer.ui.standalone import launch  # noqa: E402
from lora_trainer.ui.tab import build_tab  # noqa: E402

STUB = "stub"


class StubCaptionBackend(StandaloneBackend):
    """The standalone backend with a first captioner that writes each image's size."""

    def captioner_choices(self):
        return [STUB, *super().captioner_choices()]

    def load_captioner(self, choice, options):
        if choice == STUB:
            return CallableCaptioner(lambda image: f"a {image.width}x{image.height} picture", name=STUB)
        return super().load_captioner(choice, options)


def main() -> None:
    folder, port = sys.argv[1], int(sys.argv[2])
    app = compat.enable_queue(build_tab(StubCaptionBackend(os.path.join(folder, "loras")), JobRunner()))
    launch(app, "127.0.0.1", port, block=False)
    print("READY", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
