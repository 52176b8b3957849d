"""Making a host's live model trainable without a second copy of it, and checking that it can be.

Forge-family hosts build and patch their models inside ``torch.inference_mode()``: every weight is an
*inference tensor*, which autograd refuses to save ("Inference tensors cannot be saved for backward"), so any
LoRA on a layer that uses one fails at the first backward. ``replace_inference_tensors`` swaps each such
parameter (and buffer) for a normal clone, one at a time, so memory grows by one tensor at most; a tensor
reachable under several names (a tied embedding) gets one clone that all its names share.

Forge's transformer blocks also add residuals in place (``x += attn(norm(x))``): the norm saved ``x`` for its
backward, the in-place add changes it, and autograd fails once a LoRA upstream makes ``x`` require grad.
``guard_inplace_residuals`` hands each such block, and each norm in it, a copy of its input while gradients are
recorded.

``HostModelNotTrainable`` says why the live model cannot be trained in place; the WebUI glue then trains from
the checkpoint file instead.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Sequence

import torch
from torch import nn

from lora_trainer.errors import LoraTrainerError
from lora_trainer.hosts.module_changes import ModuleChanges

# Blocks whose forward adds residuals in place, by class name (Forge's and ComfyUI's ldm-style UNets).
INPLACE_RESIDUAL_BLOCKS = ("BasicTransformerBlock",)
TRAINABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class HostModelNotTrainable(LoraTrainerError):
    """The host's live model cannot be trained in place (the message says why); nothing was changed yet."""


def replace_inference_tensors(roots: Iterable[nn.Module]) -> int:
    """Replace every inference-mode parameter and buffer under ``roots`` by a normal clone; returns how many.

    Parameters keep their ``requires_grad`` flag and stay shared where the host shared them (one clone per
    tensor, however many modules hold it). Values are bit-identical; the host keeps using the clones.
    """
    clones: Dict[int, torch.Tensor] = {}
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for root in roots:
            for module in root.modules():
                for table, make in ((module._parameters, _parameter_clone), (module._buffers, _buffer_clone)):
                    for name, tensor in list(table.items()):
                        if tensor is None or not tensor.is_inference():
                            continue
                        if id(tensor) not in clones:
                            clones[id(tensor)] = make(tensor)
                            replaced += 1
                        table[name] = clones[id(tensor)]
    return replaced


def _parameter_clone(param: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(param.clone(), requires_grad=param.requires_grad)


def _buffer_clone(buffer: torch.Tensor) -> torch.Tensor:
    return buffer.clone()


def count_inference_tensors(roots: Iterable[nn.Module]) -> int:
    """How many parameters and buffers under ``roots`` are inference tensors (0 once replaced)."""
    seen = set()
    for root in roots:
        for tensor in [*root.parameters(), *root.buffers()]:
            if tensor.is_inference():
                seen.add(id(tensor))
    return len(seen)


def _copy_input(forward: Callable) -> Callable:
    def run(x, *args, **kwargs):
        if torch.is_grad_enabled() and x.requires_grad:
            x = x.clone()  # what the norm saves for backward is then safe from the block's in-place add
        return forward(x, *args, **kwargs)

    return run


def guard_inplace_residuals(
    root: nn.Module, changes: ModuleChanges, blocks: Sequence[str] = INPLACE_RESIDUAL_BLOCKS
) -> int:
    """Give every block of ``blocks`` (class names), and every norm inside one, a copy of its input while autograd
    records: the block's own input may be kept for backward (gradient checkpointing keeps it to recompute the
    block), and so is each norm's. Recorded in ``changes`` so ``undo`` removes it. Returns how many modules
    were wrapped."""
    wrapped = 0
    for module in root.modules():
        if type(module).__name__ not in blocks:
            continue
        changes.wrap_forward(module, _copy_input)
        wrapped += 1
        for child in module.children():
            if isinstance(child, nn.LayerNorm) or type(child).__name__.endswith("LayerNorm"):
                changes.wrap_forward(child, _copy_input)
                wrapped += 1
    return wrapped


def weights_off_device(root: nn.Module, device: torch.device) -> int:
    """How many parameters of ``root`` are not on ``device`` (a host that streams layers in keeps some away)."""
    device = torch.device(device)
    return sum(1 for p in root.parameters() if p.device.type != device.type or _index(p.device) != _index(device))


def _index(device: torch.device) -> int:
    return 0 if device.index is None else device.index


def untrainable_dtypes(root: nn.Module) -> set:
    """The storage dtypes under ``root`` that autograd cannot train through (fp8, quantised types)."""
    return {str(p.dtype) for p in root.parameters() if p.dtype not in TRAINABLE_DTYPES}


__all__ = [
    "HostModelNotTrainable",
    "count_inference_tensors",
    "guard_inplace_residuals",
    "replace_inference_tensors",
    "untrainable_dtypes",
    "weights_off_device",
]
