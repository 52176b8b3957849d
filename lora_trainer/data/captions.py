"""Caption files: ``metadata.csv`` (``filename,prompt``) and kohya-style ``.txt`` sidecars.

The CSV form is the one lora-scripts users write by hand: the prompt is everything after the first comma, so
``002.jpg,futuristic metropolis at night, glowing advertisements`` is one image with one prompt. We write
prompts quoted when they need it (commas, quotes, newlines), and reading joins the remaining fields back with
the commas that separated them, so both the hand-written and the quoted form read back exactly.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Dict, Iterable, Tuple

from lora_trainer.errors import DatasetError
from lora_trainer.io.atomic import atomic_write_text
from lora_trainer.io.text_files import read_text

HEADER_NAMES = {"filename", "file_name", "file", "image", "path"}
METADATA_FILENAME = "metadata.csv"
SIDECAR_EXTENSIONS = (".txt", ".caption", ".tags")  # the common ones: ours, sd-scripts' default, some taggers'


def read_metadata_csv(path: str) -> Dict[str, str]:
    """Map image filename -> prompt, in file order. A header row (``filename,prompt``) is optional."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise DatasetError(f"metadata file not found: {path}") from None
    captions: Dict[str, str] = {}
    reader = csv.reader(io.StringIO(text))
    try:
        for index, record in enumerate(reader):
            if not record or all(not field.strip() for field in record):
                continue
            name = record[0].strip()
            if index == 0 and name.lower() in HEADER_NAMES:
                continue
            if len(record) < 2:
                raise DatasetError(
                    f"{path}, line {reader.line_num}: expected 'filename,prompt' but found no comma after {name!r}."
                )
            captions[name] = ",".join(record[1:]).strip()
    except csv.Error as exc:
        raise DatasetError(f"{path}, line {reader.line_num}: {exc}; check the quoting of that row.") from None
    return captions


def format_metadata_csv(rows: Iterable[Tuple[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filename", "prompt"])
    for name, prompt in rows:
        writer.writerow([name, prompt])
    return buffer.getvalue()


def write_metadata_csv(path: str, rows: Iterable[Tuple[str, str]]) -> None:
    """Write ``filename,prompt`` rows (with a header) atomically, quoting prompts where needed."""
    atomic_write_text(path, format_metadata_csv(rows))


def sidecar_path(image_path: str, extension: str = ".txt") -> str:
    return os.path.splitext(image_path)[0] + extension


def read_sidecar(image_path: str, extension: str = ".txt") -> str | None:
    """The caption in the image's sidecar file, None without one; ``DatasetError`` when it is not UTF-8."""
    path = sidecar_path(image_path, extension)
    if not os.path.isfile(path):
        return None
    return read_text(path).strip()


def write_sidecar(image_path: str, caption: str, extension: str = ".txt") -> None:
    atomic_write_text(sidecar_path(image_path, extension), caption)
