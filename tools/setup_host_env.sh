#!/usr/bin/env bash
# Creates the host-pinned test environments next to the main one (./.venv):
#   .venv-host   AUTOMATIC1111 WebUI 1.10 pins: transformers 4.30.2, safetensors 0.4.2, pydantic 1.x, gradio 3.41.2,
#                open_clip_torch 2.20.0, and the real `ldm` package (stable-diffusion-sdkit, installed without its
#                stale pins). No diffusers, no peft, as in the host.
#   .venv-forge  Forge Neo's pins for the code that runs inside it (its requirements.txt): gradio 4.40.0,
#                fastapi 0.127.1, pydantic 2.10.6, transformers 4.57.6, diffusers 0.37.1, peft 0.17.1,
#                huggingface-hub 0.36.2, safetensors 0.8.0, numpy 2.3.5. No open_clip, as in Neo.
# torch is the machine's local 2.14.1 wheel: the WebUI's torch 2.1.2 cannot be had offline here.
# Usage: tools/setup_host_env.sh [host|forge|all]   (default: all). Offline-safe: PyPI and local wheels only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHICH=${1:-all}
TORCH=(torch==2.14.1 torchvision==0.29.1)

make_venv() {  # $1 = folder
    [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"
    "$1/bin/python" -m pip install -q --upgrade pip
}

setup_host() {
    make_venv .venv-host
    local pip=(.venv-host/bin/python -m pip install -q)
    # The WebUI's own pins (requirements_versions.txt of v1.10) where they matter to code that runs in the host.
    "${pip[@]}" "${TORCH[@]}" "numpy<2" transformers==4.30.2 safetensors==0.4.2 "pydantic<2" fastapi==0.94.0 \
        httpx==0.24.1 gradio==3.41.2 open_clip_torch==2.20.0 timm==0.9.16 omegaconf==2.2.3 einops==0.4.1 \
        pytorch_lightning==2.6.6 pyyaml tqdm pillow pytest==9.2.0
    # `ldm` (Stability-AI's stablediffusion code, as the WebUI clones it) without the wheel's stale pins.
    "${pip[@]}" --no-deps stable-diffusion-sdkit==2.1.5
    "${pip[@]}" --no-deps -e .
}

setup_forge() {
    make_venv .venv-forge
    local pip=(.venv-forge/bin/python -m pip install -q)
    "${pip[@]}" "${TORCH[@]}" gradio==4.40.0 fastapi==0.127.1 pydantic==2.10.6 pydantic-core==2.27.2 \
        httpx==0.28.1 huggingface-hub==0.36.2 diffusers==0.37.1 transformers==4.57.6 peft==0.17.1 \
        safetensors==0.8.0 numpy==2.3.5 pyyaml tqdm pillow pytest==9.2.0
    "${pip[@]}" --no-deps -e .
}

case "$WHICH" in
    host) setup_host ;;
    forge) setup_forge ;;
    all)  # side by side: mostly downloads and unpacking, so the two overlap well on two cores
        setup_host > /tmp/setup_host_env.host.log 2>&1 & host=$!
        setup_forge > /tmp/setup_host_env.forge.log 2>&1 & forge=$!
        status=0
        wait "$host" || { status=1; echo "setting up .venv-host failed:" >&2; tail -20 /tmp/setup_host_env.host.log >&2; }
        wait "$forge" || { status=1; echo "setting up .venv-forge failed:" >&2; tail -20 /tmp/setup_host_env.forge.log >&2; }
        exit "$status" ;;
    *) echo "usage: $0 [host|forge|all]" >&2; exit 2 ;;
esac
