"""Single-file checkpoints load offline into diffusers models with every weight in place, and our name maps
agree with diffusers' own ldm converters (an independent implementation)."""

import os

import pytest
import torch
from support.image_fixtures import REPO
from support.tiny_models import build_tiny, canonical_text_state, save_single_file, to_single_file_state

from lora_trainer.config import ImageConfig
from lora_trainer.config_template import SEED_VALUES, render_template
from lora_trainer.models.architecture import detect_architecture
from lora_trainer.models.loading import load_stable_diffusion


def _same_weights(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    sa = {k: v for k, v in sa.items() if "position_ids" not in k}
    sb = {k: v for k, v in sb.items() if "position_ids" not in k}
    assert sa.keys() == sb.keys(), (what, sorted(set(sa) ^ set(sb))[:5])
    for k in sa:
        assert torch.equal(sa[k].reshape(-1), sb[k].reshape(-1)), (what, k)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_single_file_loads_every_weight(tmp_path, arch):
    parts = build_tiny(arch)
    path = save_single_file(parts, str(tmp_path / "model.safetensors"))
    model = load_stable_diffusion(path)
    assert model.arch == arch and model.prediction_type == parts.prediction_type
    _same_weights(parts.unet, model.unet, "unet")
    _same_weights(parts.vae, model.vae, "vae")
    for i, (ours, theirs) in enumerate(zip(parts.text_encoders, model.text_encoders)):
        _same_weights(ours, theirs, f"text encoder {i}")


def test_name_maps_agree_with_diffusers_converters():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    for arch in ("sd1", "sdxl"):
        parts = build_tiny(arch)
        checkpoint = to_single_file_state(parts)
        unet = convert_ldm_unet_checkpoint(dict(checkpoint), dict(parts.unet.config))
        expected = parts.unet.state_dict()
        assert unet.keys() == expected.keys()
        assert all(torch.equal(unet[k], expected[k]) for k in expected)
        vae = convert_ldm_vae_checkpoint(dict(checkpoint), dict(parts.vae.config))
        expected = parts.vae.state_dict()
        assert vae.keys() == expected.keys()
        assert all(torch.equal(vae[k].reshape(-1), expected[k].reshape(-1)) for k in expected)


def test_sd2_prediction_type_follows_the_yaml_beside_the_checkpoint(tmp_path):
    parts = build_tiny("sd2")
    parts.prediction_type = "epsilon"
    path = save_single_file(parts, str(tmp_path / "sd2_base.safetensors"), with_yaml=True)
    assert (
        load_stable_diffusion(path, load_unet=False, load_vae=False, load_text_encoders=False).prediction_type
        == "epsilon"
    )
    assert (
        load_stable_diffusion(
            path, load_unet=False, load_vae=False, load_text_encoders=False, prediction_type="v_prediction"
        ).prediction_type
        == "v_prediction"
    )


def test_architecture_detection_rejects_what_it_cannot_train():
    from lora_trainer.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        detect_architecture(["lora_unet_x.lora_down.weight"])
    keys = {
        "model.diffusion_model.input_blocks.0.0.weight": 1,
        "conditioner.embedders.0.model.ln_final.weight": 1,
        "conditioner.embedders.1.model.ln_final.weight": 1,
    }
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        detect_architecture(keys)


def test_text_encoder_state_names_are_transformers_4_style():
    te = build_tiny("sd1").text_encoders[0]
    assert all(k.startswith("text_model.") for k in canonical_text_state(te))


def test_offline_tokenizer_matches_open_clip():
    import open_clip

    from lora_trainer.models.tokenizer import load_clip_tokenizer

    text = "a cyberpunk city at night, neon signs, rain"
    ours = load_clip_tokenizer()(text, padding="max_length", max_length=77).input_ids
    reference = open_clip.tokenize([text])[0].tolist()
    end = reference.index(49407)
    assert ours[: end + 1] == reference[: end + 1]


def test_image_config_template_is_current():
    with open(os.path.join(REPO, "configs", "my_lora_config.yaml"), encoding="utf-8") as fh:
        committed = fh.read()
    assert committed == render_template(ImageConfig, dict(SEED_VALUES, task_type="image-generation")), (
        "configs/my_lora_config.yaml is stale: regenerate it with lora_trainer.config_template.render_template"
    )
