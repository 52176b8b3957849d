"""``python -m lora_trainer ui`` serves the tab on the address it is given."""

import os
import queue
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
from waiting import CEILING_S

pytest.importorskip("gradio")

from lora_trainer.ui.standalone import DEFAULT_HOST, build_parser  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_listen_on_loopback_only():
    args = build_parser().parse_args([])
    assert args.host == DEFAULT_HOST == "127.0.0.1"
    args = build_parser().parse_args(["--host", "0.0.0.0", "--port", "9000", "--output-root", "/tmp/x"])
    assert (args.host, args.port, args.output_root) == ("0.0.0.0", 9000, "/tmp/x")


def test_cli_serves_the_tab(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=REPO, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_trainer", "ui", "--port", str(port), "--output-root", str(tmp_path / "loras")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: "queue.Queue" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    url, seen = f"http://127.0.0.1:{port}", []
    try:
        # The server prints its URL once it listens: that line, not the clock, says when to ask for the page.
        while (line := lines.get(timeout=CEILING_S)) is not None and url not in line:
            seen.append(line)
        assert line is not None, "the server exited before serving:\n" + "".join(seen)
        with urllib.request.urlopen(f"{url}/config", timeout=CEILING_S) as resp:
            page = resp.read().decode()
        assert "lora_trainer_train" in page and "lora_trainer_loss_plot" in page
        assert (tmp_path / "loras").is_dir()
    finally:
        proc.terminate()
        proc.wait(CEILING_S)
