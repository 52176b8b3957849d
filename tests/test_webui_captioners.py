"""The WebUI's own interrogators as caption-panel captioners, against stand-in ``modules`` packages.

The fakes carry exactly what the glue touches of ``shared.interrogator`` (BLIP + CLIP), ``modules.deepbooru``,
``shared.state``, ``call_queue.queue_lock``, ``devices``, ``paths`` and ``lowvram``; their weights "download"
fails as the host's does offline when the file is not in its folder. ``interrogate()`` and ``tag()`` fail the
test if called: they take over ``shared.state`` (and the run's progress bar) themselves.
"""

import os
import sys
import threading
import types
from collections import namedtuple

import pytest
import torch
from support.captioners import write_test_images
from waiting import CEILING_S

from lora_trainer.data.captions import read_metadata_csv
from lora_trainer.hosts import webui
from lora_trainer.jobs import JobRunner
from lora_trainer.ui.caption_panel import CaptionPanel
from lora_trainer.ui.captioning import CaptionRunner

Category = namedtuple("Category", ["name", "topn", "items"])
OFFLINE = OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")


class FakeState:
    def __init__(self):
        self.interrupted = False
        self.stopping_generation = False
        self.job_count = self.job_no = 0
        self.textinfo = None
        self.calls = []
        self.seen = []  # (job_no, job_count, textinfo) after each caption

    def begin(self, job="(unknown)"):
        self.calls.append(("begin", job))
        self.interrupted = False
        self.stopping_generation = False

    def press_interrupt(self):
        """The Interrupt button as A1111 1.10 / Forge wire it (modules/ui_toprow.py, default settings): a job of
        more than one item is first asked to stop after the current one; a second click interrupts."""
        if not self.stopping_generation and self.job_count > 1:
            self.stopping_generation = True
        else:
            self.interrupted = True

    def end(self):
        self.calls.append(("end",))


class FakeOpts:
    """``shared.opts``: values in ``data``, defaults otherwise (as the host's Options reads them)."""

    defaults = {"interrogate_deepbooru_score_threshold": 0.5, "interrogate_keep_models_in_memory": False}

    def __init__(self):
        self.data = {}

    def __getattr__(self, key):
        if key in self.data:
            return self.data[key]
        return self.defaults[key]


class FakeInterrogator:
    """``shared.interrogator``: BLIP from models/BLIP, CLIP from the clip folder, per-image pieces."""

    def __init__(self, ns):
        self.ns = ns
        self.blip_model = self.clip_model = self.dtype = None
        self.running_on_cpu = True
        self.calls = []

    def load_blip_model(self):
        self.calls.append("load_blip_model")
        folder = os.path.join(self.ns.models, "BLIP")  # the host takes any .pth there, else downloads
        if not (os.path.isdir(folder) and any(name.endswith(".pth") for name in os.listdir(folder))):
            raise OFFLINE
        return torch.nn.Linear(2, 2)

    def load(self):
        self.calls.append("load")
        if self.blip_model is None:
            self.blip_model = self.load_blip_model()
        if self.clip_model is None:
            if not os.path.isfile(os.path.join(self.ns.clip_dir, "ViT-L-14.pt")):
                raise OFFLINE
            self.clip_model = types.SimpleNamespace(encode_image=lambda x: torch.ones(1, 4), to=lambda d: None)
        self.dtype = torch.float32

    def clip_preprocess(self, image):
        return torch.zeros(3, 4, 4)

    def categories(self):
        return [Category("mediums", 1, ["oil painting", "photo"]), Category("flavors.top2", 2, ["neon", "dark"])]

    def rank(self, features, items, top_count=1):
        assert features.shape == (1, 4)
        return [(item, 50.0) for item in items[:top_count]]

    def generate_caption(self, image):
        assert self.ns.lock.locked(), "captioning must hold the host's GPU queue lock"
        assert self.dtype is not None and self.blip_model is not None
        state = self.ns.state
        state.seen.append((state.job_no, state.job_count, state.textinfo))
        if self.ns.interrupt_after is not None and len(state.seen) == self.ns.interrupt_after:
            for _ in range(self.ns.interrupt_clicks):
                state.press_interrupt()
        return f"blip {image.width}x{image.height}"

    def send_blip_to_ram(self):
        self.calls.append("send_blip_to_ram")

    def unload(self):
        self.calls.append("unload")

    def interrogate(self, image):
        raise AssertionError("interrogate() takes over shared.state: call its pieces")


class FakeDeepBooru:
    """``modules.deepbooru.model``: start loads (or fails offline), tag_multi reads the threshold setting."""

    def __init__(self, ns):
        self.ns = ns
        self.calls = []
        self.thresholds = []

    def start(self):
        self.calls.append("start")
        folder = os.path.join(self.ns.models, "torch_deepdanbooru")
        if not (os.path.isdir(folder) and os.listdir(folder)):
            raise OFFLINE

    def stop(self):
        self.calls.append("stop")

    def tag_multi(self, image, force_disable_ranks=False):
        assert force_disable_ranks, "training captions must not carry (tag:score) weights"
        threshold = self.ns.shared.opts.interrogate_deepbooru_score_threshold
        self.thresholds.append(threshold)
        scores = {"1girl": 0.9, "solo": 0.6, "outdoors": 0.4}
        return ", ".join(tag for tag, score in scores.items() if score >= threshold)

    def tag(self, image):
        raise AssertionError("tag() moves the model on its own: call start/tag_multi/stop")


@pytest.fixture
def host(tmp_path, monkeypatch):
    ns = types.SimpleNamespace(
        models=str(tmp_path / "models"),
        clip_dir=str(tmp_path / "clip"),
        lock=threading.Lock(),
        state=FakeState(),
        interrupt_after=None,
        interrupt_clicks=1,
        cpu_moves=0,
    )
    pkg = types.ModuleType("modules")
    pkg.__path__ = []
    shared = types.ModuleType("modules.shared")
    shared.state, shared.opts = ns.state, FakeOpts()
    shared.cmd_opts = types.SimpleNamespace(clip_models_path=ns.clip_dir, lowvram=False, medvram=True, no_half=True)
    shared.interrogator = FakeInterrogator(ns)
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = ns.lock
    devices = types.ModuleType("modules.devices")
    devices.device_interrogate = devices.cpu = torch.device("cpu")
    devices.torch_gc = lambda: None
    devices.autocast = lambda: torch.autocast("cpu", enabled=False)
    paths = types.ModuleType("modules.paths")
    paths.models_path = ns.models
    deepbooru = types.ModuleType("modules.deepbooru")
    deepbooru.model = FakeDeepBooru(ns)
    lowvram = types.ModuleType("modules.lowvram")

    def send_everything_to_cpu():
        ns.cpu_moves += 1

    lowvram.send_everything_to_cpu = send_everything_to_cpu
    mods = {
        "modules": pkg,
        "modules.shared": shared,
        "modules.call_queue": call_queue,
        "modules.devices": devices,
        "modules.paths": paths,
        "modules.deepbooru": deepbooru,
        "modules.lowvram": lowvram,
    }
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
        if "." in name:
            setattr(pkg, name.split(".")[1], mod)
    ns.shared, ns.interrogator, ns.deepbooru = shared, shared.interrogator, deepbooru.model
    return ns


def put_weights(folder, name):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as fh:
        fh.write(b"weights")


def caption(tmp_path, choice, count=2, threshold=0.35):
    """Run the panel's Run handler with the WebUI backend; return (final status, the folder's captions)."""
    panel = CaptionPanel(webui.WebUIBackend(), CaptionRunner(JobRunner()))
    data = tmp_path / "data"
    if not data.exists():
        write_test_images(str(data), count)
    assert "started" in panel.start_captioning(str(data), choice, "", threshold, "", "", True, False)
    assert panel.runner.wait(CEILING_S)
    csv = data / "metadata.csv"
    return panel.runner.status(), (read_metadata_csv(str(csv)) if csv.exists() else {})


def test_host_interrogators_are_offered_before_ours():
    choices = webui.WebUIBackend().captioner_choices()
    assert choices[:3] == [webui.HOST_BLIP, webui.HOST_BLIP_CLIP, webui.HOST_DEEPBOORU]
    assert {"blip", "clip", "wd14"} <= set(choices[3:])


def test_blip_captions_on_the_hosts_progress_bar_inside_its_lock(host, tmp_path):
    put_weights(os.path.join(host.models, "BLIP"), "model_base_caption_capfilt_large.pth")
    status, captions = caption(tmp_path, webui.HOST_BLIP, count=3)
    assert status.state == "finished", status.message
    assert captions == {f"00{i}.png": "blip 48x40" for i in range(3)}
    assert host.state.calls == [("begin", webui.CAPTION_STATE_JOB_NAME), ("end",)]
    # The progress bar counted the images: before image n, n-1 of 3 were done.
    assert [(no, count) for no, count, _ in host.state.seen] == [(0, 1), (1, 3), (2, 3)]
    assert "Captioning with webui: BLIP: 1/3" in host.state.seen[1][2]
    assert host.interrogator.calls == ["load_blip_model", "send_blip_to_ram"]  # CLIP never loaded
    assert host.cpu_moves == 1  # --medvram: the SD model leaves the GPU first, as the host does
    assert not host.lock.locked()
    status, _ = caption(tmp_path, webui.HOST_BLIP)  # a held model is reused, not loaded again
    assert host.interrogator.calls.count("load_blip_model") == 1


def test_blip_clip_appends_the_best_phrase_of_each_category(host, tmp_path):
    put_weights(os.path.join(host.models, "BLIP"), "model.pth")
    put_weights(host.clip_dir, "ViT-L-14.pt")
    status, captions = caption(tmp_path, webui.HOST_BLIP_CLIP, count=1)
    assert status.state == "finished", status.message
    assert captions == {"000.png": "blip 48x40, oil painting, neon, dark"}
    assert host.interrogator.calls[-1] == "unload"


def test_deepbooru_uses_the_panels_threshold_and_puts_the_setting_back(host, tmp_path):
    put_weights(os.path.join(host.models, "torch_deepdanbooru"), "model-resnet_custom_v3.pt")
    host.shared.opts.data["interrogate_deepbooru_score_threshold"] = 0.8
    status, captions = caption(tmp_path, webui.HOST_DEEPBOORU, count=2, threshold=0.5)
    assert status.state == "finished", status.message
    assert set(captions.values()) == {"1girl, solo"}
    assert host.deepbooru.thresholds == [0.5, 0.5]
    assert host.deepbooru.calls == ["start", "stop"]
    assert host.shared.opts.data["interrogate_deepbooru_score_threshold"] == 0.8


def test_missing_weights_offline_say_where_to_put_them_and_others_still_work(host, tmp_path):
    status, captions = caption(tmp_path, webui.HOST_BLIP)
    assert status.state == "failed" and not captions
    assert "not on disk" in status.message and "model_base_caption_capfilt_large.pth" in status.message
    assert os.path.join(host.models, "BLIP") in status.message and "other captioners still work" in status.message
    status, _ = caption(tmp_path, webui.HOST_DEEPBOORU)
    assert "torch_deepdanbooru" in status.message and "model-resnet_custom_v3.pt" in status.message
    assert host.state.calls.count(("begin", webui.CAPTION_STATE_JOB_NAME)) == host.state.calls.count(("end",))

    put_weights(os.path.join(host.models, "BLIP"), "model_base_caption_capfilt_large.pth")
    put_weights(host.clip_dir, "ViT-B-32.pt")  # another CLIP model is not the one the host loads
    status, _ = caption(tmp_path, webui.HOST_BLIP_CLIP)  # BLIP is there, CLIP is not: CLIP is named
    assert "not on disk" in status.message and "ViT-L-14.pt" in status.message and host.clip_dir in status.message
    status, captions = caption(tmp_path, webui.HOST_BLIP)  # ... and BLIP alone works
    assert status.state == "finished" and set(captions.values()) == {"blip 48x40"}


@pytest.mark.parametrize("clicks", [1, 2])
def test_the_hosts_interrupt_button_stops_the_run(host, tmp_path, clicks):
    put_weights(os.path.join(host.models, "BLIP"), "model_base_caption_capfilt_large.pth")
    # during the 2nd of 3 captions (the job counts 3 items by then, so the host's first click only asks to stop
    # after the current one)
    host.interrupt_after, host.interrupt_clicks = 2, clicks
    status, captions = caption(tmp_path, webui.HOST_BLIP, count=3)
    assert status.state == "cancelled" and "saved" in status.message
    assert list(captions) == ["000.png", "001.png"]  # the captions made before the interrupt are kept


def test_a_webui_without_the_interrogators_says_so(host, tmp_path, monkeypatch):
    monkeypatch.delattr(host.shared, "interrogator")
    monkeypatch.delattr(sys.modules["modules"], "deepbooru")
    monkeypatch.setitem(sys.modules, "modules.deepbooru", None)
    status, _ = caption(tmp_path, webui.HOST_BLIP_CLIP)
    assert status.state == "failed" and "no BLIP/CLIP interrogator" in status.message
    status, _ = caption(tmp_path, webui.HOST_DEEPBOORU)
    assert status.state == "failed" and "no DeepBooru tagger" in status.message
