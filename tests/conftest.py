"""Test-wide guards: nothing may touch the network, and nothing may reach a model hub."""

import os
import socket

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
