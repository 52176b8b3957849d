"""Which modules get LoRA layers: sd-scripts' default set, plus the convolution blocks for LoCon.

UNet: every Linear and 1x1 Conv inside the transformer blocks (``Transformer2DModel`` in diffusers,
``SpatialTransformer`` in ldm/sgm): attention q/k/v/out, feed-forward, proj_in/proj_out. With convolutions
(LoCon, or any type given a ``conv_rank``): also every Conv2d and Linear of the ResNet, downsample and upsample
blocks (``ResnetBlock2D``/``Downsample2D``/``Upsample2D``, ldm/sgm ``ResBlock``/``Downsample``/``Upsample``),
the set sd-scripts' ``conv_dim`` and LyCORIS train, less ``conv_in``/``conv_out``/``time_embedding``, which
common loaders drop. Text encoders: the Linears of each attention and MLP block. Containers are matched by class
name so that the WebUI's ldm/sgm classes and Forge's own Linear qualify without importing them.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from torch import nn

from lora_trainer.errors import ConfigError
from lora_trainer.lora.base import is_lora_target

UNET_CONTAINERS = ("Transformer2DModel", "SpatialTransformer")
UNET_CONV_CONTAINERS = ("ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample")
TEXT_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
# Layers that common loaders drop (diffusers, or the WebUI): training them would not survive export.
NEVER_TRAINED = ("conv_in", "conv_out", "time_embedding", "time_embed", "add_embedding", "label_emb")


def find_targets(
    root: nn.Module,
    containers: Sequence[str],
    extra: Sequence[str] = (),
    conv_containers: Sequence[str] = (),
) -> List[Tuple[str, nn.Module]]:
    """(module path, module) for LoRA-able children of ``containers``, every Conv2d/Linear child of
    ``conv_containers``, plus any path containing an ``extra`` substring, in model order."""
    for substring in extra:
        if any(blocked in substring for blocked in NEVER_TRAINED):
            raise ConfigError(
                f"target_modules: {substring!r} is not trainable here: loaders (diffusers, the WebUI) "
                f"drop LoRA on {', '.join(NEVER_TRAINED)}."
            )
    conv = bool(conv_containers)
    found = {}
    for name, module in root.named_modules():
        kind = type(module).__name__
        if kind in containers or kind in conv_containers:
            for child_name, child in module.named_modules():
                if child_name and is_lora_target(child, conv=kind in conv_containers):
                    found[f"{name}.{child_name}"] = child
        elif extra and is_lora_target(module, conv=conv) and any(s in name for s in extra):
            if not any(name.startswith(b) or f".{b}" in name for b in NEVER_TRAINED):
                found[name] = module
    order = {name: i for i, (name, _) in enumerate(root.named_modules())}
    return sorted(found.items(), key=lambda item: order[item[0]])
