"""Serve the tab inside a stand-in of the WebUI's page on 127.0.0.1:<port>, under whatever gradio this Python has.

Written from reading AUTOMATIC1111 1.10's modules/ui_extra_networks.py and javascript/extraNetworks.js (the
Forge line keeps the same ids): a txt2img tab with its prompt box and a Lora extra-networks page whose cards
are built once and kept until the page's hidden ``txt2img_lora_extra_refresh_internal`` button is clicked
(the host's refresh icon clicks it; its handler rescans the Lora folder and rebuilds the cards). The LoRA
Trainer tab is rendered beside it, with a backend that trains into a job folder and publishes the final file
into the Lora folder as the WebUI glue does. The trainer is a fake that writes a real safetensors file with
sd-scripts metadata; it waits at step PAUSE_AT until the test creates ``<root>/go``.

The browser tests run it with the main, the AUTOMATIC1111-pinned (.venv-host, gradio 3.41) and the Forge
Neo-pinned (.venv-forge, gradio 4.40) environments, and drive the page from the main environment.
Usage: python tests/serve_webui_standin.py <root folder> <port>
"""

import html
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from lora_trainer.hosts.webui.builtin_lora import publish_lora  # noqa: E402
from lora_trainer.jobs import JobHooks, JobRunner  # noqa: E402
from lora_trainer.train.callbacks import StepInfo  # noqa: E402
from lora_trainer.train.result import TrainingResult  # noqa: E402
from lora_trainer.ui import gradio_compat as compat  # noqa: E402
from lora_trainer.ui.backend import WEBUI_REFRESH_LORAS_JS, WEBUI_SEND_PROMPT_JS, StandaloneBackend  # noqa: E402
from lora_trainer.ui.standalone import launch, read_css  # noqa: E402
from lora_trainer.ui.tab import TrainerTab  # noqa: E402

STEPS, PAUSE_AT = 12, 4
GATE_CEILING_S = 120  # only a test that never opens the gate waits this long
TAGS = {"10_standin": {"mytag": 4, "red square": 3, "simple background": 1}}


class StandinWebUIBackend(StandaloneBackend):
    """The WebUI's answers: a loaded checkpoint, runs in a job folder, the LoRA published into the Lora folder."""

    def __init__(self, root):
        super().__init__(os.path.join(root, "Lora"))
        self.jobs = os.path.join(root, "jobs")

    def describe_model(self):
        return "Base model: **the loaded checkpoint** `tiny.safetensors` (SD1, eps-prediction)."

    def resolve_base_model(self, typed):
        return "/models/Stable-diffusion/tiny.safetensors"

    def default_output_dir(self, output_name):
        return os.path.join(self.jobs, output_name)

    def final_lora_path(self, cfg):
        return os.path.join(self.lora_dir(), f"{cfg.output_name}.safetensors")

    def send_prompt_js(self):
        return WEBUI_SEND_PROMPT_JS

    def refresh_loras_js(self):
        return WEBUI_REFRESH_LORAS_JS

    def hidden_options(self):
        return ("mixed_precision",)


def fake_trainer(root):
    def train(cfg, callbacks, **kwargs):
        for cb in callbacks:
            cb.on_train_start(STEPS, 0, {})
        start = time.time()
        for step in range(1, STEPS + 1):
            if step == PAUSE_AT + 1:
                deadline = time.time() + GATE_CEILING_S
                while not os.path.exists(os.path.join(root, "go")) and time.time() < deadline:
                    time.sleep(0.05)
            time.sleep(0.02)
            info = StepInfo(step, STEPS, 1, 1.0 / step, 1e-4, time.time() - start)
            for cb in callbacks:
                cb.on_step_end(info)
            if any(cb.should_stop() for cb in callbacks):
                return TrainingResult("cancelled", step, [], f"cancelled at step {step}")
        import numpy as np
        from safetensors.numpy import save_file

        os.makedirs(cfg.output_dir, exist_ok=True)
        path = os.path.join(cfg.output_dir, f"{cfg.output_name}.safetensors")
        metadata = {
            "ss_output_name": cfg.output_name,
            "ss_sd_model_name": cfg.base_model,
            "ss_base_model_version": "sd_v1",
            "ss_tag_frequency": json.dumps(TAGS),
        }
        save_file({"lora_unet_x.lora_down.weight": np.zeros((4, 8), np.float16)}, path, metadata=metadata)
        copy = os.path.join(cfg.output_dir, "pytorch_lora_weights.safetensors")
        save_file({"x": np.zeros(1, np.float16)}, copy)
        for cb in callbacks:
            cb.on_save(path, STEPS)
        return TrainingResult("finished", STEPS, [path, copy], f"saved {path}, {copy}")

    return train


def publisher(backend):
    """The WebUI glue's after_save: the final ``<name>.safetensors`` goes into the Lora folder."""

    def after_save(path):
        stem = os.path.splitext(os.path.basename(path))[0]
        if os.path.basename(os.path.dirname(path)) == stem:
            publish_lora(path, os.path.join(backend.lora_dir(), stem + ".safetensors"))

    return after_save


def lora_cards(folder):
    """The Lora page's cards: one per file in the Lora folder, named by its alias (the file stem)."""
    names = sorted(os.path.splitext(n)[0] for n in os.listdir(folder) if n.endswith(".safetensors"))
    cards = "".join(f"<div class='card' data-name='{html.escape(n)}'>{html.escape(n)}</div>" for n in names)
    return f"<div id='standin_lora_cards'>{cards or 'No LoRA yet'}</div>"


def build(root):
    backend = StandinWebUIBackend(root)
    os.makedirs(backend.lora_dir(), exist_ok=True)
    runner = JobRunner(trainer=fake_trainer(root), hooks=JobHooks(after_save=publisher(backend)))
    tab = TrainerTab(backend, runner)
    pages = {"txt2img": lora_cards(backend.lora_dir())}  # built once, as the host caches its pages' HTML

    def refresh():
        pages["txt2img"] = lora_cards(backend.lora_dir())
        return pages["txt2img"]

    # The host injects the extension's style.css into its page.
    with gr.Blocks(**compat.blocks_kwargs(css=read_css(), title="Stand-in WebUI")) as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("txt2img", elem_id="tab_txt2img"):
                gr.Textbox(label="Prompt", elem_id="txt2img_prompt", lines=2)
                with gr.Tabs(elem_id="txt2img_extra_tabs"):
                    with gr.Tab("Lora", elem_id="txt2img_lora"):
                        cards = gr.HTML(pages["txt2img"], elem_id="txt2img_lora_html")
                # Hidden as the host's (visible=False keeps it in 3.41/4.40 pages); gradio >= 5 drops a
                # hidden button's clicks, so there it stays visible (no host runs those versions).
                refresh_button = gr.Button(
                    "Refresh", elem_id="txt2img_lora_extra_refresh_internal", visible=compat.gradio_major() >= 5
                )
                refresh_button.click(refresh, inputs=[], outputs=[cards])
            with gr.Tab("LoRA Trainer", elem_id="tab_lora_trainer"):
                tab.blocks.render()
        demo.load(lambda: pages["txt2img"], inputs=[], outputs=[cards])
    return compat.enable_queue(demo)


def tolerate_boolean_schemas() -> None:
    """gradio_client 1.2 (gradio 4.40) fails on the boolean ``additionalProperties`` newer pydantic writes into
    file components' schemas, and then serves no page: a test-only patch reads a boolean schema as "Any"."""
    try:
        from gradio_client import utils as client_utils
    except ImportError:
        return
    original = getattr(client_utils, "_json_schema_to_python_type", None)
    if original is None or compat.gradio_major() != 4:
        return

    def tolerant(schema, defs=None):
        return "Any" if isinstance(schema, bool) else original(schema, defs)

    client_utils._json_schema_to_python_type = tolerant


def old_template_calls() -> None:
    """gradio 4.40 calls starlette's ``TemplateResponse(name, context)``; starlette 1.x takes only
    ``(request, name, context)``. A test-only adapter for an environment with a newer starlette than the
    host pins."""
    try:
        from gradio import routes
    except ImportError:
        return
    templates = getattr(routes, "templates", None)
    if templates is None or compat.gradio_major() != 4:
        return
    original = templates.TemplateResponse

    def adapted(*args, **kwargs):
        if args and isinstance(args[0], str):
            context = args[1] if len(args) > 1 else kwargs.pop("context")
            return original(context["request"], args[0], context, *args[2:], **kwargs)
        return original(*args, **kwargs)

    templates.TemplateResponse = adapted


def main() -> None:
    root, port = sys.argv[1], int(sys.argv[2])
    tolerate_boolean_schemas()
    old_template_calls()
    launch(build(root), "127.0.0.1", port, block=False)
    print("READY", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
