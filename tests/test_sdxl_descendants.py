"""SDXL descendants: the ``v_pred`` / ``ztsnr`` marker tensors (as Forge Neo and ComfyUI read them) make a
v-prediction, zero-terminal-SNR model, trained with the v target on the rescaled schedule."""

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from support.image_fixtures import image_config, train
from support.tiny_models import build_tiny, to_single_file_state

from lora_trainer.models.loading import load_stable_diffusion
from lora_trainer.train.objectives import DdpmObjective


def _descendant(tmp_path, *markers):
    state = to_single_file_state(build_tiny("sdxl"))
    for marker in markers:
        state[marker] = torch.tensor([])
    path = str(tmp_path / f"sdxl_{'_'.join(markers) or 'base'}.safetensors")
    save_file(state, path)
    return path


def test_marker_tensors_choose_the_target_and_schedule(tmp_path):
    from diffusers import DDPMScheduler

    plain = load_stable_diffusion(_descendant(tmp_path), load_unet=False, load_vae=False, load_text_encoders=False)
    assert plain.prediction_type == "epsilon" and not plain.zero_terminal_snr
    vpred = load_stable_diffusion(
        _descendant(tmp_path, "v_pred"), load_unet=False, load_vae=False, load_text_encoders=False
    )
    assert vpred.prediction_type == "v_prediction" and not vpred.zero_terminal_snr
    torch.testing.assert_close(vpred.alphas_cumprod, plain.alphas_cumprod)
    zsnr = load_stable_diffusion(
        _descendant(tmp_path, "v_pred", "ztsnr"), load_unet=False, load_vae=False, load_text_encoders=False
    )
    assert zsnr.prediction_type == "v_prediction" and zsnr.zero_terminal_snr
    # The schedule diffusers builds for zero-terminal-SNR training (an independent implementation).
    reference = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True
    ).alphas_cumprod
    assert zsnr.alphas_cumprod[-1] == 0
    torch.testing.assert_close(zsnr.alphas_cumprod, reference.float(), rtol=1e-5, atol=1e-7)


def test_v_target_at_the_last_step_of_a_zero_snr_schedule_is_minus_the_image():
    from diffusers import DDPMScheduler

    ac = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True
    ).alphas_cumprod.float()
    objective = DdpmObjective(ac, "v_prediction")
    latents = torch.randn(2, 4, 8, 8)
    seen = {}

    def predict(noisy, t):
        seen["noisy"], seen["t"] = noisy, t
        return torch.zeros_like(noisy)

    g = torch.Generator().manual_seed(0)
    objective.loss(latents, predict, g)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    a = ac[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["noisy"], a.sqrt() * latents + (1 - a).sqrt() * noise)
    # At t = 999 the input is pure noise and v = sqrt(a)·n − sqrt(1−a)·x0 = −x0.
    last = torch.full((2,), 999)
    a = ac[last].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * noise - (1 - a).sqrt() * latents, -latents)


def test_a_v_pred_ztsnr_checkpoint_trains_and_says_so_in_the_file(tmp_path):
    base = _descendant(tmp_path, "v_pred", "ztsnr")
    result = train(image_config(tmp_path, base, max_train_steps=2))
    assert result.status == "finished"
    with safe_open(result.output_files[0], framework="pt") as fh:
        meta = fh.metadata()
    assert meta["ss_v_parameterization"] == "True" and meta["ss_zero_terminal_snr"] == "True"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert all(torch.isfinite(torch.tensor(result.losses)))
