"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353), on top of any network type.

The adapted weight is re-normalised: ``W' = (W + ΔW) · m / ‖W + ΔW‖`` with a trained magnitude ``m``
(``dora_scale`` in the file), initialised to ``‖W‖`` so training starts at the base model. The norm is taken
per input channel, over the output and kernel axes: the magnitude has shape ``(1, in)`` for a Linear and
``(1, in, 1, 1)`` for a convolution. That is LyCORIS' ``wd_on_output=False`` layout, and the only one the
AUTOMATIC1111 WebUI's built-in Lora extension (``network.py: apply_weight_decompose``) and ComfyUI apply; a
per-output-channel magnitude would be applied wrongly there.

A per-input-channel factor commutes with the layer: ``W' x = (W + ΔW)(s ⊙ x)`` with ``s = m / ‖W + ΔW‖``, so
training runs the host's own module on the scaled input instead of building ``W'`` (and the bias stays as is).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import torch

if TYPE_CHECKING:  # pragma: no cover
    from lora_trainer.lora.base import NetworkLayer


def magnitude_shape(weight_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """``(1, in, 1, ...)``: the magnitude's shape for a weight of ``weight_shape`` (out, in, *kernel)."""
    return (1, weight_shape[1], *[1] * (len(weight_shape) - 2))


def input_axis_norm(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each input channel's slice of ``weight`` (out, in, *kernel), fp32, ``magnitude_shape``."""
    w = weight.float().transpose(0, 1).reshape(weight.shape[1], -1)
    return w.norm(dim=1).reshape(magnitude_shape(tuple(weight.shape)))


def decompose(merged: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``merged · m / ‖merged‖`` (per input channel): the weight a DoRA file means, given ``W + ΔW``."""
    return merged * (magnitude / input_axis_norm(merged))


def decomposed_forward(layer: "NetworkLayer", weight: torch.Tensor, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``layer``'s output with the decomposed weight, through the base module on per-channel scaled input;
    ``weight`` is the base module's weight without a graph (``base.base_weight``, passed in: base imports us).

    Dropout is not applied (as in LyCORIS, whose DoRA ignores it). With a multiplier other than 1 the result is
    ``base(x) + multiplier · (W'x − Wx)``, which is how the WebUI and ComfyUI apply a DoRA file's strength.
    """
    delta = layer.delta_weight()
    merged = weight.float() + delta
    factor = (layer.dora_scale / input_axis_norm(merged)).flatten()  # (in,)
    # The input channels are the last axis of a Linear's input and axis 1 of a convolution's.
    shape = (1, -1, *[1] * (x.dim() - 2)) if layer.geometry.is_conv else (-1,)
    scaled = x * factor.view(shape).to(x.dtype)
    out = layer._base_forward(scaled, *args, **kwargs)
    out = out + layer.geometry.apply(scaled.to(torch.float32), delta).to(out.dtype)
    if layer.multiplier == 1.0:
        return out
    original = layer._base_forward(x, *args, **kwargs)
    return original + (out - original) * layer.multiplier
