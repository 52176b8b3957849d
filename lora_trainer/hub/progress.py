"""A download's progress for whoever shows it: the tab's status line, a host's progress bar.

The terminal gets huggingface_hub's own tqdm bars. For a callback we watch the file being written: every
huggingface_hub release writes a download to ``blobs/<hash>[.<id>].incomplete`` and renames it when
complete, while only recent releases accept a ``tqdm_class`` (the WebUI hosts pin older ones). Polling that
file's size works the same with both, and with Xet transfers, at the cost of a quarter-second resolution.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

POLL_SECONDS = 0.25
INCOMPLETE_SUFFIX = ".incomplete"


def format_bytes(count: Optional[float]) -> str:
    """``512 B``, ``1.5 MB``, ``3.42 GB`` (decimal units, as the Hub shows sizes); ``?`` when unknown."""
    if count is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{int(count)} B"


@dataclass(frozen=True)
class DownloadProgress:
    """One report. Bytes count every file this download fetches (not those already cached)."""

    repo_id: str
    filename: str  # the file being fetched ("" before the first and after the last)
    file_number: int  # 1-based among ``file_count``
    file_count: int
    done_bytes: int
    total_bytes: Optional[int]  # None when the Hub did not say the sizes
    finished: bool = False

    def describe(self) -> str:
        """One line: ``Downloading owner/name (first use, then cached): unet/x.safetensors, file 3 of 9,
        1.2 GB of 4.3 GB``."""
        if self.finished:
            return f"Downloaded {self.repo_id}: {self.file_count} file(s), {format_bytes(self.done_bytes)}."
        size = (
            f"{format_bytes(self.done_bytes)} of {format_bytes(self.total_bytes)}"
            if self.total_bytes
            else format_bytes(self.done_bytes)
        )
        where = f"{self.filename}, file {self.file_number} of {self.file_count}, " if self.filename else ""
        return f"Downloading {self.repo_id} (first use; cached afterwards): {where}{size}"


DownloadCallback = Callable[[DownloadProgress], None]


class IncompleteFileWatcher:
    """While entered, calls ``on_bytes(n)`` with the bytes written so far to temporary download files in
    ``blobs_dir``, whenever that number grows. Files left over by an earlier, killed run are ignored until
    they change (an older huggingface_hub resumes from them; a newer one never touches them again)."""

    def __init__(self, blobs_dir: str, on_bytes: Callable[[int], None], interval: float = POLL_SECONDS) -> None:
        self.blobs_dir = blobs_dir
        self.on_bytes = on_bytes
        self.interval = interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._initial: Dict[str, Tuple[int, int]] = {}
        self._last = 0

    def _sizes(self) -> Dict[str, Tuple[int, int]]:
        sizes = {}
        try:
            entries = list(os.scandir(self.blobs_dir))
        except OSError:
            return sizes
        for entry in entries:
            if entry.name.endswith(INCOMPLETE_SUFFIX):
                try:
                    stat = entry.stat()
                except OSError:  # renamed into place between listing and stat
                    continue
                sizes[entry.name] = (stat.st_size, stat.st_mtime_ns)
        return sizes

    def poll(self) -> None:
        """Report once, when the count grew (the thread calls this; tests may too). It falls back to 0 when the
        finished file is renamed into place: the caller's next report covers that."""
        written = sum(size for name, (size, mtime) in self._sizes().items() if self._initial.get(name) != (size, mtime))
        if written > self._last:
            self._last = written
            self.on_bytes(written)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def __enter__(self) -> "IncompleteFileWatcher":
        self._initial = self._sizes()
        self._thread = threading.Thread(target=self._loop, name="lora-trainer-download-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
