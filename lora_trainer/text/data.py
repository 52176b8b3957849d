"""Read and validate text training data: plain ``.txt`` files and ``.jsonl`` files in one of four formats.

* ``text``: a ``.txt`` file (one sample per non-blank line, or per file) or ``.jsonl`` lines ``{"text": ...}``;
  the model learns the whole text.
* ``prompt_completion``: ``{"prompt": ..., "completion": ...}``; the model learns the completion only.
* ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional); rendered into a
  prompt with an instruction/response layout, and the model learns the output only.
* ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}``; rendered with the tokenizer's chat template
  later (``lora_trainer.text.chat``), and the model learns the assistant turns only.

Everything is checked here, before any model or tokenizer loads: a malformed line is a ``DatasetError`` naming
the file, the line number and what was expected, and an empty dataset is an error too.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from lora_trainer.errors import DatasetError
from lora_trainer.io.text_files import read_text

FORMATS = ("text", "prompt_completion", "alpaca", "chat")
JSONL_ONLY_FORMATS = ("prompt_completion", "alpaca", "chat")
CHAT_ROLES = ("system", "user", "assistant", "tool")
TEXT_EXTENSIONS = (".txt",)
JSONL_EXTENSIONS = (".jsonl",)

# What each format's line must look like, for error messages.
EXPECTED = {
    "text": 'an object with a "text" string',
    "prompt_completion": 'an object with "prompt" and "completion" strings',
    "alpaca": 'an object with "instruction" and "output" strings (and optionally an "input" string)',
    "chat": 'an object with "messages": a list of {"role": ..., "content": ...} objects',
}


@dataclass(frozen=True)
class TextSample:
    """One training example. Chat samples carry ``messages``; the others a prompt and a completion."""

    origin: str  # "path line N" (or just the path for a whole-file sample), for messages
    prompt: str = ""  # context the model sees but is not trained to write
    completion: str = ""  # what the model learns to write
    messages: Tuple[Tuple[str, str], ...] = ()  # chat turns as (role, content)

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


@dataclass
class TextDataset:
    samples: List[TextSample]
    files: List[str]
    formats: Dict[str, int] = field(default_factory=dict)  # samples per detected format

    def __len__(self) -> int:
        return len(self.samples)


def alpaca_prompt(instruction: str, context: str) -> str:
    """The prompt an alpaca record is trained under; its output follows directly."""
    if context.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def detect_format(record: Any) -> Optional[str]:
    """The format a parsed JSON line looks like, from its keys; None when it matches none."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def _describe(record: Any) -> str:
    if isinstance(record, dict):
        keys = ", ".join(repr(k) for k in record) or "none"
        return f"an object with keys {keys}"
    kinds = {
        list: "a JSON list",
        str: "a JSON string",
        bool: "a JSON true/false",
        int: "a JSON number",
        float: "a JSON number",
        type(None): "JSON null",
    }
    return kinds.get(type(record), type(record).__name__)


def _string(record: dict, key: str, where: str, *, required: bool = True, nonempty: bool = False) -> str:
    if key not in record:
        if required:
            raise DatasetError(f"{where}: missing {key!r}.")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {key!r} must be a string, got {json.dumps(value)[:60]}.")
    if nonempty and not value.strip():
        raise DatasetError(f"{where}: {key!r} is empty; there is nothing to learn from this line.")
    return value


def _chat_messages(record: dict, where: str) -> Tuple[Tuple[str, str], ...]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError(
            f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} '
            f"objects, got {json.dumps(messages)[:60]}."
        )
    turns = []
    for i, message in enumerate(messages):
        at = f"{where}, message {i + 1}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DatasetError(f'{at}: expected an object with "role" and "content", got {_describe(message)}.')
        role = message["role"]
        if role not in CHAT_ROLES:
            raise DatasetError(f"{at}: role {json.dumps(role)} is not one of {', '.join(CHAT_ROLES)}.")
        turns.append((role, _string(message, "content", at)))
    if not any(role == "assistant" and content.strip() for role, content in turns):
        raise DatasetError(
            f"{where}: the conversation has no assistant message; the model learns only the "
            "assistant turns, so there is nothing to learn from this line."
        )
    return tuple(turns)


def parse_record(record: Any, data_format: str, where: str) -> TextSample:
    """Validate one parsed JSON line against ``data_format`` and turn it into a sample."""
    if not isinstance(record, dict) or detect_format(record) != data_format:
        raise DatasetError(
            f"{where}: expected {EXPECTED[data_format]} ({data_format} format), got {_describe(record)}."
        )
    if data_format == "text":
        return TextSample(where, completion=_string(record, "text", where, nonempty=True))
    if data_format == "prompt_completion":
        return TextSample(
            where,
            prompt=_string(record, "prompt", where),
            completion=_string(record, "completion", where, nonempty=True),
        )
    if data_format == "alpaca":
        prompt = alpaca_prompt(
            _string(record, "instruction", where, nonempty=True), _string(record, "input", where, required=False)
        )
        return TextSample(where, prompt=prompt, completion=_string(record, "output", where, nonempty=True))
    return TextSample(where, messages=_chat_messages(record, where))


def _read_lines(path: str) -> List[str]:
    try:
        return read_text(path).splitlines()  # UTF-8 or a DatasetError naming the offset and line
    except FileNotFoundError:
        raise DatasetError(f"Cannot read {path}: it does not exist.") from None


def read_jsonl(path: str, data_format: str = "auto") -> Tuple[List[TextSample], Optional[str]]:
    """The samples of a ``.jsonl`` file and its format (detected from its first line under ``auto``)."""
    samples: List[TextSample] = []
    fmt = None if data_format == "auto" else data_format
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); expected "
                f"{EXPECTED[fmt] if fmt else 'one JSON object per line'}."
            ) from None
        if fmt is None:
            fmt = detect_format(record)
            if fmt is None:
                raise DatasetError(
                    f"{where}: got {_describe(record)}, which matches no data format; expected "
                    + "; or ".join(f"{EXPECTED[f]} ({f})" for f in FORMATS)
                    + "."
                )
        samples.append(parse_record(record, fmt, where))
    return samples, fmt


def read_txt(path: str, sample_unit: str = "line") -> List[TextSample]:
    """A plain-text file as samples: one per non-blank line, or the whole file as one."""
    lines = _read_lines(path)
    if sample_unit == "file":
        text = "\n".join(lines).strip()
        return [TextSample(path, completion=text)] if text else []
    return [
        TextSample(f"{path} line {n}", completion=line.strip()) for n, line in enumerate(lines, start=1) if line.strip()
    ]


def find_data_files(path: str, data_format: str = "auto") -> List[str]:
    """The data files at ``path`` (a file, or a folder's top-level ``.txt``/``.jsonl`` files, sorted)."""
    if os.path.isfile(path):
        if not path.lower().endswith(TEXT_EXTENSIONS + JSONL_EXTENSIONS):
            raise DatasetError(
                f"train_data_dir: {path} is neither a .txt nor a .jsonl file (a JSON array is "
                "not read: write one JSON object per line, as .jsonl)."
            )
        return [path]
    if not os.path.isdir(path):
        raise DatasetError(f"train_data_dir: {path} does not exist. Point it at a data folder or file.")
    names = sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
    txt = [os.path.join(path, n) for n in names if n.lower().endswith(TEXT_EXTENSIONS)]
    jsonl = [os.path.join(path, n) for n in names if n.lower().endswith(JSONL_EXTENSIONS)]
    if data_format in JSONL_ONLY_FORMATS:
        files = jsonl
    elif data_format == "text" or not (txt and jsonl):
        files = txt + jsonl
    else:
        raise DatasetError(
            f"train_data_dir: {path} mixes .txt and .jsonl files; set data_format (text reads "
            "both as plain text; prompt_completion, alpaca and chat read the .jsonl files only) "
            "or keep one kind of file there."
        )
    if not files:
        wanted = ".jsonl" if data_format in JSONL_ONLY_FORMATS else ".txt or .jsonl"
        raise DatasetError(f"train_data_dir: {path} has no {wanted} files.")
    return files


def load_text_dataset(path: str, data_format: str = "auto", sample_unit: str = "line") -> TextDataset:
    """Read every data file at ``path``, validating each line; raise ``DatasetError`` when nothing is left."""
    files = find_data_files(path, data_format)
    samples: List[TextSample] = []
    formats: Counter = Counter()
    for file in files:
        if file.lower().endswith(JSONL_EXTENSIONS):
            found, fmt = read_jsonl(file, data_format)
        elif data_format in ("auto", "text"):
            found, fmt = read_txt(file, sample_unit), "text"
        else:
            raise DatasetError(
                f"{file}: data_format {data_format} needs a .jsonl file with {EXPECTED[data_format]} on each line."
            )
        samples.extend(found)
        if found:
            formats[fmt] += len(found)
    if not samples:
        raise DatasetError(f"train_data_dir: no training samples in {path} (the data files are empty).")
    return TextDataset(samples=samples, files=files, formats=dict(formats))
