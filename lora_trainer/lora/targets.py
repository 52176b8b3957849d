"""Which modules get LoRA layers: sd-scripts' default set.

UNet: every Linear and 1x1 Conv inside the transformer blocks (``Transformer2DModel`` in diffusers,
``SpatialTransformer`` in ldm/sgm): attention q/k/v/out, feed-forward, proj_in/proj_out. Text encoders: the
Linears of each attention and MLP block. Containers are matched by class name so that the WebUI's ldm/sgm
classes and Forge's own Linear qualify without importing them.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from torch import nn

from lora_trainer.errors import ConfigError
from lora_trainer.lora.layer import is_lora_target

UNET_CONTAINERS = ("Transformer2DModel", "SpatialTransformer")
TEXT_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
# Layers that common loaders drop (diffusers, or the WebUI): training them would not survive export.
NEVER_TRAINED = ("conv_in", "conv_out", "time_embedding", "time_embed", "add_embedding", "label_emb")


def find_targets(root: nn.Module, containers: Sequence[str], extra: Sequence[str] = ()) -> List[Tuple[str, nn.Module]]:
    """(module path, module) for LoRA-able children of ``containers``, plus any path containing an ``extra``
    substring, in model order."""
    for substring in extra:
        if any(blocked in substring for blocked in NEVER_TRAINED):
            raise ConfigError(
                f"target_modules: {substring!r} is not trainable here: loaders (diffusers, the WebUI) "
                f"drop LoRA on {', '.join(NEVER_TRAINED)}."
            )
    found = {}
    for name, module in root.named_modules():
        if type(module).__name__ in containers:
            for child_name, child in module.named_modules():
                if child_name and is_lora_target(child):
                    found[f"{name}.{child_name}"] = child
        elif extra and is_lora_target(module) and any(s in name for s in extra):
            if not any(name.startswith(b) or f".{b}" in name for b in NEVER_TRAINED):
                found[name] = module
    order = {name: i for i, (name, _) in enumerate(root.named_modules())}
    return sorted(found.items(), key=lambda item: order[item[0]])
