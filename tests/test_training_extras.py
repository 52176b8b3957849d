"""Sample images, the validation loss, checkpoint retention, regularisation and loss masks in real (tiny) runs.

One run at learning rate 0 serves most tests: its samples, validation losses, kept saves and metadata."""

import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from support.image_fixtures import image_config, tiny_checkpoint, train
from support.tiny_models import make_image_folder
from waiting import CEILING_S

from lora_trainer.jobs import JobRunner
from lora_trainer.train.callbacks import TrainingCallback
from lora_trainer.train.retention import SavedCheckpoint, expired
from lora_trainer.train.validation import measure_validation_loss, validation_timesteps

PROMPTS = ["a red cube --d 5 --s 3 --w 64 --h 64", "a blue ball --n dark --s 2 --l 1 --ss euler_a"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, checkpoint):
    """One run through the tab's job runner (as the standalone app starts it): its status, log and previews."""
    tmp = tmp_path_factory.mktemp("extras")
    make_image_folder(str(tmp / "data"), count=2)
    make_image_folder(str(tmp / "reg"), count=2, metadata=False, seed=1)
    make_image_folder(str(tmp / "val"), count=1, seed=2)
    cfg = image_config(
        tmp,
        checkpoint,
        learning_rate=0.0,
        max_train_steps=4,
        datasets=[
            {"image_dir": str(tmp / "reg"), "is_reg": True, "class_tokens": "a shape"},
            {"image_dir": str(tmp / "val"), "is_val": True},
        ],
        sample_prompts=PROMPTS,
        sample_every_n_steps=2,
        validate_every_n_steps=3,  # and at each epoch's end (2 steps): steps 2, 3 and 4
        save_steps=1,
        save_last_n_steps=1,
    )
    previews = []

    class Previews(TrainingCallback):
        def on_preview(self, paths, step):
            previews.append((step, [os.path.basename(p) for p in paths]))

    lines = []
    runner = JobRunner(
        trainer=lambda cfg, callbacks, backend: train(cfg, callbacks=[*callbacks, Previews()], log=lines.append)
    )
    runner.start(cfg)
    assert runner.wait(CEILING_S)
    status = runner.status()
    assert status.state == "finished", status.message
    return cfg, status, lines, previews, runner


def _events(cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (path,) = glob.glob(os.path.join(cfg.output_dir, "logs", "events.out.tfevents.*"))
    events = EventAccumulator(path, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_two_prompts_write_their_sample_files_at_the_scheduled_steps(run):
    cfg, _, _, previews, _ = run
    expected = {f"out_{step:06d}_{i:02d}_{seed}.png" for step in (2, 4) for i, seed in ((0, 5), (1, 43))}
    assert set(os.listdir(os.path.join(cfg.output_dir, "samples"))) == expected
    assert previews == [
        (2, ["out_000002_00_5.png", "out_000002_01_43.png"]),
        (4, ["out_000004_00_5.png", "out_000004_01_43.png"]),
    ]
    image = Image.open(os.path.join(cfg.output_dir, "samples", "out_000002_00_5.png"))
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_tensorboard_holds_the_sample_images(run):
    events = _events(run[0])
    assert {"samples/0", "samples/1"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("samples/1")] == [2, 4]
    assert (events.Images("samples/0")[0].width, events.Images("samples/0")[0].height) == (64, 64)


def test_with_learning_rate_0_the_validation_loss_is_the_same_at_every_measurement(run):
    cfg, status, lines, _, _ = run
    scalars = _events(cfg).Scalars("loss/validation")
    assert [e.step for e in scalars] == [2, 3, 4]
    values = [e.value for e in scalars]
    assert len(set(values)) == 1 and values[0] > 0
    assert sum("validation loss at step" in line for line in lines) == 3
    assert status.validation_steps == (2, 3, 4) and len(set(status.validation_losses)) == 1


def test_only_the_saves_of_the_last_n_steps_remain(run):
    cfg, _, lines, _, _ = run
    names = sorted(n for n in os.listdir(cfg.output_dir) if n.startswith(("out-step", "state-")))
    # save_last_n_steps 1 at the last step (4, the final save): the saves of steps 3 and 4 remain
    assert names == ["out-step00000003.safetensors", "state-3", "state-4"]
    assert any("removed the old save" in line and "out-step00000001" in line for line in lines)
    assert os.path.exists(os.path.join(cfg.output_dir, "out.safetensors"))


def test_regularisation_images_are_recorded_in_the_metadata(run):
    cfg, status, lines, _, _ = run
    with safe_open(status.output_files[0], framework="pt") as fh:
        meta = fh.metadata()
    assert (
        meta["ss_num_reg_images"] == "2" and meta["ss_reg_dataset_dirs"] == '{"reg": {"n_repeats": 1, "img_count": 2}}'
    )
    assert meta["ss_num_validation_images"] == "1" and meta["ss_num_train_images"] == "2"
    assert any(line.startswith("  regularisation images: 2 with repeats") for line in lines)


def test_the_tab_shows_the_sample_images_and_plots_the_validation_loss(run, tmp_path):
    pytest.importorskip("gradio")
    from lora_trainer.ui.backend import StandaloneBackend
    from lora_trainer.ui.loss_plot import VALIDATION_LINE
    from lora_trainer.ui.tab import TrainerTab

    tab = TrainerTab(StandaloneBackend(str(tmp_path / "loras")), run[4])
    _progress, plot, gallery, *_ = tab.poll({})
    assert [name for _, name in gallery] == [
        "out_000002_00_5.png",
        "out_000002_01_43.png",
        "out_000004_00_5.png",
        "out_000004_01_43.png",
    ]
    sample = Image.open(os.path.join(run[0].output_dir, "samples", "out_000004_01_43.png"))
    assert np.array_equal(np.asarray(gallery[3][0].convert("RGB")), np.asarray(sample.convert("RGB")))
    assert VALIDATION_LINE in {colour for _, colour in plot.getcolors(plot.size[0] * plot.size[1])}


def test_a_black_mask_takes_an_image_out_of_the_loss(tmp_path, checkpoint):
    data = tmp_path / "data"
    make_image_folder(str(data), count=2)
    (data / "masks").mkdir()
    for name in ("000.png", "001.png"):
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / "masks" / name)
    cfg = image_config(tmp_path, checkpoint, masked_loss=True, max_train_steps=1, save_state=False)
    result = train(cfg)
    assert result.losses == [0.0]


@pytest.mark.parametrize(
    "now,last_n,expected_removed",
    [(50, 30, [10]), (50, 25, [10, 20]), (30, 100, [])],  # sd-scripts' examples: every 10 steps
)
def test_step_saves_older_than_last_n_steps_expire(now, last_n, expected_removed):
    saves = [SavedCheckpoint(step, True, False) for step in range(10, now + 1, 10)]
    assert [s.step for s in expired(saves, now, last_n, None)] == expected_removed


def test_the_last_n_epoch_saves_are_kept_and_a_save_both_ways_needs_one_rule():
    saves = [SavedCheckpoint(4, False, True), SavedCheckpoint(8, True, True), SavedCheckpoint(12, False, True)]
    assert [s.step for s in expired(saves, 12, None, 1)] == [4]  # step 8 is also a step save, kept by that rule
    assert [s.step for s in expired(saves, 12, 2, 1)] == [4, 8]


def test_a_measurement_repeats_exactly_and_sees_changed_weights():
    weight = torch.nn.Parameter(torch.ones(()))

    def loss(indices, timesteps, generator):
        noise = torch.randn(len(indices), generator=generator)
        return ((noise * weight - timesteps.float() / 1000) ** 2).mean()

    timesteps = validation_timesteps(1000)
    assert timesteps == [200, 400, 600, 800]
    first = measure_validation_loss([[0, 1], [2]], loss, timesteps, seed=3, device=torch.device("cpu"))
    assert first == measure_validation_loss([[0, 1], [2]], loss, timesteps, seed=3, device=torch.device("cpu"))
    with torch.no_grad():
        weight.fill_(0.5)
    assert first != measure_validation_loss([[0, 1], [2]], loss, timesteps, seed=3, device=torch.device("cpu"))
