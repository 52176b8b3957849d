"""The REST routes the WebUI glue mounts: auth, path safety, start/status/cancel (fake trainer and backend)."""

import base64
import os
import threading

import pytest
from waiting import CEILING_S, wait_until

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lora_trainer.hosts import rest_api  # noqa: E402
from lora_trainer.jobs import JobRunner  # noqa: E402
from lora_trainer.train.backend import TrainingBackend  # noqa: E402
from lora_trainer.train.callbacks import StepInfo  # noqa: E402
from lora_trainer.train.result import TrainingResult  # noqa: E402
from lora_trainer.ui.backend import UiBackend  # noqa: E402

P = rest_api.PREFIX


HOST_BACKEND = TrainingBackend(adapter="host")  # what the stand-in host hands the trainer


class FakeBackend(UiBackend):
    """A host with a Lora folder and a job folder under tmp_path."""

    def __init__(self, root):
        self.root = str(root)
        self.kwargs_calls = []

    def lora_dir(self):
        return os.path.join(self.root, "models", "Lora")

    def default_output_dir(self, output_name):
        return os.path.join(self.root, "outputs", "lora_trainer", output_name)

    def final_lora_path(self, cfg):
        return os.path.join(self.lora_dir(), cfg.output_name + ".safetensors")

    def resolve_base_model(self, typed):
        return "/models/loaded.safetensors"

    def training_backend(self, cfg, preview=None):
        self.kwargs_calls.append((cfg, preview))
        return HOST_BACKEND


class GatedTrainer:
    """Steps only when the test releases the gate; writes its file into output_dir when it finishes."""

    def __init__(self, steps=3):
        self.steps = steps
        self.gate = threading.Semaphore(0)
        self.kwargs = None

    def __call__(self, cfg, callbacks, **kwargs):
        self.kwargs = kwargs
        for cb in callbacks:
            cb.on_train_start(self.steps, 0, {})
        for step in range(1, self.steps + 1):
            assert self.gate.acquire(timeout=CEILING_S)
            info = StepInfo(step=step, total_steps=self.steps, epoch=1, loss=0.5 / step, lr=1e-4, elapsed_s=0.1)
            for cb in callbacks:
                cb.on_step_end(info)
            if any(cb.should_stop() for cb in callbacks):
                return TrainingResult("cancelled", step, [], "", [])
        os.makedirs(cfg.output_dir, exist_ok=True)
        path = os.path.join(cfg.output_dir, cfg.output_name + ".safetensors")
        with open(path, "wb") as fh:
            fh.write(b"lora")
        return TrainingResult("finished", self.steps, [path], "", [])


def make_client(tmp_path, credentials=None, trainer=None):
    backend = FakeBackend(tmp_path)
    trainer = trainer or GatedTrainer()
    runner = JobRunner(trainer=trainer)
    app = fastapi.FastAPI()
    rest_api.mount(app, runner, backend, credentials)
    return TestClient(app), runner, backend, trainer


def body(tmp_path, **config):
    cfg = {"train_data_dir": str(tmp_path / "data"), "output_name": "cats", "max_train_steps": 3}
    cfg.update(config)
    return {"config": cfg}


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def wait_for(predicate) -> bool:
    wait_until(predicate, "the REST API to report the state")
    return True


# --- auth --------------------------------------------------------------------------------------------------
def test_auth_required_when_configured(tmp_path):
    client, *_ = make_client(tmp_path, credentials={"alice": "s3cret", "bob": "pw"})
    for method, route in (("get", "/status"), ("post", "/cancel"), ("post", "/train")):
        r = getattr(client, method)(P + route)
        assert r.status_code == 401, route
        assert r.headers["www-authenticate"] == "Basic"
        assert "api-auth" in r.json()["error"]
    assert client.get(P + "/status", headers=basic("alice", "wrong")).status_code == 401
    assert client.get(P + "/status", headers=basic("mallory", "s3cret")).status_code == 401
    assert client.get(P + "/status", headers={"Authorization": "Basic !!notbase64"}).status_code == 401
    assert client.get(P + "/status", headers={"Authorization": "Bearer x"}).status_code == 401
    assert client.get(P + "/status", headers=basic("alice", "s3cret")).status_code == 200
    assert client.get(P + "/status", headers=basic("bob", "pw")).json()["state"] == "idle"


def test_open_when_no_credentials(tmp_path):
    client, *_ = make_client(tmp_path)
    r = client.get(P + "/status")
    assert r.status_code == 200 and r.json()["state"] == "idle"


def test_parse_api_auth_matches_host_format():
    from lora_trainer.hosts.webui import parse_api_auth

    assert parse_api_auth("u1:p1,u2:p:2") == {"u1": "p1", "u2": "p:2"}
    assert parse_api_auth(None) == {} and parse_api_auth("") == {}


# --- path safety ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"output_name": "../evil"}, "not allowed"),
        ({"output_name": "a/b"}, "not allowed"),
        ({"output_name": ".hidden"}, "not allowed"),
        ({"output_dir": "/tmp/x/../../etc"}, "'..'"),
        ({"output_dir": "relative/out"}, "absolute"),
        ({"output_dir": "/etc/lora_out"}, "must be inside"),
        ({"logging_dir": "/tmp/elsewhere"}, "logging_dir must be inside"),
        ({"cache_dir": "/tmp/elsewhere"}, "cache_dir must be inside"),
        ({"task_type": "text-generation"}, "image LoRAs"),
        ({"no_such_option": 1}, "Unknown key"),
    ],
)
def test_writes_outside_allowed_folders_are_refused(tmp_path, config, fragment):
    client, runner, backend, _ = make_client(tmp_path)
    r = client.post(P + "/train", json=body(tmp_path, **config))
    assert r.status_code == 400, r.json()
    assert fragment in r.json()["error"]
    assert runner.current_job is None and not backend.kwargs_calls


def test_symlink_escape_is_refused(tmp_path):
    client, runner, backend, _ = make_client(tmp_path)
    jobs = os.path.join(str(tmp_path), "outputs", "lora_trainer")
    os.makedirs(jobs)
    os.symlink("/etc", os.path.join(jobs, "link"))
    r = client.post(P + "/train", json=body(tmp_path, output_dir=os.path.join(jobs, "link", "x")))
    assert r.status_code == 400 and "must be inside" in r.json()["error"]


def test_defaults_keep_every_write_in_the_job_folder(tmp_path):
    client, runner, backend, trainer = make_client(tmp_path)
    r = client.post(P + "/train", json=body(tmp_path))
    assert r.status_code == 200, r.json()
    cfg, preview = backend.kwargs_calls[0]
    assert cfg.output_dir == backend.default_output_dir("cats")
    assert cfg.cache_dir == os.path.join(cfg.output_dir, "cache")  # not the dataset folder
    assert cfg.base_model == "/models/loaded.safetensors" and preview is None
    assert r.json()["lora_file"] == os.path.join(backend.lora_dir(), "cats.safetensors")
    trainer.gate.release(3)
    assert runner.wait(CEILING_S)


def test_output_inside_lora_folder_is_allowed(tmp_path):
    client, runner, backend, trainer = make_client(tmp_path)
    out = os.path.join(backend.lora_dir(), "cats_job")
    r = client.post(P + "/train", json=body(tmp_path, output_dir=out, logging_dir=os.path.join(out, "logs")))
    assert r.status_code == 200, r.json()
    trainer.gate.release(3)
    assert runner.wait(CEILING_S)


def test_existing_lora_needs_overwrite(tmp_path):
    client, runner, backend, trainer = make_client(tmp_path)
    os.makedirs(backend.lora_dir())
    open(os.path.join(backend.lora_dir(), "cats.safetensors"), "wb").close()
    r = client.post(P + "/train", json=body(tmp_path))
    assert r.status_code == 409 and "already exists" in r.json()["error"]
    r = client.post(P + "/train", json={**body(tmp_path), "overwrite": True})
    assert r.status_code == 200
    trainer.gate.release(3)
    assert runner.wait(CEILING_S)


def test_overwrite_drops_the_old_runs_states_and_a_refusal_keeps_them(tmp_path):
    """The start path the tab shares: overwriting a LoRA removes the earlier run's resumable states with it."""
    client, runner, backend, trainer = make_client(tmp_path)
    os.makedirs(backend.lora_dir())
    open(os.path.join(backend.lora_dir(), "cats.safetensors"), "wb").close()
    state = os.path.join(backend.default_output_dir("cats"), "state-00000002")
    os.makedirs(state)
    assert client.post(P + "/train", json=body(tmp_path)).status_code == 409
    assert os.path.isdir(state)
    r = client.post(P + "/train", json={**body(tmp_path), "overwrite": True})
    assert r.status_code == 200 and os.path.normpath(r.json()["output_dir"]) == os.path.dirname(state)
    assert not os.path.exists(state)
    trainer.gate.release(3)
    assert runner.wait(CEILING_S)


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({"cfg": {}}, "Unknown field"),
        ({}, "config is required"),
        ({"config": "- a\n- list"}, "mapping"),
        ({"config": "a: [unclosed"}, "not valid YAML"),
        ({"config": {"output_name": "x"}, "overwrite": "yes"}, "overwrite"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_bodies_get_clear_errors(tmp_path, payload, fragment):
    client, *_ = make_client(tmp_path)
    r = client.post(P + "/train", json=payload)
    assert r.status_code == 400 and fragment in r.json()["error"], r.json()


def test_non_json_body(tmp_path):
    client, *_ = make_client(tmp_path)
    r = client.post(P + "/train", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]


# --- start / status / cancel ---------------------------------------------------------------------------------
def test_start_status_finish_with_yaml_config(tmp_path):
    client, runner, backend, trainer = make_client(tmp_path)
    yaml_text = f"train_data_dir: {tmp_path / 'data'}\noutput_name: dogs\nlearning_rate: 2e-4\n"
    r = client.post(P + "/train", json={"config": yaml_text, "preview": {"every_n_steps": 2}})
    assert r.status_code == 200, r.json()
    assert r.json()["output_name"] == "dogs" and r.json()["status"]["state"] == "running"
    cfg, preview = backend.kwargs_calls[0]
    assert cfg.learning_rate == 2e-4 and preview == {"every_n_steps": 2}
    trainer.gate.release(1)
    assert wait_for(lambda: client.get(P + "/status").json()["step"] == 1)
    status = client.get(P + "/status?history=1").json()
    assert status["running"] and status["total"] == 3 and status["losses"] == [0.5]
    assert "losses" not in client.get(P + "/status").json()
    trainer.gate.release(2)
    assert runner.wait(CEILING_S)
    done = client.get(P + "/status").json()
    assert done["state"] == "finished" and done["output_files"][0].endswith("dogs.safetensors")
    assert trainer.kwargs == {"backend": HOST_BACKEND}


def test_second_start_refused_then_cancel(tmp_path):
    client, runner, backend, trainer = make_client(tmp_path)
    assert client.post(P + "/train", json=body(tmp_path)).status_code == 200
    r = client.post(P + "/train", json=body(tmp_path, output_name="other"))
    assert r.status_code == 409 and "already in progress" in r.json()["error"]
    r = client.post(P + "/cancel")
    assert r.status_code == 200 and r.json()["cancelled"] is True
    trainer.gate.release(1)
    assert runner.wait(CEILING_S)
    assert client.get(P + "/status").json()["state"] == "cancelled"
    assert client.post(P + "/cancel").json() == {**client.post(P + "/cancel").json(), "cancelled": False}


def test_unexpected_error_is_json_500(tmp_path):
    client, runner, backend, _ = make_client(tmp_path)

    def boom(cfg, preview=None):
        raise RuntimeError("adapter exploded")

    backend.training_backend = boom
    r = client.post(P + "/train", json=body(tmp_path))
    assert r.status_code == 500 and "adapter exploded" in r.json()["error"]
