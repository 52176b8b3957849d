"""Which reduced precision the no-grad encoding pass (VAE latents, text embeddings) may run in on a device.

The encoders' outputs are cached and never trained through, so they only need to be close to fp32, not exact:
bf16 keeps fp32's range (no overflow) with an 8-bit mantissa; ``tests/test_encoding_pass.py`` bounds the
difference on a VAE and a text encoder and ``bench/bench_encoding.py`` states it for the full-size SD1.5 VAE.
Reduced precision only pays where the hardware computes it natively: CUDA GPUs, and CPUs with AMX or
AVX512-BF16. On other CPUs (AVX2) torch emulates bf16 and it is slower than fp32, so they stay in fp32.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

REDUCED = (torch.float16, torch.bfloat16)
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (Linux ``/proc/cpuinfo`` flags; False where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)
    except OSError:
        pass
    return False


def encoding_autocast_dtype(device: torch.device, weights_dtype: torch.dtype = torch.float32) -> Optional[torch.dtype]:
    """The autocast dtype for encoding on ``device``, or None for plain fp32.

    ``weights_dtype`` is the precision the user chose for the frozen model (``mixed_precision``): a reduced one
    is used as is (autocasting fp16 weights to bf16 would only lose bits). Otherwise CUDA gets bf16 where the
    GPU has it and fp16 where not (callers re-encode in fp32 when fp16 overflows, as SD VAEs can), CPUs bf16
    only with native support, anything else fp32.
    """
    device = torch.device(device)
    if weights_dtype in REDUCED:
        return weights_dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None
