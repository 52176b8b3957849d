"""The tab builds under the host's own gradio (3.41 in AUTOMATIC1111's pins, 4.40 in Forge's), both as the
standalone app and as a host tab with a loaded checkpoint and a send-to-txt2img button, down to the config
the page loads."""

from __future__ import annotations

import pytest

gr = pytest.importorskip("gradio")

from lora_trainer.jobs import JobRunner  # noqa: E402
from lora_trainer.ui import gradio_compat as compat  # noqa: E402
from lora_trainer.ui.backend import WEBUI_SEND_PROMPT_JS, StandaloneBackend, UiBackend  # noqa: E402
from lora_trainer.ui.tab import build_tab  # noqa: E402

HOST_GRADIO = {"3": "3.41.2", "4": "4.40.0"}


class HostLikeBackend(UiBackend):
    """What the WebUI glue answers, without the WebUI: a loaded checkpoint, its Lora folder, txt2img."""

    def __init__(self, lora_dir: str):
        self._lora_dir = lora_dir

    def describe_model(self):
        return "the loaded checkpoint `tiny_sd1` (SD1)"

    def lora_dir(self):
        return self._lora_dir

    def send_prompt_js(self):
        return WEBUI_SEND_PROMPT_JS


def elem_ids(blocks) -> set:
    return {getattr(b, "elem_id", None) for b in blocks.blocks.values()}


def test_gradio_is_a_host_pin():
    assert gr.__version__ == HOST_GRADIO[str(compat.gradio_major())]


@pytest.mark.parametrize("host", [False, True])
def test_tab_builds_under_the_hosts_gradio(host, tmp_path):
    backend = HostLikeBackend(str(tmp_path / "Lora")) if host else StandaloneBackend(str(tmp_path / "out"))
    blocks = build_tab(backend, JobRunner())
    assert isinstance(blocks, gr.Blocks)
    ids = elem_ids(blocks)
    for part in (
        "dataset",
        "output_name",
        "train",
        "cancel",
        "quick_check",
        "progress",
        "loss_plot",
        "previews",
        "lora_list",
        "try_it",
        "advanced",
        "yaml_upload",
        "save_yaml",
        "opt_resolution",
    ):
        assert f"lora_trainer_{part}" in ids, part
    assert ("lora_trainer_send_to_txt2img" in ids) == host
    config = blocks.get_config_file()  # what the page loads: every component must serialise
    assert config["components"] and config["dependencies"]
