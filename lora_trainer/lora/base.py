"""What every network type shares: attach to a module by wrapping its ``forward``, detach leaving it exactly as
it was, the module's geometry (Linear or Conv2d), dropout, the preview multiplier and DoRA's magnitude.

The base module is neither replaced nor renamed: ``attach`` sets an instance-level ``forward`` on it and
``detach`` removes it again (sd-scripts does the same). The host's module tree, parameter names and state dict
stay untouched, which the WebUI (and Forge, whose Linear looks its weights up by name) rely on; afterwards the
module has no attribute it did not have before.

A type (``layer.py``, ``loha.py``, ``lokr.py``) defines its parameters, ``delta_weight`` (the dense update ΔW,
scale included) and the kohya-format tensors it reads and writes; ``delta`` (ΔW applied to an input) defaults to
a convolution/linear map with the dense ΔW and is overridden where a cheaper product exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.errors import ModelLoadError
from lora_trainer.lora import dora

_MISSING = object()


def is_conv(module: nn.Module) -> bool:
    """A 2-D convolution, by class or by name (host classes such as Forge's own Conv2d qualify)."""
    return isinstance(module, nn.Conv2d) or (
        type(module).__name__ == "Conv2d" and hasattr(module, "kernel_size") and hasattr(module, "in_channels")
    )


def is_linear(module: nn.Module) -> bool:
    """A Linear, by class or by name (Forge's ``ForgeOperations.Linear`` is not an ``nn.Linear``)."""
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Linear" and hasattr(module, "in_features") and hasattr(module, "out_features")
    )


def is_lora_target(module: nn.Module, conv: bool = False) -> bool:
    """Linears and 1x1 convolutions (SD1's proj_in/proj_out); with ``conv``, also larger (3x3) convolutions.
    Grouped convolutions are never targets (no loader splits a LoRA by group)."""
    if is_conv(module):
        if getattr(module, "groups", 1) != 1:
            return False
        return conv or tuple(module.kernel_size) == (1, 1)
    return is_linear(module)


def is_spatial_conv(module: nn.Module) -> bool:
    """A convolution with a kernel larger than 1x1: the layers LoCon adds, with their own rank and alpha."""
    return is_conv(module) and tuple(module.kernel_size) != (1, 1)


@dataclass(frozen=True)
class Geometry:
    """The weight layout and the operation of the adapted module: ``(out, in)`` for a Linear,
    ``(out, in, kh, kw)`` with stride/padding/dilation for a Conv2d."""

    out_features: int
    in_features: int
    kernel: Tuple[int, ...] = ()
    stride: Tuple[int, ...] = (1, 1)
    padding: Tuple[int, ...] = (0, 0)
    dilation: Tuple[int, ...] = (1, 1)

    @classmethod
    def of(cls, module: nn.Module) -> "Geometry":
        if is_conv(module):
            return cls(
                module.out_channels,
                module.in_channels,
                tuple(module.kernel_size),
                tuple(module.stride),
                tuple(module.padding),
                tuple(module.dilation),
            )
        return cls(module.out_features, module.in_features)

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel)

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel)

    @property
    def kernel_size(self) -> int:
        """Elements per (out, in) pair: 1 for a Linear, kh*kw for a convolution."""
        return math.prod(self.kernel) if self.kernel else 1

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x`` through a weight of this layout (no bias): ``F.linear`` or ``F.conv2d`` with the module's own
        stride, padding and dilation."""
        if self.is_conv:
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation)
        return F.linear(x, weight)


class NetworkLayer(nn.Module):
    """One adapted module. ``y = base(x) + multiplier * ΔW·dropout(x)``, or with DoRA's weight decomposition
    (``dora_scale``) ``y = base'(x)`` for the re-normalised weight ``W' = (W + ΔW) · m / ‖W + ΔW‖``.

    ``rank`` and ``alpha`` are per module (``scale = alpha / rank`` unless the type says otherwise); ``multiplier``
    is the strength the WebUI's ``<lora:name:strength>`` applies, 1 while training. Parameters are fp32.
    """

    kind: ClassVar[str]  # the registry name of the layer family, for messages
    # Tensor-name suffixes (after ``<kohya name>.``) that mark a module of this family in a file.
    marker_suffixes: ClassVar[Tuple[str, ...]]
    # Suffixes of factorisations we do not train or load (Tucker/CP), with the LyCORIS option that makes them.
    unsupported_suffixes: ClassVar[Dict[str, str]] = {}

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        weight_decompose: bool = False,
    ):
        super().__init__()
        self.name = name
        self.geometry = Geometry.of(base)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.multiplier = 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._base = [base]  # a list, so the base is not registered as our submodule
        self._saved_forward: object = _MISSING
        self._base_forward = None
        magnitude = dora.input_axis_norm(base_weight(base)) if weight_decompose else None
        self.register_parameter("dora_scale", None if magnitude is None else nn.Parameter(magnitude))

    # ------------------------------------------------------------ what a type defines

    def delta_weight(self) -> torch.Tensor:
        """ΔW, the dense update with its scale (not the multiplier), fp32, in the base weight's shape."""
        raise NotImplementedError

    def kohya_tensors(self) -> Dict[str, torch.Tensor]:
        """This module's tensors in the file format, by suffix (``lora_down.weight``, ``hada_w1_a``, ``alpha``...)."""
        raise NotImplementedError

    def _load_kohya_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy this type's own tensors (shapes already checked)."""
        raise NotImplementedError

    @classmethod
    def from_kohya(
        cls, name: str, base: nn.Module, tensors: Mapping[str, torch.Tensor], source: str, dropout: float = 0.0
    ) -> "NetworkLayer":
        """A layer shaped exactly as the file's tensors for this module (rank, alpha, factors, DoRA)."""
        raise NotImplementedError

    # ------------------------------------------------------------ shared behaviour

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW applied to ``x`` (scale included, no bias, no multiplier)."""
        return self.geometry.apply(x, self.delta_weight())

    def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.dora_scale is not None:
            return dora.decomposed_forward(self, base_weight(self.base), x, *args, **kwargs)
        out = self._base_forward(x, *args, **kwargs)
        update = self.delta(self.dropout(x.to(torch.float32)))
        return out + (update * self.multiplier).to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with this update merged at ``multiplier`` (fp32): what a loader that merges (the
        WebUI, ComfyUI) computes, for previews and checks."""
        weight = base_weight(self.base).float()
        delta = self.delta_weight()
        if self.dora_scale is None:
            return weight + self.multiplier * delta
        decomposed = dora.decompose(weight + delta, self.dora_scale)
        return weight + self.multiplier * (decomposed - weight)

    @property
    def attached(self) -> bool:
        return self._base_forward is not None

    def attach(self) -> None:
        if self.attached:
            return
        base = self.base
        self._saved_forward = base.__dict__.get("forward", _MISSING)
        self._base_forward = base.forward
        base.forward = self._forward

    def detach(self) -> None:
        if not self.attached:
            return
        base = self.base
        if self._saved_forward is _MISSING:
            base.__dict__.pop("forward", None)
        else:
            base.forward = self._saved_forward
        self._saved_forward = _MISSING
        self._base_forward = None

    # ------------------------------------------------------------ file format helpers

    def _common_tensors(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        tensors["alpha"] = torch.tensor(self.alpha)
        if self.dora_scale is not None:
            tensors["dora_scale"] = self.dora_scale
        return tensors

    def load_kohya_tensors(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Load this module's tensors from a file or a training state; every shape must match this layer."""
        own = self.kohya_tensors()
        missing = [s for s in own if s not in tensors and s != "alpha"]
        if missing:
            raise ModelLoadError(
                f"{source}: {self.name} lacks {self.name}.{missing[0]} that a {self.kind} layer of this "
                "configuration needs. Was it trained with another network_type, rank or factor?"
            )
        for suffix, value in own.items():
            if suffix != "alpha" and tuple(tensors[suffix].shape) != tuple(value.shape):
                raise ModelLoadError(
                    f"{source}: {self.name}.{suffix} has shape {tuple(tensors[suffix].shape)} but this model and "
                    f"configuration need {tuple(value.shape)}."
                )
        with torch.no_grad():
            self._load_kohya_tensors(tensors)
            if self.dora_scale is not None:
                self.dora_scale.copy_(tensors["dora_scale"].float())
        if "alpha" in tensors:
            self.alpha = float(tensors["alpha"])

    @classmethod
    def refuse_unsupported(cls, name: str, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        for suffix, option in cls.unsupported_suffixes.items():
            if suffix in tensors:
                raise ModelLoadError(
                    f"{source}: {name}.{suffix} is a {option} factorisation, which lora-trainer does not train; "
                    f"continue from a file trained without {option}."
                )


def base_weight(module: nn.Module) -> torch.Tensor:
    """The adapted module's weight without a graph (host weights may be fp16; callers convert)."""
    weight = module.weight
    if weight is None:
        raise ModelLoadError(f"{type(module).__name__} has no weight to adapt (is the model fully loaded?)")
    return weight.detach()


def required(tensors: Mapping[str, torch.Tensor], name: str, suffix: str, source: str) -> torch.Tensor:
    """``tensors[suffix]``, or a clear error naming the file and the missing key."""
    if suffix not in tensors:
        raise ModelLoadError(f"{source}: {name}.{suffix} is missing.")
    return tensors[suffix]


def alpha_from(tensors: Mapping[str, torch.Tensor], rank: int) -> float:
    """The stored alpha; a file without one means alpha = rank (scale 1), as every loader reads it."""
    return float(tensors["alpha"]) if "alpha" in tensors else float(rank)


def dora_magnitude(tensors: Mapping[str, torch.Tensor], geometry: Geometry, name: str, source: str) -> bool:
    """Whether the file carries DoRA's magnitude for this module, in the input-axis shape we write."""
    scale = tensors.get("dora_scale")
    if scale is None:
        return False
    expected = dora.magnitude_shape(geometry.weight_shape)
    if tuple(scale.shape) != expected:
        raise ModelLoadError(
            f"{source}: {name}.dora_scale has shape {tuple(scale.shape)}; lora-trainer continues DoRA files "
            f"with the magnitude per input channel {expected} (LyCORIS wd_on_output=False, the layout the "
            "WebUI and ComfyUI apply), not per output channel."
        )
    return True


def optional_dropout(value: Optional[float]) -> float:
    return float(value or 0.0)
