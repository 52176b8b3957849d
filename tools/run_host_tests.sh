#!/usr/bin/env bash
# Runs tests/host in the host-pinned environments made by tools/setup_host_env.sh:
#   1. the main environment (.venv, with diffusers) writes the standalone engine's reference LoRA files,
#   2. .venv-host (AUTOMATIC1111 pins, real ldm) runs the adapter and UI tests against them, and the glue tests,
#   3. .venv-forge (Forge pins), when present, runs the UI construction test under gradio 4.40.
# Offline: any attempt to reach the network fails the test.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
reference=$(mktemp -d)
trap 'rm -rf "$reference"' EXIT
.venv/bin/python tests/host/make_reference.py "$reference" >/dev/null
LORA_TRAINER_HOST_REFERENCE="$reference" .venv-host/bin/python -m pytest -q -p no:cacheprovider tests/host "$@"
# The WebUI glue and REST API under the host's own fastapi 0.94 / pydantic 1.x; Hub downloads (captioners' first
# use inside the WebUI) with the host's huggingface_hub 0.x against the stand-in Hub.
.venv-host/bin/python -m pytest -q -p no:cacheprovider tests/test_webui_glue.py tests/test_webui_rest_api.py \
    tests/test_hub_download.py "$@"
if [ -x .venv-forge/bin/python ]; then
    .venv-forge/bin/python -m pytest -q -p no:cacheprovider tests/host/test_host_ui.py "$@"
fi
