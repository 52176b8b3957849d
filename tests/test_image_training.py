"""Image training end to end on tiny models: the seed config, learning, resume, incremental training."""

import glob
import os
import subprocess
import sys

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from support.image_fixtures import REPO, StopAfter, image_config, tiny_checkpoint, train
from support.tiny_models import make_image_folder
from waiting import CEILING_S

from lora_trainer.export.lora_file import safetensors_data_hash

SEED_CONFIG = """\
train_data_dir: "./data/cyberpunk_train"
metadata_path: "./data/cyberpunk_train/metadata.csv"
base_model: "./models/Stable-diffusion/v1-5-pruned.safetensors"
lora_rank: 8
task_type: "image-generation"
batch_size: 4
epochs: 10
learning_rate: 2e-4
output_dir: "./output/cyberpunk_style"
save_steps: 100
"""


def test_seed_config_trains_from_the_command_line(tmp_path):
    os.makedirs(tmp_path / "models" / "Stable-diffusion")
    checkpoint = tiny_checkpoint(tmp_path / "models" / "Stable-diffusion")
    os.rename(checkpoint, tmp_path / "models" / "Stable-diffusion" / "v1-5-pruned.safetensors")
    make_image_folder(str(tmp_path / "data" / "cyberpunk_train"), count=4, size=(96, 64))
    (tmp_path / "my.yaml").write_text(SEED_CONFIG)
    # The seed config trains at its default 512 px; the test images are small, so the run stays quick.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--config", "my.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=CEILING_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "output" / "cyberpunk_style"
    for name in ("pytorch_lora_weights.safetensors", "cyberpunk_style.safetensors", "config.yaml"):
        assert (out / name).is_file(), name
    assert glob.glob(str(out / "logs" / "events.out.tfevents.*"))
    snapshot = yaml.safe_load((out / "config.yaml").read_text())
    assert snapshot["learning_rate"] == 2e-4 and snapshot["lora_rank"] == 8 and snapshot["resolution"] == 512
    assert "dataset: 4 images" in proc.stdout
    with safe_open(str(out / "cyberpunk_style.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert meta["ss_output_name"] == "cyberpunk_style" and meta["ss_network_dim"] == "8"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_steps"] == "10" and meta["ss_num_train_images"] == "4"
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    downs = {k.rsplit(".", 2)[0] for k in keys if k.endswith("lora_down.weight")}
    assert downs == {k[: -len(".alpha")] for k in keys if k.endswith(".alpha")}
    assert not any(b in k for k in keys for b in ("conv_in", "conv_out", "time_emb", "add_emb"))
    blob = (out / "cyberpunk_style.safetensors").read_bytes()
    assert meta["sshs_model_hash"] == safetensors_data_hash(blob)


def test_loss_falls_on_a_memorisation_task(tmp_path):
    # The SD2-v model: its v target carries the images themselves, which a LoRA on a random toy UNet can
    # memorise (an eps target is pure noise there and its loss floor hides any learning).
    base = tiny_checkpoint(tmp_path, "sd2")
    cfg = image_config(
        tmp_path, base, max_train_steps=60, learning_rate=3e-3, lora_rank=8, batch_size=4, seed=3, save_state=False
    )
    result = train(cfg)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def _lora(path):
    return load_file(path)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    base = tiny_checkpoint(tmp_path)
    overrides = dict(
        max_train_steps=6,
        gradient_accumulation_steps=2,
        batch_size=1,
        lora_dropout=0.1,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        shuffle_caption=True,
        caption_dropout_rate=0.3,
    )
    full = train(image_config(tmp_path / "a", base, **overrides))
    stopped = train(image_config(tmp_path / "b", base, **overrides), callbacks=[StopAfter(3)])
    assert stopped.status == "cancelled" and stopped.step == 3
    state = tmp_path / "b" / "out" / "state-3"
    resumed = train(image_config(tmp_path / "b", base, resume=str(state), **overrides))
    assert resumed.status == "finished" and resumed.step == 6
    a, b = _lora(full.output_files[0]), _lora(resumed.output_files[0])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_network_weights_starts_exactly_from_the_given_file(tmp_path):
    base = tiny_checkpoint(tmp_path)
    first = train(image_config(tmp_path / "a", base, lora_rank=4, lora_alpha=2))
    start = _lora(first.output_files[0])
    # A different rank in the config: the file's rank and alpha win; with a zero learning rate nothing moves.
    again = train(
        image_config(
            tmp_path / "b",
            base,
            lora_rank=16,
            network_weights=first.output_files[0],
            learning_rate=0.0,
            max_train_steps=1,
        )
    )
    end = _lora(again.output_files[0])
    assert end.keys() == start.keys()
    for key in start:
        torch.testing.assert_close(end[key], start[key], rtol=0, atol=0, msg=key)
    assert next(v for k, v in end.items() if k.endswith("lora_down.weight")).shape[0] == 4
    assert float(next(v for k, v in end.items() if k.endswith(".alpha"))) == 2.0
    moved = train(image_config(tmp_path / "c", base, network_weights=first.output_files[0], max_train_steps=1))
    assert any(not torch.equal(_lora(moved.output_files[0])[k], start[k]) for k in start)


def test_second_run_uses_the_disk_cache_without_loading_encoders(tmp_path, monkeypatch):
    base = tiny_checkpoint(tmp_path)
    # One epoch (4 images, batches of 2): latents encoded during training are all cached by its end.
    cfg = image_config(tmp_path, base, cache_to_disk=True, max_train_steps=2)
    first = train(cfg)
    from lora_trainer.models import diffusers_adapter

    loads = []
    original = diffusers_adapter.DiffusersAdapter.load

    def spy(self, *, unet, vae, text_encoders):
        loads.append((unet, vae and self.vae is None, text_encoders and self.text_encoders is None))
        return original(self, unet=unet, vae=vae, text_encoders=text_encoders)

    monkeypatch.setattr(diffusers_adapter.DiffusersAdapter, "load", spy)
    second = train(image_config(tmp_path, base, cache_to_disk=True, max_train_steps=2))
    assert not any(vae or te for _, vae, te in loads), loads
    a, b = _lora(first.output_files[0]), _lora(second.output_files[0])
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_lora_layers_detach_leaving_the_model_exactly_as_it_was(tmp_path):
    from lora_trainer.lora.network import LoRANetwork
    from lora_trainer.models.diffusers_adapter import DiffusersAdapter

    adapter = DiffusersAdapter(tiny_checkpoint(tmp_path), device=torch.device("cpu"))
    adapter.load(unet=True, vae=False, text_encoders=True)
    before = {k: v.clone() for k, v in adapter.unet.state_dict().items()}
    names = [n for n, _ in adapter.unet.named_modules()]
    network = LoRANetwork(adapter.lora_targets(True), rank=4, alpha=4)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 77, 64)
    base = adapter.unet(x, t, ctx).sample
    with network.attached():
        assert not torch.allclose(adapter.unet(x, t, ctx).sample, base)
        assert [n for n, _ in adapter.unet.named_modules()] == names
    assert all("forward" not in m.__dict__ for m in adapter.unet.modules())
    torch.testing.assert_close(adapter.unet(x, t, ctx).sample, base, rtol=0, atol=0)
    after = adapter.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
