"""What the tab shows about a job and the finished files, as plain text and rows (no gradio here)."""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from typing import Dict, List, Optional, Sequence, Tuple

from lora_trainer.jobs import CANCELLED, FAILED, FINISHED, IDLE, RUNNING, JobStatus

LORA_EXTENSION = ".safetensors"
TRY_IT_WEIGHT = 0.8
LIST_DEPTH = 2  # lora_dir/<name>.safetensors and lora_dir/<run folder>/<name>.safetensors
SKIPPED_FOLDERS = ("logs", "samples", ".lora_trainer_cache")  # run folders hold these beside the LoRA
STATE_PREFIX = "state-"  # resumable training states, not LoRAs
# The image trainer also writes each LoRA under diffusers' default name (image_trainer.FINAL_DIFFUSERS_NAME);
# that copy has no alias of its own, so it is not listed.
DIFFUSERS_COPY_NAME = "pytorch_lora_weights.safetensors"
TABLE_HEADERS = ["LoRA", "Trigger words / top tags", "Base model", "Size (MB)", "Modified", "File"]
# The engine's intermediate saves (image_trainer: <name>-step00000100.safetensors) stay run details: they are
# not in the host's Lora folder, so their <lora:...> tag would do nothing there.
STEP_SAVE = re.compile(r"-step\d+$")
TOP_TAGS = 5
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors JSON header larger than this is not a LoRA's

STATE_TITLES = {IDLE: "Idle", RUNNING: "Running", FINISHED: "Finished", CANCELLED: "Cancelled", FAILED: "Failed"}


def format_duration(seconds: Optional[float]) -> str:
    """``1:02:03`` / ``2:03``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_text(status: JobStatus) -> str:
    """One status line (state, step, loss, it/s, ETA) and the job's message."""
    if status.state == IDLE:
        return "Idle: no training run yet."
    parts = [f"{STATE_TITLES.get(status.state, status.state)} ({status.label or 'Train'}: {status.output_name})"]
    if status.total:
        percent = 100.0 * status.step / status.total
        parts.append(f"step {status.step}/{status.total} ({percent:.0f}%)")
    if status.last_loss is not None:
        parts.append(f"loss {status.last_loss:.4f}")
    if status.it_per_s:
        parts.append(f"{status.it_per_s:.2f} it/s")
    if status.state == RUNNING and status.total:
        parts.append(f"ETA {format_duration(status.eta_s)}")
    elif status.finished_at and status.started_at:
        parts.append(f"took {format_duration(status.finished_at - status.started_at)}")
    line = " · ".join(parts)
    return f"{line}\n{status.message}" if status.message else line


def try_it_prompt(lora_path: str, weight: float = TRY_IT_WEIGHT) -> str:
    """The prompt tag the WebUI's Lora extension understands; its alias is the file stem."""
    name = os.path.splitext(os.path.basename(lora_path))[0]
    return f"<lora:{name}:{weight:g}>"


def main_lora_file(output_files: Sequence[str], output_name: str) -> Optional[str]:
    """The file a run's "Try it" names: the one called after the run, else the last that is not the diffusers copy."""
    for path in output_files:
        if os.path.splitext(os.path.basename(path))[0] == output_name:
            return path
    named = [p for p in output_files if os.path.basename(p) != DIFFUSERS_COPY_NAME]
    return named[-1] if named else None


def find_lora_files(folder: str, depth: int = LIST_DEPTH) -> List[str]:
    """LoRA files in ``folder`` and its run subfolders, skipping training states, logs and caches."""
    found: List[str] = []
    if not folder or not os.path.isdir(folder):
        return found
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return found
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.lower().endswith(LORA_EXTENSION) and entry.name != DIFFUSERS_COPY_NAME:
            found.append(entry.path)
        elif (
            entry.is_dir()
            and depth > 1
            and not entry.name.startswith(STATE_PREFIX)
            and entry.name not in SKIPPED_FOLDERS
        ):
            found.extend(find_lora_files(entry.path, depth - 1))
    return found


def read_metadata(path: str) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors file (its JSON header only, no tensors); {} when unreadable.

    Format: 8-byte little-endian header length, then that many bytes of JSON (huggingface/safetensors)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                return {}
            (size,) = struct.unpack("<Q", head)
            if not 0 < size <= MAX_HEADER_BYTES:
                return {}
            header = json.loads(fh.read(size).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def top_tags(metadata: Dict[str, str], count: int = TOP_TAGS) -> str:
    """The most frequent caption tags of the training set (sd-scripts' ``ss_tag_frequency``: JSON
    ``{dataset folder: {tag: count}}``), comma-separated; the first is usually the trigger word."""
    try:
        folders = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        return ""
    totals: Dict[str, float] = {}
    if isinstance(folders, dict):
        for tags in folders.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)):
                        key = str(tag).strip()
                        totals[key] = totals.get(key, 0) + n
    ranked = sorted(totals.items(), key=lambda item: -item[1])  # stable: ties keep their first-seen order
    return ", ".join(tag for tag, _n in ranked[:count] if tag)


def base_model_name(metadata: Dict[str, str]) -> str:
    """The checkpoint a LoRA was trained on (``ss_sd_model_name``; its file name when it is a path) and its
    family (``ss_base_model_version``)."""
    name = os.path.basename(metadata.get("ss_sd_model_name", "").rstrip("/\\"))
    family = metadata.get("ss_base_model_version", "")
    return f"{name} ({family})" if name and family else name or family


class LoraCatalog:
    """Rows for the "Finished LoRA files" table: one per LoRA the user can use, newest first.

    A LoRA is usable where the host's Lora list finds it: the files in the Lora folder and its subfolders
    (the standalone app's run folders), less training states, logs, caches, the diffusers-named copy and
    intermediate step saves. Headers are read once per file version (path, size, mtime), not on every poll.
    """

    def __init__(self) -> None:
        self._columns: Dict[Tuple[str, int, int], Tuple[str, str]] = {}

    def rows(self, folder: str) -> List[List[object]]:
        found = []
        for path in find_lora_files(folder):
            if STEP_SAVE.search(os.path.splitext(os.path.basename(path))[0]):
                continue
            try:
                stat = os.stat(path)
            except OSError:  # deleted between listing and stat
                continue
            key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
            if key not in self._columns:
                metadata = read_metadata(path)
                self._columns[key] = (top_tags(metadata), base_model_name(metadata))
            tags, base = self._columns[key]
            name = os.path.splitext(os.path.basename(path))[0]
            modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(stat.st_mtime))
            row = [name, tags, base, round(stat.st_size / 2**20, 2), modified, os.path.abspath(path)]
            found.append((stat.st_mtime, row))
        found.sort(key=lambda r: r[0], reverse=True)
        return [row for _, row in found]


def lora_table(folder: str) -> List[List[object]]:
    """The table's rows for ``folder`` (a fresh catalog: no header cache)."""
    return LoraCatalog().rows(folder)
