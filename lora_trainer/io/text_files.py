"""Reading the text files users write (captions, metadata.csv, text-route data, YAML configs): UTF-8 only.

UTF-8 with or without a byte-order mark is read; anything else is one error naming the file, the byte offset
and line of the first undecodable byte, and the encoding the bytes most likely are, so the user can re-save
the file. We never guess an encoding silently: Windows-1252, Latin-1 and other 8-bit code pages all decode any
byte, so a wrong guess would train on the wrong characters without a word.
"""

from __future__ import annotations

import codecs
from typing import Type

from lora_trainer.errors import DatasetError, LoraTrainerError

UTF16_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


class NotUtf8Error(ValueError):
    """The bytes are not UTF-8; the message names the offset, the line and the likely encoding."""


def _likely_encoding(data: bytes) -> str:
    if data.startswith(UTF16_BOMS) or data.count(0) > len(data) // 5:  # text in UTF-16 is full of zero bytes
        return "UTF-16 or UTF-32 (what Windows Notepad calls 'Unicode')"
    try:
        data.decode("cp1252")
    except UnicodeDecodeError:
        return "an 8-bit code page other than Windows-1252"
    return "Windows-1252 / Latin-1 (what many Windows tools write)"


def decode_utf8(data: bytes) -> str:
    """``data`` as text: UTF-8, a leading byte-order mark dropped, line ends normalised to ``\\n`` (as text-mode
    ``open`` does). Raises ``NotUtf8Error`` when the bytes are not UTF-8."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise NotUtf8Error(
            f"not UTF-8 text: byte 0x{data[exc.start]:02X} at offset {exc.start} (line {line}) cannot be "
            f"decoded; it looks like {_likely_encoding(data)}. Save the file as UTF-8 "
            "(in most editors: Save As, Encoding: UTF-8)."
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: str, error: Type[LoraTrainerError] = DatasetError) -> str:
    """The text of the file at ``path`` (see ``decode_utf8``); raises ``error`` naming the file when it cannot
    be read or is not UTF-8. ``FileNotFoundError`` passes through for callers that treat absence themselves."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return decode_utf8(data)
    except NotUtf8Error as exc:
        raise error(f"{path}: {exc}") from None
