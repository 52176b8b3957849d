"""Ctrl+C and SIGTERM on the command line: the first stops after the current step and saves the LoRA and a
resumable state (printing the resume line); a second quits at once; neither leaves a partial file.

The subprocess tests wait on the run's own readiness signal (a line it prints after each step) and on its exit,
with a ceiling only a hung process reaches; nothing is timed."""

import os
import queue
import signal
import subprocess
import sys
import threading

import pytest
import torch
from safetensors import safe_open
from support.image_fixtures import REPO, tiny_checkpoint
from support.tiny_models import make_image_folder
from waiting import CEILING_S

from lora_trainer.io.atomic import atomic_directory, atomic_path
from lora_trainer.train.signals import StopOnSignals

CPU = torch.device("cpu")
# The command line with one addition: a line after each step, the readiness signal the test waits for.
DRIVER = """
import sys
from lora_trainer.train import callbacks
shown = callbacks.TqdmProgress.on_step_end
def announce(self, info):
    shown(self, info)
    print(f"STEP {info.step}", flush=True)
callbacks.TqdmProgress.on_step_end = announce
from lora_trainer.cli import main
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


def write_config(tmp_path, checkpoint):
    data = tmp_path / "data"
    make_image_folder(str(data), count=2)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"train_data_dir: {str(data)!r}\nbase_model: {checkpoint!r}\noutput_dir: {str(tmp_path / 'out')!r}\n"
        "output_name: run\nresolution: 64\nbatch_size: 1\nlora_rank: 4\nmax_train_steps: 200\nsave_steps: 100\n"
        "cache_to_disk: false\n"
    )
    return config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model"))


class Run:
    """A training subprocess whose output lines are read as they come."""

    def __init__(self, tmp_path, checkpoint):
        config = write_config(tmp_path, checkpoint)
        args = [sys.executable, "-c", DRIVER, str(config)]
        env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str) -> None:
        while True:
            line = self.lines.get(timeout=CEILING_S)
            assert line is not None, "the run ended before printing " + repr(text) + ":\n" + "".join(self.seen)
            self.seen.append(line)
            if text in line:
                return

    def finish(self) -> str:
        self.proc.wait(timeout=CEILING_S)
        while (line := self.lines.get(timeout=CEILING_S)) is not None:
            self.seen.append(line)
        return "".join(self.seen)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def leftovers(folder):
    return [os.path.join(r, n) for r, dirs, files in os.walk(folder) for n in dirs + files if ".tmp" in n]


def test_first_ctrl_c_stops_after_the_step_saves_and_prints_the_resume_line(tmp_path, checkpoint):
    run = Run(tmp_path, checkpoint)
    try:
        run.wait_for("STEP 3")
        run.proc.send_signal(signal.SIGINT)
        output = run.finish()
    finally:
        run.kill()
    assert run.proc.returncode == 130, output[-3000:]
    out = tmp_path / "out"
    resume = [line for line in output.splitlines() if line.startswith("resume: ")]
    assert len(resume) == 1, output[-3000:]
    state = resume[0][len("resume: ") :]
    step = int(state.rsplit("state-", 1)[1])
    assert state == str(out / f"state-{step}") and 3 <= step < 100
    assert sorted(os.listdir(out)) == ["config.yaml", "logs", f"run-step{step:08d}.safetensors", f"state-{step}"]
    assert sorted(os.listdir(out / f"state-{step}")) == ["optimizer.pt", "trainable.safetensors", "trainer_state.json"]
    with safe_open(str(out / f"run-step{step:08d}.safetensors"), framework="pt") as fh:
        assert fh.metadata()["ss_steps"] == str(step)
    assert not leftovers(out)


def test_a_second_signal_quits_at_once_without_saving(tmp_path, checkpoint, capsys, monkeypatch):
    """The command line in this process, its step hook raising real signals: a job scheduler's SIGTERM (the
    run would save after this step), then Ctrl+C before that step has ended."""
    from lora_trainer.cli import main
    from lora_trainer.train import callbacks, run
    from lora_trainer.train.backend import TrainingBackend
    from lora_trainer.train.runtime import LocalRuntime

    config = write_config(tmp_path, checkpoint)
    shown, training = callbacks.TqdmProgress.on_step_end, run.run_training

    def two_signals(self, info):
        shown(self, info)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(callbacks.TqdmProgress, "on_step_end", two_signals)
    monkeypatch.setattr(
        run, "run_training", lambda cfg, callbacks: training(cfg, callbacks, TrainingBackend(LocalRuntime(CPU)))
    )
    handler = signal.getsignal(signal.SIGINT)
    assert main(["train", "--config", str(config)]) == 130
    err = capsys.readouterr().err
    assert "SIGTERM: stopping after this step" in err and err.rstrip().endswith("interrupted")
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["config.yaml", "logs"]  # nothing saved, nothing half-written
    assert signal.getsignal(signal.SIGINT) is handler  # the command line put the handlers back


def test_signal_handling_in_process():
    previous = signal.getsignal(signal.SIGTERM)
    with StopOnSignals(notify=lambda _message: None) as stop:
        with pytest.raises(KeyboardInterrupt):  # before training starts nothing would be saved: quit now
            signal.raise_signal(signal.SIGTERM)
        stop.on_train_start(10, 0, {})
        signal.raise_signal(signal.SIGTERM)
        assert stop.should_stop() and stop.exit_status == 128 + signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_quitting_mid_write_leaves_no_partial_file_and_keeps_the_previous_state(tmp_path):
    target = tmp_path / "lora.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(str(target)) as tmp:
            open(tmp, "wb").write(b"half")
            raise KeyboardInterrupt
    state = tmp_path / "state-3"
    with atomic_directory(str(state)) as tmp:
        open(os.path.join(tmp, "a"), "w").write("first")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(str(state)) as tmp:
            open(os.path.join(tmp, "a"), "w").write("second, never complete")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["state-3"] and (state / "a").read_text() == "first"
