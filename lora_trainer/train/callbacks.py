"""Progress, logging and cancel as callbacks the trainer calls; the CLI, TensorBoard and the WebUI plug in.

The trainer never knows which front end is listening: it calls ``on_step_end`` with a ``StepInfo`` and asks
``should_stop`` once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

if TYPE_CHECKING:
    from lora_trainer.hub.progress import DownloadProgress

# The ``StepInfo.extra`` key of the validation loss (``validation.py``), which the tab plots beside the loss.
VALIDATION_LOSS = "loss/validation"


@dataclass
class StepInfo:
    step: int  # optimizer steps done
    total_steps: int
    epoch: int  # 1-based: the epoch this step belongs to
    loss: float
    lr: float
    elapsed_s: float  # since this run (or resume) started
    # Metrics beside the loss; a callback may add one (the validation loss) for the callbacks after it.
    extra: Dict[str, float] = field(default_factory=dict)
    start_step: int = 0  # the step this run resumed from: rates count only steps done in this run
    epoch_finished: bool = False  # this step ended ``epoch``

    @property
    def it_per_s(self) -> float:
        return (self.step - self.start_step) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float:
        rate = self.it_per_s
        return (self.total_steps - self.step) / rate if rate > 0 else float("inf")


class TrainingCallback:
    """Override what you need; every hook is optional."""

    def on_encode_progress(self, done: int, total: int, what: str) -> None:
        """Progress of the encoding pass before training: ``done`` of ``total`` ``what`` ("latents" of images,
        "captions") encoded; called with done=0 when a part starts."""

    def on_train_start(self, total_steps: int, start_step: int, summary: Dict[str, Any]) -> None: ...

    def on_download(self, progress: DownloadProgress) -> None:
        """A base model is being downloaded on first use (``lora_trainer.hub.progress.DownloadProgress``)."""

    def on_step_end(self, info: StepInfo) -> None: ...

    def on_save(self, path: str, step: int) -> None: ...

    def on_preview(self, paths: List[str], step: int) -> None:
        """Preview images generated with the LoRA active (the WebUI backend makes them)."""

    def on_train_end(self, info: Optional[StepInfo], status: str) -> None: ...

    def should_stop(self) -> bool:
        return False


class CallbackList(TrainingCallback):
    def __init__(self, callbacks: Sequence[Optional[TrainingCallback]]) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def on_encode_progress(self, done: int, total: int, what: str) -> None:
        for c in self.callbacks:
            c.on_encode_progress(done, total, what)

    def on_train_start(self, total_steps: int, start_step: int, summary: Dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_train_start(total_steps, start_step, summary)

    def on_download(self, progress: DownloadProgress) -> None:
        for c in self.callbacks:
            hook = getattr(c, "on_download", None)  # callbacks written before this hook existed lack it
            if hook is not None:
                hook(progress)

    def on_step_end(self, info: StepInfo) -> None:
        for c in self.callbacks:
            c.on_step_end(info)

    def on_save(self, path: str, step: int) -> None:
        for c in self.callbacks:
            c.on_save(path, step)

    def on_preview(self, paths: List[str], step: int) -> None:
        for c in self.callbacks:
            c.on_preview(paths, step)

    def on_train_end(self, info: Optional[StepInfo], status: str) -> None:
        for c in self.callbacks:
            c.on_train_end(info, status)

    def should_stop(self) -> bool:
        return any(c.should_stop() for c in self.callbacks)


class TqdmProgress(TrainingCallback):
    """A terminal progress bar with loss and learning rate."""

    def __init__(self) -> None:
        self.bar: Any = None  # tqdm bars, made when their part starts
        self.encode_bar: Any = None

    def on_encode_progress(self, done: int, total: int, what: str) -> None:
        from tqdm.auto import tqdm

        if self.encode_bar is None or self.encode_bar.desc != f"encoding {what}":
            self._close_encode_bar()
            unit = "image" if what == "latents" else "caption"
            self.encode_bar = tqdm(total=total, desc=f"encoding {what}", unit=unit, dynamic_ncols=True)
        self.encode_bar.update(done - self.encode_bar.n)
        if done >= total:
            self._close_encode_bar()

    def _close_encode_bar(self) -> None:
        if self.encode_bar is not None:
            self.encode_bar.close()
            self.encode_bar = None

    def on_train_start(self, total_steps: int, start_step: int, summary: Dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        self._close_encode_bar()
        self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)

    def on_step_end(self, info: StepInfo) -> None:
        if self.bar is not None:
            self.bar.update(info.step - self.bar.n)
            self.bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}")

    def on_save(self, path: str, step: int) -> None:
        if self.bar is not None:
            self.bar.write(f"saved {path} (step {step})")

    def on_train_end(self, info: Optional[StepInfo], status: str) -> None:
        self._close_encode_bar()
        if self.bar is not None:
            self.bar.close()


class TensorBoardLogger(TrainingCallback):
    """Scalars (loss, lr, ``StepInfo.extra``) and sample images for ``tensorboard --logdir output_dir/logs``."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.writer: Any = None  # a SummaryWriter once training starts (None without tensorboard)

    def on_train_start(self, total_steps: int, start_step: int, summary: Dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed (e.g. inside a WebUI host): logging is optional there
            return
        self.writer = SummaryWriter(self.logdir, purge_step=start_step or None)

    def on_step_end(self, info: StepInfo) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("loss", info.loss, info.step)
        self.writer.add_scalar("lr", info.lr, info.step)
        for key, value in info.extra.items():
            self.writer.add_scalar(key, value, info.step)

    def on_preview(self, paths: List[str], step: int) -> None:
        """Sample images, one image tag per prompt position (``samples/0``, ...), with a slider over steps."""
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        for index, path in enumerate(paths):
            try:
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
            except OSError:  # removed or unreadable: the image is still on disk or was never written
                continue
            self.writer.add_image(f"samples/{index}", pixels, step, dataformats="HWC")

    def on_train_end(self, info: Optional[StepInfo], status: str) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
