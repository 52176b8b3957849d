"""The WebUI glue inside Forge, against the Forge stand-in (``forge_standin.py``) and stand-in ``modules`` with what
Forge Neo's own have: ``sd_models.model_data`` / ``unload_model_weights`` / ``forge_model_reload``, ``shared``,
``call_queue.queue_lock``, ``paths_internal``, and its LoRA extension's ``networks``.

A run in place: the LoRAs Forge merged are undone through its loader, the run holds the queue lock, trains with
Forge's clip skip, publishes into the Lora folder and resets Forge's LoRA state so the next generation reads
the new file. A run the live model cannot take: Forge's model is unloaded through its own API (nothing keeps it
alive), the engine's own loader trains from the checkpoint file, Forge's model is loaded again and the LoRA
published.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import types
import weakref

import forge_standin as standin
import pytest
import torch
from safetensors import safe_open
from support.image_fixtures import tiny_checkpoint
from support.tiny_models import make_image_folder

from lora_trainer.config import config_from_dict
from lora_trainer.hosts.webui import WebUIBackend
from lora_trainer.hosts.webui import backend as backend_module
from lora_trainer.hosts.webui.forge import ForgeHost
from lora_trainer.jobs import FINISHED, JobRunner, default_trainer
from lora_trainer.train.callbacks import TrainingCallback


class FakeState:
    def __init__(self):
        self.interrupted = False
        self.job_count = self.job_no = self.sampling_step = self.sampling_steps = 0
        self.textinfo = None
        self.calls = []

    def begin(self, job="(unknown)"):
        self.calls.append(("begin", job))

    def end(self):
        self.calls.append(("end",))


class FakeInitialModel:
    """Forge's placeholder while no checkpoint is loaded."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("forge_glue"), "sd1")


def load_engine(checkpoint: str):
    engine = standin.load_forge_engine(checkpoint, "sd1")
    engine.sd_checkpoint_info = types.SimpleNamespace(filename=checkpoint, name_for_extra="tiny_sd1", sha256=None)
    return engine


@pytest.fixture
def forge(tmp_path, monkeypatch, checkpoint):
    """Stand-in ``modules`` (Forge Neo's), ``backend`` and ``networks``; the engine loaded as Forge loads it."""
    memory = standin.install_backend(monkeypatch)
    monkeypatch.setattr(standin, "attention_function", standin.attention_sage)
    ns = types.SimpleNamespace(memory=memory, state=FakeState(), lock=threading.Lock(), events=[], listed=0)
    pkg = types.ModuleType("modules")
    pkg.__path__ = []
    shared = types.ModuleType("modules.shared")
    shared.state = ns.state
    shared.opts = types.SimpleNamespace(data={"CLIP_stop_at_last_layers": 2})  # Neo's default
    shared.cmd_opts = types.SimpleNamespace(lora_dir=str(tmp_path / "Lora"), api_auth=None)
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.FakeInitialModel = FakeInitialModel
    sd_models.model_data = types.SimpleNamespace(sd_model=FakeInitialModel(), forge_hash="")

    def forge_model_reload():
        if sd_models.model_data.forge_hash:
            return sd_models.model_data.sd_model, False
        ns.events.append("reload")
        model = load_engine(checkpoint)
        sd_models.model_data.sd_model = shared.sd_model = model
        sd_models.model_data.forge_hash = "loaded"
        return model, True

    def unload_model_weights():
        ns.events.append("unload")
        memory.unload_all_models()
        sd_models.model_data.sd_model = shared.sd_model = FakeInitialModel()
        sd_models.model_data.forge_hash = ""

    sd_models.forge_model_reload, sd_models.unload_model_weights = forge_model_reload, unload_model_weights
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = ns.lock
    paths_internal = types.ModuleType("modules.paths_internal")
    paths_internal.data_path = str(tmp_path / "webui")
    networks = types.ModuleType("networks")

    def list_available_networks():
        ns.listed += 1

    networks.list_available_networks = list_available_networks
    modules = {
        "modules": pkg,
        "modules.shared": shared,
        "modules.sd_models": sd_models,
        "modules.call_queue": call_queue,
        "modules.paths_internal": paths_internal,
        "networks": networks,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
        if name.startswith("modules."):
            setattr(pkg, name.split(".")[1], module)
    shared.sd_model = FakeInitialModel()
    ns.shared, ns.sd_models, ns.tmp = shared, sd_models, tmp_path
    return ns


def run_config(forge, backend, name="cats", **overrides):
    data = os.path.join(str(forge.tmp), "data")
    make_image_folder(data, count=2)
    raw = {
        "base_model": backend.resolve_base_model(""),
        "train_data_dir": data,
        "output_name": name,
        "output_dir": backend.default_output_dir(name),
        "resolution": 64,
        "batch_size": 2,
        "lora_rank": 4,
        "max_train_steps": 1,
        "save_precision": "float",
        "cache_to_disk": False,
        "train_text_encoder": True,
    }
    raw.update(overrides)
    return config_from_dict(raw)


def metadata(path: str) -> dict:
    with safe_open(path, "pt") as fh:
        return fh.metadata()


def test_an_unloaded_forge_loads_its_checkpoint_for_a_run_and_says_the_plan(forge):
    backend = WebUIBackend()
    assert "none is loaded yet" in backend.describe_model()
    cfg = run_config(forge, WebUIBackend())  # Train: Forge loads the model as a generation would
    made_backend = backend.training_backend(cfg)
    assert forge.events == ["reload"] and made_backend.plan.in_place and made_backend.adapter is None
    text = backend.describe_model()
    assert "`tiny_sd1` (SD1, epsilon)" in text and "in place on the weights Forge holds" in text
    assert "clip skip 2" in text
    assert "in place" in backend.estimate_memory(cfg) and "LoRA parameters" in backend.estimate_memory(cfg)


def test_a_run_trains_in_place_publishes_and_makes_forge_read_the_new_file(forge, monkeypatch):
    forge.sd_models.forge_model_reload()
    engine = forge.shared.sd_model
    unet = engine.forge_objects_original.unet.model.diffusion_model
    key = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    clean = unet.state_dict()[key].clone()
    engine.apply_loras({f"diffusion_model.{key}": torch.full_like(clean, 0.05)})  # a <lora:> generation
    engine.sample(forge.memory, "a cat <lora:old:1>")
    assert not torch.equal(unet.get_parameter(key), clean)

    backend = WebUIBackend()
    seen = {}

    class Probe(TrainingCallback):
        def on_step_end(self, info):
            seen.update(locked=forge.lock.locked(), weight=unet.get_parameter(key).detach().clone())

    def trainer(cfg, callbacks, **kwargs):
        seen["clip_skip"] = cfg.clip_skip
        return default_trainer(cfg, callbacks=[*callbacks, Probe()], **kwargs)

    monkeypatch.setattr(backend_module, "default_trainer", trainer)
    runner = JobRunner(trainer=backend.train, hooks=backend.job_hooks())
    torch.set_num_threads(2)
    cfg = run_config(forge, backend)
    job = runner.start(cfg, backend=backend.training_backend(cfg))
    assert job.wait(600)
    status = job.status()
    assert status.state == FINISHED, status.message
    assert seen["locked"] and seen["clip_skip"] == 2  # Forge's own setting, as the engine counts it
    assert torch.equal(seen["weight"], clean)  # trained on Forge's own weights, not the merged LoRA
    published = os.path.join(forge.shared.cmd_opts.lora_dir, "cats.safetensors")
    assert os.path.isfile(published) and metadata(published)["ss_clip_skip"] == "2"
    assert forge.listed == 1 and engine.current_lora_hash == str([])
    assert engine.forge_objects_after_applying_lora.unet is engine.forge_objects_original.unet
    assert not forge.lock.locked() and forge.state.calls == [("begin", "lora_trainer"), ("end",)]
    assert standin.attention_function is standin.attention_sage and torch.equal(unet.get_parameter(key), clean)
    assert forge.memory.outside_inference_mode == 0  # Forge's loader called as Forge calls it


def test_refresh_after_a_rewrite_drops_forges_applied_loras(forge):
    forge.sd_models.forge_model_reload()
    engine = forge.shared.sd_model
    engine.apply_loras({"diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)})
    assert engine.current_lora_hash != str([])
    ForgeHost().refresh_loras("cats")
    assert engine.current_lora_hash == str([]) and forge.listed == 1
    assert engine.forge_objects.unet is engine.forge_objects_original.unet
    assert engine.forge_objects_after_applying_lora.clip is engine.forge_objects_original.clip


def test_a_model_forge_keeps_off_the_gpu_trains_from_the_file_and_comes_back(forge):
    """Forge's loader leaves part of the UNet off the GPU (its low-VRAM memory state): the run frees Forge's
    model through Forge's unload, trains from the checkpoint file, loads Forge's model again, publishes."""
    forge.sd_models.forge_model_reload()
    engine_ref = weakref.ref(forge.shared.sd_model)
    unet_ref = weakref.ref(forge.shared.sd_model.forge_objects_original.unet.model.diffusion_model)
    load = forge.memory.load_models_gpu

    def partial_load(patchers, *args, **kwargs):
        load(patchers, *args, **kwargs)
        for patcher in patchers:
            if hasattr(patcher.model, "predictor"):
                patcher.model.model_lowvram = True

    forge.memory.load_models_gpu = partial_load
    backend = WebUIBackend()
    seen = {}

    class Probe(TrainingCallback):
        def on_step_end(self, info):
            gc.collect()
            seen.update(
                events=list(forge.events),
                freed=engine_ref() is None and unet_ref() is None,
                model=forge.sd_models.model_data.sd_model,
            )

    cfg = run_config(forge, backend, name="dogs")
    runner = JobRunner(
        trainer=lambda cfg, callbacks, **kw: backend.train(cfg, [*callbacks, Probe()], **kw), hooks=backend.job_hooks()
    )
    torch.set_num_threads(2)
    job = runner.start(cfg, backend=backend.training_backend(cfg))
    assert job.wait(600)
    status = job.status()
    assert status.state == FINISHED, status.message
    assert seen["events"] == ["reload", "unload"] and seen["freed"]
    assert isinstance(seen["model"], FakeInitialModel)
    assert forge.events == ["reload", "unload", "reload"]
    assert forge.shared.sd_model.forge_objects is not None  # Forge has its model again
    published = os.path.join(forge.shared.cmd_opts.lora_dir, "dogs.safetensors")
    assert os.path.isfile(published) and metadata(published)["ss_clip_skip"] == "2"
    assert forge.listed == 1 and not forge.lock.locked()


def test_what_neither_path_can_train_is_refused_before_any_work(forge):
    forge.sd_models.forge_model_reload()
    engine = forge.shared.sd_model
    engine.forge_objects_original.unet.model.predictor.prediction_type = "const"  # a flow-matching model
    backend = WebUIBackend()
    assert "Cannot train here" in backend.describe_model()
    with pytest.raises(Exception, match="only epsilon and v-prediction"):
        backend.training_backend(run_config(forge, backend))


def test_the_tab_makes_the_folder_forge_saves_shown_images_into(forge):
    """Neo saves every PIL image a component shows into its temp_dir setting's folder, which a fresh install
    lacks; the tab shows its loss plot from the start."""
    from lora_trainer.hosts.webui.facts import ensure_host_temp_dir

    folder = forge.tmp / "webui" / "tmp"
    forge.shared.opts.temp_dir = str(folder)
    ensure_host_temp_dir()
    assert folder.is_dir()
