"""An offline CLIP tokenizer built from the BPE vocabulary that open_clip_torch ships.

The Stable Diffusion text encoders all use the same 49,408-token CLIP BPE vocabulary. When a diffusers folder
has no tokenizer (or the model is a single file), we write ``vocab.json``/``merges.txt`` from open_clip's
``bpe_simple_vocab_16e6.txt.gz`` once into a cache folder and load a transformers ``CLIPTokenizer`` from it.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from typing import List, Optional

from lora_trainer.errors import ModelLoadError
from lora_trainer.io.atomic import atomic_write_text

MERGES_USED = 49152 - 256 - 2  # CLIP keeps this many merges; the rest of the file is unused


def _bytes_to_unicode() -> dict:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def open_clip_bpe_path() -> str:
    try:
        import open_clip
    except ImportError:
        raise ModelLoadError(
            "no tokenizer in the model folder and open_clip_torch is not installed; install "
            "open_clip_torch (it ships the CLIP vocabulary) or add a tokenizer/ folder."
        ) from None
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise ModelLoadError(f"open_clip's CLIP vocabulary is missing ({path}); reinstall open_clip_torch.")
    return path


def write_clip_tokenizer_files(folder: str, merges: Optional[List[str]] = None) -> str:
    """Write vocab.json, merges.txt and tokenizer_config.json for the CLIP BPE tokenizer into ``folder``.

    ``merges``: the BPE merges ("a b" lines, in rank order) when they come from elsewhere than open_clip's
    vocabulary file (a host that ships a CLIP tokenizer but not open_clip)."""
    os.makedirs(folder, exist_ok=True)
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return folder
    if merges is None:
        with gzip.open(open_clip_bpe_path(), "rt", encoding="utf-8") as fh:
            merges = fh.read().split("\n")[1 : MERGES_USED + 1]
    if len(merges) != MERGES_USED:
        raise ModelLoadError(f"a CLIP vocabulary has {MERGES_USED} BPE merges; this one has {len(merges)}.")
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    atomic_write_text(
        os.path.join(folder, "vocab.json"), json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False)
    )
    atomic_write_text(
        os.path.join(folder, "merges.txt"), "#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    atomic_write_text(
        os.path.join(folder, "special_tokens_map.json"),
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}),
    )
    atomic_write_text(os.path.join(folder, "tokenizer_config.json"), json.dumps(config))
    return folder


def default_tokenizer_dir() -> str:
    base = os.environ.get("LORA_TRAINER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora_trainer")
    return os.path.join(base, "clip_tokenizer")


@lru_cache(maxsize=4)
def load_clip_tokenizer(folder: str | None = None, pad_token: str | None = None):
    """A transformers CLIPTokenizer from ``folder`` (a diffusers tokenizer/ folder) or built offline."""
    from transformers import CLIPTokenizer

    folder = folder or write_clip_tokenizer_files(default_tokenizer_dir())
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    if pad_token:  # SD2/SDXL's open_clip encoders pad with "!" (id 0), SD1 with the end token
        tokenizer.pad_token = pad_token
    return tokenizer
