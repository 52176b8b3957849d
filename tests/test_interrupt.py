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
from image_fixtures import REPO, tiny_checkpoint
from safetensors import safe_open
from tiny_models import make_image_folder

from lora_trainer.io.atomic import atomic_directory, atomic_path
from lora_trainer.train.signals import StopOnSignals

CEILING_S = 900  # reached only by a hung process, never by a slow machine
# The command line with one addition: a line after each step (the readiness signal), and with "hold N" the
# run stays in step N's end until a signal ends it, so that a second signal lands before any save begins.
DRIVER = """
import sys, time
from lora_trainer.train import callbacks
shown = callbacks.TqdmProgress.on_step_end
hold = int(sys.argv[3]) if len(sys.argv) > 3 else None
def announce(self, info):
    shown(self, info)
    print(f"STEP {info.step}", flush=True)
    while hold is not None and info.step >= hold:
        time.sleep(0.05)
callbacks.TqdmProgress.on_step_end = announce
from lora_trainer.cli import main
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model"))


class Run:
    """A training subprocess whose output lines are read as they come."""

    def __init__(self, tmp_path, checkpoint, hold=None):
        data = tmp_path / "data"
        make_image_folder(str(data), count=2)
        config = tmp_path / "config.yaml"
        config.write_text(
            f"train_data_dir: {str(data)!r}\nbase_model: {checkpoint!r}\n"
            f"output_dir: {str(tmp_path / 'out')!r}\noutput_name: run\nresolution: 64\nbatch_size: 1\n"
            "lora_rank: 4\nmax_train_steps: 200\nsave_steps: 100\ncache_to_disk: false\n"
        )
        args = [sys.executable, "-c", DRIVER, str(config)] + ([] if hold is None else ["hold", str(hold)])
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


def test_a_second_signal_quits_at_once_without_saving(tmp_path, checkpoint):
    run = Run(tmp_path, checkpoint, hold=3)  # the run stays in step 3 until signals end it
    try:
        run.wait_for("STEP 3")
        run.proc.send_signal(signal.SIGTERM)  # a job scheduler's stop: acknowledged, the run would save next
        run.wait_for("stopping after this step")
        run.proc.send_signal(signal.SIGINT)
        output = run.finish()
    finally:
        run.kill()
    assert run.proc.returncode == 130 and output.rstrip().endswith("interrupted"), output[-3000:]
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["config.yaml", "logs"]
    assert not leftovers(out)


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
