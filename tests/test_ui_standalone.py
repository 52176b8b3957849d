"""``python -m lora_trainer ui`` serves the tab on the address it is given."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

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
    env = dict(os.environ, PYTHONPATH=REPO, GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_trainer", "ui", "--port", str(port), "--output-root", str(tmp_path / "loras")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, page = time.time() + 60, ""
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as resp:
                    page = resp.read().decode()
                break
            except OSError:
                time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read()
        assert "lora_trainer_train" in page and "lora_trainer_loss_plot" in page
        assert (tmp_path / "loras").is_dir()
    finally:
        proc.terminate()
        proc.wait(10)
