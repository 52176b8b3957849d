"""WebUI entry point (AUTOMATIC1111, the Forge line): registers the LoRA Trainer tab, its settings, its REST routes.

The host imports every file in ``scripts/`` at start-up, so this one stays thin and cheap: it imports only
the WebUI's callback registry, and builds the backend, the job runner, the tab and the routes when the host
asks for them. The one ``JobRunner`` of the process lives here (host glue is the only place with global
state): the tab and the REST API share it, so a second run is refused whichever side starts it.

The module name must not clash with the builtin Lora extension's modules (``network``, ``networks``,
``lora``); ours all live in the ``lora_trainer`` package.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, List, Optional, Tuple

from modules import script_callbacks

# The host puts an extension's folder on sys.path only while it imports the extension's scripts, then puts
# the old sys.path back. Importing the (tiny) package now keeps it in sys.modules, so the lazy imports below,
# made later from the host's callbacks, find its submodules through the package's own __path__.
EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if EXTENSION_ROOT not in sys.path:  # imported some other way (a test): make the package importable
    sys.path.append(EXTENSION_ROOT)
import lora_trainer  # noqa: E402,F401  (only its __init__: a version string)

SETTINGS_SECTION = ("lora_trainer", "LoRA Trainer")
_lock = threading.Lock()
_backend: Optional[Any] = None
_runner: Optional[Any] = None
_captions: Optional[Any] = None


def _preview_defaults() -> Any:
    """The preview settings from the host's Settings page, read when a run starts."""
    from modules import shared

    from lora_trainer.hosts.webui import PreviewSettings

    opts = shared.opts
    return PreviewSettings(
        every_n_steps=int(getattr(opts, "lora_trainer_preview_every_n_steps", 0) or 0),
        prompt=str(getattr(opts, "lora_trainer_preview_prompt", "") or ""),
        steps=int(getattr(opts, "lora_trainer_preview_steps", 20) or 20),
    )


def backend_and_runner() -> Tuple[Any, Any]:
    """The process's one backend and job runner, made on first use."""
    global _backend, _runner
    with _lock:
        if _runner is None:
            from lora_trainer.hosts.webui import WebUIBackend
            from lora_trainer.jobs import JobRunner

            _backend = WebUIBackend(default_preview=_preview_defaults)
            _runner = JobRunner(trainer=_backend.train, hooks=_backend.job_hooks())
        return _backend, _runner


def caption_runner() -> Any:
    """The process's one caption runner, bound to its job runner: a reloaded UI sees a run still going."""
    global _captions
    _backend_now, runner = backend_and_runner()
    with _lock:
        if _captions is None:
            from lora_trainer.ui.captioning import CaptionRunner

            _captions = CaptionRunner(runner)
        return _captions


def on_ui_tabs() -> List[Tuple[Any, str, str]]:
    from lora_trainer.hosts.webui.facts import ensure_host_temp_dir
    from lora_trainer.ui.tab import build_tab

    ensure_host_temp_dir()
    backend, runner = backend_and_runner()
    return [(build_tab(backend, runner, caption_runner()), backend.title, "lora_trainer")]


def on_ui_settings() -> None:
    from modules import shared

    section = SETTINGS_SECTION
    shared.opts.add_option(
        "lora_trainer_preview_every_n_steps",
        shared.OptionInfo(0, "Preview images every N training steps (0 = no previews)", section=section),
    )
    shared.opts.add_option(
        "lora_trainer_preview_prompt",
        shared.OptionInfo("", "Preview prompt (blank: the LoRA's output name)", section=section),
    )
    shared.opts.add_option(
        "lora_trainer_preview_steps", shared.OptionInfo(20, "Preview sampling steps", section=section)
    )


def on_app_started(demo: Any, app: Any) -> None:
    """Mount the REST routes (``demo`` is None under --nowebui; the routes work either way)."""
    from lora_trainer.hosts import rest_api
    from lora_trainer.hosts.webui import api_credentials

    backend, runner = backend_and_runner()
    rest_api.mount(app, runner, backend, api_credentials())


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
