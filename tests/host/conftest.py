"""The host tests run only in the host-pinned environments (``tools/setup_host_env.sh``): the adapter tests
where the WebUI's `ldm` package is installed (``.venv-host``), the UI test under a host's gradio (3.x in
``.venv-host``, 4.x in ``.venv-forge``). The main suite skips this folder. Before `ldm` is imported, the same
pytorch_lightning shim the WebUI applies makes ``pytorch_lightning.utilities.distributed`` importable again."""

import importlib.metadata
import importlib.util
import os
import sys

import pytest


def apply_webui_lightning_shim() -> None:
    """pytorch_lightning 2.x moved ``utilities.distributed`` to ``utilities.rank_zero``; ldm imports the old
    name. The WebUI aliases it in sys.modules at start-up; so do we."""
    if "pytorch_lightning.utilities.distributed" in sys.modules:
        return
    import pytorch_lightning.utilities.rank_zero as rank_zero

    sys.modules["pytorch_lightning.utilities.distributed"] = rank_zero


def host_gradio() -> bool:
    """gradio 3.x (AUTOMATIC1111) or 4.x (Forge) is installed; the main environment has a current one."""
    try:
        return importlib.metadata.version("gradio").split(".")[0] in ("3", "4")
    except importlib.metadata.PackageNotFoundError:
        return False


HAS_LDM = importlib.util.find_spec("ldm") is not None and importlib.util.find_spec("pytorch_lightning") is not None
collect_ignore = []
if HAS_LDM:
    apply_webui_lightning_shim()
else:
    collect_ignore += ["test_host_adapter.py", "test_host_attention.py"]
if not host_gradio():
    collect_ignore.append("test_host_ui.py")

REFERENCE_ENV = "LORA_TRAINER_HOST_REFERENCE"


@pytest.fixture(scope="session")
def reference_dir():
    """Tiny single-file checkpoints and the standalone engine's LoRA files for them (``make_reference.py``,
    run with the main environment by ``tools/run_host_tests.sh``)."""
    folder = os.environ.get(REFERENCE_ENV)
    if not folder or not os.path.isdir(folder):
        pytest.skip(f"no standalone reference: set {REFERENCE_ENV} (tools/run_host_tests.sh does)")
    return folder
