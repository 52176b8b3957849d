"""The tab's side of sd-scripts' dataset options: several folders and one-per-line prompts in the form, and the
validation loss on the loss plot (handlers called directly, no browser)."""

import pytest
import yaml
from waiting import CEILING_S

from lora_trainer.jobs import JobRunner, TrainingJob
from lora_trainer.train.callbacks import VALIDATION_LOSS, StepInfo
from lora_trainer.train.result import TrainingResult
from lora_trainer.ui.loss_plot import (
    HEIGHT,
    MARGIN_BOTTOM,
    MARGIN_LEFT,
    MARGIN_RIGHT,
    MARGIN_TOP,
    VALIDATION_LINE,
    WIDTH,
    render_loss_plot,
)
from lora_trainer.ui.options import FormRequest, build_config, form_fields, to_widget, widget_values_from_mapping

SPECS = {s.key: s for s in form_fields()}


def _form(tmp_path, train_data_dir, **changes):
    specs = list(SPECS.values())
    values = [changes.get(s.key, s.default) for s in specs]
    request = FormRequest(train_data_dir=train_data_dir, base_model=str(tmp_path / "model"), output_name="style")
    return build_config(request, specs, values, default_output_dir=str(tmp_path / "out"))


def test_the_form_takes_several_folders_one_per_line(tmp_path):
    assert SPECS["datasets"].lines and SPECS["datasets"].mappings and SPECS["sample_prompts"].lines
    assert "Keys: image_dir, metadata_path, num_repeats, is_reg, is_val, class_tokens" in SPECS["datasets"].doc
    text = f"{tmp_path / 'more'}\n\n{{image_dir: {tmp_path / 'reg'}, is_reg: true, num_repeats: 2}}\n"
    cfg = _form(tmp_path, str(tmp_path / "data"), datasets=text)
    assert cfg.train_data_dir == str(tmp_path / "data")
    assert [(e.image_dir, e.is_reg, e.num_repeats) for e in cfg.datasets] == [
        (str(tmp_path / "more"), False, None),
        (str(tmp_path / "reg"), True, 2),
    ]
    # the Dataset folder box may stay empty when the folders are listed
    assert _form(tmp_path, "", datasets=str(tmp_path / "more")).train_data_dir == ""
    with pytest.raises(Exception, match="Dataset folder is required"):
        _form(tmp_path, "")
    with pytest.raises(Exception, match=r"Datasets, line 1: .* is not a YAML mapping"):
        _form(tmp_path, "", datasets="{image_dir: [unclosed")
    with pytest.raises(Exception, match=r"Unknown key datasets\[0\]\.is_regg"):
        _form(tmp_path, "", datasets="{image_dir: a, is_regg: true}")


def test_prompts_with_commas_and_folder_entries_survive_the_yaml_round_trip(tmp_path):
    prompts = ["a cat, on a sofa --n blurry, lowres --d 3", "a dog, running --s 20"]
    cfg = _form(
        tmp_path,
        str(tmp_path / "data"),
        datasets=f"{{image_dir: {tmp_path / 'reg'}, is_reg: true, class_tokens: 'a dog, sitting'}}",
        sample_prompts="\n".join(prompts),
        sample_every_n_steps=10,
    )
    assert cfg.sample_prompts == prompts
    from lora_trainer.config import save_config_snapshot

    save_config_snapshot(cfg, str(tmp_path / "saved.yaml"))
    raw = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    values, unknown = widget_values_from_mapping(list(SPECS.values()), raw)
    by_key = dict(zip(SPECS, values, strict=True))
    assert by_key["sample_prompts"] == "\n".join(prompts) and not unknown
    assert by_key["datasets"] == f"{{image_dir: {tmp_path / 'reg'}, is_reg: true, class_tokens: 'a dog, sitting'}}"
    assert _form(tmp_path, str(tmp_path / "data"), **by_key).datasets == cfg.datasets
    assert to_widget([str(tmp_path / "a"), {"image_dir": str(tmp_path / "b")}], SPECS["datasets"]) == (
        f"{tmp_path / 'a'}\n{tmp_path / 'b'}"
    )


def _pixel(image, x, y):
    return image.getpixel((round(x), round(y)))


def test_the_validation_loss_is_drawn_on_the_loss_axes():
    steps, losses = list(range(1, 11)), [0.5] * 10
    plain = render_loss_plot(steps, losses)
    assert VALIDATION_LINE not in {c for _, c in plain.getcolors(WIDTH * HEIGHT)}
    image = render_loss_plot(steps, losses, validation=([5, 10], [1.0, 0.0]))
    left, right, top, bottom = MARGIN_LEFT, WIDTH - MARGIN_RIGHT, MARGIN_TOP, HEIGHT - MARGIN_BOTTOM
    # the axes span both series: 1.0 at the top, 0.0 at the bottom, the flat loss of 0.5 half-way
    assert _pixel(image, left + 4 / 9 * (right - left), top) == VALIDATION_LINE
    assert _pixel(image, right, bottom) == VALIDATION_LINE
    assert _pixel(image, left + (right - left) / 4, (top + bottom) / 2) != (255, 255, 255)
    assert _pixel(image, left + (right - left) / 4, top + 2) == (255, 255, 255)


class ValidatingTrainer:
    """Three steps, a validation loss at steps 2 and 3 (as ``ValidationLoss`` reports it)."""

    def __call__(self, cfg, callbacks, **kwargs):
        for cb in callbacks:
            cb.on_train_start(3, 0, {})
        for step, validation in ((1, None), (2, 0.75), (3, 0.5)):
            info = StepInfo(step, 3, 1, 1.0 / step, 1e-4, 0.1 * step)
            if validation is not None:
                info.extra[VALIDATION_LOSS] = validation
            for cb in callbacks:
                cb.on_step_end(info)
        return TrainingResult("finished", 3, [], "")


def test_the_tab_has_multi_line_boxes_and_plots_the_validation_loss_of_a_run(tmp_path):
    pytest.importorskip("gradio")
    from lora_trainer.ui.backend import StandaloneBackend
    from lora_trainer.ui.tab import TrainerTab

    cfg = _form(tmp_path, str(tmp_path / "data"))
    job = TrainingJob(cfg, trainer=ValidatingTrainer())
    job.start()
    assert job.wait(CEILING_S)
    status = job.status()
    assert (status.validation_steps, status.validation_losses) == ((2, 3), (0.75, 0.5))
    runner = JobRunner(trainer=ValidatingTrainer())
    runner.start(cfg)
    assert runner.wait(CEILING_S)
    tab = TrainerTab(StandaloneBackend(str(tmp_path / "loras")), runner)
    for key in ("datasets", "sample_prompts"):  # the one-per-line options get a box of several lines
        # the help text is the option's doc in the tab's words (labels for config keys)
        assert tab.widgets[key].lines > 1 and tab.widgets[key].info == tab.wording.say(SPECS[key].doc)
        assert "one per line" in tab.widgets[key].info
    _progress, plot, *_ = tab.poll({})
    assert VALIDATION_LINE in {c for _, c in plot.getcolors(WIDTH * HEIGHT)}
