"""What the tab shows about a job and the finished files, as plain text and rows (no gradio here)."""

from __future__ import annotations

import math
import os
import time
from typing import Iterable, List, Optional, Sequence

from lora_trainer.jobs import CANCELLED, FAILED, FINISHED, IDLE, RUNNING, JobStatus

LORA_EXTENSION = ".safetensors"
TRY_IT_WEIGHT = 0.8
LIST_DEPTH = 2  # lora_dir/<name>.safetensors and lora_dir/<run folder>/<name>.safetensors
SKIPPED_FOLDERS = ("logs", "samples", ".lora_trainer_cache")  # run folders hold these beside the LoRA
STATE_PREFIX = "state-"  # resumable training states, not LoRAs
# The image trainer also writes each LoRA under diffusers' default name (image_trainer.FINAL_DIFFUSERS_NAME);
# that copy has no alias of its own, so it is not listed.
DIFFUSERS_COPY_NAME = "pytorch_lora_weights.safetensors"
TABLE_HEADERS = ["LoRA", "Size (MB)", "Modified", "File"]

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


def lora_table(folder: str, extra: Iterable[str] = ()) -> List[List[object]]:
    """Rows for the finished-files table, newest first: files in ``folder`` plus ``extra`` (this session's runs)."""
    paths = {os.path.abspath(p) for p in find_lora_files(folder)}
    paths.update(os.path.abspath(p) for p in extra if os.path.isfile(p) and os.path.basename(p) != DIFFUSERS_COPY_NAME)
    rows = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:  # deleted between listing and stat
            continue
        name = os.path.splitext(os.path.basename(path))[0]
        modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(stat.st_mtime))
        rows.append((stat.st_mtime, [name, round(stat.st_size / 2**20, 2), modified, path]))
    rows.sort(key=lambda r: r[0], reverse=True)
    return [row for _, row in rows]
