"""Write the trained adapter (and optionally the merged model) as folders transformers and peft load as is.

Each folder is written under a temporary name and renamed into place (``atomic_directory``), so a reader
never sees half an adapter and a crash keeps the previous save.
"""

from __future__ import annotations

import copy
import os
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

from lora_trainer.io.atomic import atomic_directory

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_state_dict(model, precision: str = "float") -> Dict[str, torch.Tensor]:
    """The adapter's weights under the names peft saves them with, cast to the save precision."""
    from peft import get_peft_model_state_dict

    dtype = SAVE_DTYPES[precision]
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model, tokenizer, folder: str, precision: str = "fp16", base_model_name: Optional[str] = None) -> str:
    """Write ``adapter_model.safetensors``, ``adapter_config.json`` and the tokenizer into ``folder``.

    The tokenizer travels with the adapter so that ``pipeline("text-generation", model=folder)`` works; the
    adapter config names the base model it was trained on: the folder, or ``base_model_name`` (the Hub id whose
    cached files the folder is), so that the adapter loads on any machine. The model itself keeps the folder
    as its name: peft reads the base config from there, never from the network.
    """
    config = copy.deepcopy(model.peft_config["default"])
    config.inference_mode = True  # a loaded adapter is for inference unless asked otherwise
    if base_model_name:
        config.base_model_name_or_path = base_model_name
    with atomic_directory(folder) as tmp:
        save_file(adapter_state_dict(model, precision), os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder


def save_merged_model(model, tokenizer, folder: str, dtype: torch.dtype) -> str:
    """Merge the adapter into the base weights and write a plain transformers model folder.

    This folds the adapter into ``model``'s base layers, so call it only when training is over.
    """
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # the merged model is for generation
    with atomic_directory(folder) as tmp:
        merged.to(dtype).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder
