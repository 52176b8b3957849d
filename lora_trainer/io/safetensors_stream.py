"""Reading a .safetensors file one tensor at a time with plain reads, not a memory map.

safetensors' own ``safe_open`` maps the file: every page it touches counts towards the process's resident
memory until the mapping closes, so loading a 2 GB fp16 checkpoint into fp32 weights peaks near 2 GB above
the weights themselves. Reading each tensor into its own buffer keeps the peak at the weights plus one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, List, Tuple

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsStream:
    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) != 8:
                raise ValueError("file too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise ValueError("header length exceeds the file size (truncated or not safetensors)")
            header = json.loads(fh.read(header_len))
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries: Dict[str, dict] = header
        for name, entry in header.items():
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"tensor {name} has unsupported dtype {entry['dtype']}")
            if self.data_start + entry["data_offsets"][1] > size:
                raise ValueError(f"tensor {name} lies beyond the end of the file (truncated download?)")

    def keys(self) -> List[str]:
        return list(self.entries)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as fh:
            fh.seek(self.data_start + begin)
            fh.readinto(buffer)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)
