"""The Hub download path for real, against a stand-in Hub on 127.0.0.1 (tests/hub_standin.py): first use
downloads with progress, later uses read the cache (also with the Hub stopped), and offline, unreachable,
gated, not-found and cut downloads each end in a message that says what to do.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME when it is imported, and derives more from them
(the hosts it sends the token to and follows redirects on), so each fetch runs in a child process
(tests/hub_client.py) started with its own environment and HF_HOME. The children may reach loopback only
(tests/child_guard). Runs in the main environment (huggingface_hub 2.x) and in the WebUI host's
(0.36, tools/run_host_tests.sh).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shlex
import socket
import subprocess
import sys
import threading

import pytest
from hub_standin import StandinHub, child_env
from waiting import CEILING_S

from lora_trainer.hub.progress import format_bytes

CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hub_client.py")

REPO_ID = "acme/tiny-captioner"
FILES = {
    "config.json": b'{"model_type": "tiny"}',
    "tokenizer_config.json": b'{"do_lower_case": true}',
    "model.safetensors": hashlib.sha256(b"weights").digest() * 10_000,  # 320 kB: served as an LFS file
    "README.md": b"# never downloaded",
    "tf_model.h5": b"\0" * 50_000,  # another format of the weights: never downloaded
}
NEEDED = ["config.json", "model.safetensors", "tokenizer_config.json"]
SPEC = {
    "ref": REPO_ID,
    "required": [["config.json"], ["model.safetensors", "pytorch_model.bin"]],
    "optional": ["tokenizer*"],
}


def fetch(spec: dict, env: dict):
    """Run the client; (its JSON events, the completed process)."""
    proc = subprocess.run(
        [sys.executable, CLIENT, json.dumps(spec)], env=env, capture_output=True, text=True, timeout=CEILING_S
    )
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert events and events[-1]["event"] in ("result", "error"), proc.stderr[-3000:]
    return events, proc


def result_folder(events) -> str:
    assert events[-1]["event"] == "result", events[-1]
    return events[-1]["folder"]


def error_of(events) -> dict:
    assert events[-1]["event"] == "error", events[-1]
    assert "\n" not in events[-1]["message"]
    return events[-1]


def cache_dir(tmp_path) -> str:
    return str(tmp_path / "hf" / "hub")


def repo_cache(tmp_path, repo_id: str = REPO_ID) -> str:
    return os.path.join(cache_dir(tmp_path), "models--" + repo_id.replace("/", "--"))


def read(folder: str, name: str) -> bytes:
    with open(os.path.join(folder, name), "rb") as fh:
        return fh.read()


@pytest.fixture
def hub():
    with StandinHub() as standin:
        standin.add(REPO_ID, FILES)
        yield standin


def test_first_use_downloads_with_progress_then_the_cache_serves_it_with_the_hub_stopped(tmp_path, hub):
    # TQDM_POSITION=-1: huggingface_hub's bars show although stderr is a pipe here (on a terminal they always do).
    env = child_env(tmp_path, hub.url, TQDM_POSITION="-1")
    events, proc = fetch(SPEC, env)
    folder = result_folder(events)
    assert folder.startswith(cache_dir(tmp_path) + os.sep)  # the standard cache under this test's HF_HOME
    for name in NEEDED:
        assert read(folder, name) == FILES[name]
    assert sorted(hub.downloaded()) == NEEDED  # only what the use needs: no README.md, no tf_model.h5

    progress = [e for e in events if e["event"] == "progress"]
    total = sum(len(FILES[n]) for n in NEEDED)
    assert progress[0]["done_bytes"] == 0 and progress[0]["total_bytes"] == total and progress[0]["file_count"] == 3
    assert {e["filename"] for e in progress if not e["finished"]} == set(NEEDED)
    assert [e["done_bytes"] for e in progress] == sorted(e["done_bytes"] for e in progress)
    assert progress[-1]["finished"] and progress[-1]["done_bytes"] == total
    # On the terminal: our line before the download, and huggingface_hub's own bar for the weights.
    assert f"downloading 3 file(s) ({format_bytes(total)}) of {REPO_ID}" in proc.stderr
    assert "model.safetensors" in proc.stderr and "100%" in proc.stderr

    requests_before = len(hub.requests)
    hub.stop()
    events, _ = fetch(SPEC, env)
    assert result_folder(events) == folder and not [e for e in events if e["event"] == "progress"]
    events, _ = fetch(SPEC, dict(env, HF_HUB_OFFLINE="1"))
    assert result_folder(events) == folder
    assert len(hub.requests) == requests_before


def test_offline_with_an_empty_cache_names_the_files_and_where_they_go(tmp_path, hub):
    events, _ = fetch(SPEC, child_env(tmp_path, hub.url, HF_HUB_OFFLINE="1"))
    error = error_of(events)
    assert error["type"] == "HubUnavailableError"
    message = error["message"]
    assert REPO_ID in message and "HF_HUB_OFFLINE=1" in message and cache_dir(tmp_path) in message
    assert f"hf download {REPO_ID} config.json model.safetensors 'tokenizer*'" in message
    assert hub.requests == []  # offline means no request at all


def test_the_offline_message_command_fills_the_cache_for_an_offline_machine(tmp_path, hub):
    events, _ = fetch(SPEC, child_env(tmp_path, hub.url, HF_HUB_OFFLINE="1"))
    message = error_of(events)["message"]
    command = shlex.split(message.split("`")[1])  # the `hf download ...` the message gives
    assert command[:2] == ["hf", "download"]
    hf = os.path.join(os.path.dirname(sys.executable), "hf")
    online = child_env(tmp_path / "connected_machine", hub.url)
    done = subprocess.run([hf, *command[1:]], env=online, capture_output=True, text=True, timeout=CEILING_S)
    assert done.returncode == 0, done.stderr[-3000:]
    # The offline machine gets a copy of that cache.
    os.rename(tmp_path / "connected_machine" / "hf", tmp_path / "hf")
    hub.stop()
    events, _ = fetch(SPEC, child_env(tmp_path, hub.url, HF_HUB_OFFLINE="1"))
    assert read(result_folder(events), "model.safetensors") == FILES["model.safetensors"]


def test_an_unreachable_hub_says_so_and_what_to_do(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = error_of(fetch(SPEC, child_env(tmp_path, f"http://127.0.0.1:{port}"))[0])
    assert error["type"] == "HubUnavailableError"
    assert "could not be reached" in error["message"] and "hf download" in error["message"]


def test_gated_repo_401_says_accept_the_licence_and_set_hf_token(tmp_path, hub):
    hub.add("acme/gated-model", FILES, gated_token="hf_test_secret")
    spec = dict(SPEC, ref="acme/gated-model")
    error = error_of(fetch(spec, child_env(tmp_path, hub.url))[0])
    assert error["type"] == "HubGatedError"
    assert f"{hub.url}/acme/gated-model" in error["message"]
    assert "accept its licence" in error["message"] and "HF_TOKEN" in error["message"]
    # With the token the same call downloads; the token goes to the Hub, never to the CDN it redirects to.
    events, _ = fetch(spec, child_env(tmp_path, hub.url, HF_TOKEN="hf_test_secret"))
    assert read(result_folder(events), "model.safetensors") == FILES["model.safetensors"]
    sent = [(server, {k.lower(): v for k, v in headers.items()}) for server, _, _, headers in hub.requests]
    assert any(h.get("authorization") == "Bearer hf_test_secret" for server, h in sent if server == "hub")
    assert not any("authorization" in h for server, h in sent if server == "cdn")


def test_not_found_names_the_reference_as_given(tmp_path, hub):
    env = child_env(tmp_path, hub.url)
    error = error_of(fetch(dict(SPEC, ref="acme/no-such-model"), env)[0])
    assert error["type"] == "HubNotFoundError"
    assert "acme/no-such-model" in error["message"] and "no such repository" in error["message"]
    error = error_of(fetch(dict(SPEC, ref=f"{REPO_ID}@v9"), env)[0])
    assert error["type"] == "HubNotFoundError" and "has no revision 'v9'" in error["message"]
    error = error_of(fetch(dict(SPEC, required=[["model.onnx"]]), env)[0])
    assert error["type"] == "HubNotFoundError" and f"{REPO_ID} has no model.onnx" in error["message"]
    assert "config.json" in error["message"]  # what the repository holds instead
    assert hub.downloaded() == []


def test_a_connection_cut_mid_file_resumes_to_an_intact_file(tmp_path, hub):
    hub.cut_once["model.safetensors"] = 100_000
    events, _ = fetch(SPEC, child_env(tmp_path, hub.url))
    assert read(result_folder(events), "model.safetensors") == FILES["model.safetensors"]
    assert "model.safetensors" not in hub.cut_once  # the cut happened


def _blobs_are_complete(tmp_path, files) -> None:
    """Every finished blob in the cache is exactly one of the repository's files: partial data only ever
    sits under a temporary ``.incomplete`` name, which no lookup takes for a file."""
    blobs = os.path.join(repo_cache(tmp_path), "blobs")
    contents = {hashlib.sha256(data).hexdigest() for data in files.values()}
    for name in os.listdir(blobs):
        if not name.endswith(".incomplete"):
            with open(os.path.join(blobs, name), "rb") as fh:
                assert hashlib.sha256(fh.read()).hexdigest() in contents, name


def test_a_download_killed_mid_file_leaves_nothing_a_later_run_takes_for_complete(tmp_path, hub):
    big = dict(FILES, **{"model.safetensors": os.urandom(24_000_000)})
    hub.add(REPO_ID, big)
    hub.hold["model.safetensors"] = 12_000_000  # huggingface_hub writes in 10 MB chunks: one lands on disk
    env = child_env(tmp_path, hub.url)
    child = subprocess.Popen(
        [sys.executable, CLIENT, json.dumps(SPEC)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True).start()
    try:
        start = None
        while True:  # until the progress report shows the weights part-way
            event = json.loads(lines.get(timeout=CEILING_S))
            assert event["event"] == "progress", event
            if event["filename"] == "model.safetensors":
                start = event["done_bytes"] if start is None else start
                if event["done_bytes"] > start:
                    break
        assert 0 < event["done_bytes"] - start < len(big["model.safetensors"])
        assert event["total_bytes"] == sum(len(big[n]) for n in NEEDED)
    finally:
        child.kill()
        child.wait()
        hub.release.set()

    snapshot = os.path.join(repo_cache(tmp_path), "snapshots")
    assert not any("model.safetensors" in files for _, _, files in os.walk(snapshot))
    assert not os.path.exists(os.path.join(repo_cache(tmp_path), "refs", "main"))
    _blobs_are_complete(tmp_path, big)
    error = error_of(fetch(SPEC, dict(env, HF_HUB_OFFLINE="1"))[0])  # offline: not taken for a cached model
    assert error["type"] == "HubUnavailableError" and "model.safetensors" in error["message"]
    events, _ = fetch(SPEC, env)  # online: fetched again, whole
    assert read(result_folder(events), "model.safetensors") == big["model.safetensors"]
    _blobs_are_complete(tmp_path, big)
