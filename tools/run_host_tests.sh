#!/usr/bin/env bash
# Runs tests/host in the host-pinned environments made by tools/setup_host_env.sh:
#   1. the main environment (.venv, with diffusers) writes the standalone engine's reference LoRA files,
#   2. .venv-host (AUTOMATIC1111 pins, real ldm) runs the adapter and UI tests against them, and the glue tests,
#   3. .venv-forge (Forge Neo's pins), when present, runs the UI construction test under gradio 4.40, the WebUI
#      glue and REST API under its fastapi/pydantic, and the Forge adapter and glue tests (the Forge stand-in)
#      under its transformers/diffusers. Forge Neo ships no open_clip: the CLIP vocabulary the engine's loader
#      builds its tokenizer from is written by step 1 into the shared cache folder.
# Offline: any attempt to reach the network fails the test.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
reference=$(mktemp -d)
trap 'rm -rf "$reference"' EXIT
export LORA_TRAINER_CACHE="$reference/cache"
.venv/bin/python tests/host/make_reference.py "$reference" >/dev/null
LORA_TRAINER_HOST_REFERENCE="$reference" .venv-host/bin/python -m pytest -q -p no:cacheprovider tests/host "$@"
# The WebUI glue and REST API under the host's own fastapi 0.94 / pydantic 1.x; Hub downloads (captioners' first
# use inside the WebUI) with the host's huggingface_hub 0.x against the stand-in Hub.
.venv-host/bin/python -m pytest -q -p no:cacheprovider tests/test_webui_glue.py tests/test_webui_rest_api.py \
    tests/test_hub_download.py "$@"
if [ -x .venv-forge/bin/python ]; then
    .venv-forge/bin/python -m pytest -q -p no:cacheprovider tests/host/test_host_ui.py tests/test_webui_glue.py \
        tests/test_webui_rest_api.py tests/test_forge_adapter.py tests/test_forge_glue.py "$@"
fi
