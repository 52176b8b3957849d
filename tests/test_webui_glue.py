"""The WebUI host glue against stand-in ``modules`` packages: lock, progress, interrupt, refusals, Lora state.

The real WebUI is not importable here; these fakes carry exactly the attributes the glue touches
(``call_queue.queue_lock``, ``shared.state``/``cmd_opts``/``opts``, ``devices``, ``sd_models.model_data``,
``processing``, the builtin Lora extension's ``networks``), so a changed host API shows up as a failing test.
"""

import os
import sys
import threading
import types

import pytest
import torch
from torch import nn
from waiting import CEILING_S, wait_until

from lora_trainer.config import config_from_dict
from lora_trainer.hosts import webui
from lora_trainer.jobs import CANCELLED, FAILED, FINISHED, JobRunner
from lora_trainer.train.backend import TrainingBackend
from lora_trainer.train.callbacks import StepInfo
from lora_trainer.train.result import TrainingResult

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeState:
    """``shared.state``: the attributes the progress bar reads, begin/end as the host defines them."""

    def __init__(self):
        self.interrupted = False
        self.stopping_generation = False
        self.job_count = 0
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.calls = []

    def begin(self, job="(unknown)"):
        self.calls.append(("begin", job))
        self.interrupted = False
        self.stopping_generation = False
        self.job_count = -1

    def press_interrupt(self):
        """The Interrupt button as A1111 1.10 / Forge wire it (modules/ui_toprow.py), with the default setting
        "Don't Interrupt in the middle": a job of more than one item is first asked to stop after the current
        one (``stop_generating``); only a second click interrupts."""
        if not self.stopping_generation and self.job_count > 1:
            self.stopping_generation = True
        else:
            self.interrupted = True

    def end(self):
        self.calls.append(("end",))
        self.job_count = 0


class SpatialTransformer(nn.Module):
    """Named like ldm's block, so the memory estimate counts its linears."""

    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(8, 8)
        self.proj_in = nn.Conv2d(8, 8, 1)


class FakeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = nn.Identity()
        self.block = SpatialTransformer()
        self.other = nn.Linear(4, 4)
        self.is_sdxl = False
        self.is_sd2 = False
        self.parameterization = "eps"
        self.sd_checkpoint_info = types.SimpleNamespace(name_for_extra="random_sd15", filename="/m/random_sd15.st")


class FakeNetworks(types.ModuleType):
    """The builtin Lora extension's ``networks`` module state."""

    def __init__(self):
        super().__init__("networks")
        self.loaded_networks = []
        self.networks_in_memory = {}
        self.listed = 0

    def list_available_networks(self):
        self.listed += 1

    @staticmethod
    def network_restore_weights_from_backup(module):
        # As the host does it: an in-place copy into the parameter itself (which requires grad in the WebUI).
        if getattr(module, "network_weights_backup", None) is not None:
            module.weight.copy_(module.network_weights_backup)
        if getattr(module, "network_bias_backup", None) is not None:
            module.bias.copy_(module.network_bias_backup)


@pytest.fixture
def host(tmp_path, monkeypatch):
    """Stand-in ``modules`` packages in sys.modules; returns a namespace to change host facts."""
    state = FakeState()
    model = FakeModel()
    cmd_opts = types.SimpleNamespace(
        lora_dir=str(tmp_path / "Lora"), lowvram=False, medvram=False, medvram_sdxl=False, api_auth="u:p"
    )
    ns = types.SimpleNamespace(
        state=state,
        model=model,
        cmd_opts=cmd_opts,
        lock=threading.Lock(),
        renders=[],
        networks=FakeNetworks(),
        data=str(tmp_path / "webui"),
    )
    pkg = types.ModuleType("modules")
    pkg.__path__ = []
    shared = types.ModuleType("modules.shared")
    shared.state, shared.cmd_opts, shared.sd_model = state, cmd_opts, model
    shared.opts = types.SimpleNamespace(data={"CLIP_stop_at_last_layers": 1})
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = ns.lock
    devices = types.ModuleType("modules.devices")
    devices.device, devices.dtype, devices.dtype_unet, devices.fp8 = (
        torch.device("cpu"),
        torch.float32,
        torch.float32,
        False,
    )
    devices.autocast = lambda: torch.autocast("cpu", enabled=False)
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.model_data = types.SimpleNamespace(sd_model=model)
    paths_internal = types.ModuleType("modules.paths_internal")
    paths_internal.data_path = ns.data
    processing = types.ModuleType("modules.processing")

    class Txt2Img:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            ns.renders.append(kwargs)

    def process_images(p):
        assert ns.lock.locked(), "previews must render inside the queue lock the run holds"
        state.job_no += 1  # what the host's nextjob() does
        state.sampling_steps = p.kwargs["steps"]
        from PIL import Image

        return types.SimpleNamespace(images=[Image.new("RGB", (p.kwargs["width"], p.kwargs["height"]), "red")])

    processing.StableDiffusionProcessingTxt2Img, processing.process_images = Txt2Img, process_images
    mods = {
        "modules": pkg,
        "modules.shared": shared,
        "modules.call_queue": call_queue,
        "modules.devices": devices,
        "modules.sd_models": sd_models,
        "modules.paths_internal": paths_internal,
        "modules.processing": processing,
        "networks": ns.networks,
    }
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
        if "." in name:
            setattr(pkg, name.split(".")[1], mod)
    ns.devices, ns.shared = devices, shared
    return ns


def make_cfg(tmp_path, backend, name="cats", **extra):
    raw = {
        "base_model": "/m/random_sd15.st",
        "train_data_dir": str(tmp_path / "data"),
        "output_name": name,
        "output_dir": backend.default_output_dir(name),
    }
    raw.update(extra)
    return config_from_dict(raw)


class ScriptedTrainer:
    """Stands in for the engine: steps, checks the host's lock and state, saves like the image trainer."""

    def __init__(self, host, steps=4, gate=None):
        self.host, self.steps, self.gate = host, steps, gate
        self.seen = []

    def __call__(self, cfg, callbacks, **kwargs):
        self.kwargs = kwargs
        for cb in callbacks:
            cb.on_train_start(self.steps, 0, {})
        os.makedirs(cfg.output_dir, exist_ok=True)
        for step in range(1, self.steps + 1):
            if self.gate is not None:
                assert self.gate.acquire(timeout=CEILING_S)
            info = StepInfo(step=step, total_steps=self.steps, epoch=1, loss=1.0 / step, lr=1e-4, elapsed_s=0.5)
            for cb in callbacks:
                cb.on_step_end(info)
            self.seen.append((self.host.lock.locked(), self.host.state.job_no, self.host.state.textinfo))
            if step == 2:  # an intermediate save stays in the job folder
                path = os.path.join(cfg.output_dir, f"{cfg.output_name}-step{step:08d}.safetensors")
                open(path, "wb").write(b"step2")
                for cb in callbacks:
                    cb.on_save(path, step)
            if any(cb.should_stop() for cb in callbacks):
                return TrainingResult("cancelled", step, [], "", [])
        final = os.path.join(cfg.output_dir, f"{cfg.output_name}.safetensors")
        open(final, "wb").write(b"final weights")
        for cb in callbacks:
            cb.on_save(final, self.steps)
        return TrainingResult("finished", self.steps, [final], "", [])


def runner_for(backend, trainer, monkeypatch):
    monkeypatch.setattr(webui.backend, "default_trainer", trainer)
    return JobRunner(trainer=backend.train, hooks=backend.job_hooks())


# --- the run: lock, progress, interrupt ------------------------------------------------------------------------
def test_lock_held_for_the_whole_run_and_progress_mirrored(host, tmp_path, monkeypatch):
    backend = webui.WebUIBackend()
    trainer = ScriptedTrainer(host)
    runner = runner_for(backend, trainer, monkeypatch)
    job = runner.start(make_cfg(tmp_path, backend), backend=webui.WebUITraining(preview=webui.PreviewSettings()))
    assert job.wait(CEILING_S)
    assert job.status().state == FINISHED, job.status().message
    assert [locked for locked, _, _ in trainer.seen] == [True] * 4
    assert [no for _, no, _ in trainer.seen] == [1, 2, 3, 4]
    assert trainer.seen[-1][2].startswith("Training LoRA cats (holds the GPU): step 4/4, loss 0.2500, ETA ")
    assert "Cancel in the LoRA Trainer tab" in trainer.seen[-1][2]
    assert host.state.calls == [("begin", "lora_trainer"), ("end",)]
    assert not host.lock.locked()
    assert trainer.kwargs == {"backend": TrainingBackend()}  # the preview settings are the glue's, not the engine's


def test_generation_waits_for_training(host, tmp_path, monkeypatch):
    """A txt2img (which takes the same lock) cannot run until training ends."""
    backend = webui.WebUIBackend()
    gate = threading.Semaphore(0)
    runner = runner_for(backend, ScriptedTrainer(host, steps=2, gate=gate), monkeypatch)
    job = runner.start(make_cfg(tmp_path, backend))
    wait_until(host.lock.locked, "training to take the host's lock")
    assert not host.lock.acquire(timeout=0.1)
    gate.release(2)
    assert job.wait(CEILING_S) and host.lock.acquire(timeout=CEILING_S)
    host.lock.release()


@pytest.mark.parametrize("clicks", [1, 2])
def test_webui_interrupt_stops_the_run(host, tmp_path, monkeypatch, clicks):
    """One click on the WebUI's Interrupt stops the run after the current step (the host first asks a job of
    several steps to stop after the current one; a second click interrupts outright: both stop a training)."""
    backend = webui.WebUIBackend()
    gate = threading.Semaphore(0)
    runner = runner_for(backend, ScriptedTrainer(host, steps=5, gate=gate), monkeypatch)
    job = runner.start(make_cfg(tmp_path, backend))
    gate.release(1)
    wait_until(lambda: job.status().step >= 1, "step 1")
    for _ in range(clicks):
        host.state.press_interrupt()
    assert host.state.stopping_generation and host.state.interrupted == (clicks == 2)
    gate.release(4)
    assert job.wait(CEILING_S)
    assert job.status().state == CANCELLED and job.status().step == 2
    assert not os.path.exists(os.path.join(host.cmd_opts.lora_dir, "cats.safetensors"))


# --- refusals ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "setting, extra, fragment",
    [
        ("lowvram", {}, "--lowvram"),
        ("fp8", {}, "fp8"),
        ("medvram", {"train_text_encoder": True}, "--medvram"),
    ],
)
def test_refusals_before_any_work(host, tmp_path, monkeypatch, setting, extra, fragment):
    if setting == "fp8":
        host.devices.fp8 = True
    else:
        setattr(host.cmd_opts, setting, True)
    backend = webui.WebUIBackend()
    cfg = make_cfg(tmp_path, backend, **extra)
    with pytest.raises(webui.ConfigError, match=fragment):  # what the tab and API show at Train
        backend.training_backend(cfg)
    trainer = ScriptedTrainer(host)
    job = runner_for(backend, trainer, monkeypatch).start(cfg)  # and again inside the lock, before training
    assert job.wait(CEILING_S)
    assert job.status().state == FAILED and fragment in job.status().message
    assert trainer.seen == [] and not host.lock.locked()


def test_medvram_allows_unet_only_and_sdxl_flag_counts_only_for_sdxl(host, tmp_path):
    host.cmd_opts.medvram_sdxl = True
    backend = webui.WebUIBackend()
    facts = webui.host_facts(host.model)
    assert not facts.medvram and webui.refusal(make_cfg(tmp_path, backend, train_text_encoder=True), facts) is None
    host.model.is_sdxl = True
    assert webui.host_facts(host.model).medvram
    host.cmd_opts.medvram_sdxl, host.cmd_opts.medvram = False, True
    assert webui.refusal(make_cfg(tmp_path, backend), webui.host_facts(host.model)) is None


# --- the builtin Lora extension --------------------------------------------------------------------------------
def test_before_start_unloads_merged_networks(host, tmp_path):
    linear = host.model.other
    assert linear.weight.requires_grad  # as the WebUI loads its model
    original = linear.weight.detach().clone()
    linear.network_weights_backup = original.clone()
    linear.network_bias_backup = None
    linear.network_current_names = (("old_lora", 1.0, 1.0, None),)
    with torch.no_grad():
        linear.weight.add_(1.0)  # what a merged LoRA delta looks like
    host.networks.loaded_networks.append(types.SimpleNamespace(name="old_lora"))
    webui.WebUIBackend().before_start(make_cfg(tmp_path, webui.WebUIBackend()))
    assert torch.equal(linear.weight, original)
    assert linear.network_current_names == () and linear.network_weights_backup is None
    assert host.networks.loaded_networks == []


def test_after_save_publishes_final_file_and_resets_host_state(host, tmp_path, monkeypatch):
    backend = webui.WebUIBackend()
    host.networks.networks_in_memory["cats"] = object()
    host.networks.networks_in_memory["dogs"] = object()
    runner = runner_for(backend, ScriptedTrainer(host), monkeypatch)
    job = runner.start(make_cfg(tmp_path, backend))
    assert job.wait(CEILING_S) and job.status().state == FINISHED
    lora_dir = host.cmd_opts.lora_dir
    assert os.listdir(lora_dir) == ["cats.safetensors"]  # no intermediate, no temporary left behind
    assert open(os.path.join(lora_dir, "cats.safetensors"), "rb").read() == b"final weights"
    assert os.stat(os.path.join(lora_dir, "cats.safetensors")).st_mode & 0o777 == 0o644
    job_dir = backend.default_output_dir("cats")
    assert job_dir.startswith(os.path.join(host.data, "outputs")) and not job_dir.startswith(lora_dir)
    assert os.path.exists(os.path.join(job_dir, "cats-step00000002.safetensors"))
    assert host.networks.listed == 1 and "cats" not in host.networks.networks_in_memory
    assert "dogs" in host.networks.networks_in_memory
    assert backend.final_lora_path(make_cfg(tmp_path, backend)) == os.path.join(lora_dir, "cats.safetensors")


def test_rewritten_lora_in_use_is_unmerged(host):
    linear = host.model.other
    original = linear.weight.detach().clone()
    linear.network_weights_backup = original.clone()
    with torch.no_grad():
        linear.weight.mul_(2)
    host.networks.loaded_networks.append(types.SimpleNamespace(name="cats"))
    webui.refresh_host_networks("cats", host.model)
    assert torch.equal(linear.weight, original) and host.networks.loaded_networks == []


def test_without_the_builtin_extension_nothing_breaks(host, monkeypatch):
    monkeypatch.delitem(sys.modules, "networks")
    assert webui.unload_host_networks(host.model) == 0
    webui.refresh_host_networks("cats", host.model)


# --- previews --------------------------------------------------------------------------------------------------
def test_previews_every_n_steps_in_the_lock(host, tmp_path, monkeypatch):
    backend = webui.WebUIBackend()
    runner = runner_for(backend, ScriptedTrainer(host), monkeypatch)
    preview = webui.PreviewSettings.from_mapping({"every_n_steps": 2, "steps": 3})
    cfg = make_cfg(tmp_path, backend, resolution=256)
    job = runner.start(cfg, backend=webui.WebUITraining(preview=preview.for_run(cfg)))
    assert job.wait(CEILING_S) and job.status().state == FINISHED, job.status().message
    previews = job.status().previews
    assert [os.path.basename(p) for p in previews] == ["preview-step00000002-0.png", "preview-step00000004-0.png"]
    assert all(p.startswith(cfg.output_dir) for p in previews)
    assert len(host.renders) == 2
    sent = host.renders[0]
    assert sent["prompt"] == "cats" and sent["width"] == sent["height"] == 256 and sent["steps"] == 3
    assert sent["do_not_save_samples"] is True and sent["do_not_save_grid"] is True
    assert "<lora:" not in sent["prompt"]  # the LoRA is live in the model; a tag would apply it twice


def test_failed_preview_does_not_stop_training(host, tmp_path):
    delivered = []

    class Sink(webui.TrainingCallback):
        def on_preview(self, paths, step):
            delivered.append(paths)

    def broken(settings):
        raise RuntimeError("out of memory")

    maker = webui.HostPreviews(webui.PreviewSettings(every_n_steps=1), str(tmp_path), broken, Sink(), host.state)
    host.state.job_no = 7
    maker.on_step_end(StepInfo(step=1, total_steps=2, epoch=1, loss=0.1, lr=1e-4, elapsed_s=1))
    assert delivered == [] and host.state.job_no == 7


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"every": 2}, "unknown key"),
        ({"steps": "many"}, "not a valid"),
        ({"steps": 0}, "steps >= 1"),
        ([1], "object"),
    ],
)
def test_preview_settings_validation(raw, fragment):
    with pytest.raises(webui.ConfigError, match=fragment):
        webui.PreviewSettings.from_mapping(raw)


# --- what the tab shows and the trainer gets ---------------------------------------------------------------------
def test_describe_model_is_cheap_and_names_the_checkpoint(host, monkeypatch):
    backend = webui.WebUIBackend()
    assert "`random_sd15` (SD1, epsilon)" in backend.describe_model()
    host.model.is_sd2, host.model.parameterization = True, "v"
    assert "(SD2, v-prediction)" in backend.describe_model()
    sys.modules["modules.sd_models"].model_data.sd_model = None
    assert "none is loaded yet" in backend.describe_model()


def test_lora_dir_respects_the_flag_and_send_js(host):
    backend = webui.WebUIBackend()
    assert backend.lora_dir() == os.path.abspath(host.cmd_opts.lora_dir)
    assert "loraTrainerSendToTxt2img" in backend.send_prompt_js()
    assert webui.api_credentials() == {"u": "p"}


def test_training_backend_builds_runtime_and_adapter(host, tmp_path, monkeypatch):
    made = {}

    class FakeAdapter:
        def __init__(self, model, **facts):
            made.update(model=model, **facts)

    fake_module = types.ModuleType("lora_trainer.hosts.ldm_adapter")
    fake_module.LdmHostAdapter = FakeAdapter
    monkeypatch.setitem(sys.modules, "lora_trainer.hosts.ldm_adapter", fake_module)
    backend = webui.WebUIBackend()
    made_backend = backend.training_backend(make_cfg(tmp_path, backend, resolution=320), preview={"every_n_steps": 5})
    assert made_backend.runtime.device.type == "cpu" and made_backend.runtime.mixed_precision == "no"
    assert made["model"] is host.model and made["dtype"] == torch.float32
    assert made["lowvram"] is False and made["fp8"] is False
    assert made_backend.preview == webui.PreviewSettings(every_n_steps=5, prompt="cats", width=320, height=320)
    assert made["autocast"] is host.devices.autocast
    with made["clip_skip_scope"](2):
        assert host.shared.opts.data["CLIP_stop_at_last_layers"] == 2
    assert host.shared.opts.data["CLIP_stop_at_last_layers"] == 1


def test_host_attention_is_swapped_only_without_loaded_hypernetworks(host, tmp_path, monkeypatch):
    """The WebUI's hypernetworks run inside its own attention forward: with any loaded, the adapter keeps it."""
    made = []

    class FakeAdapter:
        def __init__(self, model, **facts):
            made.append(facts["fast_attention"])

    fake_module = types.ModuleType("lora_trainer.hosts.ldm_adapter")
    fake_module.LdmHostAdapter = FakeAdapter
    monkeypatch.setitem(sys.modules, "lora_trainer.hosts.ldm_adapter", fake_module)
    backend = webui.WebUIBackend()
    backend.training_backend(make_cfg(tmp_path, backend))
    sys.modules["modules.shared"].loaded_hypernetworks = [object()]
    backend.training_backend(make_cfg(tmp_path, backend))
    assert made == [True, False]


def test_host_precision_maps_to_engine_precision():
    cuda = torch.device("cuda")
    facts = webui.HostFacts(device=cuda, dtype=torch.float16, lowvram=False, medvram=False, fp8=False)
    assert facts.mixed_precision == "fp16"
    assert webui.HostFacts(cuda, torch.float32, False, False, False).mixed_precision == "no"
    assert webui.HostFacts(torch.device("cpu"), torch.float16, False, False, False).mixed_precision == "no"


def test_memory_estimate_counts_lora_params_only(host, tmp_path):
    backend = webui.WebUIBackend()
    text = backend.estimate_memory(make_cfg(tmp_path, backend, lora_rank=4, resolution=512, batch_size=2))
    # to_q (8+8) and proj_in (8+8) at rank 4: 128 parameters; "other" is outside a transformer block.
    assert "0.0 M LoRA parameters" in text and "no second copy" in text and "batch 2 at 512 px" in text
    assert "precision" not in text
    text = backend.estimate_memory(make_cfg(tmp_path, backend, mixed_precision="bf16"))
    assert "Computing in the WebUI's precision (no)" in text


# --- the script the host imports -----------------------------------------------------------------------------
def test_tab_script_registers_callbacks_and_mounts_routes(host, monkeypatch):
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    registered = {}
    callbacks = types.ModuleType("modules.script_callbacks")
    for hook in ("on_ui_tabs", "on_ui_settings", "on_app_started"):
        setattr(callbacks, hook, lambda fn, hook=hook: registered.setdefault(hook, fn))
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", callbacks)
    sys.modules["modules"].script_callbacks = callbacks
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lora_trainer_tab_under_test", os.path.join(REPO, "scripts", "lora_trainer_tab.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert set(registered) == {"on_ui_tabs", "on_ui_settings", "on_app_started"}
    app = fastapi.FastAPI()
    registered["on_app_started"](None, app)  # demo is None under --nowebui
    client = TestClient(app)
    assert client.get("/lora-trainer/v1/status").status_code == 401
    assert client.get("/lora-trainer/v1/status", auth=("u", "p")).json()["state"] == "idle"
    backend, runner = script.backend_and_runner()
    assert script.backend_and_runner() == (backend, runner)  # one runner for the tab and the API


def test_tab_script_imports_nothing_heavy():
    """In a fresh interpreter: importing the script loads neither torch nor gradio (the host imports it early)."""
    import subprocess

    code = (
        "import sys, types; m = types.ModuleType('modules'); m.__path__ = []; "
        "cb = types.ModuleType('modules.script_callbacks'); "
        "cb.on_ui_tabs = cb.on_ui_settings = cb.on_app_started = lambda fn: None; "
        "sys.modules.update({'modules': m, 'modules.script_callbacks': cb}); "
        "import runpy; runpy.run_path(sys.argv[1]); "
        "print(sorted({'torch', 'gradio', 'fastapi'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, os.path.join(REPO, "scripts", "lora_trainer_tab.py")],
        capture_output=True,
        text=True,
        timeout=CEILING_S,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda m: setattr(m, "forge_objects", object()), "Forge"),
        (lambda m: setattr(m, "is_sd3", True), "SD3"),
        (lambda m: delattr(m, "model"), "not an ldm/sgm"),
    ],
)
def test_models_the_trainer_cannot_drive_are_named_in_the_tab(host, tmp_path, change, fragment):
    change(host.model)
    backend = webui.WebUIBackend()
    assert "Cannot train here" in backend.describe_model() and fragment in backend.describe_model()
    with pytest.raises(webui.ConfigError, match=fragment):
        backend.training_backend(make_cfg(tmp_path, backend))


def test_adapter_restored_even_when_the_engine_fails_early(host, tmp_path, monkeypatch):
    """A safety net for the host's model: the trainer wrapper restores the adapter on every exit."""
    restored = []

    class Adapter:
        def restore(self):
            restored.append(True)

    def failing_engine(cfg, callbacks, **kwargs):
        raise RuntimeError("failed while building the network")

    backend = webui.WebUIBackend()
    runner = runner_for(backend, failing_engine, monkeypatch)
    job = runner.start(make_cfg(tmp_path, backend), backend=webui.WebUITraining(adapter=Adapter()))
    assert job.wait(CEILING_S) and job.status().state == FAILED
    assert restored == [True] and not host.lock.locked()


def test_lowvram_trains_from_the_checkpoint_file_with_the_model_unloaded(host, tmp_path, monkeypatch):
    """In place is refused (--lowvram): the host's model is unloaded through its own API, the engine trains from
    the checkpoint file the WebUI has loaded, the model is loaded again, and the LoRA is published."""
    pytest.importorskip("diffusers")  # the engine's own loader (absent from AUTOMATIC1111's environment)
    checkpoint = tmp_path / "random_sd15.safetensors"
    checkpoint.write_bytes(b"stands in for the file the WebUI loaded")
    host.model.sd_checkpoint_info.filename = str(checkpoint)
    host.cmd_opts.lowvram = True
    events = []
    sd_models = sys.modules["modules.sd_models"]
    monkeypatch.setattr(sd_models, "unload_model_weights", lambda *a, **k: events.append("unload"), raising=False)
    monkeypatch.setattr(sd_models, "reload_model_weights", lambda *a, **k: events.append("reload"), raising=False)
    backend = webui.WebUIBackend()
    assert "--lowvram" in backend.describe_model() and "checkpoint file" in backend.describe_model()
    cfg = make_cfg(tmp_path, backend, base_model=backend.resolve_base_model(""))
    made_backend = backend.training_backend(cfg)
    assert not made_backend.plan.in_place and made_backend.adapter is None
    assert "checkpoint file" in backend.estimate_memory(cfg)

    class FromFile(ScriptedTrainer):
        def __call__(self, cfg, callbacks, **kwargs):
            self.during = (list(events), cfg.base_model)
            return super().__call__(cfg, callbacks, **kwargs)

    trainer = FromFile(host)
    job = runner_for(backend, trainer, monkeypatch).start(cfg, backend=made_backend)
    assert job.wait(10) and job.status().state == FINISHED, job.status().message
    assert trainer.during == (["unload"], str(checkpoint)) and events == ["unload", "reload"]
    engine = trainer.kwargs["backend"]
    assert set(trainer.kwargs) == {"backend"} and engine.runtime is not None
    assert engine.adapter is None  # no adapter: the engine loads the file itself
    assert open(os.path.join(host.cmd_opts.lora_dir, "cats.safetensors"), "rb").read() == b"final weights"
    assert host.networks.listed == 1 and not host.lock.locked()


def test_reforge_and_forge_classic_train_from_the_checkpoint_file(host, tmp_path):
    """An AUTOMATIC1111-style model carrying Forge's objects (reForge, Forge Classic) is driven by the engine's own
    loader from the file, never refused when that loader and the file are there."""
    pytest.importorskip("diffusers")
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"stands in for the file the WebUI loaded")
    host.model.sd_checkpoint_info.filename = str(checkpoint)
    host.model.forge_objects = object()
    backend = webui.WebUIBackend()
    text = backend.describe_model()
    assert "reForge or Forge Classic" in text and "checkpoint file" in text and "Cannot train" not in text
    assert not backend.training_backend(make_cfg(tmp_path, backend)).plan.in_place
