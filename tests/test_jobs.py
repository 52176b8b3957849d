"""The background job runner: progress snapshot, cancel within one step, one job at a time, failures, hooks."""

import contextlib
import os
import threading
import time

import pytest
from waiting import CEILING_S, wait_until

from lora_trainer import jobs
from lora_trainer.config import config_from_dict
from lora_trainer.errors import DatasetError
from lora_trainer.jobs import JobBusyError, JobHooks, JobRunner, TrainingJob
from lora_trainer.train.backend import TrainingBackend
from lora_trainer.train.callbacks import StepInfo
from lora_trainer.train.result import TrainingResult


def make_cfg(tmp_path, **extra):
    raw = {
        "base_model": str(tmp_path / "model"),
        "train_data_dir": str(tmp_path / "data"),
        "output_dir": str(tmp_path / "out"),
        "output_name": "demo",
    }
    raw.update(extra)
    return config_from_dict(raw)


class FakeTrainer:
    """Steps like the real trainer: on_train_start, then per step on_step_end and should_stop; writes a file.

    ``gate`` (optional) makes each step wait until the test lets it go, so tests control timing exactly.
    """

    def __init__(self, steps=5, delay=0.0, gate=None, fail_at=None, error=None):
        self.steps, self.delay, self.gate, self.fail_at, self.error = steps, delay, gate, fail_at, error
        self.steps_run = 0
        self.backend_kwargs = None

    def __call__(self, cfg, callbacks, **backend_kwargs):
        self.backend_kwargs = backend_kwargs
        for cb in callbacks:
            cb.on_train_start(self.steps, 0, {})
        start = time.time()
        losses = []
        for step in range(1, self.steps + 1):
            if self.gate is not None:
                assert self.gate.acquire(timeout=CEILING_S), "test never released the step"
            time.sleep(self.delay)
            if step == self.fail_at:
                raise self.error
            self.steps_run = step
            loss = 1.0 / step
            losses.append(loss)
            info = StepInfo(
                step=step, total_steps=self.steps, epoch=1, loss=loss, lr=1e-4, elapsed_s=time.time() - start + 1e-3
            )
            for cb in callbacks:
                cb.on_step_end(info)
            if any(cb.should_stop() for cb in callbacks):
                return TrainingResult("cancelled", step, [], "Cancelled at step %d." % step, losses)
        os.makedirs(cfg.output_dir, exist_ok=True)
        path = os.path.join(cfg.output_dir, "demo.safetensors")
        with open(path, "wb") as fh:
            fh.write(b"lora")
        for cb in callbacks:
            cb.on_save(path, self.steps)
        return TrainingResult("finished", self.steps, [path], "", losses)


def test_progress_snapshot_and_finish(tmp_path):
    trainer = FakeTrainer(steps=5)
    runner = JobRunner(trainer=trainer)
    assert runner.status().state == "idle"
    runner.start(make_cfg(tmp_path), backend=TrainingBackend(runtime="fake"))
    assert runner.wait(CEILING_S)
    s = runner.status()
    assert s.state == "finished"
    assert (s.step, s.total) == (5, 5)
    assert s.loss_steps == (1, 2, 3, 4, 5)
    assert s.losses[-1] == pytest.approx(0.2)
    assert s.it_per_s > 0
    assert s.output_files == (str(tmp_path / "out" / "demo.safetensors"),)
    assert "demo.safetensors" in s.message
    assert runner.finished_files == list(s.output_files)
    assert trainer.backend_kwargs == {"backend": TrainingBackend(runtime="fake")}


def test_status_while_running_is_a_consistent_snapshot(tmp_path):
    gate = threading.Semaphore(0)
    runner = JobRunner(trainer=FakeTrainer(steps=4, gate=gate))
    runner.start(make_cfg(tmp_path))
    gate.release(2)
    wait_until(lambda: runner.status().step >= 2, "step 2")
    s = runner.status()
    assert s.state == "running" and s.step == 2 and s.total == 4
    assert len(s.losses) == len(s.loss_steps) == 2
    assert s.eta_s is not None and s.eta_s >= 0
    gate.release(2)
    assert runner.wait(CEILING_S)


def test_cancel_stops_within_one_step(tmp_path):
    gate = threading.Semaphore(0)
    trainer = FakeTrainer(steps=100, gate=gate)
    runner = JobRunner(trainer=trainer)
    runner.start(make_cfg(tmp_path))
    gate.release(3)
    wait_until(lambda: runner.status().step >= 3, "step 3")
    assert runner.cancel() is True
    assert runner.status().cancel_requested
    gate.release(100)  # let it run freely: it must stop at the very next step
    assert runner.wait(CEILING_S)
    s = runner.status()
    assert s.state == "cancelled"
    assert trainer.steps_run <= 4
    assert runner.cancel() is False  # nothing left to cancel


def test_second_start_is_refused_while_running(tmp_path):
    gate = threading.Semaphore(0)
    runner = JobRunner(trainer=FakeTrainer(steps=2, gate=gate))
    runner.start(make_cfg(tmp_path))
    with pytest.raises(JobBusyError, match="already in progress"):
        runner.start(make_cfg(tmp_path, output_name="other"))
    gate.release(2)
    assert runner.wait(CEILING_S)
    runner.start(make_cfg(tmp_path, output_name="again"))  # allowed once the first one ended
    gate.release(2)
    assert runner.wait(CEILING_S) and runner.status().output_name == "again"


def test_concurrent_starts_only_one_wins(tmp_path):
    gate = threading.Semaphore(0)
    runner = JobRunner(trainer=FakeTrainer(steps=1, gate=gate))
    cfg = make_cfg(tmp_path)
    results = []

    def start():
        try:
            runner.start(cfg)
            results.append("started")
        except JobBusyError:
            results.append("refused")

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 7 + ["started"]
    gate.release(1)
    assert runner.wait(CEILING_S)


def test_user_error_becomes_failed_with_its_message(tmp_path):
    runner = JobRunner(trainer=FakeTrainer(steps=3, fail_at=2, error=DatasetError("no images in /data")))
    runner.start(make_cfg(tmp_path))
    assert runner.wait(CEILING_S)
    s = runner.status()
    assert s.state == "failed" and s.message == "no images in /data"
    assert s.step == 1 and s.finished_at >= s.started_at


def test_unexpected_error_is_logged_with_traceback(tmp_path, caplog):
    runner = JobRunner(trainer=FakeTrainer(steps=3, fail_at=1, error=RuntimeError("boom")))
    runner.start(make_cfg(tmp_path))
    assert runner.wait(CEILING_S)
    s = runner.status()
    assert s.state == "failed"
    assert "RuntimeError: boom" in s.message
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


def test_stopped_result_is_failed_and_keeps_files(tmp_path):
    def trainer(cfg, callbacks, **kw):
        return TrainingResult("stopped", 7, ["/x/last.safetensors"], "Out of memory: lower batch_size.")

    runner = JobRunner(trainer=trainer)
    runner.start(make_cfg(tmp_path))
    assert runner.wait(CEILING_S)
    s = runner.status()
    assert s.state == "failed" and "batch_size" in s.message and s.output_files == ("/x/last.safetensors",)


def test_hooks_guard_before_start_after_save_after_end(tmp_path):
    calls = []

    @contextlib.contextmanager
    def guard(cfg):
        calls.append("lock")
        yield
        calls.append("unlock")

    hooks = JobHooks(
        guard=guard,
        before_start=lambda cfg: calls.append("before"),
        after_save=lambda path: calls.append(("saved", os.path.basename(path))),
        after_end=lambda status: calls.append(("end", status.state)),
    )
    runner = JobRunner(trainer=FakeTrainer(steps=2), hooks=hooks)
    runner.start(make_cfg(tmp_path))
    assert runner.wait(CEILING_S)
    # the file is reported once although the trainer both saved it and returned it
    assert calls == ["lock", "before", ("saved", "demo.safetensors"), "unlock", ("end", "finished")]


def test_before_start_can_refuse_and_failing_after_save_does_not_stop_training(tmp_path):
    def refuse(cfg):
        raise DatasetError("--lowvram cannot train")

    runner = JobRunner(trainer=FakeTrainer(steps=2), hooks=JobHooks(before_start=refuse))
    runner.start(make_cfg(tmp_path))
    assert runner.wait(CEILING_S)
    assert runner.status().state == "failed" and "lowvram" in runner.status().message

    def broken(path):
        raise RuntimeError("refresh failed")

    runner = JobRunner(trainer=FakeTrainer(steps=2), hooks=JobHooks(after_save=broken))
    runner.start(make_cfg(tmp_path))
    assert runner.wait(CEILING_S)
    assert runner.status().state == "finished"


def test_cancel_while_waiting_for_the_guard_never_starts_training(tmp_path):
    lock = threading.Lock()
    lock.acquire()  # a generation is holding the GPU

    @contextlib.contextmanager
    def guard(cfg):
        with lock:
            yield

    trainer = FakeTrainer(steps=2)
    runner = JobRunner(trainer=trainer, hooks=JobHooks(guard=guard))
    runner.start(make_cfg(tmp_path))
    assert "Waiting" in runner.status().message or runner.status().message == "Starting…"
    runner.cancel()
    lock.release()
    assert runner.wait(CEILING_S)
    assert runner.status().state == "cancelled" and trainer.steps_run == 0


def test_previews_reported_and_scanned(tmp_path):
    def trainer(cfg, callbacks, **kw):
        samples = os.path.join(cfg.output_dir, jobs.PREVIEW_DIR)
        os.makedirs(samples)
        first = os.path.join(samples, "s1.png")
        open(first, "wb").close()
        for cb in callbacks:
            cb.on_preview([first], 1)
        second = os.path.join(samples, "s2.png")
        open(second, "wb").close()  # not reported: found by the scan at the end
        return TrainingResult("finished", 1, [], "")

    runner = JobRunner(trainer=trainer)
    runner.start(make_cfg(tmp_path))
    assert runner.wait(CEILING_S)
    assert [os.path.basename(p) for p in runner.status().previews] == ["s1.png", "s2.png"]


def test_training_job_alone(tmp_path):
    job = TrainingJob(make_cfg(tmp_path), trainer=FakeTrainer(steps=1))
    assert job.status().state == "idle"
    job.start()
    assert job.wait(CEILING_S) and job.done and job.status().state == "finished"


def test_a_first_use_download_shows_as_the_running_jobs_message(tmp_path):
    from lora_trainer.hub.progress import DownloadProgress

    seen = []

    def downloading_trainer(cfg, callbacks, **_):
        for cb in callbacks:
            cb.on_download(DownloadProgress("owner/sd", "unet/x.safetensors", 2, 3, 500_000_000, 2_000_000_000))
        seen.append(runner.status().message)  # what the page's poll shows while the download runs
        return TrainingResult("finished", 0, [], "", [])

    runner = JobRunner(trainer=downloading_trainer)
    runner.start(make_cfg(tmp_path))
    assert runner.wait(CEILING_S)
    assert seen == [
        "Downloading owner/sd (first use; cached afterwards): unet/x.safetensors, file 2 of 3, 500.0 MB of 2.00 GB"
    ]


class GatedJob(jobs.BackgroundJob):
    """A job of another kind that runs until the test opens its gate, then ends as the test says."""

    kind = "other"

    def __init__(self, gate, raises=None):
        super().__init__(jobs.JobStatus(), "gated")
        self.gate, self.raises = gate, raises

    def refusal(self, kind):
        return jobs.CaptionBusyError(f"the other job blocks {kind}")

    def _work(self):
        assert self.gate.wait(CEILING_S), "test never opened the gate"
        if self.raises is not None:
            raise self.raises
        self._end(jobs.FINISHED, "done")


def test_one_runner_runs_one_job_of_any_kind_and_ends_it_in_the_one_vocabulary(tmp_path):
    runner = JobRunner(trainer=FakeTrainer(steps=1))
    gate = threading.Event()
    other = runner.submit("other", lambda job_id: GatedJob(gate))
    with pytest.raises(JobBusyError, match="the other job blocks training"):
        runner.start(make_cfg(tmp_path))
    assert runner.status().state == "idle" and runner.running_job() is other
    gate.set()
    assert other.wait(CEILING_S) and other.status().state == "finished"
    runner.start(make_cfg(tmp_path))  # free again
    assert runner.wait(CEILING_S) and runner.status().state == "finished"
    for error, state in [(DatasetError("no images"), "failed"), (RuntimeError("bug"), "failed")]:
        job = runner.submit("other", lambda job_id, error=error: GatedJob(gate, raises=error))
        assert job.wait(CEILING_S) and job.status().state == state
    assert {jobs.IDLE, jobs.RUNNING} | set(jobs.END_STATES) == {"idle", "running", "finished", "cancelled", "failed"}
