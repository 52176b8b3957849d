"""A set of LoRA layers over named target modules, saved and loaded as kohya-format tensors."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lora_trainer.errors import ModelLoadError
from lora_trainer.lora.layer import LoRALayer

Target = Tuple[str, nn.Module]  # (kohya module name, module), e.g. ("lora_unet_..._to_q", Linear)


class LoRANetwork(nn.Module):
    def __init__(
        self,
        targets: Sequence[Target],
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        ranks: Optional[Dict[str, int]] = None,
        alphas: Optional[Dict[str, float]] = None,
    ):
        super().__init__()
        if not targets:
            raise ModelLoadError("no LoRA target modules were found in the model.")
        self.layers = nn.ModuleDict()
        for name, module in targets:
            r = (ranks or {}).get(name, rank)
            a = (alphas or {}).get(name, alpha)
            self.layers[name] = LoRALayer(name, module, r, a, dropout)

    def attach(self) -> None:
        for layer in self.layers.values():
            layer.attach()

    def detach(self) -> None:
        for layer in self.layers.values():
            layer.detach()

    @contextlib.contextmanager
    def attached(self) -> Iterator["LoRANetwork"]:
        """Attach for the duration of a block; always detach, whatever happens inside."""
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def parameter_groups(self, lrs: Dict[str, Optional[float]], default_lr: float) -> List[dict]:
        """One optimizer group per kohya prefix (``lora_unet``, ``lora_te``...), each with its own rate."""
        groups: Dict[str, List[nn.Parameter]] = {}
        for name, layer in self.layers.items():
            prefix = "lora_unet" if name.startswith("lora_unet") else "lora_te"
            groups.setdefault(prefix, []).extend(layer.parameters())
        return [
            {"params": params, "lr": lrs.get(prefix) if lrs.get(prefix) is not None else default_lr, "name": prefix}
            for prefix, params in groups.items()
        ]

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
        """``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and ``<name>.alpha`` for every layer."""
        out: Dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            out[f"{name}.lora_down.weight"] = layer.lora_down.weight.detach().to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = layer.lora_up.weight.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=dtype)
        return out

    def load_kohya_state_dict(self, state: Dict[str, torch.Tensor], source: str) -> None:
        """Load weights saved by ``kohya_state_dict`` (from us or sd-scripts); every layer must be present."""
        missing = [n for n in self.layers if f"{n}.lora_down.weight" not in state]
        unknown = sorted({k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")} - set(self.layers))
        if missing or unknown:
            detail = f"missing {missing[0]}" if missing else f"it has {unknown[0]}, which this model lacks"
            raise ModelLoadError(
                f"{source} does not match this model and these target modules: {detail} "
                f"({len(missing)} missing, {len(unknown)} unknown). Was it trained on another "
                "architecture or with train_text_encoder set differently?"
            )
        with torch.no_grad():
            for name, layer in self.layers.items():
                down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
                if down.shape != layer.lora_down.weight.shape or up.shape != layer.lora_up.weight.shape:
                    raise ModelLoadError(
                        f"{source}: {name} has shape {tuple(down.shape)} but the model needs "
                        f"{tuple(layer.lora_down.weight.shape)}."
                    )
                layer.lora_down.weight.copy_(down.float())
                layer.lora_up.weight.copy_(up.float())
                if f"{name}.alpha" in state:
                    layer.alpha = float(state[f"{name}.alpha"])


def ranks_and_alphas(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, int], Dict[str, float]]:
    """Per-module rank and alpha of a kohya LoRA file (a missing alpha means alpha = rank, scale 1)."""
    ranks, alphas = {}, {}
    for key, value in state.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            ranks[name] = int(value.shape[0])
            alphas[name] = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(value.shape[0])
    return ranks, alphas
