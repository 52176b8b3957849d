"""Test-wide guards: nothing may touch the network, nothing may reach a model hub, no test shares a model cache."""

import os
import socket
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class NetworkAccessError(RuntimeError):
    pass


_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    # Loopback is allowed (the UI tests serve a local app, gloo rendezvous on 127.0.0.1); anything else fails.
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host in ("127.0.0.1", "localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    raise NetworkAccessError(f"test tried to reach the network: {address!r}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    yield


@pytest.fixture(autouse=True)
def own_hf_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty Hugging Face cache of its own, so none reads (or fills) the machine's: set in the
    environment (child processes and a first import of huggingface_hub read it) and, once huggingface_hub is
    imported, in the constant it read at import (what lora_trainer.hub and huggingface_hub use)."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
