"""The network types, one entry each: which layer family, which modules by default, how a file records them.

``lora`` is sd-scripts' own LoRA (``ss_network_module: networks.lora``); the others are written exactly as
sd-scripts with the LyCORIS package writes them (``--network_module lycoris.kohya --network_args algo=...``):
``ss_network_module: lycoris.kohya`` and ``ss_network_args`` holding the arguments as strings. The WebUI's
built-in Lora extension, Forge, ComfyUI and LyCORIS pick each module's type from its tensor names, so the
metadata is for people and tools that show it.

Nothing here imports torch: ``config.py`` (which the WebUI host imports early) takes its choices from here;
layer classes are imported when a network is built.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

DEFAULT_LORA_RANK = 8  # the rank (network dim) when lora_rank is left out, for every task: sd-scripts' and peft's

SD_SCRIPTS_LORA = "networks.lora"
LYCORIS_KOHYA = "lycoris.kohya"
# LyCORIS' preset with exactly our default layer set: attention/feed-forward linears and 1x1 convolutions of
# the UNet's transformer blocks, CLIP attention and MLP, no 3x3 convolutions.
NO_CONV_PRESET = "attn-mlp"


@dataclass(frozen=True)
class NetworkType:
    name: str
    layer: str  # "module:Class" of its NetworkLayer, imported on use
    algo: Optional[str]  # LyCORIS' algo name; None for sd-scripts' networks.lora
    trains_convs: bool  # the ResNet/down/upsampler 3x3 convolutions by default
    weight_decompose: bool  # DoRA
    doc: str

    def layer_class(self):
        module, cls = self.layer.split(":")
        return getattr(importlib.import_module(module), cls)


NETWORK_TYPES: Dict[str, NetworkType] = {
    t.name: t
    for t in (
        NetworkType(
            "lora", "lora_trainer.lora.layer:LoRALayer", None, False, False, "LoRA on attention/feed-forward layers"
        ),
        NetworkType(
            "locon", "lora_trainer.lora.layer:LoRALayer", "locon", True, False, "LoRA also on 3x3 convolutions"
        ),
        NetworkType("loha", "lora_trainer.lora.loha:LoHaLayer", "loha", False, False, "Hadamard product"),
        NetworkType("lokr", "lora_trainer.lora.lokr:LoKrLayer", "lokr", False, False, "Kronecker product"),
        NetworkType("dora", "lora_trainer.lora.layer:LoRALayer", "lora", False, True, "weight-decomposed LoRA (DoRA)"),
    )
}
NETWORK_TYPE_NAMES: Tuple[str, ...] = tuple(NETWORK_TYPES)


def _number(value: float) -> str:
    """A number as a user would type it in ``--network_args`` (``4``, ``0.5``)."""
    return format(float(value), "g")


@dataclass(frozen=True)
class NetworkSpec:
    """What to build, resolved from the config (or from an existing file): the type and its options.

    ``conv_rank`` None means no 3x3 convolutions; ``weight_decompose`` is DoRA on top of the type's update.
    """

    network_type: str = "lora"
    rank: int = 8
    alpha: float = 8.0
    conv_rank: Optional[int] = None
    conv_alpha: Optional[float] = None
    dropout: float = 0.0
    factor: int = -1
    weight_decompose: bool = False

    @property
    def type(self) -> NetworkType:
        return NETWORK_TYPES[self.network_type]

    @property
    def trains_convs(self) -> bool:
        return self.conv_rank is not None

    @classmethod
    def from_config(cls, cfg: Any) -> "NetworkSpec":
        """The spec an ``ImageConfig`` asks for (its options are validated in ``config.py``)."""
        kind = NETWORK_TYPES[cfg.network_type]
        rank = cfg.lora_rank if cfg.lora_rank is not None else DEFAULT_LORA_RANK
        alpha = cfg.lora_alpha if cfg.lora_alpha is not None else float(rank)
        conv_rank = cfg.conv_rank if cfg.conv_rank is not None else (rank if kind.trains_convs else None)
        conv_alpha = None
        if conv_rank is not None:
            # By default the convolutions get the same alpha/rank scale as the other layers.
            conv_alpha = cfg.conv_alpha if cfg.conv_alpha is not None else conv_rank * alpha / rank
        return cls(
            network_type=kind.name,
            rank=rank,
            alpha=float(alpha),
            conv_rank=conv_rank,
            conv_alpha=None if conv_alpha is None else float(conv_alpha),
            dropout=float(cfg.lora_dropout or 0.0),
            factor=cfg.factor,
            weight_decompose=kind.weight_decompose or cfg.dora_wd,
        )

    def rank_and_alpha(self, spatial_conv: bool) -> Tuple[int, float]:
        if spatial_conv:
            return self.conv_rank, self.conv_alpha
        return self.rank, self.alpha

    def layer_options(self) -> Dict[str, Any]:
        options: Dict[str, Any] = {"dropout": self.dropout, "weight_decompose": self.weight_decompose}
        if self.network_type == "lokr":
            options["factor"] = self.factor
        return options

    def network_args(self) -> Dict[str, str]:
        """``ss_network_args`` as sd-scripts records LyCORIS' ``--network_args`` (all values strings)."""
        kind = self.type
        if kind.algo is None:
            return {}
        args = {"algo": kind.algo}
        if self.trains_convs:
            args.update(conv_dim=str(self.conv_rank), conv_alpha=_number(self.conv_alpha))
        else:
            args["preset"] = NO_CONV_PRESET
        if self.network_type == "lokr":
            args["factor"] = str(self.factor)
        if self.weight_decompose:
            args.update(dora_wd="True", wd_on_output="False")
        return args

    def metadata(self) -> Dict[str, str]:
        """``ss_network_module`` and, for the LyCORIS types, ``ss_network_args``."""
        args = self.network_args()
        if not args:
            return {"ss_network_module": SD_SCRIPTS_LORA}
        return {"ss_network_module": LYCORIS_KOHYA, "ss_network_args": json.dumps(args)}

    def describe(self) -> str:
        text = f"{self.network_type} (rank {self.rank}, alpha {_number(self.alpha)}"
        if self.trains_convs:
            text += f"; 3x3 convolutions rank {self.conv_rank}, alpha {_number(self.conv_alpha)}"
        if self.network_type == "lokr":
            text += f"; factor {self.factor}"
        if self.weight_decompose and self.network_type != "dora":
            text += "; DoRA weight decomposition"
        return text + ")"


def layer_class_for_tensors(suffixes: Mapping[str, Any]):
    """The layer family whose marker tensors a module's suffixes contain, or None."""
    for kind in ("lora", "loha", "lokr"):
        cls = NETWORK_TYPES[kind].layer_class()
        if any(s in suffixes for s in cls.marker_suffixes):
            return cls
    return None
