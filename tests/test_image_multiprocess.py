"""``accelerate launch --cpu --num_processes 2 train.py`` trains data-parallel (gloo); only rank 0 writes."""

import glob
import os
import socket
import subprocess
import sys

import yaml
from safetensors.torch import load_file
from support.image_fixtures import REPO, tiny_checkpoint
from support.tiny_models import make_image_folder
from waiting import CEILING_S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path, name, base):
    data = tmp_path / "data"
    if not data.exists():
        make_image_folder(str(data), count=4)
    cfg = {
        "train_data_dir": str(data),
        "base_model": base,
        "output_dir": str(tmp_path / name),
        "resolution": 64,
        "batch_size": 1,
        "lora_rank": 4,
        "max_train_steps": 3,
        "save_steps": 2,
        "learning_rate": 1e-3,
        "cache_to_disk": False,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_cpu_processes_train_data_parallel_and_only_rank_zero_writes(tmp_path):
    base = tiny_checkpoint(tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [
        accelerate,
        "launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        os.path.join(REPO, "train.py"),
        "--config",
        str(_config(tmp_path, "ddp", base)),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=CEILING_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "ddp"
    assert sorted(os.listdir(out)) == [
        "config.yaml",
        "ddp-step00000002.safetensors",
        "ddp.safetensors",
        "logs",
        "pytorch_lora_weights.safetensors",
        "state-2",
        "state-3",
    ]
    assert len(glob.glob(str(out / "logs" / "events.out.tfevents.*"))) == 1
    assert proc.stdout.count("dataset: 4 images") == 1  # only the main process reports
    assert "in 2 process(es)" in proc.stdout

    single = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--config", str(_config(tmp_path, "single", base))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=CEILING_S,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    ddp, one = load_file(out / "ddp.safetensors"), load_file(tmp_path / "single" / "single.safetensors")
    assert ddp.keys() == one.keys()
    assert all(ddp[k].shape == one[k].shape for k in ddp)
    assert any(ddp[k].abs().sum() > 0 for k in ddp if k.endswith("lora_up.weight"))
