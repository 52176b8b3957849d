"""Flux.1 on a tiny random model saved as WebUI users have it: the command line trains from those files, the loss
falls, resume is bit-exact, diffusers' own Flux LoRA loader reproduces our trained outputs, our BFL-layout
transformer equals diffusers' implementation, and the flow-matching pair is the reference formula."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from support.image_fixtures import REPO, assert_resume_equals_an_uninterrupted_run, train
from support.tiny_flux import build_tiny_flux, save_webui_layout, seed_t5_tokenizer_cache
from support.tiny_models import make_image_folder
from test_lora_metadata import forge_version, sdnext_version

from lora_trainer.config import config_from_dict
from lora_trainer.models.flux.names import diffusers_to_bfl
from lora_trainer.models.flux.transformer import FluxParams, FluxTransformer, image_ids, pack_latents
from lora_trainer.train.loss_weights import LossWeights
from lora_trainer.train.objectives import FlowMatchingObjective, flow_matching_pair


@pytest.fixture
def webui(tmp_path):
    """(models folder, transformer file, parts) of a tiny Flux.1 [dev] in a WebUI's layout, tokenizer cached."""
    seed_t5_tokenizer_cache(os.environ["HF_HUB_CACHE"])
    parts = build_tiny_flux(guidance=True)
    models = tmp_path / "models"
    return models, save_webui_layout(parts, str(models)), parts


def flux_config(tmp_path, base, **overrides):
    data = str(tmp_path / "data")
    if not os.path.isdir(data):
        make_image_folder(data, count=4)
    raw = {
        "train_data_dir": data,
        "base_model": base,
        "output_dir": str(tmp_path / "out"),
        "resolution": 64,
        "batch_size": 2,
        "lora_rank": 4,
        "learning_rate": 1e-3,
        "max_train_steps": 4,
        "save_precision": "float",
        "cache_to_disk": False,
    }
    raw.update(overrides)
    return config_from_dict(raw)


def test_our_bfl_transformer_equals_diffusers_flux(webui):
    _models, path, parts = webui
    state = load_file(path)
    ours = FluxTransformer(FluxParams.from_shapes({k: tuple(v.shape) for k, v in state.items()}))
    ours.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, 6, generator=g)
    img, ids = pack_latents(latents), image_ids(2, 8, 6)
    txt, txt_ids = torch.randn(2, 5, 32, generator=g), torch.zeros(2, 5, 3)
    y, t, guidance = torch.randn(2, 32, generator=g), torch.tensor([0.2, 0.8]), torch.tensor([1.0, 3.5])
    with torch.no_grad():
        mine = ours.eval()(img, ids, txt, txt_ids, t, y, guidance)
        theirs = parts.transformer(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=ids[0],
            txt_ids=txt_ids[0],
            guidance=guidance,
            return_dict=False,
        )[0]
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_flow_matching_noises_and_targets_as_the_reference_formula():
    x0 = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]])
    noise = torch.tensor([[[[0.25, 1.0], [-1.0, 2.0]]]])
    noisy, target = flow_matching_pair(x0, noise, torch.tensor([0.25]))
    torch.testing.assert_close(noisy, torch.tensor([[[[0.8125, -1.25], [0.125, 0.5]]]]))  # 0.75·x0 + 0.25·n
    torch.testing.assert_close(target, torch.tensor([[[[-0.75, 3.0], [-1.5, 2.0]]]]))  # n − x0
    # The objective draws t and the noise from the step's generator and compares with noise − x0.
    seen = {}

    def predict(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    latents = torch.randn(3, 16, 4, 4)
    loss = FlowMatchingObjective("sigmoid").loss(latents, predict, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    n = torch.randn(latents.shape, generator=g)
    t = torch.sigmoid(torch.randn((3,), generator=g))
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], (1 - t.view(-1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1) * n)
    torch.testing.assert_close(loss, ((n - latents) ** 2).mean())


def test_flow_matching_takes_fixed_validation_timesteps_and_loss_weights():
    """The validation loss measures at fixed noise levels (sd-scripts' 200..800 of 1000 as t = 0.2..0.8), and
    regularisation weights and loss masks weigh the flow loss per sample and per latent pixel."""
    objective = FlowMatchingObjective("sigmoid")
    assert objective.validation_timesteps() == [0.2, 0.4, 0.6, 0.8]
    latents = torch.randn(2, 16, 4, 4)
    seen = {}

    def predict(x_t, t):
        seen["t"] = t
        return torch.zeros_like(x_t)

    fixed = torch.full((2,), 0.4)
    plain = objective.loss(latents, predict, torch.Generator().manual_seed(1), timesteps=fixed)
    torch.testing.assert_close(seen["t"], fixed)
    n = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    per_sample = ((n - latents) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(plain, per_sample.mean())
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1.0  # the top half counts
    weights = LossWeights(torch.tensor([1.0, 0.5]), mask)
    weighted = objective.loss(latents, predict, torch.Generator().manual_seed(1), timesteps=fixed, weights=weights)
    masked = (((n - latents) ** 2) * mask).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted, (masked * torch.tensor([1.0, 0.5])).mean())


def test_train_py_trains_from_the_webui_folders(webui, tmp_path):
    models, path, _parts = webui
    make_image_folder(str(tmp_path / "data"), count=4)
    config = {
        "train_data_dir": str(tmp_path / "data"),
        "base_model": path,  # ae, clip_l and t5xxl are found in models/VAE and models/text_encoder
        "output_dir": str(tmp_path / "out"),
        "resolution": 64,
        "batch_size": 2,
        "max_train_steps": 3,
        "lora_rank": 4,
        "train_text_encoder": True,
    }
    (tmp_path / "flux.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--config", "flux.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lora = tmp_path / "out" / "out.safetensors"
    with safe_open(str(lora), framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert "lora_unet_single_blocks_0_modulation_lin.alpha" in keys
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert "modelspec.prediction_type" not in meta and meta["ss_guidance_scale"] == "1.0"
    assert (forge_version(meta), sdnext_version(meta)) == ("Flux", "f1")  # the hosts' own rules
    assert "Flux.1 [dev]" in proc.stdout or "flux-dev" in proc.stdout


def test_loss_falls_on_a_memorisation_task(webui, tmp_path):
    _models, path, _parts = webui
    cfg = flux_config(tmp_path, path, max_train_steps=40, learning_rate=3e-3, lora_rank=8, batch_size=4, seed=3)
    result = train(cfg)
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)


def test_resume_equals_an_uninterrupted_run(webui, tmp_path):
    _models, path, _parts = webui
    overrides = dict(max_train_steps=4, batch_size=1, gradient_accumulation_steps=2, lora_dropout=0.1)
    assert_resume_equals_an_uninterrupted_run(
        lambda folder, **extra: flux_config(folder, path, **overrides, **extra), tmp_path
    )


def _diffusers_flux(parts, tokenizers):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=parts.vae,
        text_encoder=parts.clip,
        tokenizer=tokenizers[0],
        text_encoder_2=parts.t5,
        tokenizer_2=tokenizers[1],
        transformer=parts.transformer,
    )


def _transformer_inputs(seed=3, side=8, txt_dim=32, pooled_dim=32):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 16, side, side, generator=g)
    cond = {"t5": torch.randn(2, 6, txt_dim, generator=g), "pooled": torch.randn(2, pooled_dim, generator=g)}
    return latents, cond, torch.tensor([0.3, 0.7])


def _their_prediction(transformer, latents, cond, t, guidance):
    from lora_trainer.models.flux.transformer import unpack_latents

    side = latents.shape[-1]
    with torch.no_grad():
        tokens = transformer(
            hidden_states=pack_latents(latents),
            encoder_hidden_states=cond["t5"],
            pooled_projections=cond["pooled"],
            timestep=t,
            img_ids=image_ids(1, side, side)[0],
            txt_ids=torch.zeros(cond["t5"].shape[1], 3),
            guidance=guidance,
            return_dict=False,
        )[0]
    return unpack_latents(tokens, side, side)


def test_diffusers_flux_lora_loader_reproduces_our_trained_outputs(webui, tmp_path):
    """The trained file's double-block and CLIP-L keys through diffusers' kohya Flux converter. (Its single-block
    split is written for the full-size model's widths only; the next test covers those keys at full width.)"""
    from lora_trainer.export.lora_file import load_lora_file
    from lora_trainer.lora.network import LoRANetwork
    from lora_trainer.models.families import FLUX_DEV
    from lora_trainer.models.flux.adapter import FluxAdapter

    models, path, parts = webui
    result = train(flux_config(tmp_path, path, train_text_encoder=True, max_train_steps=3, learning_rate=1e-2))
    tensors, _ = load_lora_file(result.output_files[0])
    tensors = {k: v for k, v in tensors.items() if not k.startswith("lora_unet_single_blocks_")}

    adapter = FluxAdapter(path, FLUX_DEV, device=torch.device("cpu"))
    adapter.load(unet=True, vae=False, text_encoders=True)
    targets = [(n, m) for n, m in adapter.lora_targets(True) if not n.startswith("lora_unet_single_blocks_")]
    network = LoRANetwork(targets, rank=4, alpha=4)
    network.load_kohya_state_dict(tensors, "trained file")
    latents, cond, t = _transformer_inputs()
    clip_tok, t5_tok = adapter.tokenizers()
    ids = clip_tok(["a picture number 1"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        base_out = adapter.predict(latents, t, cond)
        with network.attached():
            ours = adapter.predict(latents, t, cond)
            our_pooled = adapter.text_encoders[0](ids).pooler_output

    pipe = _diffusers_flux(build_tiny_flux(guidance=True), (clip_tok, t5_tok))  # the same seed: the untouched base
    pipe.load_lora_weights(tensors)
    theirs = _their_prediction(pipe.transformer, latents, cond, t, torch.full((2,), 1.0))
    with torch.no_grad():
        their_pooled = pipe.text_encoder(ids).pooler_output
    assert (ours - base_out).abs().max() > 1e-4, "the LoRA has no effect"
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(their_pooled, our_pooled, rtol=1e-4, atol=1e-5)


def test_diffusers_loads_our_single_block_keys_at_flux_width(tmp_path):
    """One single block at Flux.1's real width (3072 channels, as diffusers' converter expects), a LoRA on every
    Linear written by our exporter, applied by diffusers: the same outputs as ours."""
    from diffusers import FluxTransformer2DModel
    from support.tiny_flux import _perturb

    from lora_trainer.export.lora_file import save_lora_file
    from lora_trainer.lora.network import LoRANetwork
    from lora_trainer.lora.targets import find_targets
    from lora_trainer.models.families.flux import LORA_CONTAINERS

    torch.manual_seed(0)
    theirs_model = FluxTransformer2DModel(
        in_channels=64,
        num_layers=0,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
    ).eval()
    _perturb(theirs_model, 1, scale=0.01)
    state = diffusers_to_bfl({k: v.clone() for k, v in theirs_model.state_dict().items()})
    ours_model = FluxTransformer(FluxParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})).eval()
    ours_model.load_state_dict(state)
    del state
    targets = [("lora_unet_" + p.replace(".", "_"), m) for p, m in find_targets(ours_model, LORA_CONTAINERS)]
    network = LoRANetwork(targets, rank=4, alpha=2)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.02)
    lora_path = str(tmp_path / "single.safetensors")
    save_lora_file(lora_path, network.kohya_state_dict(), {"ss_network_dim": "4"})
    latents, cond, t = _transformer_inputs(side=4)
    with torch.no_grad(), network.attached():
        tokens = ours_model(
            pack_latents(latents), image_ids(2, 4, 4), cond["t5"], torch.zeros(2, 6, 3), t, cond["pooled"]
        )
    from lora_trainer.models.flux.transformer import unpack_latents

    ours = unpack_latents(tokens, 4, 4)
    from diffusers import FluxPipeline

    state_dict, network_alphas = FluxPipeline.lora_state_dict(lora_path, return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=network_alphas, transformer=theirs_model)
    theirs = _their_prediction(theirs_model, latents, cond, t, None)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_bfl_names_cover_every_diffusers_weight():
    parts = build_tiny_flux(guidance=False)
    state = parts.transformer.state_dict()
    bfl = diffusers_to_bfl(dict(state))
    assert sum(v.numel() for v in bfl.values()) == sum(v.numel() for v in state.values())
    assert "guidance_in.in_layer.weight" not in bfl and "double_blocks.0.txt_attn.qkv.weight" in bfl


def test_text_encoders_are_freed_before_the_transformer_loads(webui, tmp_path, monkeypatch):
    from lora_trainer.models.flux import adapter as flux_adapter

    seen = []
    original = flux_adapter.FluxAdapter._load_transformer

    def spy(self):
        seen.append((self.text_encoders, self.vae))
        return original(self)

    monkeypatch.setattr(flux_adapter.FluxAdapter, "_load_transformer", spy)
    _models, path, _parts = webui
    result = train(flux_config(tmp_path, path, max_train_steps=1))
    assert result.status == "finished" and seen == [(None, None)]


@pytest.mark.parametrize("options", [{"network_type": "loha"}, {"network_type": "locon"}, {"conv_rank": 4}])
def test_network_types_flux_files_cannot_hold_are_refused_before_loading(webui, tmp_path, monkeypatch, options):
    """LyCORIS types and convolution options are SD1/SD2/SDXL's: a Flux run asking for them stops with an error
    naming the option, before the transformer is opened."""
    from lora_trainer.errors import ConfigError
    from lora_trainer.models.families.flux import FluxFamily

    def never(*_args, **_kwargs):
        raise AssertionError("the model was opened")

    monkeypatch.setattr(FluxFamily, "open_standalone", never)
    _models, path, _parts = webui
    with pytest.raises(ConfigError, match="network_type: 'loha'|network_type: 'locon'|conv_rank"):
        train(flux_config(tmp_path, path, **options))
