"""Run by the WebUI at start-up (in a subprocess, skipped under --skip-install): install what the host lacks.

The engine needs only torch, safetensors, numpy, Pillow, PyYAML and tqdm, and every supported host
(AUTOMATIC1111 1.10, Forge) already ships all of them at versions it pins and reinstalls at each start. So
this script installs nothing by default, and never names a package the host pins (torch, gradio,
transformers, diffusers, safetensors, pydantic, ...): installing one would change the host's version.

Optional extras are installed only when missing and only when they cannot move a pinned package:
- tensorboard: the loss curves under output_dir/logs (training runs without it; the logger skips itself).
  Off unless LORA_TRAINER_INSTALL_TENSORBOARD=1, because its protobuf requirement can conflict with the
  protobuf the host pins.
"""

import os

import launch  # the host's helpers; only importable inside the WebUI's launcher

# (import name, pip requirement, why) for what the engine needs and a host might lack.
REQUIRED = [
    ("yaml", "pyyaml", "config files"),
    ("tqdm", "tqdm", "progress in the console"),
]
OPTIONAL = [
    ("tensorboard", "tensorboard", "TensorBoard loss curves", "LORA_TRAINER_INSTALL_TENSORBOARD"),
]


def main() -> None:
    for module, requirement, why in REQUIRED:
        if not launch.is_installed(module):
            launch.run_pip(f"install {requirement}", f"{requirement} for LoRA Trainer ({why})")
    for module, requirement, why, switch in OPTIONAL:
        if os.environ.get(switch) == "1" and not launch.is_installed(module):
            launch.run_pip(f"install {requirement}", f"{requirement} for LoRA Trainer ({why})")


main()
