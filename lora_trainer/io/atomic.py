"""Atomic file writes: write to a hidden temporary name in the same folder, fsync, then rename.

A rename within one filesystem is atomic, so the WebUI (or any reader) sees either the old file or the
complete new one. The temporary name starts with a dot and ends in ``.tmp`` so that no loader that scans for
``*.safetensors`` picks it up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.close(fd)
        # mkstemp creates 0600; give the file the permissions an ordinary open() would (readable by the
        # WebUI's user, other tools), following the umask.
        os.chmod(tmp, 0o666 & ~_current_umask())
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (old one removed)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    old = tmp + ".old"
    try:
        os.chmod(tmp, 0o777 & ~_current_umask())
        yield tmp
        if os.path.isdir(path):
            os.replace(path, old)
            os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        # Interrupted between the two renames (a second Ctrl+C): the previous folder goes back in place.
        if os.path.isdir(old) and not os.path.exists(path):
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
