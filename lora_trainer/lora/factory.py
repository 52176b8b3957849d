"""The one way the trainer gets its network: from the config, or continuing an existing file of any type.

A model adapter (diffusers from disk, the WebUI's live model, ...) only supplies targets: ``(kohya name,
module)`` pairs from ``adapter.lora_targets(train_text_encoder, extra[, conv=True])``. Everything about network
types (which layers, ranks, factors, DoRA, the metadata the file records) is decided here and in the registry.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Dict, List, Tuple

from lora_trainer.config import lora_rank_of
from lora_trainer.export.lora_file import load_lora_file
from lora_trainer.lora.base import NetworkLayer, is_spatial_conv
from lora_trainer.lora.network import LoRANetwork, Target, group_by_module
from lora_trainer.lora.registry import NetworkSpec


def build_network(cfg, adapter, log: Callable[[str], None] = print) -> Tuple[LoRANetwork, NetworkSpec]:
    """The network ``cfg`` asks for on ``adapter``'s model, and the spec it was built from (for the metadata).

    With ``network_weights`` the file decides everything, module by module (type, rank, alpha, factors, DoRA,
    which convolutions); the config's network options are then ignored, as its rank is. Raises
    ``ModelLoadError`` when the file does not fit the model or ``ConfigError`` for bad target options.
    """
    if cfg.network_weights:
        return _continue_from_file(cfg, adapter, log)
    spec = NetworkSpec.from_config(cfg)
    _check_family(adapter, spec)
    network = LoRANetwork(_targets(cfg, adapter, spec.trains_convs), spec=spec)
    return network, spec


def _check_family(adapter, spec: NetworkSpec) -> None:
    """The model family's refusal of a type its files cannot hold (``ModelFamily.check_network_type``)."""
    family = getattr(adapter, "family", None)
    if family is not None:
        family.check_network_type(spec.network_type, spec.conv_rank)


def _targets(cfg, adapter, conv: bool) -> List[Target]:
    # Adapters that predate convolution targets are only asked for them when a run needs them.
    if conv:
        return adapter.lora_targets(cfg.train_text_encoder, cfg.target_modules, conv=True)
    return adapter.lora_targets(cfg.train_text_encoder, cfg.target_modules)


def _continue_from_file(cfg, adapter, log) -> Tuple[LoRANetwork, NetworkSpec]:
    path = cfg.network_weights
    tensors, metadata = load_lora_file(path)
    family = getattr(adapter, "family", None)
    if family is not None:  # the family's file names (Z-Image's diffusion_model.*) as the network's kohya names
        tensors = family.from_lora_file(tensors)
    names = set(group_by_module(tensors))
    targets = _targets(cfg, adapter, conv=False)
    if not names <= {name for name, _ in targets}:
        targets = _targets(cfg, adapter, conv=True)  # a LoCon-style file: the convolution blocks too
    network = LoRANetwork.from_kohya(targets, tensors, path, dropout=float(cfg.lora_dropout or 0.0))
    spec = spec_of_layers(list(network.layers.values()), metadata, default_rank=lora_rank_of(cfg))
    spec = dataclasses.replace(spec, dropout=float(cfg.lora_dropout or 0.0))
    _check_family(adapter, spec)
    log(f"continuing from {path}: {spec.describe()}")
    return network, spec


def spec_of_layers(layers: List[NetworkLayer], metadata: Dict[str, str], default_rank: int = 8) -> NetworkSpec:
    """The spec that describes loaded layers (for the metadata of the files a continued run writes): the type
    (loha/lokr if any module is one, locon if a 3x3 convolution is adapted, dora for decomposed LoRA), the
    largest rank and the first alpha of the other layers, the convolutions' rank and alpha, LoKr's factor
    from the file's ``ss_network_args``."""
    kinds = {layer.kind for layer in layers}
    spatial = [layer for layer in layers if is_spatial_conv(layer.base)]
    plain = [layer for layer in layers if not is_spatial_conv(layer.base)] or layers
    decompose = any(layer.dora_scale is not None for layer in layers)
    if "loha" in kinds or "lokr" in kinds:
        network_type = "loha" if "loha" in kinds else "lokr"
    elif spatial:
        network_type = "locon"
    else:
        network_type = "dora" if decompose else "lora"
    ranked = [layer for layer in plain if getattr(layer, "low_rank", True)]
    rank = max((layer.rank for layer in ranked), default=default_rank)
    alpha = ranked[0].alpha if ranked else float(rank)
    try:
        factor = int(json.loads(metadata.get("ss_network_args", "{}")).get("factor", -1))
    except (ValueError, TypeError, AttributeError):
        factor = -1
    return NetworkSpec(
        network_type=network_type,
        rank=rank,
        alpha=alpha,
        conv_rank=spatial[0].rank if spatial else None,
        conv_alpha=spatial[0].alpha if spatial else None,
        factor=factor if network_type == "lokr" else -1,
        weight_decompose=decompose,
    )
