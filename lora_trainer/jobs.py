"""Run one background job at a time, training or captioning, for every UI front end (standalone app, WebUI tab,
REST API).

``JobRunner`` is the one runner: it owns at most one running job of either kind, so training and captioning
exclude each other (captioning rewrites the captions a training run reads, and both want the GPU); the check
that nothing runs and the start happen under one lock, so two clicks at once cannot both start. The front end
holds the runner (there is no module state here). Each job is a ``BackgroundJob``: a worker thread, a stop
request, and a thread-safe, immutable status snapshot that the page polls.

- ``TrainingJob`` calls the trainer with a progress callback that records a ``JobStatus`` (step, loss history,
  it/s, ETA, files) and answers ``should_stop()`` with True once the user cancels, so the trainer stops within
  one step.
- The caption kind (``ui.captioning.CaptionJob``) captions a folder, honouring a stop between batches.

Status vocabulary (the ``state`` of every job's status, whatever its kind):

- ``idle``: nothing has run yet;
- ``running``: started and not ended (including waiting for the GPU and loading);
- ``finished``: the job did all its work;
- ``cancelled``: the user asked it to stop (Cancel, Stop, the host's Interrupt); what it finished is kept
  (the last save of a training run, the captions written so far);
- ``failed``: it could not go on: a bad input, a library error, or a trainer that stopped itself (its
  ``TrainingResult.status`` ``"stopped"``: NaN loss, out of memory); the message says what to change.

The host glue plugs in through ``JobHooks``: a guard held for the whole run (the WebUI's GPU queue lock), a
check before training, and a call after each file written (to refresh the host's Lora list).
Nothing here imports torch or gradio: the WebUI host loads this module when its tab is built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Dict, Generic, List, Optional, Protocol, Tuple, TypeVar

from lora_trainer.config import CommonConfig, resolved_output_name
from lora_trainer.errors import LoraTrainerError, TrainingCancelled
from lora_trainer.hub.progress import DownloadProgress
from lora_trainer.train.backend import TrainingBackend
from lora_trainer.train.callbacks import VALIDATION_LOSS, StepInfo, TrainingCallback
from lora_trainer.train.result import TrainingResult

log = logging.getLogger(__name__)

IDLE, RUNNING, FINISHED, CANCELLED, FAILED = "idle", "running", "finished", "cancelled", "failed"
END_STATES = (FINISHED, CANCELLED, FAILED)
TRAINING, CAPTIONING = "training", "captioning"  # the kinds of job the runner runs
PREVIEW_DIR = "samples"  # where trainers write preview images, relative to output_dir (sd-scripts' habit)
PREVIEW_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class Trainer(Protocol):
    """What a training job calls: ``run_training`` by default, a host's wrapper around it, or a test's fake."""

    def __call__(
        self, cfg: CommonConfig, callbacks: List[TrainingCallback], backend: TrainingBackend
    ) -> TrainingResult: ...


class JobBusyError(LoraTrainerError):
    """A job was requested while another one runs (one job at a time, of either kind)."""


class CaptionBusyError(JobBusyError):
    """Captioning and training exclude each other (and a second caption run waits for the first)."""


S = TypeVar("S")  # a job kind's status: a frozen dataclass with ``state`` and ``message``


class BackgroundJob(Generic[S]):
    """One job in a worker thread: an immutable status snapshot (``state`` in the vocabulary above), a stop
    request, and an end that is always recorded, whatever the job raised.

    A kind subclasses it and writes ``_work`` (run in the worker thread; it returns normally after calling
    ``_end``, or raises: ``TrainingCancelled`` ends the job ``cancelled``, any other error ``failed``) and
    ``refusal`` (the error raised when a job of another or the same kind is asked for while this one runs).
    """

    kind = ""

    def __init__(self, status: S, thread_name: str, on_end: Optional[Callable[[S], None]] = None) -> None:
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._status = status
        self._on_end = on_end
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    # --- control -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._update(state=RUNNING, started_at=time.time(), message="Starting…")
        self._thread.start()

    def cancel(self) -> bool:
        """Ask the job to stop at its next step or batch; True when it was still running."""
        if self._done.is_set():
            return False
        self._cancel.set()
        self._update(**self._cancel_changes())
        return True

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the job has ended; False on timeout."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def status(self) -> S:
        with self._lock:
            return self._snapshot()

    def refusal(self, kind: str) -> JobBusyError:
        """The error for a ``kind`` job asked for while this one runs."""
        raise NotImplementedError

    # --- for the kind --------------------------------------------------------------------------------------
    def _work(self) -> None:
        raise NotImplementedError

    def _snapshot(self) -> S:
        """The status handed out (called under the lock)."""
        return self._status

    def _cancel_changes(self) -> Dict[str, Any]:
        """Status fields set when the user asks to stop."""
        return {"message": "Stopping…"}

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._status = replace(self._status, **changes)  # type: ignore[type-var]

    def _end(self, state: str, message: str, **changes: Any) -> None:
        self._update(state=state, message=message, **changes)

    def _run(self) -> None:
        try:
            self._work()
        except TrainingCancelled as exc:
            self._end(CANCELLED, str(exc) or "Cancelled.")
        except LoraTrainerError as exc:  # missing weights, a bad folder, a refused start: said as they are
            self._end(FAILED, str(exc))
        except Exception as exc:  # a bug or an unexpected library error: keep the page alive, log the traceback
            log.exception("%s job failed", self.kind.capitalize() or "Background")
            self._end(FAILED, f"Unexpected error: {type(exc).__name__}: {exc} (the full traceback is in the log).")
        finally:
            if self._on_end is not None:
                try:
                    self._on_end(self.status())
                except Exception:
                    log.exception("after_end hook failed")
            self._done.set()


@dataclass(frozen=True)
class JobStatus:
    """What the page shows about the current (or last) training job. Immutable: safe to hand to any thread."""

    state: str = IDLE
    job_id: int = 0
    label: str = ""  # "Train" or "Quick check"
    output_name: str = ""
    output_dir: str = ""
    step: int = 0
    total: int = 0
    epoch: int = 0
    loss_steps: Tuple[int, ...] = ()
    losses: Tuple[float, ...] = ()
    validation_steps: Tuple[int, ...] = ()  # the steps where the validation loss was measured
    validation_losses: Tuple[float, ...] = ()
    lr: float = 0.0
    it_per_s: float = 0.0
    eta_s: Optional[float] = None
    message: str = ""
    saved_files: Tuple[str, ...] = ()  # every file the trainer reported saving, intermediate saves included
    output_files: Tuple[str, ...] = ()  # the final LoRA file(s) of a finished, cancelled or stopped run
    previews: Tuple[str, ...] = ()
    started_at: float = 0.0
    finished_at: float = 0.0
    cancel_requested: bool = False

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def last_loss(self) -> Optional[float]:
        return self.losses[-1] if self.losses else None


@dataclass
class JobHooks:
    """Optional host glue for training jobs. Every hook runs in the job's worker thread.

    ``guard(cfg)`` returns a context manager held for the whole run (the WebUI's GPU queue lock);
    ``before_start(cfg)`` may raise LoraTrainerError to refuse the run with a message (e.g. ``--lowvram``);
    ``after_save(path)`` runs after each LoRA file is written (refresh the host's Lora list);
    ``after_end(status)`` runs once with the final status, whatever the outcome.
    """

    guard: Optional[Callable[[CommonConfig], ContextManager[Any]]] = None
    before_start: Optional[Callable[[CommonConfig], None]] = None
    after_save: Optional[Callable[[str], None]] = None
    after_end: Optional[Callable[[JobStatus], None]] = None


def default_trainer(cfg: CommonConfig, callbacks: List[TrainingCallback], backend: TrainingBackend) -> TrainingResult:
    """The engine's one entry point, imported only when a job starts (it pulls in torch)."""
    from lora_trainer.train.run import run_training

    return run_training(cfg, callbacks=callbacks, backend=backend)


class _JobProgress(TrainingCallback):
    """The callback the trainer sees: forwards everything to its job."""

    def __init__(self, job: "TrainingJob") -> None:
        self.job = job

    def on_encode_progress(self, done: int, total: int, what: str) -> None:
        if not self.job.cancel_requested:  # keep "Cancelling…" on screen once asked
            self.job._update(message=f"Encoding {what} for the cache: {done}/{total}…")

    def on_train_start(self, total_steps: int, start_step: int, summary: Dict[str, Any]) -> None:
        self.job._on_train_start(total_steps, start_step)

    def on_download(self, progress: DownloadProgress) -> None:
        """A first-use download of the base model: its line (file, bytes of total) is the job's message."""
        self.job._update(message=progress.describe())

    def on_step_end(self, info: StepInfo) -> None:
        self.job._on_step_end(info)

    def on_save(self, path: str, step: int) -> None:
        self.job._on_save(path, step)

    def on_preview(self, paths: List[str], step: int) -> None:
        """Trainers that render preview images report them here (duck-typed: not every trainer has previews)."""
        self.job._on_preview(paths)

    def should_stop(self) -> bool:
        return self.job.cancel_requested


class TrainingJob(BackgroundJob[JobStatus]):
    """One training run in a background thread, with a status snapshot and cancel."""

    kind = TRAINING

    def __init__(
        self,
        cfg: CommonConfig,
        *,
        job_id: int = 1,
        label: str = "Train",
        trainer: Optional[Trainer] = None,
        backend: Optional[TrainingBackend] = None,
        hooks: Optional[JobHooks] = None,
    ) -> None:
        self.cfg = cfg
        self.trainer: Trainer = trainer or default_trainer
        self.backend = backend or TrainingBackend()
        self.hooks = hooks or JobHooks()
        self._reported: set = set()  # files already passed to after_save
        # The loss history grows every step; it is kept in lists and copied into the snapshot only when read.
        self._loss_steps: List[int] = []
        self._losses: List[float] = []
        status = JobStatus(job_id=job_id, label=label, output_name=resolved_output_name(cfg), output_dir=cfg.output_dir)
        super().__init__(status, f"lora-trainer-job-{job_id}", on_end=self.hooks.after_end)

    def refusal(self, kind: str) -> JobBusyError:
        s = self.status()
        if kind == CAPTIONING:
            return CaptionBusyError(
                f"A training run is in progress ({s.label or 'Train'}: {s.output_name}); "
                "captioning would compete with it for the GPU and change its data. "
                "Caption after it ends, or cancel it."
            )
        where = f" (step {s.step}/{s.total})" if s.total else ""
        return JobBusyError(
            f"A training run is already in progress{where}: {s.output_name}. "
            "Cancel it or wait for it to finish before starting another."
        )

    def _snapshot(self) -> JobStatus:
        return replace(self._status, loss_steps=tuple(self._loss_steps), losses=tuple(self._losses))

    def _cancel_changes(self) -> Dict[str, Any]:
        return {"cancel_requested": True, "message": "Cancelling: stopping after the current step…"}

    def _end(self, state: str, message: str, **changes: Any) -> None:
        super()._end(state, message, finished_at=time.time(), eta_s=None, **changes)

    # --- worker thread -------------------------------------------------------------------------------------
    def _work(self) -> None:
        guard = self.hooks.guard(self.cfg) if self.hooks.guard else contextlib.nullcontext()
        self._update(message="Waiting for the GPU…" if self.hooks.guard else "Preparing…")
        with guard:
            if self.cancel_requested:  # cancelled while waiting for the guard: never start
                raise TrainingCancelled("Cancelled before training started.")
            self._update(message="Loading the model and data…")
            if self.hooks.before_start:
                self.hooks.before_start(self.cfg)
            result = self.trainer(self.cfg, callbacks=[_JobProgress(self)], backend=self.backend)
        self._finish_from_result(result)

    def _finish_from_result(self, result: TrainingResult) -> None:
        outputs = tuple(getattr(result, "output_files", None) or ())
        for path in outputs:
            self._report_saved(path)
        self._update(output_files=outputs)
        self._scan_previews()
        status = getattr(result, "status", FINISHED)
        message = getattr(result, "message", "") or ""
        if status == FINISHED:
            self._end(FINISHED, message or self._finished_message(outputs))
        elif status == CANCELLED:
            self._end(CANCELLED, message or "Cancelled; the last save is kept.")
        else:  # "stopped": NaN loss, out of memory... the trainer's message names the setting to change
            self._end(FAILED, message or f"Training stopped ({status}).")

    @staticmethod
    def _finished_message(outputs: Tuple[str, ...]) -> str:
        if not outputs:
            return "Finished."
        return "Finished: " + ", ".join(os.path.basename(p) for p in outputs)

    # --- progress callbacks (called by the trainer, in this worker thread) ----------------------------------
    def _on_train_start(self, total_steps: int, start_step: int) -> None:
        self._update(total=total_steps, step=start_step, message="Training…")

    def _on_step_end(self, info: StepInfo) -> None:
        eta = info.eta_s
        with self._lock:
            s = self._status
            self._loss_steps.append(info.step)
            self._losses.append(float(info.loss))
            validation: Dict[str, Any] = {}
            if VALIDATION_LOSS in info.extra:  # a few measurements per run: kept in the snapshot itself
                validation = {
                    "validation_steps": s.validation_steps + (info.step,),
                    "validation_losses": s.validation_losses + (float(info.extra[VALIDATION_LOSS]),),
                }
            self._status = replace(
                s,
                **validation,
                step=info.step,
                total=info.total_steps or s.total,
                epoch=info.epoch,
                lr=info.lr,
                it_per_s=info.it_per_s,
                eta_s=None if eta == float("inf") else eta,
                message=s.message if s.cancel_requested else "Training…",
            )

    def _on_save(self, path: str, step: int) -> None:
        with self._lock:
            self._status = replace(self._status, saved_files=self._status.saved_files + (path,))
        self._report_saved(path)
        self._scan_previews()

    def _on_preview(self, paths: List[str]) -> None:
        with self._lock:
            known = self._status.previews
            self._status = replace(self._status, previews=known + tuple(p for p in paths if p not in known))

    def _report_saved(self, path: str) -> None:
        """Call after_save once per file; a failing hook is logged, it never stops training."""
        if path in self._reported or not self.hooks.after_save:
            return
        self._reported.add(path)
        try:
            self.hooks.after_save(path)
        except Exception:
            log.exception("after_save hook failed for %s", path)

    def _scan_previews(self) -> None:
        """Pick up preview images written to output_dir/samples during this run (trainers without on_preview)."""
        folder = os.path.join(self.cfg.output_dir, PREVIEW_DIR)
        started = self._status.started_at
        try:
            entries = [
                e
                for e in os.scandir(folder)
                if e.is_file() and e.name.lower().endswith(PREVIEW_EXTENSIONS) and e.stat().st_mtime >= started - 1
            ]
        except OSError:
            return
        entries.sort(key=lambda e: (e.stat().st_mtime, e.name))
        self._on_preview([e.path for e in entries])


J = TypeVar("J", bound=BackgroundJob)


class JobRunner:
    """The one job runner: at most one job at a time, training or captioning.

    A start while any job runs is refused with the running job's ``refusal`` (``JobBusyError``, or its
    ``CaptionBusyError`` subclass when captioning is involved). ``start``/``status``/``cancel``/``wait`` speak
    of training jobs; ``submit`` starts a job of any kind and ``last(kind)`` returns the latest of a kind.
    """

    def __init__(self, trainer: Optional[Trainer] = None, hooks: Optional[JobHooks] = None) -> None:
        self.trainer = trainer
        self.hooks = hooks or JobHooks()
        self._lock = threading.Lock()
        self._running: Optional[BackgroundJob] = None
        self._last: Dict[str, BackgroundJob] = {}
        self._next_id: Dict[str, int] = {}
        self._finished_files: List[str] = []

    def submit(self, kind: str, make: Callable[[int], J]) -> J:
        """Start ``make(job_id)`` (ids count from 1 per kind) unless a job runs; returns the started job."""
        with self._lock:  # check and start under one lock: two clicks at once cannot both start
            running = self._running
            if running is not None and not running.done:
                raise running.refusal(kind)
            job_id = self._next_id.get(kind, 1)
            job = make(job_id)
            self._next_id[kind] = job_id + 1
            self._running = self._last[kind] = job
            job.start()
            return job

    def start(
        self, cfg: CommonConfig, *, label: str = "Train", backend: Optional[TrainingBackend] = None
    ) -> TrainingJob:
        """Start training ``cfg``; ``JobBusyError`` while any job runs."""
        return self.submit(
            TRAINING,
            lambda job_id: TrainingJob(
                cfg,
                job_id=job_id,
                label=label,
                trainer=self.trainer,
                backend=backend,
                hooks=self._hooks_with_bookkeeping(),
            ),
        )

    def _hooks_with_bookkeeping(self) -> JobHooks:
        """The user's hooks plus recording each job's final files, for the list of finished LoRAs."""
        user_end = self.hooks.after_end

        def after_end(status: JobStatus) -> None:
            with self._lock:
                self._finished_files.extend(p for p in status.output_files if p not in self._finished_files)
            if user_end:
                user_end(status)

        return replace(self.hooks, after_end=after_end)

    def last(self, kind: str) -> Optional[BackgroundJob]:
        """The running job of ``kind``, or the last one after it ended; None before the first."""
        with self._lock:
            return self._last.get(kind)

    def running_job(self) -> Optional[BackgroundJob]:
        """The job running now, of either kind, or None."""
        with self._lock:
            job = self._running
        return job if job is not None and not job.done else None

    def cancel(self) -> bool:
        """Cancel the running training job; False when none runs."""
        job = self.current_job
        return job.cancel() if job is not None else False

    def status(self) -> JobStatus:
        """The running (or last) training job's status."""
        job = self.current_job
        return job.status() if job is not None else JobStatus()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the training job has ended (at once when there is none); False on timeout."""
        job = self.current_job
        return job.wait(timeout) if job is not None else True

    @property
    def current_job(self) -> Optional[TrainingJob]:
        """The running training job, or the last one after it ended."""
        job = self.last(TRAINING)
        return job if isinstance(job, TrainingJob) else None

    @property
    def is_running(self) -> bool:
        """True while a training job runs."""
        job = self.current_job
        return job is not None and not job.done

    @property
    def finished_files(self) -> List[str]:
        """Final LoRA files of every job this runner ran, oldest first."""
        with self._lock:
            return list(self._finished_files)


__all__ = [
    "CANCELLED",
    "CAPTIONING",
    "END_STATES",
    "FAILED",
    "FINISHED",
    "IDLE",
    "RUNNING",
    "TRAINING",
    "BackgroundJob",
    "CaptionBusyError",
    "JobBusyError",
    "JobHooks",
    "JobRunner",
    "JobStatus",
    "Trainer",
    "TrainingJob",
    "default_trainer",
]
