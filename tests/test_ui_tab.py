"""The tab under the installed gradio: construction, and its handlers called directly (no browser)."""

import os
import types

import pytest
from waiting import CEILING_S, wait_until

gr = pytest.importorskip("gradio")

from lora_trainer.config import load_config  # noqa: E402
from lora_trainer.jobs import JobRunner  # noqa: E402
from lora_trainer.train.backend import TrainingBackend  # noqa: E402
from lora_trainer.train.callbacks import StepInfo  # noqa: E402
from lora_trainer.train.result import TrainingResult  # noqa: E402
from lora_trainer.ui import gradio_compat as compat  # noqa: E402
from lora_trainer.ui.backend import StandaloneBackend, UiBackend  # noqa: E402
from lora_trainer.ui.status_view import TABLE_HEADERS  # noqa: E402
from lora_trainer.ui.tab import TrainerTab, build_tab  # noqa: E402


class RecordingTrainer:
    """Two quick steps, one preview image, then the LoRA file; remembers the configs it was given."""

    def __init__(self):
        self.configs = []

    def __call__(self, cfg, callbacks, **kwargs):
        self.configs.append(cfg)
        for cb in callbacks:
            cb.on_train_start(2, 0, {})
        for step in (1, 2):
            for cb in callbacks:
                cb.on_step_end(StepInfo(step, 2, 1, 1.0 / step, 1e-4, 0.1 * step))
        os.makedirs(os.path.join(cfg.output_dir, "samples"), exist_ok=True)
        from PIL import Image

        Image.new("RGB", (8, 8), (200, 0, 0)).save(os.path.join(cfg.output_dir, "samples", "p.png"))
        path = os.path.join(cfg.output_dir, f"{cfg.output_name}.safetensors")
        with open(path, "wb") as fh:
            fh.write(b"fake")
        return TrainingResult("finished", 2, [path], "")


@pytest.fixture
def tab(tmp_path):
    return TrainerTab(StandaloneBackend(str(tmp_path / "loras")), JobRunner(trainer=RecordingTrainer()))


def form(tab, tmp_path, name="style", overwrite=False, data=None, model=None, **changes):
    """The form's values; a dataset folder with one image and a model folder exist unless given."""
    from PIL import Image

    if data is None:
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(data / "a.png")
    if model is None:
        model = tmp_path / "model"
        model.mkdir(exist_ok=True)
    values = [changes.get(s.key, s.default) for s in tab.specs]
    return [str(data), str(model), name, "", overwrite, *values]


def elem_ids(blocks):
    return {getattr(b, "elem_id", None) for b in blocks.blocks.values()}


def test_build_tab_has_every_part():
    blocks = build_tab(StandaloneBackend("/tmp/unused"), JobRunner())
    assert isinstance(blocks, gr.Blocks)
    ids = elem_ids(blocks)
    for part in (
        "dataset",
        "base_model",
        "output_name",
        "train",
        "cancel",
        "quick_check",
        "progress",
        "loss_plot",
        "previews",
        "lora_list",
        "try_it",
        "advanced",
        "yaml_upload",
        "save_yaml",
        "opt_resolution",
        "opt_noise_offset",
    ):
        assert f"lora_trainer_{part}" in ids, part
    assert "lora_trainer_send_to_txt2img" not in ids  # the standalone app has no txt2img


def test_train_poll_shows_progress_plot_previews_files_and_try_it(tab, tmp_path):
    notice = tab.start_training(*form(tab, tmp_path))
    assert "started" in notice
    assert tab.runner.wait(CEILING_S)
    progress, plot, gallery, table, try_it, _model, published, seen = tab.poll({})
    assert "Finished" in progress and "step 2/2" in progress
    lora = os.path.join(str(tmp_path / "loras"), "style", "style.safetensors")
    assert f"Your LoRA: {lora}" in progress and "Type <lora:style:0.8> in a prompt" in progress
    assert plot.size == (640, 240)
    assert len(gallery) == 1 and gallery[0][1] == "p.png"
    rows = compat.table_rows(table)
    assert list(table.columns) == TABLE_HEADERS
    assert len(rows) == 1 and rows[0][0] == "style" and rows[0][-1] == lora
    assert try_it == "<lora:style:0.8>"
    assert published == "1:style.safetensors"
    again = tab.poll(seen)  # nothing changed: every output is left alone
    assert all(isinstance(v, dict) for v in again[:-1])
    restarted = TrainerTab(StandaloneBackend(str(tmp_path / "loras")), JobRunner())  # the same list after a restart
    assert compat.table_rows(restarted.poll({})[3]) == rows


def test_a_blank_base_model_trains_the_default_hub_model_in_the_standalone_app(tab, tmp_path):
    from lora_trainer.models.hub_models import DEFAULT_BASE_MODEL

    args = form(tab, tmp_path)
    args[1] = ""  # the Base model box left empty
    assert "started" in tab.start_training(*args)
    assert tab.runner.wait(CEILING_S)
    assert tab.runner.trainer.configs[-1].base_model == DEFAULT_BASE_MODEL
    assert DEFAULT_BASE_MODEL in tab.base_model.placeholder


def test_existing_lora_is_not_overwritten_unless_asked(tab, tmp_path):
    tab.start_training(*form(tab, tmp_path))
    tab.runner.wait(CEILING_S)
    refused = tab.start_training(*form(tab, tmp_path))
    assert "not started" in refused and "already exists" in refused
    assert "started" in tab.start_training(*form(tab, tmp_path, overwrite=True))
    tab.runner.wait(CEILING_S)


def test_second_train_while_running_is_refused(tmp_path):
    release = []

    def slow(cfg, callbacks, **kw):
        wait_until(lambda: release, "the test to release the run")
        return TrainingResult("finished", 0, [], "")

    tab = TrainerTab(StandaloneBackend(str(tmp_path / "l")), JobRunner(trainer=slow))
    assert "started" in tab.start_training(*form(tab, tmp_path))
    refused = tab.start_training(*form(tab, tmp_path, name="other"))
    assert "not started" in refused and "already in progress" in refused
    assert "Cancelling" in tab.cancel()
    release.append(True)
    tab.runner.wait(CEILING_S)
    assert tab.cancel() == "Nothing is running."


def test_invalid_form_is_reported_not_started(tab, tmp_path):
    refused = tab.start_training(*form(tab, tmp_path, max_train_steps="lots"))
    assert '"Max train steps"' in refused and "max_train_steps" not in refused  # the tab's label, not the key
    assert "Output name" in tab.start_training(*form(tab, tmp_path, name="../x"))
    assert tab.runner.status().state == "idle"


def test_inputs_are_checked_before_anything_starts(tab, tmp_path):
    missing = tab.start_training(*form(tab, tmp_path, data=tmp_path / "nowhere"))
    assert missing.startswith("**Train not started:**") and '"Dataset folder"' in missing
    assert "train_data_dir" not in missing and "GiB" not in missing
    (tmp_path / "empty").mkdir()
    assert "has no images" in tab.start_training(*form(tab, tmp_path, data=tmp_path / "empty"))
    # folders listed under Datasets (the Dataset folder left empty) are checked the same way
    listed = tab.start_training(*form(tab, tmp_path, data="", datasets=str(tmp_path / "elsewhere")))
    assert "not started" in listed and '"Datasets"' in listed and "elsewhere" in listed
    no_model = tab.start_quick_check(*form(tab, tmp_path, model=tmp_path / "gone.safetensors"))
    assert "not started" in no_model and '"Base model"' in no_model
    assert tab.runner.status().state == "idle"


def test_the_tab_keeps_caches_out_of_the_dataset_and_overwrite_drops_old_states(tab, tmp_path):
    tab.start_training(*form(tab, tmp_path))
    tab.runner.wait(CEILING_S)
    cfg = tab.runner.trainer.configs[-1]
    assert cfg.cache_dir == os.path.join(cfg.output_dir, "cache")
    os.makedirs(os.path.join(cfg.output_dir, "state-00000002"))
    assert "started" in tab.start_training(*form(tab, tmp_path, overwrite=True))
    tab.runner.wait(CEILING_S)
    assert not os.path.exists(os.path.join(cfg.output_dir, "state-00000002"))
    assert not os.path.exists(tmp_path / "data" / ".lora_trainer_cache")


def test_help_texts_use_the_tabs_labels(tab):
    info = {key: widget.info for key, widget in tab.widgets.items()}
    assert '"Max train steps"' in info["epochs"] and "max_train_steps" not in info["epochs"]
    assert all("train_data_dir" not in (text or "") for text in info.values())


def test_quick_check_runs_small_under_its_own_name(tab, tmp_path):
    assert "Quick check started" in tab.start_quick_check(*form(tab, tmp_path, resolution=768))
    tab.runner.wait(CEILING_S)
    cfg = tab.runner.trainer.configs[-1]
    assert cfg.max_train_steps <= 10 and cfg.resolution <= 256 and cfg.lora_rank <= 4
    assert cfg.output_name == "style_quickcheck"
    assert cfg.output_dir == os.path.join(str(tmp_path / "loras"), "style_quickcheck")


def test_save_and_load_yaml_round_trip(tab, tmp_path):
    path, note = tab.save_yaml(*form(tab, tmp_path, resolution=320, optimizer="SGD"))
    assert os.path.isfile(path) and "saved" in note
    cfg = load_config(path)
    assert cfg.resolution == 320 and cfg.optimizer == "SGD" and cfg.output_name == "style"
    loaded = tab.load_yaml(path)
    assert len(loaded) == 4 + len(tab.specs) + 1
    assert loaded[0] == str(tmp_path / "data") and loaded[2] == "style"
    by_key = dict(zip([s.key for s in tab.specs], loaded[4:-1], strict=True))
    assert by_key["resolution"] == 320 and by_key["optimizer"] == "SGD"
    assert "Loaded" in loaded[-1]


def test_load_yaml_refuses_text_configs_and_garbage(tab, tmp_path):
    text = tmp_path / "t.yaml"
    text.write_text("task_type: text-generation\n")
    assert "image LoRAs" in tab.load_yaml(str(text))[-1]
    bad = tmp_path / "b.yaml"
    bad.write_text("- a list\n")
    assert "key: value" in tab.load_yaml(str(bad))[-1]
    assert "Ignored unknown keys: bogus" in tab.load_yaml(_write(tmp_path / "u.yaml", "bogus: 1\n"))[-1]


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_pick_lora_fills_try_it(tab):
    rows = [["a", "", "", 0.1, "t", "/x/a.safetensors"], ["b", "", "", 0.1, "t", "/x/b.safetensors"]]
    assert tab.pick_lora(rows, types.SimpleNamespace(index=[1, 0])) == "<lora:b:0.8>"
    assert isinstance(tab.pick_lora(rows, types.SimpleNamespace(index=[5, 0])), dict)


class HostBackend(UiBackend):
    """What the WebUI glue will look like: a loaded model, its own Lora folder, JS to send prompts."""

    def __init__(self, folder):
        self.folder = folder

    def describe_model(self):
        return "Base model: the loaded checkpoint **tiny** (SD1.x)"

    def resolve_base_model(self, typed):
        return "/models/tiny.safetensors"

    def lora_dir(self):
        return self.folder

    def training_backend(self, cfg, preview=None):
        return TrainingBackend(adapter="adapter")

    def send_prompt_js(self):
        return "(prompt) => { console.log(prompt); return []; }"

    def refresh_loras_js(self):
        return "(published) => []"

    def hidden_options(self):
        return ("mixed_precision",)


def test_host_backend_names_the_loaded_model_and_passes_its_kwargs(tmp_path):
    seen = {}

    def trainer(cfg, callbacks, backend):
        seen.update(adapter=backend.adapter, base_model=cfg.base_model)
        return TrainingResult("finished", 0, [], "")

    tab = TrainerTab(HostBackend(str(tmp_path)), JobRunner(trainer=trainer))
    assert "lora_trainer_send_to_txt2img" in elem_ids(tab.blocks)
    assert tab.base_model.visible is False and tab.model_info.visible is True
    tab.start_training(*form(tab, tmp_path))
    tab.runner.wait(CEILING_S)
    assert seen == {"adapter": "adapter", "base_model": "/models/tiny.safetensors"}
    assert tab.widgets["mixed_precision"].visible is False  # the host's precision decides
    assert tab.widgets["resolution"].visible is not False


def test_compat_helpers():
    assert compat.js_kwargs(None) == {}
    key = "js" if compat.gradio_major() >= 4 else "_js"
    assert compat.js_kwargs("() => 1") == {key: "() => 1"}
    assert compat.file_path("/a.yaml") == "/a.yaml"
    assert compat.file_path({"path": "/b.yaml"}) == "/b.yaml"
    assert compat.file_path(types.SimpleNamespace(name="/c.yaml")) == "/c.yaml"
    assert compat.file_path(None) is None
    assert compat.selected_row(types.SimpleNamespace(index=[3, 1])) == 3
    assert compat.table_rows([[1, 2]]) == [[1, 2]]
