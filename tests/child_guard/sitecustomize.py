"""Imported by Python at start-up in the tests' child processes (this folder is put on their PYTHONPATH):
like the test process itself (tests/conftest.py), they may reach loopback addresses only."""

import socket

_real_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host in ("127.0.0.1", "localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    raise RuntimeError(f"a test's child process tried to reach the network: {address!r}")


socket.socket.connect = _loopback_only
