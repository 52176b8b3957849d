"""The tab's caption panel, its handlers called directly: run a captioner, edit the grid, save, bulk actions, and
the refusals between captioning and training."""

import threading

import pytest
from waiting import CEILING_S

gr = pytest.importorskip("gradio")

from support.captioners import build_tiny_wd14, write_test_images  # noqa: E402

from lora_trainer.caption.base import CallableCaptioner  # noqa: E402
from lora_trainer.data.captions import read_metadata_csv, read_sidecar  # noqa: E402
from lora_trainer.jobs import JobRunner  # noqa: E402
from lora_trainer.train.result import TrainingResult  # noqa: E402
from lora_trainer.ui import gradio_compat as compat  # noqa: E402
from lora_trainer.ui.backend import LOCAL_CAPTIONER, StandaloneBackend  # noqa: E402
from lora_trainer.ui.caption_panel import GRID_HEADERS, grid_rows  # noqa: E402
from lora_trainer.ui.tab import TrainerTab, build_tab  # noqa: E402

STUB = "stub"


class StubBackend(StandaloneBackend):
    """The standalone backend plus a stub captioner that writes the image's size, gated when asked."""

    def __init__(self, root, gate=None):
        super().__init__(root)
        self.gate = gate
        self.captioning = threading.Event()  # set once the first image is being captioned
        self.closed = 0

    def captioner_choices(self):
        return [STUB, *super().captioner_choices()]

    def load_captioner(self, choice, options):
        if choice != STUB:
            return super().load_captioner(choice, options)
        backend = self

        def caption(image):
            backend.captioning.set()
            if backend.gate is not None:
                backend.gate.wait(CEILING_S)
            return f"a {image.width}x{image.height} picture"

        class Stub(CallableCaptioner):
            batch_size = 1  # one image per batch: a stop request is seen after the image in progress

            def close(self):
                backend.closed += 1

        return Stub(caption, name=STUB)


def gated_trainer(release):
    def train(cfg, callbacks, **kwargs):
        release.wait(CEILING_S)
        return TrainingResult("finished", 0, [], "")

    return train


def make_tab(tmp_path, backend=None, trainer=None):
    return TrainerTab(backend or StubBackend(str(tmp_path / "loras")), JobRunner(trainer=trainer))


def run_args(folder, choice=STUB, model_path="", threshold=0.35, prefix="", suffix="", overwrite=False, sidecar=False):
    return [str(folder), choice, model_path, threshold, prefix, suffix, overwrite, sidecar]


def finish(tab):
    """Wait for the run; return what the page then gets: progress line, grid, gallery, grid folder, seen."""
    assert tab.captions.wait(CEILING_S)
    progress, finished, seen = tab.caption_panel.poll({})
    grid, gallery, folder = tab.caption_panel.show_finished_run(finished)
    return progress, grid, gallery, folder, seen


def test_panel_is_part_of_the_tab_and_offers_the_backends_captioners(tmp_path):
    blocks = build_tab(StandaloneBackend(str(tmp_path)), JobRunner())
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    for part in (
        "panel",
        "model",
        "model_path",
        "threshold",
        "prefix",
        "suffix",
        "overwrite",
        "sidecar",
        "run",
        "stop",
        "load",
        "progress",
        "grid",
        "trigger",
        "add",
        "remove",
        "find",
        "replacement",
        "regex",
        "replace",
        "save",
        "gallery",
    ):
        assert f"lora_trainer_caption_{part}" in ids, part
    assert StandaloneBackend("x").captioner_choices() == ["blip", "clip", "wd14", LOCAL_CAPTIONER]
    assert blocks.get_config_file()["components"]


def test_caption_run_fills_the_grid_and_edits_save_back(tmp_path):
    tab = make_tab(tmp_path)
    panel = tab.caption_panel
    data = tmp_path / "data"
    write_test_images(str(data), 3)
    notice = panel.start_captioning(*run_args(data, prefix="tok", sidecar=True))
    assert "started" in notice
    progress, grid, gallery, folder, seen = finish(tab)
    assert progress.startswith("Finished (stub): 3/3 images") and "3 captioned" in progress
    assert grid_rows(grid) == [(f"00{i}.png", "tok, a 48x40 picture") for i in range(3)]
    assert [label for _, label in gallery] == ["000.png", "001.png", "002.png"]
    assert folder == str(data) and tab.caption_panel.runner.status().state == "finished"
    assert tab.backend.closed == 1  # the captioner is released after the run
    assert all(isinstance(v, dict) for v in panel.poll(seen)[:-1])  # the grid is filled once per run
    assert all(isinstance(v, dict) for v in panel.show_finished_run("99"))  # not a run that ended

    rows = [list(r) for r in grid_rows(grid)]
    rows[1][1] = 'tok, a "quoted", multi\nline caption, ünïcode'
    message = panel.save_captions(str(data), folder, compat.table_value(GRID_HEADERS, rows), True)
    assert "Saved 3 caption(s)" in message
    saved = read_metadata_csv(str(data / "metadata.csv"))
    assert saved["001.png"] == 'tok, a "quoted", multi\nline caption, ünïcode'
    assert read_sidecar(str(data / "001.png")) == saved["001.png"]
    reloaded = panel.load_captions(str(data), False)
    assert grid_rows(reloaded[0])[1][1] == saved["001.png"] and "Loaded 3" in reloaded[3]


def test_rerun_keeps_edited_captions_unless_overwrite(tmp_path):
    tab = make_tab(tmp_path)
    data = tmp_path / "data"
    write_test_images(str(data), 2)
    (data / "metadata.csv").write_text("filename,prompt\n000.png,hand written\n", encoding="utf-8")
    tab.caption_panel.start_captioning(*run_args(data))
    progress = finish(tab)[0]
    assert "1 captioned, 1 kept" in progress
    assert read_metadata_csv(str(data / "metadata.csv"))["000.png"] == "hand written"
    tab.caption_panel.start_captioning(*run_args(data, overwrite=True))
    finish(tab)
    assert read_metadata_csv(str(data / "metadata.csv"))["000.png"] == "a 48x40 picture"


def test_tiny_wd14_tagger_from_a_local_path(tmp_path):
    pytest.importorskip("onnx")  # the host environments have no onnx to build the tagger with
    pytest.importorskip("onnxruntime")
    tagger = build_tiny_wd14(str(tmp_path / "tagger"))
    tab = make_tab(tmp_path, backend=StandaloneBackend(str(tmp_path / "loras")))
    data = tmp_path / "data"
    write_test_images(str(data), 2)
    tab.caption_panel.start_captioning(
        *run_args(data, choice=LOCAL_CAPTIONER, model_path=tagger, threshold=0.5, suffix="mystyle")
    )
    progress, grid = finish(tab)[:2]
    assert progress.startswith("Finished"), progress
    for _name, caption in grid_rows(grid):
        tags = caption.split(", ")
        assert "1girl" in tags and "unlikely_tag" not in tags and tags[-1] == "mystyle"


def test_missing_weights_fail_with_the_message_and_the_panel_stays_usable(tmp_path):
    tab = make_tab(tmp_path)
    data = tmp_path / "data"
    write_test_images(str(data), 1)
    tab.caption_panel.start_captioning(*run_args(data, choice="wd14", model_path=str(tmp_path / "no_tagger")))
    progress = finish(tab)[0]
    assert progress.startswith("Failed") and "no_tagger" in progress and "Traceback" not in progress
    tab.caption_panel.start_captioning(*run_args(data, choice=LOCAL_CAPTIONER))  # no path given
    assert "Model path" in finish(tab)[0]
    tab.caption_panel.start_captioning(*run_args(data))
    assert finish(tab)[0].startswith("Finished")


def test_bad_requests_are_refused_with_a_message(tmp_path):
    panel = make_tab(tmp_path).caption_panel
    assert "enter the dataset folder" in panel.start_captioning(*run_args(""))
    assert "does not exist" in panel.start_captioning(*run_args(tmp_path / "nope"))
    assert "load the captions first" in panel.save_captions(str(tmp_path), "", [], False)
    assert "Not loaded" in panel.load_captions(str(tmp_path / "nope"), False)[3]
    assert panel.stop_captioning() == "Captioning is not running."


def test_save_refuses_a_grid_of_another_folder_and_rows_outside_it(tmp_path):
    panel = make_tab(tmp_path).caption_panel
    data = tmp_path / "data"
    write_test_images(str(data), 1)
    grid = [["000.png", "x"]]
    assert "is now" in panel.save_captions(str(tmp_path / "other"), str(data), grid, False)
    assert "Not saved" in panel.save_captions(str(data), str(data), [["../evil.png", "x"]], False)
    assert not (data / "metadata.csv").exists()
    assert "Saved 1" in panel.save_captions(str(data), str(data), grid + [["", "a row added by hand"]], False)


def test_bulk_actions_change_the_grid_only(tmp_path):
    panel = make_tab(tmp_path).caption_panel
    table = compat.table_value(GRID_HEADERS, [["a.png", "cat, red"], ["b.png", "tok, dog"], ["c.png", None]])
    added, note = panel.add_trigger(table, "tok", "start")
    assert grid_rows(added) == [("a.png", "tok, cat, red"), ("b.png", "tok, dog"), ("c.png", "tok")]
    assert "Save" in note
    at_end = grid_rows(panel.add_trigger(table, "tok", "end")[0])
    assert at_end[0] == ("a.png", "cat, red, tok") and at_end[1] == ("b.png", "tok, dog")
    assert grid_rows(panel.remove_trigger(added, "tok")[0]) == [("a.png", "cat, red"), ("b.png", "dog"), ("c.png", "")]
    replaced, note = panel.find_replace(table, "red", "blue", False, True)
    assert grid_rows(replaced)[0] == ("a.png", "cat, blue") and "Changed 1" in note
    regex = grid_rows(panel.find_replace(table, r"(\w+), (\w+)", r"\2 \1", True, True)[0])
    assert regex[:2] == [("a.png", "red cat"), ("b.png", "dog tok")]
    assert grid_rows(panel.find_replace(table, "CAT", "lion", False, False)[0])[0] == ("a.png", "lion, red")
    unchanged, note = panel.find_replace(table, "(", "x", True, True)
    assert isinstance(unchanged, dict) and "invalid regular expression" in note
    assert isinstance(panel.add_trigger(table, " ", "start")[0], dict)


def test_captioning_is_refused_while_training_runs(tmp_path):
    release = threading.Event()
    tab = make_tab(tmp_path, trainer=gated_trainer(release))
    data = tmp_path / "data"
    write_test_images(str(data), 1)
    values = [s.default for s in tab.specs]
    (tmp_path / "model").mkdir()
    assert "Train started" in tab.start_training(str(data), str(tmp_path / "model"), "busy", "", False, *values)
    refused = tab.caption_panel.start_captioning(*run_args(data))
    assert "not started" in refused and "training run is in progress" in refused
    release.set()
    assert tab.runner.wait(CEILING_S)
    assert "started" in tab.caption_panel.start_captioning(*run_args(data))
    finish(tab)


def test_training_and_saving_are_refused_while_captioning_runs(tmp_path):
    gate = threading.Event()
    tab = make_tab(
        tmp_path, backend=StubBackend(str(tmp_path / "loras"), gate=gate), trainer=gated_trainer(threading.Event())
    )
    data = tmp_path / "data"
    write_test_images(str(data), 3)
    assert "started" in tab.caption_panel.start_captioning(*run_args(data))
    assert tab.backend.captioning.wait(CEILING_S)  # the first image is being captioned, held by the gate
    values = [s.default for s in tab.specs]
    (tmp_path / "model").mkdir()
    refused = tab.start_training(str(data), str(tmp_path / "model"), "x", "", False, *values)
    assert "not started" in refused and "Captioning is running" in refused
    assert tab.runner.status().state == "idle"
    assert "already running" in tab.caption_panel.start_captioning(*run_args(data))
    assert "captioning is running" in tab.caption_panel.save_captions(str(data), str(data), [["000.png", "x"]], False)
    assert "Stopping" in tab.caption_panel.stop_captioning()
    gate.set()
    progress = finish(tab)[0]
    assert progress.startswith("Stopped (stub): 1/3 images") and "saved" in progress
    assert list(read_metadata_csv(str(data / "metadata.csv"))) == ["000.png"]  # the image in progress is kept


def test_a_folder_with_captions_fills_the_grid_when_entered(tmp_path):
    from lora_trainer.caption.editing import save_caption_rows

    tab = make_tab(tmp_path)
    panel = tab.caption_panel
    data = tmp_path / "data"
    write_test_images(str(data), 2)
    keep = panel.load_existing_captions(str(data), False, "")
    assert all(isinstance(v, dict) for v in keep)  # no metadata.csv yet: nothing to show
    save_caption_rows(str(data), [("000.png", "tok, a cat"), ("001.png", "tok, a dog")], sidecar=False)
    grid, gallery, folder = panel.load_existing_captions(str(data), False, "")
    assert compat.table_rows(grid) == [["000.png", "tok, a cat"], ["001.png", "tok, a dog"]]
    assert len(gallery) == 2 and folder == str(data)
    again = panel.load_existing_captions(str(data), False, str(data))  # already shown: unsaved edits stay
    assert all(isinstance(v, dict) for v in again)


def test_a_captioners_first_use_download_shows_in_the_panels_progress(tmp_path):
    from lora_trainer.hub.progress import DownloadProgress

    data = tmp_path / "data"
    write_test_images(data, 1)
    shown = []

    class DownloadingBackend(StubBackend):
        def load_captioner(self, choice, options):
            options.on_download(DownloadProgress("owner/blip", "model.safetensors", 1, 1, 100_000_000, 990_000_000))
            shown.append(tab.caption_panel.poll({})[0])  # the page's progress line during the download
            return super().load_captioner(STUB, options)

    tab = make_tab(tmp_path, DownloadingBackend(str(tmp_path / "loras")))
    tab.caption_panel.start_captioning(*run_args(data))
    finish(tab)
    assert "Downloading owner/blip (first use; cached afterwards): model.safetensors" in shown[0]
    assert "100.0 MB of 990.0 MB" in shown[0]
