"""Z-Image on a tiny random model saved as a Forge Neo user has it: the command line trains from those files, the
loss falls, resume is bit-exact, diffusers' own Z-Image LoRA loader reproduces our trained outputs from the file,
our text conditioning is the diffusers pipeline's, and the file's names are those ComfyUI/Forge Neo map."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from support.image_fixtures import REPO, assert_resume_equals_an_uninterrupted_run, train
from support.tiny_models import make_image_folder
from support.tiny_zimage import (
    build_tiny_zimage,
    save_diffusers_folder,
    save_forge_neo_layout,
    seed_qwen_tokenizer_cache,
)
from test_flux import flux_config
from test_lora_metadata import sdnext_version

from lora_trainer.models.families import ZIMAGE, family_at


@pytest.fixture
def forge_neo(tmp_path):
    """(transformer file, parts) of a tiny Z-Image in a Forge Neo ``models`` folder, tokenizer cached."""
    seed_qwen_tokenizer_cache(os.environ["HF_HUB_CACHE"])
    parts = build_tiny_zimage()
    return save_forge_neo_layout(parts, str(tmp_path / "models")), parts


def test_train_py_trains_from_the_forge_neo_folders(forge_neo, tmp_path):
    path, _parts = forge_neo
    assert family_at(path) is ZIMAGE
    make_image_folder(str(tmp_path / "data"), count=4)
    config = {
        "train_data_dir": str(tmp_path / "data"),
        "base_model": path,  # ae and qwen3 are found in models/VAE and models/text_encoder
        "output_dir": str(tmp_path / "out"),
        "resolution": 64,
        "batch_size": 2,
        "max_train_steps": 3,
        "lora_rank": 4,
        "lora_alpha": 2,
    }
    (tmp_path / "zimage.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--config", "zimage.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(str(tmp_path / "out" / "out.safetensors"), framework="pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    # Every Linear of every block, under the names ComfyUI's and Forge Neo's z_image_to_diffusers table maps.
    for block in ("layers.0", "noise_refiner.0"):
        for leaf in ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w2"):
            for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                assert f"diffusion_model.{block}.{leaf}{suffix}" in keys
        assert f"diffusion_model.{block}.adaLN_modulation.0.lora_up.weight" in keys
    assert "diffusion_model.context_refiner.0.feed_forward.w1.lora_down.weight" in keys
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert meta["ss_base_model_version"] == "zimage" and meta["modelspec.architecture"] == "z-image/lora"
    assert meta["ss_network_alpha"] == "2.0" and "modelspec.prediction_type" not in meta
    assert sdnext_version(meta) == "zimage"  # SD.Next's own rule
    assert "zimage" in proc.stdout


def test_loss_falls_on_a_memorisation_task(forge_neo, tmp_path):
    path, _parts = forge_neo
    cfg = flux_config(tmp_path, path, max_train_steps=40, learning_rate=3e-3, lora_rank=8, batch_size=4, seed=3)
    result = train(cfg)
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)


def test_resume_equals_an_uninterrupted_run(forge_neo, tmp_path):
    path, _parts = forge_neo
    overrides = dict(max_train_steps=4, batch_size=1, gradient_accumulation_steps=2, lora_dropout=0.1)
    assert_resume_equals_an_uninterrupted_run(
        lambda folder, **extra: flux_config(folder, path, **overrides, **extra), tmp_path
    )


def _diffusers_pipeline(parts, tokenizer):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=tokenizer,
        transformer=parts.transformer,
    )


def test_diffusers_zimage_lora_loader_reproduces_our_trained_outputs(forge_neo, tmp_path):
    """The trained file (alpha != rank) through ``ZImagePipeline.load_lora_weights`` into the untouched base:
    every module gets its LoRA and the transformer's outputs equal ours; our conditioning is the pipeline's."""
    from lora_trainer.export.lora_file import load_lora_file
    from lora_trainer.lora.network import LoRANetwork
    from lora_trainer.models.zimage import ZImageAdapter

    path, parts = forge_neo
    cfg = flux_config(tmp_path, path, max_train_steps=3, learning_rate=1e-2, lora_alpha=2)
    result = train(cfg)
    tensors, _ = load_lora_file(result.output_files[0])

    adapter = ZImageAdapter(path, ZIMAGE, device=torch.device("cpu"))
    adapter.load(unet=True, vae=False, text_encoders=True)
    network = LoRANetwork(adapter.lora_targets(False), rank=4, alpha=2)
    network.load_kohya_state_dict(ZIMAGE.from_lora_file(tensors), "trained file")
    captions = ["a picture of a cat", "red dog number 3"]
    cond = adapter.encode_text(captions, 0)
    g = torch.Generator().manual_seed(3)
    latents, sigmas = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        base_out = adapter.predict(latents, sigmas, cond)
        with network.attached():
            ours = adapter.predict(latents, sigmas, cond)

    pipe = _diffusers_pipeline(build_tiny_zimage(), adapter.tokenizer())  # the same seed: the untouched base
    embeddings = pipe._encode_prompt(captions, device=torch.device("cpu"))
    for i, embedding in enumerate(embeddings):
        torch.testing.assert_close(embedding, cond["text"][i][cond["mask"][i]], rtol=0, atol=0)
    with torch.no_grad():
        untouched = pipe.transformer(list(latents.unsqueeze(2).unbind(0)), 1 - sigmas, embeddings, return_dict=False)
    torch.testing.assert_close(-torch.stack(untouched[0]).squeeze(2), base_out, rtol=0, atol=0)
    pipe.load_lora_weights(tensors)
    applied = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert len(applied) == len(network.layers), (len(applied), len(network.layers))
    with torch.no_grad():
        theirs = pipe.transformer(list(latents.unsqueeze(2).unbind(0)), 1 - sigmas, embeddings, return_dict=False)
    theirs = -torch.stack(theirs[0]).squeeze(2)
    assert (ours - base_out).abs().max() > 1e-4, "the LoRA has no effect"
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_a_diffusers_folder_and_a_diffusers_layout_file_give_the_same_model(forge_neo, tmp_path):
    """The three ways users have Z-Image (original-layout file, diffusers-layout file, diffusers folder) are
    recognised and load to the same text conditioning, latents and predictions."""
    from safetensors.torch import save_file

    from lora_trainer.models.zimage import ZImageAdapter

    path, parts = forge_neo
    folder = save_diffusers_folder(parts, str(tmp_path / "Z-Image-Turbo"))
    flat = str(tmp_path / "models" / "Stable-diffusion" / "z_image_diffusers.safetensors")
    save_file({k: v.contiguous() for k, v in parts.transformer.state_dict().items()}, flat)
    g = torch.Generator().manual_seed(5)
    pixels, latents = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.randn(2, 16, 8, 8, generator=g)
    outputs = []
    for where in (path, flat, folder):
        assert family_at(where) is ZIMAGE, where
        adapter = ZImageAdapter(where, ZIMAGE, device=torch.device("cpu"))
        adapter.load(unet=True, vae=True, text_encoders=True)
        cond = adapter.encode_text(["a picture of a cat", "red dog"], 0)
        with torch.no_grad():
            outputs.append(
                (cond["text"], adapter.encode_pixels(pixels), adapter.predict(latents, torch.tensor([0.2, 0.6]), cond))
            )
    for other in outputs[1:]:
        for mine, theirs in zip(outputs[0], other):
            torch.testing.assert_close(theirs, mine, rtol=1e-6, atol=1e-6)


def test_file_names_round_trip_and_unknown_modules_are_refused():
    from lora_trainer.models.families.zimage import file_module_name, internal_module_name

    for name in (
        "layers.12.attention.to_out.0",
        "context_refiner.1.feed_forward.w3",
        "noise_refiner.0.adaLN_modulation.0",
    ):
        internal = internal_module_name("diffusion_model." + name)
        assert file_module_name(internal) == "diffusion_model." + name
    with pytest.raises(ValueError, match="t_embedder"):
        file_module_name("lora_unet_t_embedder_mlp_0")


def test_only_lora_is_offered_for_z_image_files():
    """Z-Image's file form (diffusion_model.<diffusers name>) has no LyCORIS layers: other types are refused
    with the option named; SD families take every registered type and their convolution blocks."""
    from lora_trainer.errors import ConfigError
    from lora_trainer.lora.registry import NETWORK_TYPE_NAMES
    from lora_trainer.models.families import SD1, SDXL, ZIMAGE

    ZIMAGE.check_network_type("lora")
    for kind in ("locon", "loha", "lokr", "dora"):
        with pytest.raises(ConfigError, match=f"network_type: '{kind}' is not supported for Z-Image"):
            ZIMAGE.check_network_type(kind)
    with pytest.raises(ConfigError, match="conv_rank"):
        ZIMAGE.check_network_type("lora", conv_rank=4)
    for family in (SD1, SDXL):
        for kind in NETWORK_TYPE_NAMES:
            family.check_network_type(kind, conv_rank=4)
