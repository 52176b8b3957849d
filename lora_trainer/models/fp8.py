"""fp8 storage of a frozen base model's Linears, computed in a wider dtype (sd-scripts' ``--fp8_base``).

Each Linear inside the named container blocks keeps its weight in ``torch.float8_e4m3fn`` (1 byte a
parameter instead of 2) and gets an instance ``forward`` that casts the weight up to the input's dtype for
the matmul. LoRA layers wrap that forward like any other (``lora/layer.py``) and stay in their own dtype, so
the LoRA is trained in bf16/fp32 on an fp8-stored base. Rounding the base to fp8 changes its outputs slightly,
as it does in sd-scripts; it is a memory option, off by default.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

FP8 = getattr(torch, "float8_e4m3fn", None)


def _fp8_forward(module: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = module.bias.to(x.dtype) if module.bias is not None else None
        return F.linear(x, module.weight.to(x.dtype), bias)

    return forward


def store_linears_in_fp8(model: nn.Module, containers: Sequence[str], compute_dtype: torch.dtype) -> int:
    """Store every Linear weight inside ``containers`` (class names) in fp8; returns how many. Raises
    RuntimeError where this torch has no float8 dtype."""
    if FP8 is None:
        raise RuntimeError("this torch has no float8_e4m3fn dtype; fp8_base needs torch 2.1 or newer.")
    count = 0
    for module in model.modules():
        if type(module).__name__ not in containers:
            continue
        for child in module.modules():
            if isinstance(child, nn.Linear) and child.weight.dtype != FP8:
                child.weight = nn.Parameter(child.weight.detach().to(FP8), requires_grad=False)
                if child.bias is not None:
                    child.bias = nn.Parameter(child.bias.detach().to(compute_dtype), requires_grad=False)
                child.forward = _fp8_forward(child)
                count += 1
    return count
