"""The memory estimate logged before a run counts the base as stored and names the options that lower it."""

import torch
from support.tiny_flux import build_tiny_flux

from lora_trainer.config import config_from_dict
from lora_trainer.models.families import FLUX_DEV, SD1
from lora_trainer.models.flux.names import diffusers_to_bfl
from lora_trainer.models.flux.transformer import FluxParams, FluxTransformer
from lora_trainer.models.fp8 import store_linears_in_fp8
from lora_trainer.train.memory import estimate_memory


def _cfg(**overrides):
    raw = {"train_data_dir": "d", "base_model": "m", "output_dir": "o", "resolution": 1024, "batch_size": 2}
    return config_from_dict({**raw, **overrides})


def _flux():
    state = diffusers_to_bfl(dict(build_tiny_flux().transformer.state_dict()))
    model = FluxTransformer(FluxParams.from_shapes({k: tuple(v.shape) for k, v in state.items()}))
    model.load_state_dict(state)
    return model


def test_options_that_lower_the_estimate_are_named_and_do_lower_it():
    model = _flux()
    plain = estimate_memory(_cfg(), FLUX_DEV, model, [], lora_parameters=1000)
    assert any(a.startswith("gradient_checkpointing") for a in plain.advice)
    assert any(a.startswith("mixed_precision: bf16") for a in plain.advice)  # an fp32 base
    checkpointed = estimate_memory(_cfg(gradient_checkpointing=True), FLUX_DEV, model, [], 1000)
    assert checkpointed.activations_gib < plain.activations_gib
    assert not any(a.startswith("gradient_checkpointing") for a in checkpointed.advice)

    bf16 = model.to(torch.bfloat16)
    half = estimate_memory(_cfg(mixed_precision="bf16"), FLUX_DEV, bf16, [], 1000)
    assert any(a.startswith("fp8_base") for a in half.advice)
    assert abs(half.base_gib - plain.base_gib / 2) < 1e-6
    store_linears_in_fp8(bf16, ("DoubleStreamBlock", "SingleStreamBlock"), torch.bfloat16)
    fp8 = estimate_memory(_cfg(mixed_precision="bf16", fp8_base=True), FLUX_DEV, bf16, [], 1000)
    assert fp8.base_gib < half.base_gib and not any(a.startswith("fp8_base") for a in fp8.advice)
    assert "memory estimate: about" in fp8.describe()


def test_kept_encoders_count_and_sd_families_are_not_offered_fp8():
    model = _flux()
    clip = build_tiny_flux().clip
    kept = estimate_memory(_cfg(mixed_precision="bf16"), SD1, model.to(torch.bfloat16), [clip], 10)
    assert kept.encoders_gib > 0 and any(a.startswith("train_text_encoder: false") for a in kept.advice)
    assert not any(a.startswith("fp8_base") for a in kept.advice)
    # A VAE kept to encode every step (random_flip) counts too, and the advice names what frees it.
    vae = build_tiny_flux().vae
    flipped = estimate_memory(_cfg(mixed_precision="bf16", random_flip=True), SD1, model, [], 10, kept_vae=vae)
    assert flipped.encoders_gib > 0
    assert any(a.startswith("random_flip: false") for a in flipped.advice)
    assert not any(a.startswith("train_text_encoder") for a in flipped.advice)
    uncached = estimate_memory(_cfg(cache_latents=False), SD1, model, [], 10, kept_vae=vae)
    assert any(a.startswith("cache_latents: true") for a in uncached.advice)


def test_fp8_storage_computes_like_the_rounded_weights():
    model = _flux().to(torch.bfloat16)
    linear = model.double_blocks[0].img_attn.qkv
    rounded = linear.weight.detach().to(torch.float8_e4m3fn).to(torch.bfloat16)
    store_linears_in_fp8(model, ("DoubleStreamBlock", "SingleStreamBlock"), torch.bfloat16)
    assert linear.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(3, linear.in_features, dtype=torch.bfloat16)
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, rounded, linear.bias))
