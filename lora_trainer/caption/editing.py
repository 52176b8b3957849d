"""The caption editor behind the tab: load every image's caption, apply bulk edits, save atomically.

Rows are ``(filename, caption)`` tuples, ``filename`` being the metadata.csv key (path relative to the data
folder). The bulk edits are pure functions returning new rows; only ``save_caption_rows`` touches disk.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, List, Optional, Tuple

from lora_trainer.caption.run import image_name
from lora_trainer.caption.tags import add_trigger, remove_tag, split_tags
from lora_trainer.data.captions import (
    METADATA_FILENAME,
    read_metadata_csv,
    read_sidecar,
    write_metadata_csv,
    write_sidecar,
)
from lora_trainer.data.images import list_image_paths
from lora_trainer.errors import DatasetError

CaptionRow = Tuple[str, str]


def _metadata_path(folder: str, metadata_path: Optional[str]) -> str:
    return metadata_path or os.path.join(folder, METADATA_FILENAME)


def load_caption_rows(folder: str, metadata_path: Optional[str] = None, sidecar: bool = False) -> List[CaptionRow]:
    """(filename, caption) for every image under ``folder``, in folder order.

    The caption comes from metadata.csv, else (with ``sidecar``) from the image's ``.txt``, else is empty.
    """
    if not os.path.isdir(folder):
        raise DatasetError(f"image folder not found: {folder}")
    path = _metadata_path(folder, metadata_path)
    captions = read_metadata_csv(path) if os.path.isfile(path) else {}
    rows = []
    for image_path, _ in list_image_paths(folder):
        name = image_name(folder, image_path)
        caption = captions.get(name)
        if caption is None and sidecar:
            caption = read_sidecar(image_path)
        rows.append((name, caption or ""))
    return rows


def _checked_name(folder: str, name: str) -> str:
    """Reject keys that would point outside the folder (the editor's grid is user-editable)."""
    name = name.strip()
    full = os.path.normpath(os.path.join(folder, name))
    if not name or os.path.isabs(name) or not full.startswith(os.path.normpath(folder) + os.sep):
        raise DatasetError(f"invalid image name {name!r}: it must be a path inside {folder}")
    return name


def save_caption_rows(
    folder: str, rows: Iterable[CaptionRow], metadata_path: Optional[str] = None, sidecar: bool = False
) -> str:
    """Write edited rows into metadata.csv atomically, keeping rows of images not among them; return its path.

    With ``sidecar``, each edited image's ``.txt`` is rewritten too (only when its text changed).
    """
    path = _metadata_path(folder, metadata_path)
    merged = read_metadata_csv(path) if os.path.isfile(path) else {}
    edited = [(_checked_name(folder, name), caption.strip()) for name, caption in rows]
    for name, caption in edited:
        merged[name] = caption
    write_metadata_csv(path, merged.items())
    if sidecar:
        for name, caption in edited:
            image_path = os.path.join(folder, *name.split("/"))
            if os.path.isfile(image_path) and read_sidecar(image_path) != caption:
                write_sidecar(image_path, caption)
    return path


def add_trigger_word(rows: Iterable[CaptionRow], word: str, position: str = "start") -> List[CaptionRow]:
    """Put ``word`` first (``position="start"``) or last (``"end"``) in every caption that lacks it as a tag."""
    if position not in ("start", "end"):
        raise ValueError(f"position must be 'start' or 'end', not {position!r}")
    result = []
    for name, caption in rows:
        if word.strip() and word.strip() in split_tags(caption):
            result.append((name, caption))
        elif position == "start":
            result.append((name, add_trigger(caption, prefix=word)))
        else:
            result.append((name, add_trigger(caption, suffix=word)))
    return result


def remove_trigger_word(rows: Iterable[CaptionRow], word: str) -> List[CaptionRow]:
    """Drop every comma-separated part equal to ``word`` from every caption."""
    return [(name, remove_tag(caption, word)) for name, caption in rows]


def find_replace(
    rows: Iterable[CaptionRow], find: str, replacement: str, *, regex: bool = False, case_sensitive: bool = True
) -> List[CaptionRow]:
    """Replace ``find`` (plain text, or a regular expression with ``regex``) in every caption."""
    if not find:
        return list(rows)
    try:
        pattern = re.compile(find if regex else re.escape(find), 0 if case_sensitive else re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {find!r}: {exc}") from None
    # A function replacement keeps backslashes in plain-text replacements literal.
    replace = (lambda match: match.expand(replacement)) if regex else (lambda match: replacement)
    return [(name, pattern.sub(replace, caption)) for name, caption in rows]
