"""A set of network layers (any registered type) over named target modules, saved and loaded as kohya-format
tensors (``<kohya module name>.<suffix>``)."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from lora_trainer.errors import ModelLoadError
from lora_trainer.lora.base import NetworkLayer, is_spatial_conv
from lora_trainer.lora.registry import NetworkSpec, layer_class_for_tensors

Target = Tuple[str, nn.Module]  # (kohya module name, module), e.g. ("lora_unet_..._to_q", Linear)


def group_by_module(state: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{module name: {suffix: tensor}}`` from kohya keys (module names have no dots; suffixes may)."""
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = value
    return groups


class LoRANetwork(nn.Module):
    """The layers of one training run, keyed by kohya module name; attach/detach them together."""

    def __init__(
        self,
        targets: Sequence[Target],
        rank: int = 8,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        *,
        spec: Optional[NetworkSpec] = None,
    ):
        """Layers of ``spec``'s type on every target (plain LoRA of ``rank``/``alpha`` when no spec is given).
        3x3 convolutions get the spec's conv rank and alpha."""
        super().__init__()
        spec = spec or NetworkSpec(rank=rank, alpha=float(rank if alpha is None else alpha), dropout=dropout)
        cls = spec.type.layer_class()
        layers = []
        for name, module in targets:
            spatial = is_spatial_conv(module)
            if spatial and not spec.trains_convs:
                raise ModelLoadError(f"{name} is a 3x3 convolution, but {spec.network_type} has no conv_rank.")
            rank_here, alpha_here = spec.rank_and_alpha(spatial)
            layers.append(cls(name, module, rank_here, alpha_here, **spec.layer_options()))
        self._set_layers(layers)

    def _set_layers(self, layers: Sequence[NetworkLayer]) -> None:
        if not layers:
            raise ModelLoadError("no LoRA target modules were found in the model.")
        self.layers = nn.ModuleDict({layer.name: layer for layer in layers})

    @classmethod
    def from_kohya(
        cls, targets: Sequence[Target], state: Mapping[str, torch.Tensor], source: str, dropout: float = 0.0
    ) -> "LoRANetwork":
        """The network a file describes, module by module (each keeps its own type, rank, alpha and factors).
        Every target must be in the file and every module of the file among the targets."""
        groups = group_by_module(state)
        _check_same_modules([name for name, _ in targets], groups, source)
        layers = []
        for name, module in targets:
            layer_cls = layer_class_for_tensors(groups[name])
            if layer_cls is None:
                raise ModelLoadError(
                    f"{source}: {name} has tensors {sorted(groups[name])}, which are none of the network types "
                    "lora-trainer trains (lora/locon/dora: lora_down/lora_up, loha: hada_*, lokr: lokr_*)."
                )
            layers.append(layer_cls.from_kohya(name, module, groups[name], source, dropout))
        network = cls.__new__(cls)
        nn.Module.__init__(network)
        network._set_layers(layers)
        return network

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
        """Every layer's tensors under ``<name>.<suffix>`` (``lora_down.weight``, ``hada_w1_a``, ``alpha``...)."""
        out: Dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            for suffix, value in layer.kohya_tensors().items():
                out[f"{name}.{suffix}"] = value.detach().to("cpu", dtype).contiguous()
        return out

    def load_kohya_state_dict(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Load weights saved by ``kohya_state_dict`` into this network; every layer must be present with the
        shapes it has here."""
        groups = group_by_module(state)
        _check_same_modules(list(self.layers), groups, source)
        for name, layer in self.layers.items():
            layer.load_kohya_tensors(groups[name], source)


def _check_same_modules(names: Sequence[str], groups: Mapping[str, Mapping], source: str) -> None:
    missing = [n for n in names if n not in groups]
    unknown = sorted(set(groups) - set(names))
    if missing or unknown:
        detail = f"missing {missing[0]}" if missing else f"it has {unknown[0]}, which this model lacks"
        raise ModelLoadError(
            f"{source} does not match this model and these target modules: {detail} "
            f"({len(missing)} missing, {len(unknown)} unknown). Was it trained on another "
            "architecture or with train_text_encoder or the network type's convolutions set differently?"
        )
