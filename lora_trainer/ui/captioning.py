"""The captioning kind of job: one captioning pass over a dataset folder, run by the one ``jobs.JobRunner``.

``CaptionJob`` is a ``jobs.BackgroundJob`` with a ``CaptionStatus`` snapshot the page polls and a stop request
honoured between batches; its states are the runner's vocabulary (a user's Stop ends it ``cancelled``, with
the captions written so far saved). Because the runner runs one job at a time, captioning is refused while a
training job runs, and training is refused while captioning runs. ``CaptionRunner`` is the caption panel's
handle on the runner: it starts, stops and reports on caption jobs only.

The host plugs in through ``CaptionProgress``: a session object (the WebUI's holds its GPU queue lock and
drives its progress bar) that receives progress and may ask the run to stop (the host's Interrupt button).
Nothing here imports gradio or torch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Dict, Optional, Tuple

from lora_trainer.jobs import (
    CANCELLED,
    CAPTIONING,
    FAILED,
    FINISHED,
    IDLE,
    RUNNING,
    TRAINING,
    BackgroundJob,
    CaptionBusyError,
    JobBusyError,
    JobRunner,
)

TOP_TAGS_SHOWN = 8


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
    # The panel's button says "Stop": a cancelled run reads "Stopped" here.
    head = {RUNNING: "Running", FINISHED: "Finished", CANCELLED: "Stopped", FAILED: "Failed"}[status.state]
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


class CaptionJob(BackgroundJob[CaptionStatus]):
    """One caption run in a background thread; ``cancel`` stops it after the current batch."""

    kind = CAPTIONING

    def __init__(self, request: CaptionRequest, run_id: int = 1) -> None:
        self.request = request
        status = CaptionStatus(
            run_id=run_id,
            label=request.label,
            folder=request.folder,
            sidecar=bool(getattr(request.options, "sidecar", False)),
        )
        super().__init__(status, f"lora-trainer-caption-{run_id}")

    def refusal(self, kind: str) -> JobBusyError:
        words = self._progress_words()
        if kind == TRAINING:
            return CaptionBusyError(
                f"Captioning is running ({words}); training would read "
                "captions while they change. Stop it or wait for it to finish."
            )
        return CaptionBusyError(f"Captioning is already running ({words}): stop it or wait for it to finish.")

    def _progress_words(self) -> str:
        s = self.status()
        return f"{s.label}, {s.done}/{s.total} images" if s.total else s.label

    def _cancel_changes(self) -> Dict[str, Any]:
        return {"message": "Stopping after the current batch…"}

    def download_progress(self, progress: Any) -> None:
        """A captioner's first-use download: its line is the run's message until captioning starts."""
        self._update(message=progress.describe())

    def _work(self) -> None:
        from lora_trainer.caption.run import caption_folder

        request = self.request
        self._update(message="Waiting for the GPU…")
        with request.session(request.label) as host:
            if self.cancel_requested:
                self._end(CANCELLED, "Stopped before captioning started; nothing changed.")
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
                    should_stop=lambda: self.cancel_requested or host.should_stop(),
                )
            finally:
                captioner.close()
        failed = tuple(report.failed)
        if report.stopped:
            self._end(
                CANCELLED, "Stopped; captions written so far are saved. " + summarize_report(report), failed=failed
            )
        else:
            self._end(FINISHED, summarize_report(report), failed=failed)

    def _progress(self, host: CaptionProgress, done: int, total: int) -> None:
        text = f"Captioning with {self.request.label}: {done}/{total} images"
        self._update(
            done=done,
            total=total,
            message="Captioning…" if not self.cancel_requested else "Stopping after the current batch…",
        )
        host.update(done, total, text)


class CaptionRunner:
    """The caption panel's handle on the one ``JobRunner``: starts, stops and reports on caption jobs."""

    def __init__(self, jobs: JobRunner) -> None:
        self.jobs = jobs

    def start(self, request: CaptionRequest) -> int:
        """Start ``request`` in a background thread and return its run id; CaptionBusyError when refused."""
        return self.jobs.submit(CAPTIONING, lambda run_id: CaptionJob(request, run_id)).status().run_id

    @property
    def current_job(self) -> Optional[CaptionJob]:
        """The running caption job, or the last one after it ended."""
        job = self.jobs.last(CAPTIONING)
        return job if isinstance(job, CaptionJob) else None

    def stop(self) -> bool:
        """Ask the run to stop after its current batch (finished captions are saved); False when idle."""
        job = self.current_job
        return job.cancel() if job is not None else False

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the run has ended (at once when there is none); False on timeout."""
        job = self.current_job
        return job.wait(timeout) if job is not None else True

    @property
    def is_running(self) -> bool:
        job = self.current_job
        return job is not None and not job.done

    def status(self) -> CaptionStatus:
        job = self.current_job
        return job.status() if job is not None else CaptionStatus()

    def download_progress(self, progress: Any) -> None:
        """A captioner's first-use download (a ``lora_trainer.hub.progress.DownloadProgress``): its line, with
        the file and the bytes of the total, is the running caption job's message until captioning starts."""
        job = self.current_job
        if job is not None and not job.done:
            job.download_progress(progress)
