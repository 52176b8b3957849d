"""Form fields generated from the config metadata, form <-> config conversions, the quick check, the views."""

import dataclasses
import os

import pytest

from lora_trainer.config import ImageConfig
from lora_trainer.errors import ConfigError
from lora_trainer.jobs import JobStatus
from lora_trainer.ui import options
from lora_trainer.ui.loss_plot import downsample, render_loss_plot, smooth
from lora_trainer.ui.status_view import (
    DIFFUSERS_COPY_NAME,
    format_duration,
    lora_table,
    main_lora_file,
    progress_text,
    try_it_prompt,
)


def specs_by_key():
    return {s.key: s for s in options.form_fields(ImageConfig)}


def test_every_option_gets_a_widget_of_the_right_kind():
    specs = specs_by_key()
    expected = {f.name for f in dataclasses.fields(ImageConfig)} - set(options.OWN_ROW_KEYS)
    assert set(specs) == expected
    assert specs["optimizer"].kind == "dropdown" and "AdamW" in specs["optimizer"].choices
    assert specs["prediction_type"].choices[0] == options.AUTO and specs["prediction_type"].default == options.AUTO
    assert specs["gradient_checkpointing"].kind == "checkbox"
    assert specs["resolution"].kind == "number" and specs["resolution"].integer
    assert specs["max_train_steps"].kind == "text" and specs["max_train_steps"].optional
    assert specs["target_modules"].kind == "text"
    assert specs["learning_rate"].doc and specs["lora_rank"].label == "LoRA rank"
    assert not specs["resolution"].advanced and specs["noise_offset"].advanced


def test_basic_options_come_first():
    flags = [s.advanced for s in options.form_fields(ImageConfig)]
    assert flags == sorted(flags)


def form_values(**changes):
    return [changes.get(s.key, s.default) for s in options.form_fields(ImageConfig)]


def test_build_config_from_defaults_and_edits(tmp_path):
    specs = options.form_fields(ImageConfig)
    request = options.FormRequest(str(tmp_path / "data"), str(tmp_path / "m"), "my lora")
    cfg = options.build_config(
        request,
        specs,
        form_values(
            resolution=256.0,
            max_train_steps="30",
            prediction_type="v_prediction",
            target_modules="proj_in, proj_out",
            lora_rank="",
        ),
        default_output_dir=str(tmp_path / "out" / "my lora"),
    )
    assert cfg.resolution == 256 and isinstance(cfg.resolution, int)
    assert cfg.max_train_steps == 30 and cfg.lora_rank is None
    assert cfg.prediction_type == "v_prediction" and cfg.target_modules == ["proj_in", "proj_out"]
    assert cfg.output_dir == str(tmp_path / "out" / "my lora") and cfg.output_name == "my lora"
    defaults = ImageConfig(base_model="x", train_data_dir="y")
    assert cfg.learning_rate == defaults.learning_rate and cfg.optimizer == defaults.optimizer


def test_build_config_reports_bad_values(tmp_path):
    specs = options.form_fields(ImageConfig)
    request = options.FormRequest(str(tmp_path), str(tmp_path), "ok")
    with pytest.raises(ConfigError, match="max_train_steps"):
        options.build_config(request, specs, form_values(max_train_steps="many"), default_output_dir="/o")
    with pytest.raises(ConfigError, match="Dataset folder"):
        options.build_config(options.FormRequest("", "m", "ok"), specs, form_values(), default_output_dir="/o")


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", "a\\b", ".hidden", "x" * 200])
def test_output_name_is_sanitised(bad):
    with pytest.raises(ConfigError):
        options.check_output_name(bad)


def test_output_name_accepts_ordinary_names():
    assert options.check_output_name(" my_style-v2 (test) ") == "my_style-v2 (test)"
    assert options.check_output_name("x.safetensors") == "x"


def test_yaml_mapping_to_widget_values():
    specs = options.form_fields(ImageConfig)
    values, unknown = options.widget_values_from_mapping(
        specs, {"resolution": 768, "prediction_type": None, "target_modules": ["a", "b"], "bogus": 1}
    )
    by_key = dict(zip([s.key for s in specs], values, strict=True))
    assert by_key["resolution"] == 768 and by_key["prediction_type"] == options.AUTO
    assert by_key["target_modules"] == "a, b" and unknown == ["bogus"]


def test_quick_check_config_is_small_and_separate(tmp_path):
    cfg = ImageConfig(
        base_model="m",
        train_data_dir="d",
        output_dir=str(tmp_path / "o"),
        output_name="style",
        resolution=1024,
        min_bucket_reso=512,
        lora_rank=64,
        save_steps=100,
        epochs=10,
    )
    quick = options.quick_check_config(cfg, str(tmp_path / "q"))
    assert quick.max_train_steps == options.QUICK_CHECK_STEPS and quick.lora_rank == options.QUICK_CHECK_RANK
    assert quick.resolution == 256 and quick.min_bucket_reso <= quick.resolution <= quick.max_bucket_reso
    assert quick.output_name == "style_quickcheck" and quick.output_dir == str(tmp_path / "q")
    assert quick.save_steps is None and not quick.save_state
    assert options.final_lora_path(quick) == os.path.join(str(tmp_path / "q"), "style_quickcheck.safetensors")


def test_progress_text_and_durations():
    assert format_duration(75) == "1:15" and format_duration(3723) == "1:02:03"
    assert format_duration(float("inf")) == "?"
    s = JobStatus(
        state="running",
        output_name="x",
        step=5,
        total=10,
        loss_steps=(5,),
        losses=(0.12345,),
        it_per_s=2.5,
        eta_s=2.0,
        message="Training…",
    )
    text = progress_text(s)
    assert "step 5/10 (50%)" in text and "loss 0.1235" in text and "2.50 it/s" in text and "ETA 0:02" in text
    assert "Idle" in progress_text(JobStatus())


def test_try_it_prompt():
    assert try_it_prompt("/a/b/my_style.safetensors") == "<lora:my_style:0.8>"


def test_lora_table_lists_runs_but_not_states(tmp_path):
    (tmp_path / "run" / "state-10").mkdir(parents=True)
    (tmp_path / "run" / "state-10" / "weights.safetensors").write_bytes(b"x")
    (tmp_path / "run" / "run.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "run" / "run-step00000010.safetensors").write_bytes(b"x")  # an intermediate save: run details
    (tmp_path / "top.safetensors").write_bytes(b"x")
    (tmp_path / "run" / DIFFUSERS_COPY_NAME).write_bytes(b"x")  # the unnamed diffusers copy is not listed
    (tmp_path / "notes.txt").write_text("x")
    rows = lora_table(str(tmp_path))
    assert sorted(r[0] for r in rows) == ["run", "top"]
    assert lora_table(str(tmp_path / "missing")) == []


def test_lora_table_shows_top_tags_and_base_model_from_the_files_metadata(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    from lora_trainer.ui.status_view import TABLE_HEADERS, LoraCatalog

    tags = {"10_cats": {"mycat": 12, "cat": 9, "sitting": 2}, "1_more": {"cat": 4, "grass": 3}}
    metadata = {
        "ss_tag_frequency": json.dumps(tags),
        "ss_sd_model_name": "/models/Stable-diffusion/v1-5.safetensors",
        "ss_base_model_version": "sd_v1",
    }
    save_file({"w": torch.zeros(2)}, str(tmp_path / "cats.safetensors"), metadata=metadata)
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 16)  # unreadable header: listed, columns blank
    catalog = LoraCatalog()
    rows = {r[0]: dict(zip(TABLE_HEADERS, r, strict=True)) for r in catalog.rows(str(tmp_path))}
    assert rows["cats"]["Trigger words / top tags"] == "cat, mycat, grass, sitting"
    assert rows["cats"]["Base model"] == "v1-5.safetensors (sd_v1)"
    assert rows["broken"]["Trigger words / top tags"] == "" and rows["broken"]["Base model"] == ""


def test_loss_plot_renders_empty_flat_and_long_runs():
    assert render_loss_plot([], []).size == (640, 240)
    assert render_loss_plot([1], [0.5]).size == (640, 240)
    flat = render_loss_plot([1, 2, 3], [0.2, 0.2, 0.2])
    assert flat.getbbox() is not None
    steps = list(range(1, 20001))
    image = render_loss_plot(steps, [1.0 / s for s in steps] + [])
    assert image.mode == "RGB"
    xs, ys = downsample(steps, [float(s) for s in steps], 100)
    assert len(xs) == 100 and ys[0] < ys[-1]
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])


def test_loss_plot_changes_with_new_points():
    first = render_loss_plot([1, 2], [1.0, 0.5]).tobytes()
    second = render_loss_plot([1, 2, 3], [1.0, 0.5, 0.2]).tobytes()
    assert first != second


def test_main_lora_file_is_the_named_one():
    files = ["/o/pytorch_lora_weights.safetensors", "/o/style.safetensors"]
    assert main_lora_file(files, "style") == "/o/style.safetensors"
    assert main_lora_file(["/o/style-step00000010.safetensors"], "style") == "/o/style-step00000010.safetensors"
    assert main_lora_file(files[:1], "style") is None and main_lora_file([], "x") is None


def test_diffusers_copy_name_matches_the_image_trainer():
    from lora_trainer.train.image_trainer import FINAL_DIFFUSERS_NAME

    assert DIFFUSERS_COPY_NAME == FINAL_DIFFUSERS_NAME


def test_tab_wording_replaces_config_identifiers_only():
    from lora_trainer.ui.wording import TabWording

    words = TabWording.for_fields(options.form_fields())
    assert words.say("train_data_dir not found: /d/x") == '"Dataset folder" not found: /d/x'
    assert words.say("defaults to learning_rate; see unet_lr.") == 'defaults to "Learning rate"; see "UNet LR".'
    plain = "Training resolution (the bucket area is resolution squared); the same seed gives the same LoRA."
    assert words.say(plain) == plain  # one-word keys are ordinary words in prose
    assert words.say("my_train_data_dir_v2.yaml") == "my_train_data_dir_v2.yaml"
