"""Sample images during training (sd-scripts' ``sample_prompts``), rendered by the standalone backend.

``SampleImages`` is a training callback: at the steps or epochs its schedule names (sd-scripts' rules:
``sample_every_n_epochs`` wins over ``sample_every_n_steps``; ``sample_at_first`` before the first step) it
renders every prompt with the LoRA being trained live in the model (strength 1, as ``<lora:name:1>`` with the
saved file), writes ``output_dir/samples/<name>_<step or eNNNNNN epoch>_<prompt index>_<seed>.png`` and hands
the paths to the other callbacks' ``on_preview`` (TensorBoard logs them; the tab shows them).

Rendering is a plain text-to-image loop: a diffusers scheduler (sd-scripts' sampler names) built on the
model's own noise schedule (its ``alphas_cumprod``, so zero-terminal-SNR and v-prediction models sample as
they train), classifier-free guidance, and the adapter's UNet, text encoders and VAE. The noise comes from a
CPU generator seeded by the prompt, so a sample is the same on any device.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from lora_trainer.io.atomic import atomic_write
from lora_trainer.models.adapter import Conditioning, DiffusionAdapter, SizeCondition
from lora_trainer.train.callbacks import StepInfo, TrainingCallback
from lora_trainer.train.sample_prompts import SamplePrompt

SAMPLE_FOLDER = "samples"  # jobs.PREVIEW_DIR
# sd-scripts' sampler names -> (diffusers scheduler class, its options)
SCHEDULERS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {"clip_sample": True}),  # sd-scripts turns clip_sample on
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """The per-step betas of a cumulative-product schedule: ``1 - ac[t] / ac[t-1]`` (``ac[-1]`` = 1)."""
    ac = alphas_cumprod.detach().double().cpu().numpy()
    previous = np.concatenate([[1.0], ac[:-1]])
    return 1.0 - ac / previous


def resolved_fields(prompt: SamplePrompt) -> Tuple[int, int, int, str]:
    """``(width, height, seed, sampler)`` of a prompt ``SamplePrompt.resolve`` filled in; ValueError for one it
    did not (a caller's bug: ``train.extras`` resolves every prompt before it builds the callback)."""
    if prompt.width is None or prompt.height is None or prompt.seed is None or prompt.sampler is None:
        raise ValueError(f"sample prompt {prompt.prompt!r} has no size, seed or sampler: resolve it first")
    return prompt.width, prompt.height, prompt.seed, prompt.sampler


def make_scheduler(sampler: str, alphas_cumprod: torch.Tensor, prediction_type: str):
    """The diffusers scheduler of an sd-scripts sampler name (``k_`` names are the plain ones) on the model's
    noise schedule."""
    import diffusers

    class_name, options = SCHEDULERS[sampler[2:] if sampler.startswith("k_") else sampler]
    betas = betas_from_alphas_cumprod(alphas_cumprod)
    return getattr(diffusers, class_name)(
        num_train_timesteps=len(betas), trained_betas=betas.tolist(), prediction_type=prediction_type, **options
    )


@torch.no_grad()
def render_sample(
    adapter: DiffusionAdapter,
    prompt: SamplePrompt,
    cond: Conditioning,
    uncond: Optional[Conditioning],
    autocast: Callable = torch.autocast,
) -> torch.Tensor:
    """One image (3, H, W) in [-1, 1] on the CPU for a resolved ``prompt``; ``uncond`` (the negative prompt's
    conditioning) is used when the guidance scale is not 1."""
    device = adapter.device
    width, height, seed, sampler = resolved_fields(prompt)
    scheduler = make_scheduler(sampler, adapter.alphas_cumprod, adapter.prediction_type)
    scheduler.set_timesteps(prompt.steps, device=device)
    generator = torch.Generator("cpu").manual_seed(seed)
    channels = getattr(adapter, "latent_channels", 4)
    shape = (1, channels, height // 8, width // 8)
    latents = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    both = cond
    guided = uncond is not None and prompt.scale != 1.0
    if uncond is not None and guided:
        both = {k: torch.cat([uncond[k], v]).to(device) for k, v in cond.items()}
    batch = 2 if guided else 1
    sizes = [SizeCondition((width, height), (0, 0), (width, height))] * batch
    step_takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * batch), t)
        with autocast():
            prediction = adapter.predict(model_input, t.expand(batch).to(device), both, sizes).float()
        if guided:
            negative, positive = prediction.chunk(2)
            prediction = negative + prompt.scale * (positive - negative)
        extra = {"generator": generator} if step_takes_generator else {}
        latents = scheduler.step(prediction, t, latents, **extra).prev_sample
    return adapter.decode_latents(latents.float())[0].float().clamp(-1, 1).cpu()


def to_pil(pixels: torch.Tensor):
    """(3, H, W) in [-1, 1] -> an RGB PIL image."""
    from PIL import Image

    array = ((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(array)


def sample_file_name(output_name: str, index: int, seed: int, step: int, epoch: Optional[int]) -> str:
    """sd-scripts' sample names without their timestamp: ``<name>_<step:06d or eEEEEEE>_<index:02d>_<seed>.png``."""
    when = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    return f"{output_name}_{when}_{index:02d}_{seed}.png"


class SampleImages(TrainingCallback):
    """Renders the sample prompts on schedule (see the module docstring); only on the main process.

    ``encode(texts)`` gives the conditioning of each text (the trainer's text encoders, loaded on demand);
    ``deliver`` is the callback list whose ``on_preview`` gets the written paths; ``network`` is put in eval
    mode while rendering (no LoRA dropout). A failure is logged and training goes on.
    """

    def __init__(
        self,
        prompts: List[SamplePrompt],
        *,
        adapter: DiffusionAdapter,
        network: torch.nn.Module,
        encode: Callable[[List[str]], List[Conditioning]],
        output_dir: str,
        output_name: str,
        every_n_steps: Optional[int],
        every_n_epochs: Optional[int],
        at_first: bool,
        autocast: Callable,
        log: Callable[[str], None],
        deliver: Optional[TrainingCallback] = None,
    ) -> None:
        self.prompts = prompts
        self.adapter = adapter
        self.network = network
        self.encode = encode
        self.folder = os.path.join(output_dir, SAMPLE_FOLDER)
        self.output_name = output_name
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.at_first = at_first
        self.autocast = autocast
        self.log = log
        self.deliver = deliver
        self.written: List[str] = []

    def due(self, info: StepInfo) -> bool:
        """sd-scripts' schedule: every N epochs (at an epoch's end) if set, else every N steps."""
        if self.every_n_epochs:
            return info.epoch_finished and info.epoch % self.every_n_epochs == 0
        return bool(self.every_n_steps) and info.step % (self.every_n_steps or 1) == 0

    def on_train_start(self, total_steps, start_step, summary):
        if self.at_first:
            self.render(start_step, None)

    def on_step_end(self, info: StepInfo) -> None:
        if self.due(info):
            self.render(info.step, info.epoch if self.every_n_epochs else None)

    def render(self, step: int, epoch: Optional[int]) -> List[str]:
        """Render and write every prompt; returns the paths (also handed to ``deliver.on_preview``)."""
        was_training = self.network.training
        self.network.eval()
        try:
            paths = self._render_all(step, epoch)
        except Exception as exc:  # a sample must never cost the run
            self.log(f"sample images at step {step} failed ({type(exc).__name__}: {exc}); training goes on")
            return []
        finally:
            self.network.train(was_training)
        self.written += paths
        if paths and self.deliver is not None:
            self.deliver.on_preview(paths, step)
        return paths

    def _render_all(self, step: int, epoch: Optional[int]) -> List[str]:
        texts = sorted({p.prompt for p in self.prompts} | {p.negative_prompt for p in self.prompts})
        conditioning: Dict[str, Conditioning] = dict(zip(texts, self.encode(texts)))
        paths = []
        for index, prompt in enumerate(self.prompts):
            uncond = conditioning[prompt.negative_prompt] if prompt.scale != 1.0 else None
            pixels = render_sample(self.adapter, prompt, conditioning[prompt.prompt], uncond, self.autocast)
            seed = resolved_fields(prompt)[2]
            path = os.path.join(self.folder, sample_file_name(self.output_name, index, seed, step, epoch))
            image = to_pil(pixels)

            def write(tmp: str, image: Any = image) -> None:
                image.save(tmp, format="PNG")

            atomic_write(path, write)
            paths.append(path)
        self.log(f"sample images at step {step}: {', '.join(os.path.basename(p) for p in paths)}")
        return paths
