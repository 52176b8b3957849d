"""The exported kohya file, loaded into the untouched base model by diffusers' own ``load_lora_weights``,
reproduces our trained model's UNet (and text-encoder) outputs, for SD1-, SD2-v- and SDXL-shaped models."""

import pytest
import torch
from safetensors import safe_open
from support.image_fixtures import image_config, tiny_checkpoint, train

from lora_trainer.export.lora_file import load_lora_file
from lora_trainer.lora.network import LoRANetwork
from lora_trainer.models.diffusers_adapter import DiffusersAdapter
from lora_trainer.models.loading import load_stable_diffusion


def _diffusers_pipeline(arch, model):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDPMScheduler(steps_offset=1, clip_sample=False)
    if arch == "sdxl":
        return StableDiffusionXLPipeline(
            vae=model.vae,
            text_encoder=model.text_encoders[0],
            text_encoder_2=model.text_encoders[1],
            tokenizer=model.tokenizers[0],
            tokenizer_2=model.tokenizers[1],
            unet=model.unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoders[0],
        tokenizer=model.tokenizers[0],
        unet=model.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _unet_inputs(arch, unet):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if arch == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32),
        }
    return x, t, ctx, kwargs


def _our_model_with_lora(base, lora_path, train_text_encoder):
    """Our side: the base loaded by our loader, our LoRA layers attached with the file's weights."""
    adapter = DiffusersAdapter(base, device=torch.device("cpu"))
    adapter.load(unet=True, vae=False, text_encoders=True)
    tensors, _ = load_lora_file(lora_path)
    network = LoRANetwork(adapter.lora_targets(train_text_encoder), rank=4, alpha=4)
    network.load_kohya_state_dict(tensors, lora_path)
    return adapter, network


@pytest.mark.parametrize("arch,train_te", [("sd1", True), ("sd2", False), ("sdxl", True)])
def test_exported_lora_loads_in_diffusers_and_reproduces_outputs(tmp_path, arch, train_te):
    base = tiny_checkpoint(tmp_path, arch)
    cfg = image_config(tmp_path, base, train_text_encoder=train_te, max_train_steps=3, learning_rate=5e-3)
    result = train(cfg)
    assert result.status == "finished"
    lora_path = result.output_files[0]
    with safe_open(lora_path, framework="pt") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}[arch]
    if arch == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in keys)
        assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    if arch == "sd2":
        assert meta["ss_v2"] == "True" and meta["ss_v_parameterization"] == "True"

    adapter, network = _our_model_with_lora(base, lora_path, train_te)
    x, t, ctx, kwargs = _unet_inputs(arch, adapter.unet)
    with torch.no_grad():
        base_out = adapter.unet(x, t, ctx, **kwargs).sample
        with network.attached():
            ours = adapter.unet(x, t, ctx, **kwargs).sample
            ids = adapter.tokenizers[0](
                ["a picture number 1"], padding="max_length", max_length=77, return_tensors="pt"
            ).input_ids
            our_te = adapter.text_encoders[0](ids).last_hidden_state
        base_te = adapter.text_encoders[0](ids).last_hidden_state

    untouched = load_stable_diffusion(base)  # a fresh copy of the base for diffusers
    pipe = _diffusers_pipeline(arch, untouched)
    pipe.load_lora_weights(lora_path)
    with torch.no_grad():
        theirs = pipe.unet(x, t, ctx, **kwargs).sample
        their_te = pipe.text_encoder(ids).last_hidden_state

    assert (ours - base_out).abs().max() > 1e-4, "the LoRA has no effect on the UNet"
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    if train_te:
        assert (our_te - base_te).abs().max() > 1e-5, "the text-encoder LoRA has no effect"
        torch.testing.assert_close(their_te, our_te, rtol=1e-4, atol=1e-5)
