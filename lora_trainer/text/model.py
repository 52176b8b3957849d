"""Load the base causal LM and its tokenizer from a local folder or a Hub repository (fetched into the Hugging
Face cache on first use), and attach a trainable LoRA adapter."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, List, Optional

import torch

from lora_trainer.config import TextConfig, lora_rank_of
from lora_trainer.errors import ModelLoadError
from lora_trainer.hub.files import MissingRepoFiles, describe_alternatives, weight_files
from lora_trainer.hub.progress import DownloadCallback

# The familiar peft recipe for causal LMs; the config's None means "use these".
DEFAULT_ALPHA = 16.0
DEFAULT_DROPOUT = 0.1


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: List[str]


def resolve_lora_settings(cfg: TextConfig) -> LoraSettings:
    """The adapter's shape: the config's values, or the text task's defaults where they are None."""
    return LoraSettings(
        rank=lora_rank_of(cfg),
        alpha=cfg.lora_alpha if cfg.lora_alpha is not None else DEFAULT_ALPHA,
        dropout=cfg.lora_dropout if cfg.lora_dropout is not None else DEFAULT_DROPOUT,
        target_modules=list(cfg.target_modules),
    )


# Tokenizer files a causal LM repository may hold at its root; whichever it has are fetched.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TOKENIZER_VOCABULARIES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json")
_WEIGHTS = (("model", ".safetensors"), ("pytorch_model", ".bin"))


class CausalLmFiles:
    """What ``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained`` read from a repository: the tokenizer
    files, the weights (one file, or the shards and their index; safetensors preferred), and ``config.json``
    last, so that a cached ``config.json`` means the download finished. Never other formats (gguf, onnx,
    original/ checkpoints)."""

    label = "base model (causal LM)"

    def plan(self, names: Collection[str], cached: Collection[str] = ()) -> List[str]:
        names = set(names)
        missing = []
        if not any(name in names for name in TOKENIZER_VOCABULARIES):
            missing.append(describe_alternatives(TOKENIZER_VOCABULARIES))
        weights = weight_files(names, "", _WEIGHTS)
        if weights is None:
            missing.append("model.safetensors (or model-*-of-*.safetensors with its index, or pytorch_model.bin)")
        if "config.json" not in names:
            missing.append("config.json")
        if missing:
            raise MissingRepoFiles(missing)
        return [*(n for n in TOKENIZER_FILES if n in names), *weights, "config.json"]

    def describe(self) -> str:
        return "config.json, model.safetensors (or its shards and index), and the tokenizer files"

    def include_patterns(self) -> List[str]:
        return ["config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]


def resolve_causal_lm(
    reference: str,
    *,
    on_download: Optional[DownloadCallback] = None,
    log: Optional[Callable[[str], None]] = None,
) -> str:
    """The local folder of ``base_model``: an existing path as it is, a Hub repository id (``owner/name``,
    optionally ``@revision``) fetched into the Hugging Face cache on first use. Raises the hub's HubErrors."""
    from lora_trainer.hub.reference import as_hub_reference

    ref = None if os.path.exists(reference) else as_hub_reference(reference)
    if ref is None or ref.filename:
        return reference  # _require_model_folder says what is wrong with it
    from lora_trainer.hub.fetch import fetch_repo_files

    return fetch_repo_files(
        ref,
        CausalLmFiles(),
        as_given=reference,
        place_hint="save the model with save_pretrained into a folder and set base_model to that folder",
        download_command=f"python -m lora_trainer download {reference}",
        on_progress=on_download,
        log=log,
    )


def _require_model_folder(path: str) -> None:
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(
            f"base_model: {path} is not a transformers model folder (no config.json there). "
            "The text task needs a causal-LM folder as written by save_pretrained, or a Hugging Face Hub "
            "repository id (owner/name)."
        )


def load_tokenizer(base_model: str):
    """The tokenizer saved with the base model."""
    from transformers import AutoTokenizer

    _require_model_folder(base_model)
    try:
        return AutoTokenizer.from_pretrained(base_model)
    except Exception as exc:  # transformers raises many kinds (OSError, ValueError, KeyError)
        raise ModelLoadError(f"base_model: cannot load a tokenizer from {base_model}: {exc}") from exc


def declared_dtype(base_model: str) -> torch.dtype:
    """The dtype the base model's config declares (float32 when it declares none)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(base_model), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_base_model(base_model: str, dtype: torch.dtype, gradient_checkpointing: bool = False):
    """The frozen base model in ``dtype`` (the compute precision), in training mode."""
    from transformers import AutoModelForCausalLM

    _require_model_folder(base_model)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"base_model: cannot load a causal language model from {base_model}: {exc}") from exc
    model.config.use_cache = False  # the key/value cache only serves generation
    if gradient_checkpointing:
        # Non-reentrant checkpointing lets gradients reach the adapter although the embeddings are frozen.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    # peft probes a model attribute that transformers 5 deprecates; the warning is not the user's to act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def attach_adapter(model, cfg: TextConfig, settings: LoraSettings):
    """Wrap ``model`` in a trainable PEFT LoRA: a new one, or the adapter folder in ``cfg.network_weights``."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.network_weights:
        folder = cfg.network_weights
        if os.path.isfile(folder):  # the adapter_model.safetensors inside the folder is accepted too
            folder = os.path.dirname(folder)
        if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise ModelLoadError(
                f"network_weights: {cfg.network_weights} is not a PEFT adapter folder (no adapter_config.json there)."
            )
        try:
            with _quiet_peft():
                peft_model = PeftModel.from_pretrained(model, folder, is_trainable=True)
        except Exception as exc:
            raise ModelLoadError(
                f"network_weights: cannot load the adapter in {folder} onto {cfg.base_model}: {exc}"
            ) from exc
    else:
        lora = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=settings.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            with _quiet_peft():
                peft_model = get_peft_model(model, lora)
        except ValueError as exc:  # e.g. no module matches target_modules
            raise ModelLoadError(f"target_modules {settings.target_modules}: {exc}") from exc
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # adapter weights train in fp32 whatever the base precision
    return peft_model
