"""Builders for the text tests: a tiny random LLaMA-architecture model with a word-level tokenizer, data files
and configs, all written to a temporary folder (nothing is downloaded). No tests live here."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List

import torch

# Every word the test data uses; anything else becomes <unk>.
WORDS = """what is the capital of france germany italy spain ? answer : paris berlin rome madrid
hello world how are you fine thanks good morning night say a word colour sky grass blue green
### Instruction: Input: Response: name country city translate to english bonjour hola
<|system|> <|user|> <|assistant|> you are helpful assistant cats dogs like and""".split()
WORDS = list(dict.fromkeys(WORDS))  # unique, in order: ids must run 0..len-1
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

# The memorisation set: four questions and their one-word answers.
CAPITALS = [
    ("what is the capital of france ? answer :", " paris"),
    ("what is the capital of germany ? answer :", " berlin"),
    ("what is the capital of italy ? answer :", " rome"),
    ("what is the capital of spain ? answer :", " madrid"),
]


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A word-level fast tokenizer that splits on whitespace and adds <s> in front, like LLaMA's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_lm(folder: str, *, seed: int = 0, chat_template: str | None = CHAT_TEMPLATE) -> str:
    """Save a randomly initialised 2-layer LLaMA and its tokenizer into ``folder``; returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template)
    # initializer_range 0.3 (not 0.02): with small frozen lm_head rows behind the final RMSNorm, the logits
    # could not grow past ~1, and no adapter on q/v could make the model confident of anything.
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: str, records: Iterable[Any]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def capitals_records() -> List[Dict[str, str]]:
    return [{"prompt": p, "completion": c} for p, c in CAPITALS]


def text_config(base_model: str, data: str, output_dir: str, **overrides: Any):
    """A validated TextConfig for a short CPU run (overrides win)."""
    from lora_trainer.config import config_from_dict

    raw = {
        "task_type": "text-generation",
        "base_model": base_model,
        "train_data_dir": data,
        "output_dir": output_dir,
        "max_seq_length": 64,
        "learning_rate": 1e-2,
        "max_train_steps": 4,
        "batch_size": 2,
        "save_precision": "float",
        "seed": 3,
    }
    raw.update(overrides)
    return config_from_dict(raw)


def cpu_runtime():
    from lora_trainer.train.runtime import LocalRuntime

    return LocalRuntime(torch.device("cpu"))
