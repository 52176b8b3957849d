"""The image route's optional callbacks, built from its config once the model and the LoRA are ready: sample
images (``sample_images.py``), the validation loss (``validation.py``) and checkpoint retention
(``retention.py``). The trainer puts them first in its callback list, so the metrics and images they add reach
the front ends' callbacks (TensorBoard, the tab, the progress bar) at the same step.
"""

from __future__ import annotations

from typing import List

import torch

from lora_trainer.models.adapter import Conditioning
from lora_trainer.train.callbacks import TrainingCallback
from lora_trainer.train.retention import CheckpointRetention
from lora_trainer.train.sample_images import SampleImages
from lora_trainer.train.state import state_folder
from lora_trainer.train.validation import ValidationLoss, measure_validation_loss


def training_extras(session) -> List[TrainingCallback]:
    """The callbacks ``session`` (an ``ImageTrainingSession`` with its dataset, adapter, network, caches and
    callback list set up) needs for its config."""
    cfg, runtime = session.cfg, session.runtime
    extras: List[TrainingCallback] = []
    if session.sample_prompts and runtime.is_main_process:
        if getattr(session.adapter, "renders_samples", False):
            extras.append(_sample_images(session))
        else:
            session.log(
                "sample_prompts: this model backend does not render sample images (inside the WebUI, the tab's "
                "previews render with the WebUI's own txt2img); training goes on without them"
            )
    if session.dataset.validation_samples:
        extras.append(
            ValidationLoss(
                lambda: _measure_validation(session),
                session.network,
                cfg.validate_every_n_steps,
                cfg.validate_every_n_epochs,
                session.log,
            )
        )
    if (cfg.save_last_n_steps or cfg.save_last_n_epochs) and runtime.is_main_process:
        extras.append(
            CheckpointRetention(
                output_dir=cfg.output_dir,
                output_name=session.output_name,
                save_steps=cfg.save_steps,
                save_every_n_epochs=cfg.save_every_n_epochs,
                last_n_steps=cfg.save_last_n_steps,
                last_n_epochs=cfg.save_last_n_epochs,
                lora_path=session._step_file,
                state_path=lambda step: state_folder(cfg.output_dir, step),
                log=session.log,
            )
        )
    return extras


def _sample_images(session) -> SampleImages:
    cfg = session.cfg
    prompts = [p.resolve(i, cfg.resolution, cfg.seed, cfg.sample_sampler) for i, p in enumerate(session.sample_prompts)]
    return SampleImages(
        prompts,
        adapter=session.adapter,
        network=session.network,
        encode=lambda texts: _encode_prompts(session, texts),
        output_dir=cfg.output_dir,
        output_name=session.output_name,
        every_n_steps=cfg.sample_every_n_steps,
        every_n_epochs=cfg.sample_every_n_epochs,
        at_first=cfg.sample_at_first,
        autocast=session.runtime.autocast,
        log=session.log,
        deliver=session.callbacks,
    )


@torch.no_grad()
def _encode_prompts(session, texts: List[str]) -> List[Conditioning]:
    """Each text's conditioning (batch of one). With the text encoders trained or resident they encode it now
    (a trained one with its LoRA); otherwise through the text cache, loading the encoders only for what it
    misses and freeing them again."""
    cfg, adapter, cache = session.cfg, session.adapter, session.cache
    if not session.cache_text:
        return [adapter.encode_text([text], cfg.clip_skip) for text in texts]
    missing = [t for t in texts if not cache.has(cache.text_key(t, cfg.clip_skip))]
    if missing:
        adapter.load(unet=False, vae=False, text_encoders=True)
        try:
            for text in missing:
                cond = adapter.encode_text([text], cfg.clip_skip)
                cache.put(cache.text_key(text, cfg.clip_skip), {k: v[0] for k, v in cond.items()})
        finally:
            adapter.release(text_encoders=True)
    entries = [cache.get(cache.text_key(t, cfg.clip_skip)) for t in texts]
    return [{k: v.unsqueeze(0).to(adapter.device) for k, v in entry.items()} for entry in entries]


def _measure_validation(session) -> float:
    """Every validation batch at sd-scripts' fixed timesteps and seeded noise. Each process measures all of them
    (validation sets are small), so every process has the same value without a collective."""
    cfg, dataset = session.cfg, session.dataset
    batches = dataset.validation_batches(cfg.batch_size, cfg.max_validation_steps)
    timesteps = session.objective.validation_timesteps()  # the family's: DDPM indices or flow noise levels
    return measure_validation_loss(
        batches,
        lambda indices, t, generator: session.loss(indices, 0, generator, timesteps=t),
        timesteps,
        dataset.validation_seed,
        session.runtime.device,
    )
