"""Run one captioning pass over a dataset folder in a background thread, never at the same time as training.

``CaptionRunner`` is the caption panel's counterpart of ``jobs.JobRunner``: at most one run, a thread-safe
``CaptionStatus`` snapshot the page polls, and a stop request honoured between batches. It shares one lock
between "start captioning" and "start training" (``training_start``), so the check that the other is idle and
the start itself happen together: captioning is refused while a training job runs, and training is refused
while captioning runs.

The host plugs in through ``CaptionProgress``: a session object (the WebUI's holds its GPU queue lock and
drives its progress bar) that receives progress and may ask the run to stop (the host's Interrupt button).
Nothing here imports gradio or torch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Iterator, Optional, Tuple

from lora_trainer.errors import LoraTrainerError
from lora_trainer.jobs import JobRunner

log = logging.getLogger(__name__)

IDLE, RUNNING, FINISHED, STOPPED, FAILED = "idle", "running", "finished", "stopped", "failed"
TOP_TAGS_SHOWN = 8


class CaptionBusyError(LoraTrainerError):
    """Captioning and training exclude each other (and a second caption run waits for the first)."""


class CaptionProgress:
    """What a host gets to know about a caption run. The default host shows nothing and never interrupts."""

    def update(self, done: int, total: int, text: str) -> None:
        """``done`` of ``total`` images captioned; ``text`` is the line the page shows too."""

    def should_stop(self) -> bool:
        """True when the host wants the run to stop (the WebUI's Interrupt button)."""
        return False


CaptionSession = Callable[[str], ContextManager[CaptionProgress]]  # label -> held for the whole run


def no_host_session(label: str) -> ContextManager[CaptionProgress]:
    """The session of a host without a progress bar or GPU lock (the standalone app)."""
    return contextlib.nullcontext(CaptionProgress())


@dataclass(frozen=True)
class CaptionStatus:
    """What the page shows about the current (or last) caption run. Immutable: safe to hand to any thread."""

    state: str = IDLE
    run_id: int = 0
    label: str = ""  # the captioner's name as chosen in the panel
    folder: str = ""
    sidecar: bool = False  # the run wrote .txt sidecars: the grid reloads them too
    done: int = 0
    total: int = 0
    message: str = ""
    failed: Tuple[Tuple[str, str], ...] = ()  # (image, reason) of unreadable images
    started_at: float = 0.0

    @property
    def running(self) -> bool:
        return self.state == RUNNING


@dataclass(frozen=True)
class CaptionRequest:
    """One run: caption ``folder`` with what ``load`` returns, using caption_folder's ``options``."""

    folder: str
    label: str
    load: Callable[[], Any]  # -> Captioner; called in the worker thread, inside the host session
    options: Any  # lora_trainer.caption.run.CaptionRunOptions
    session: CaptionSession = no_host_session


def progress_line(status: CaptionStatus) -> str:
    """The panel's one- or two-line summary of ``status``."""
    if status.state == IDLE:
        return "Idle: no captioning has run yet."
    head = {RUNNING: "Running", FINISHED: "Finished", STOPPED: "Stopped", FAILED: "Failed"}[status.state]
    counts = f" {status.done}/{status.total} images" if status.total else ""
    return f"{head} ({status.label}):{counts}\n{status.message}".rstrip()


def summarize_report(report: Any) -> str:
    """A caption report in a few words: what was written, kept, refused, and the most common tags."""
    parts = [f"{len(report.captioned)} captioned", f"{len(report.skipped)} kept (already captioned)"]
    if report.failed:
        parts.append(
            f"{len(report.failed)} unreadable: "
            + "; ".join(f"{name} ({reason})" for name, reason in report.failed[:3])
            + (" …" if len(report.failed) > 3 else "")
        )
    text = ", ".join(parts) + f". Written to {report.output}."
    if report.tag_counts:
        top = ", ".join(f"{tag} ({count})" for tag, count in report.tag_counts.most_common(TOP_TAGS_SHOWN))
        text += f" Most common tags: {top}."
    return text


class CaptionRunner:
    """At most one caption run at a time, and none while ``jobs`` runs a training job (and vice versa)."""

    def __init__(self, jobs: JobRunner) -> None:
        self.jobs = jobs
        self._lock = threading.Lock()  # guards starts of both kinds, and the status snapshot
        self._status = CaptionStatus()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._done.set()
        self._next_id = 1

    # --- control -------------------------------------------------------------------------------------------
    def start(self, request: CaptionRequest) -> int:
        """Start ``request`` in a background thread and return its run id; CaptionBusyError when refused."""
        with self._lock:
            if not self._done.is_set():
                raise CaptionBusyError(
                    f"Captioning is already running ({self._progress_words()}): stop it or wait for it to finish."
                )
            if self.jobs.is_running:
                s = self.jobs.status()
                raise CaptionBusyError(
                    f"A training run is in progress ({s.label or 'Train'}: {s.output_name}); "
                    "captioning would compete with it for the GPU and change its data. "
                    "Caption after it ends, or cancel it."
                )
            run_id = self._next_id
            self._next_id += 1
            self._stop.clear()
            self._done.clear()
            self._status = CaptionStatus(
                state=RUNNING,
                run_id=run_id,
                label=request.label,
                folder=request.folder,
                sidecar=bool(getattr(request.options, "sidecar", False)),
                message="Starting…",
                started_at=time.time(),
            )
        thread = threading.Thread(target=self._run, args=(request,), name=f"lora-trainer-caption-{run_id}", daemon=True)
        thread.start()
        return run_id

    @contextlib.contextmanager
    def training_start(self) -> Iterator[None]:
        """Hold this around starting a training job: refuses (CaptionBusyError) while captioning runs."""
        with self._lock:
            if not self._done.is_set():
                raise CaptionBusyError(
                    f"Captioning is running ({self._progress_words()}); training would read "
                    "captions while they change. Stop it or wait for it to finish."
                )
            yield

    def stop(self) -> bool:
        """Ask the run to stop after its current batch (finished captions are saved); False when idle."""
        if self._done.is_set():
            return False
        self._stop.set()
        self._update(message="Stopping after the current batch…")
        return True

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the run has ended; False on timeout."""
        return self._done.wait(timeout)

    @property
    def is_running(self) -> bool:
        return not self._done.is_set()

    def status(self) -> CaptionStatus:
        with self._lock:
            return self._status

    # --- worker thread -------------------------------------------------------------------------------------
    def _progress_words(self) -> str:
        s = self._status  # under self._lock
        return f"{s.label}, {s.done}/{s.total} images" if s.total else s.label

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._status = replace(self._status, **changes)

    def _run(self, request: CaptionRequest) -> None:
        from lora_trainer.caption.run import caption_folder

        try:
            self._update(message="Waiting for the GPU…")
            with request.session(request.label) as host:
                if self._stop.is_set():
                    self._end(STOPPED, "Stopped before captioning started; nothing changed.")
                    return
                self._update(message=f"Loading the {request.label} captioner…")
                host.update(0, 0, f"Captioning: loading {request.label}…")
                captioner = request.load()
                # A captioner that works one image at a time says so (batch_size = 1): batches of one give
                # it per-image progress and stop checks at no cost.
                options = request.options
                preferred = getattr(captioner, "batch_size", None)
                if isinstance(preferred, int) and preferred > 0:
                    options = replace(options, batch_size=preferred)
                try:
                    report = caption_folder(
                        request.folder,
                        captioner,
                        options,
                        on_progress=lambda done, total: self._progress(host, done, total),
                        should_stop=lambda: self._stop.is_set() or host.should_stop(),
                    )
                finally:
                    captioner.close()
            failed = tuple(report.failed)
            if report.stopped:
                self._end(
                    STOPPED, "Stopped; captions written so far are saved. " + summarize_report(report), failed=failed
                )
            else:
                self._end(FINISHED, summarize_report(report), failed=failed)
        except LoraTrainerError as exc:  # missing weights, missing folder, no images: said as they are
            self._end(FAILED, str(exc))
        except Exception as exc:  # a bug or a library error: keep the page alive, log the traceback
            log.exception("Caption run %s failed", request.label)
            self._end(FAILED, f"Unexpected error: {type(exc).__name__}: {exc} (the full traceback is in the log).")
        finally:
            self._done.set()

    def download_progress(self, progress: Any) -> None:
        """A captioner's first-use download (a ``lora_trainer.hub.progress.DownloadProgress``): its line, with
        the file and the bytes of the total, is the run's message until captioning starts."""
        self._update(message=progress.describe())

    def _progress(self, host: CaptionProgress, done: int, total: int) -> None:
        text = f"Captioning with {self.status().label}: {done}/{total} images"
        self._update(
            done=done,
            total=total,
            message="Captioning…" if not self._stop.is_set() else "Stopping after the current batch…",
        )
        host.update(done, total, text)

    def _end(self, state: str, message: str, failed: Tuple[Tuple[str, str], ...] = ()) -> None:
        self._update(state=state, message=message, failed=failed)
