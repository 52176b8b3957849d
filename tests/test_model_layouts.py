"""Every diffusers folder layout diffusers' own loaders accept loads (and trains) as diffusers reads it: .bin or
sharded weights, weights only as a variant, configs that omit optional keys (the class defaults apply), any
scheduler class and beta schedule. What is not an SD1/SD2/SDXL text-to-image model is refused naming what is
missing or why."""

import glob
import inspect
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.image_fixtures import image_config, train
from support.tiny_models import build_tiny, save_diffusers_folder, to_single_file_state

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.loading import load_stable_diffusion


@pytest.fixture(scope="module")
def parts():
    return build_tiny("sd1")


@pytest.fixture(scope="module")
def base(parts, tmp_path_factory):
    return save_diffusers_folder(parts, str(tmp_path_factory.mktemp("pipeline") / "sd1"))


def copy_of(base, tmp_path, name="model"):
    return shutil.copytree(base, str(tmp_path / name))


def edit_json(path, change):
    with open(path, encoding="utf-8") as fh:
        value = json.load(fh)
    value = change(value) or value
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(value, fh)


def without_defaults(cls, config: dict) -> dict:
    """``config`` with every key whose value is ``cls``'s own default removed, as minimal configs are written."""
    parameters = inspect.signature(cls.__init__).parameters

    def is_default(key, value):
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        return default is not inspect.Parameter.empty and (
            default == value or (isinstance(default, tuple) and list(default) == value)
        )

    return {k: v for k, v in config.items() if k.startswith("_") or not is_default(k, v)}


def minimal_configs(folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextConfig)):
        edit_json(os.path.join(folder, sub, "config.json"), lambda c, cls=cls: without_defaults(cls, c))
    edit_json(os.path.join(folder, "unet", "config.json"), lambda c: c.pop("layers_per_block", None) and None)
    tokenizer = os.path.join(folder, "tokenizer")
    for name in os.listdir(tokenizer):  # the vocabulary alone: transformers' own defaults apply to the rest
        if name not in ("vocab.json", "merges.txt"):
            os.remove(os.path.join(tokenizer, name))


def as_bin_and_sharded(folder, parts):
    for path in glob.glob(os.path.join(folder, "*", "*.safetensors")):
        stem = "pytorch_model" if os.path.basename(path) == "model.safetensors" else "diffusion_pytorch_model"
        torch.save(load_file(path), os.path.join(os.path.dirname(path), stem + ".bin"))
        os.remove(path)
    shutil.rmtree(os.path.join(folder, "unet"))
    parts.unet.save_pretrained(os.path.join(folder, "unet"), max_shard_size="100KB")  # several shards + index


def as_fp16_variant_only(folder):
    for path in glob.glob(os.path.join(folder, "*", "*.safetensors")):
        tensors = {k: v.half() for k, v in load_file(path).items()}
        save_file(tensors, path.replace(".safetensors", ".fp16.safetensors"))
        os.remove(path)


def diffusers_reference(folder, variant=None):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, variant=variant, torch_dtype=torch.float32)


def assert_same_as_diffusers(ours, pipe):
    torch.testing.assert_close(ours.alphas_cumprod, pipe.scheduler.alphas_cumprod.float(), rtol=0, atol=0)
    assert ours.prediction_type == pipe.scheduler.config.prediction_type
    assert ours.vae_scaling_factor == pipe.vae.config.scaling_factor
    for mine, theirs in ((ours.unet, pipe.unet), (ours.vae, pipe.vae), (ours.text_encoders[0], pipe.text_encoder)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[49406, 320, 1125, 49407]])
    with torch.no_grad():
        torch.testing.assert_close(
            ours.text_encoders[0](ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state, rtol=0, atol=0
        )


def test_bin_sharded_weights_and_configs_without_optional_keys_load_as_diffusers_loads_them(base, parts, tmp_path):
    folder = copy_of(base, tmp_path)
    as_bin_and_sharded(folder, parts)
    minimal_configs(folder)
    assert len(glob.glob(os.path.join(folder, "unet", "*.safetensors"))) > 1
    assert_same_as_diffusers(load_stable_diffusion(folder), diffusers_reference(folder))


def test_variant_only_weights_and_a_scheduler_named_by_class_only_train(base, tmp_path):
    folder = copy_of(base, tmp_path)
    as_fp16_variant_only(folder)
    edit_json(os.path.join(folder, "model_index.json"), lambda c: c.update(scheduler=["diffusers", "PNDMScheduler"]))
    edit_json(os.path.join(folder, "scheduler", "scheduler_config.json"), lambda c: {"_class_name": "PNDMScheduler"})
    ours = load_stable_diffusion(folder)
    assert_same_as_diffusers(ours, diffusers_reference(folder, variant="fp16"))
    assert abs(float(ours.alphas_cumprod[500]) - 0.0778) < 1e-3  # PNDM's own defaults: linear 1e-4..0.02
    result = train(image_config(tmp_path, folder, max_train_steps=1))
    assert result.status == "finished", result.message


@pytest.mark.parametrize(
    "scheduler",
    [
        {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2"},
        {"_class_name": "EulerDiscreteScheduler", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
        {"_class_name": "DDIMScheduler", "trained_betas": [0.001 * (i + 1) for i in range(1000)]},
    ],
)
def test_every_noise_schedule_is_diffusers_own(base, tmp_path, scheduler):
    import diffusers

    folder = copy_of(base, tmp_path)
    name = scheduler["_class_name"]
    edit_json(os.path.join(folder, "model_index.json"), lambda c: c.update(scheduler=["diffusers", name]))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as fh:
        json.dump(scheduler, fh)
    reference = getattr(diffusers, name).from_pretrained(folder, subfolder="scheduler")
    ours = load_stable_diffusion(folder, load_unet=False, load_vae=False, load_text_encoders=False)
    torch.testing.assert_close(ours.alphas_cumprod, reference.alphas_cumprod.float(), rtol=0, atol=0)
    assert ours.prediction_type == reference.config.prediction_type


def refused(folder, match):
    with pytest.raises(ModelLoadError, match=match):
        load_stable_diffusion(folder, load_unet=False, load_vae=False, load_text_encoders=False)


def test_what_is_missing_is_named(base, tmp_path):
    no_vae = copy_of(base, tmp_path, "no_vae")
    shutil.rmtree(os.path.join(no_vae, "vae"))
    refused(no_vae, r"the vae/ folder \(the image autoencoder\) is missing")
    no_scheduler = copy_of(base, tmp_path, "no_scheduler")
    shutil.rmtree(os.path.join(no_scheduler, "scheduler"))
    refused(no_scheduler, r"the scheduler/ folder \(the noise schedule\) is missing")
    refiner = copy_of(base, tmp_path, "refiner")
    edit_json(
        os.path.join(refiner, "model_index.json"),
        lambda c: c.update(text_encoder=[None, None], text_encoder_2=["transformers", "CLIPTextModelWithProjection"]),
    )
    refused(refiner, "lists no text_encoder .*SDXL refiner")
    transformer = copy_of(base, tmp_path, "sd3")
    edit_json(
        os.path.join(transformer, "model_index.json"),
        lambda c: c.pop("unet") and c.update(transformer=["diffusers", "SD3Transformer2DModel"]),
    )
    refused(transformer, "lists no unet")
    weightless = copy_of(base, tmp_path, "weightless")
    for path in glob.glob(os.path.join(weightless, "unet", "*.safetensors")):
        os.remove(path)
    with pytest.raises(ModelLoadError, match="cannot load unet/"):
        load_stable_diffusion(weightless, load_vae=False, load_text_encoders=False)


def test_inpainting_unets_are_refused_in_folders_and_single_files(base, parts, tmp_path):
    inpainting = copy_of(base, tmp_path, "inpainting")
    edit_json(os.path.join(inpainting, "unet", "config.json"), lambda c: c.update(in_channels=9))
    refused(inpainting, "the UNet takes 9 input channels, not 4: an inpainting")
    state = to_single_file_state(parts)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.cat([state[key], torch.zeros(state[key].shape[0], 5, 3, 3)], dim=1).contiguous()
    save_file(state, str(tmp_path / "inpainting.safetensors"))
    refused(str(tmp_path / "inpainting.safetensors"), "the UNet takes 9 input channels")
    no_vae = {k: v for k, v in to_single_file_state(parts).items() if not k.startswith("first_stage_model.")}
    save_file(no_vae, str(tmp_path / "no_vae.safetensors"))
    refused(str(tmp_path / "no_vae.safetensors"), r"no VAE \(first_stage_model\.\*\) weights")
