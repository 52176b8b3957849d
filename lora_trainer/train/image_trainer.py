"""Image LoRA training: config -> dataset -> model adapter -> LoRA network -> shared loop -> kohya file.

``ImageTrainingSession`` is the image route's ``TrainingTask`` (``train/loop.py``): it reads the dataset, opens
the model through its family, fills the encoding caches, attaches the LoRA network, and gives the shared loop
each step's micro-batches, their loss (the family's objective), the saves and the position to resume from.
Step seeding, accumulation, resume, save cadence, NaN/OOM and cancel handling are the loop's.
"""

from __future__ import annotations

import math
import os
import random
from typing import List, Optional, Sequence

import torch

from lora_trainer.config import ImageConfig, check_output_name, resolved_output_name
from lora_trainer.data.buckets import Bucket, cover_size, crop_left_top
from lora_trainer.data.dataset import ImageCaptionDataset
from lora_trainer.data.encoding_cache import EncodingCache
from lora_trainer.errors import ConfigError
from lora_trainer.export.lora_file import SAVE_DTYPES, save_lora_file
from lora_trainer.export.metadata import base_model_hashes, lora_metadata
from lora_trainer.lora.factory import build_network
from lora_trainer.lora.network import LoRANetwork
from lora_trainer.models.adapter import DiffusionAdapter, SizeCondition
from lora_trainer.models.long_captions import cut_caption_lines
from lora_trainer.train.callbacks import TrainingCallback
from lora_trainer.train.encoding_pass import (
    CaptionsOnDemand,
    EncodingPass,
    LatentsOnDemand,
    on_demand_captions_per_batch,
)
from lora_trainer.train.extras import training_extras
from lora_trainer.train.loop import LoopEnd, StepBatches, TrainingLoop, TrainingTask
from lora_trainer.train.loss_weights import batch_loss_weights
from lora_trainer.train.memory import GIB, estimate_activations_gib, estimate_memory, module_bytes
from lora_trainer.train.result import TrainingResult
from lora_trainer.train.runtime import Runtime
from lora_trainer.train.sample_prompts import load_sample_prompts
from lora_trainer.train.state import TrainingState, resume_hint, state_folder

FINAL_DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"


def crop_offset(size, bucket: Bucket):
    """Where ``resize_to_bucket`` crops an image of ``size`` covering ``bucket``, in resized pixels."""
    return crop_left_top(cover_size(size, bucket), bucket)


def train_image(
    cfg: ImageConfig,
    callbacks: Optional[List[TrainingCallback]] = None,
    runtime: Optional[Runtime] = None,
    adapter: Optional[DiffusionAdapter] = None,
    log=print,
) -> TrainingResult:
    """Train an image LoRA. ``adapter`` defaults to diffusers models loaded from ``cfg.base_model``."""
    if runtime is None:
        from lora_trainer.train.accelerate_runtime import AccelerateRuntime

        runtime = AccelerateRuntime(cfg.mixed_precision, cfg.num_threads)
    session = ImageTrainingSession(cfg, runtime, callbacks or [], log if runtime.is_main_process else _silent)
    try:
        return session.run(adapter)
    finally:
        runtime.end()


def _silent(*_args, **_kwargs) -> None:
    pass


class ImageTrainingSession(TrainingTask):
    def __init__(self, cfg: ImageConfig, runtime, callbacks: List[TrainingCallback], log):
        self.cfg = cfg
        self.runtime = runtime
        self.log = log
        self.output_name = resolved_output_name(cfg)
        self.loop = TrainingLoop(cfg, self, runtime, callbacks, log)
        self.callbacks = self.loop.callbacks
        # sd-scripts' ss_session_id: a random number telling which run a file came from (not from the seed).
        self.session_id = random.SystemRandom().randint(0, 2**32 - 1)
        self.model_hashes: Optional[dict] = None
        self.latents_on_demand: Optional[LatentsOnDemand] = None  # cache_latents_during_training, until done
        self.captions_on_demand: Optional[CaptionsOnDemand] = None  # cache_text_during_training

    # ------------------------------------------------------------ set-up

    def run(self, adapter: Optional[DiffusionAdapter]) -> TrainingResult:
        cfg, runtime = self.cfg, self.runtime
        if cfg.output_name:
            check_output_name(cfg.output_name)  # the rule every front end applies
        # The dataset is read before any model loads: an empty or broken folder fails in seconds.
        self.dataset = ImageCaptionDataset(cfg)
        for line in self.dataset.summary_lines():
            self.log(line)
        self.sample_prompts = load_sample_prompts(cfg.sample_prompts)  # a bad prompt file fails before the model
        self.loop.write_snapshot()
        if adapter is None:
            from lora_trainer.models.standalone import open_base_model

            adapter = open_base_model(
                cfg, device=runtime.device, dtype=runtime.dtype, on_download=self.callbacks.on_download, log=self.log
            )
        elif cfg.prediction_type:
            adapter.prediction_type = cfg.prediction_type
        if cfg.fp8_base and not adapter.family.supports_fp8_base:
            raise ConfigError(f"fp8_base: {adapter.family.label} models cannot be stored in fp8 here; set it to false.")
        if not cfg.network_weights:  # before any weights load; a continued file's type is checked when read
            adapter.family.check_network_type(cfg.network_type, cfg.conv_rank)
        self.adapter = adapter
        adapter.set_max_token_length(cfg.max_token_length)
        self.objective = adapter.family.objective(adapter.prediction_type, adapter.alphas_cumprod, cfg)
        self.log(
            f"model: {adapter.model_name} ({adapter.arch}, {adapter.prediction_type}); training on "
            f"{runtime.device} in {runtime.num_processes} process(es)"
        )
        samples = self.dataset.samples
        counts = adapter.caption_token_counts([s.caption for s in samples])
        for line in cut_caption_lines([s.image.name for s in samples], counts, cfg.max_token_length):
            self.log(line)
        try:  # whatever fails from here on, the model (the host's, in the WebUI) is handed back as it was
            self._prepare_encodings()
            self.network = self._build_network()
            self._plan_steps()
            self._log_memory_estimate()
            self.callbacks.callbacks[:0] = training_extras(self)  # samples, validation, retention
            with self.network.attached():
                return self.loop.run()
        finally:
            adapter.restore()

    def _log_memory_estimate(self) -> None:
        adapter = self.adapter
        # Not the VAE encoder kept for latents on demand: it goes after the first epoch (its size is logged).
        vae = None if self.cache_latents else getattr(adapter, "vae", None)
        text_encoders = [] if self.cache_text else adapter.text_encoder_modules()
        lora_parameters = sum(p.numel() for p in self.network.parameters())
        estimate = estimate_memory(self.cfg, adapter.family, adapter.unet, text_encoders, lora_parameters, vae)
        self.log(estimate.describe())

    def _prepare_encodings(self) -> None:
        """Fill the latent/text caches with the encoders loaded, then free them before the UNet loads; with
        ``cache_latents_during_training``, the latents are left to ``LatentsOnDemand`` and the VAE's encoder
        loads beside the UNet; with ``cache_text_during_training`` (where it fits), the captions are left to
        ``CaptionsOnDemand``."""
        cfg, adapter, dataset = self.cfg, self.adapter, self.dataset
        cache_dir = cfg.cache_dir or dataset.cache_root
        self.cache = EncodingCache(
            cache_dir if cfg.cache_to_disk else None,
            adapter.identity,
            writer=self.runtime.is_main_process,
            max_token_length=cfg.max_token_length,
        )
        self.cache_latents = cfg.cache_latents and not dataset.any_flip
        self.cache_text = not cfg.train_text_encoder and dataset.captions_are_fixed()
        missing_latents = [
            s for s in dataset.samples if self.cache_latents and not self.cache.has(self.cache.latent_key(s))
        ]
        variants = dataset.all_caption_variants()
        missing_text = [
            c for c in variants if self.cache_text and not self.cache.has(self.cache.text_key(c, cfg.clip_skip))
        ]
        on_demand = bool(missing_latents) and self._latents_on_demand()
        text_on_demand = bool(missing_text) and self._text_on_demand()
        before = [] if on_demand else missing_latents
        before_text = [] if text_on_demand else missing_text
        if before or before_text:
            adapter.load(unet=False, vae=bool(before), text_encoders=bool(before_text))
            images = f"{len(before)} images and " if before else ""
            self.log(f"encoding {images}{len(before_text)} captions for the caches")
            encoder = EncodingPass(adapter, self.callbacks.on_encode_progress, self.callbacks.should_stop, self.log)
            if before:
                encoder.latents(before, dataset.pixels, self._store_latents)
            if before_text:
                encoder.captions(before_text, cfg.clip_skip, self._store_text)
        if text_on_demand:
            self.captions_on_demand = CaptionsOnDemand(
                EncodingPass(adapter, log=self.log, fp32_for_good=False),
                variants,
                missing_text,
                cfg.clip_skip,
                self._store_text,
                load=lambda: adapter.load(unet=False, vae=False, text_encoders=True),
                release=lambda: adapter.release(text_encoders=True),
                per_batch=on_demand_captions_per_batch(adapter.device),
                progress=self.callbacks.on_encode_progress,
                should_stop=self.callbacks.should_stop,
                log=self.log,
            )
            self.log(
                f"encoding the {len(missing_text)} captions as training reaches them (cache_text_during_training): "
                "the first step's now, the rest before the next step that needs one"
            )
        # What the steps still need: the VAE only without latent caching (or until the latents are encoded), the
        # text encoders only when not cached.
        adapter.release(vae=self.cache_latents and not on_demand, text_encoders=self.cache_text)
        adapter.load(unet=True, vae=on_demand or not self.cache_latents, text_encoders=not self.cache_text)
        if on_demand:
            self.latents_on_demand = LatentsOnDemand(
                EncodingPass(adapter, fp32_for_good=False),
                dataset.samples,
                missing_latents,
                dataset.pixels,
                self._store_latents,
                release=self._release_vae,
            )
            size = round(module_bytes([getattr(adapter, "vae", None)]) / 2**20)
            # A host adapter has no VAE of its own to load: it encodes with the host's, resident anyway.
            vae = f"the VAE encoder ({size} MB) loaded until then" if size else "with the model's own VAE"
            self.log(
                f"encoding the latents of {len(missing_latents)} images as training first reaches them "
                f"(cache_latents_during_training), {vae}"
            )

    def _store_latents(self, sample, latents: torch.Tensor) -> None:
        self.cache.put(self.cache.latent_key(sample), {"latents": latents})

    def _store_text(self, caption: str, entry) -> None:
        self.cache.put(self.cache.text_key(caption, self.cfg.clip_skip), entry)

    def _text_on_demand(self) -> bool:
        """Encode captions during training: asked for, possible with this adapter, one process (as for the
        latents), and the text encoders smaller than a step's activations, so loading them between steps does
        not raise the peak (0 extra bytes where the host holds them anyway)."""
        cfg, adapter = self.cfg, self.adapter
        extra = adapter.text_encoder_bytes()
        return (
            cfg.cache_text_during_training
            and adapter.encodes_during_training
            and self.runtime.num_processes == 1
            and extra is not None
            and extra <= estimate_activations_gib(cfg, adapter.family) * GIB
        )

    def _latents_on_demand(self) -> bool:
        """Encode latents during training: asked for, possible with this adapter, and one process (each process
        draws only its share of an epoch; the disk cache has one writer)."""
        cfg, adapter = self.cfg, self.adapter
        return (
            self.cache_latents
            and cfg.cache_latents_during_training
            and adapter.encodes_during_training
            and self.runtime.num_processes == 1
        )

    def _release_vae(self) -> None:
        self.adapter.release(vae=True)
        self.log(f"all {self.latents_on_demand.total if self.latents_on_demand else 0} latents cached; VAE freed")

    def _build_network(self) -> LoRANetwork:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # LoRA down-projections start the same on every process
        network, self.network_spec = build_network(cfg, self.adapter, self.log)
        self.rank, self.alpha = self.network_spec.rank, self.network_spec.alpha
        network.to(self.runtime.device)
        if cfg.gradient_checkpointing:
            self.adapter.enable_gradient_checkpointing(cfg.train_text_encoder)
        return network

    # ------------------------------------------------------------ one micro-batch

    def _batch_inputs(self, indices: Sequence[int], epoch: int, generator: torch.Generator):
        cfg, dataset, adapter, device = self.cfg, self.dataset, self.adapter, self.runtime.device
        samples = [dataset.samples[i] for i in indices]
        flips = [False] * len(samples)
        if self.cache_latents:
            if self.latents_on_demand is not None:
                self.latents_on_demand.ensure(samples)
            latents = torch.stack([self.cache.get(self.cache.latent_key(s))["latents"] for s in samples])
        else:
            flips = [
                s.repeats > 0 and dataset.flips(s.index) and bool(torch.rand((), generator=generator) < 0.5)
                for s in samples
            ]
            pixels = torch.stack([dataset.pixels(s.index, flip) for s, flip in zip(samples, flips)])
            latents = adapter.encode_pixels(pixels)
        captions = [dataset.caption_for(s.index, epoch, cfg.seed) for s in samples]
        if self.captions_on_demand is not None:
            self.captions_on_demand.ensure(captions)
        if self.cache_text:
            entries = [self.cache.get(self.cache.text_key(c, cfg.clip_skip)) for c in captions]
            cond = {k: torch.stack([e[k] for e in entries]).to(device) for k in entries[0]}
        else:
            with torch.set_grad_enabled(cfg.train_text_encoder and torch.is_grad_enabled()):
                cond = adapter.encode_text(captions, cfg.clip_skip)
        sizes = [SizeCondition(s.image.size, s.crop_left_top, s.bucket) for s in samples]
        return latents.to(device, torch.float32), cond, sizes, batch_loss_weights(dataset, samples, flips)

    def loss(
        self,
        micro_batch: Sequence[int],
        epoch: int,
        generator: torch.Generator,
        timesteps: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The family objective's loss on one micro-batch (its mean over the batch: one loss unit), with the
        batch's regularisation weights and loss masks; ``timesteps`` fixed instead of drawn (the validation
        loss, in the objective's own units)."""
        adapter, runtime = self.adapter, self.runtime
        latents, cond, sizes, weights = self._batch_inputs(micro_batch, epoch, generator)
        with runtime.autocast():
            return self.objective.loss(
                latents,
                lambda noisy, t: adapter.predict(noisy, t, cond, sizes),
                generator,
                weights=weights,
                timesteps=timesteps,
            )

    # ------------------------------------------------------------ the loop

    def _plan_steps(self) -> None:
        cfg, runtime = self.cfg, self.runtime
        batches_per_epoch = len(
            self.dataset.epoch_batches(0, cfg.seed, cfg.batch_size, runtime.process_index, runtime.num_processes)
        )
        steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps))
        self.steps = cfg.max_train_steps or cfg.epochs * steps_per_epoch
        self.epochs = math.ceil(self.steps / steps_per_epoch)
        self.batches_per_epoch = batches_per_epoch

    def parameter_groups(self) -> List[dict]:
        cfg = self.cfg
        return self.network.parameter_groups(
            {"lora_unet": cfg.unet_lr, "lora_te": cfg.text_encoder_lr}, cfg.learning_rate
        )

    def total_steps(self) -> int:
        return self.steps

    def start_at(self, state: Optional[TrainingState]) -> int:
        self.epoch, self.batch_offset = (
            (0, 0) if state is None else (state.epoch, int(state.info.get("batch_in_epoch", 0)))
        )
        self.epoch_batches = None
        if state is not None:
            self.log(f"resumed from {self.cfg.resume} at step {state.step}")
        return 0 if state is None else state.step

    def next_step(self, step: int) -> StepBatches:
        cfg, runtime = self.cfg, self.runtime
        if self.epoch_batches is None or self.batch_offset >= len(self.epoch_batches):
            if self.epoch_batches is not None:
                self.epoch, self.batch_offset = self.epoch + 1, 0
            self.epoch_batches = self.dataset.epoch_batches(
                self.epoch, cfg.seed, cfg.batch_size, runtime.process_index, runtime.num_processes
            )
        group = self.epoch_batches[self.batch_offset : self.batch_offset + cfg.gradient_accumulation_steps]
        self.batch_offset += len(group)
        return StepBatches(group, self.epoch, epoch_finished=self.batch_offset >= len(self.epoch_batches))

    def summary(self) -> dict:
        return {"images": len(self.dataset.samples), "arch": self.adapter.arch}

    def trainable_state(self):
        return self.network.kohya_state_dict(torch.float32)

    def resume_settings(self) -> dict:
        """What a training state records and a resumed run must match (see ``state.check_resumable``)."""
        return {
            "lora_rank": self.rank,
            "lora_alpha": self.alpha,
            "base_model": self.adapter.model_name,
            # The type and its options (as ss_network_args records them: conv rank/alpha, factor, DoRA).
            "network_type": self.network_spec.network_type,
            "network_args": self.network_spec.network_args(),
        }

    def load_trainable_state(self, state: TrainingState, source: str) -> None:
        self.network.load_kohya_state_dict(state.weights, source)
        self.loop.started_at = float(state.info.get("started_at", self.loop.started_at))

    def state_info(self) -> dict:
        # The position after the step just taken: an epoch's end resumes at the next epoch's start.
        epoch, offset = self.epoch, self.batch_offset
        if self.epoch_batches is not None and offset >= len(self.epoch_batches):
            epoch, offset = epoch + 1, 0
        return {"epoch": epoch, "batch_in_epoch": offset}

    def result(self, end: LoopEnd) -> TrainingResult:
        if end.status == "finished" and not end.outputs:  # a data-parallel process other than the writer
            return TrainingResult("finished", end.step, [], "finished; the main process saved the files", end.losses)
        if end.status == "finished":
            named, diffusers_name = end.outputs
            return TrainingResult(
                "finished", end.step, [diffusers_name, named], f"saved {diffusers_name}, {named}", end.losses
            )
        kept = [end.last_save] if end.last_save else []
        if end.status == "cancelled":
            message = f"cancelled at step {end.step}" + (f"; saved {end.last_save}" if end.last_save else "")
            if end.last_save and self.cfg.save_state:
                message += "\n" + resume_hint(state_folder(self.cfg.output_dir, end.step))
        elif end.reason.startswith("out of memory"):
            message = (
                f"{end.reason}; the last good save is kept. Lower batch_size, resolution or lora_rank, or turn on "
                "gradient_checkpointing / mixed_precision."
            )
        else:
            what = f"the last good save ({end.last_save}) is kept" if end.last_save else "nothing was saved"
            message = (
                f"loss became NaN/inf at step {end.step + 1}; training stopped and {what}. Lower learning_rate, or "
                "use mixed_precision bf16/no instead of fp16."
            )
        return TrainingResult(end.status, end.step, kept, message, end.losses)

    # ------------------------------------------------------------ saving

    def _lora_tensors_and_metadata(self, step: int, epoch: int):
        cfg, adapter = self.cfg, self.adapter
        tensors = adapter.family.to_lora_file(self.network.kohya_state_dict(SAVE_DTYPES[cfg.save_precision]))
        if self.model_hashes is None:  # hashed once per run, at the first save (a multi-GB file takes seconds)
            self.model_hashes = getattr(adapter, "model_hashes", None) or base_model_hashes(adapter.model_file)
        metadata = lora_metadata(
            cfg,
            family=adapter.family,
            model_name=adapter.model_name,
            prediction_type=adapter.prediction_type,
            rank=self.rank,
            alpha=self.alpha,
            network=self.network_spec.metadata(),
            dataset=self.dataset.metadata(),
            started_at=self.loop.started_at,
            step=step,
            epoch=epoch,
            num_epochs=self.epochs,
            max_steps=self.steps,
            zero_terminal_snr=getattr(adapter, "zero_terminal_snr", False),
            batches_per_epoch=self.batches_per_epoch,
            num_processes=self.runtime.num_processes,
            session_id=self.session_id,
            model_hashes=self.model_hashes,
        )
        return tensors, metadata

    def _step_file(self, step: int) -> str:
        """An intermediate save's path (the retention rules delete old ones by it)."""
        return os.path.join(self.cfg.output_dir, f"{self.output_name}-step{step:08d}.safetensors")

    def save(self, step: int, final: bool) -> List[str]:
        """An intermediate ``<name>-stepNNNNNNNN.safetensors``, or the final ``<name>.safetensors`` and its
        diffusers-named copy; the named file first."""
        cfg = self.cfg
        tensors, metadata = self._lora_tensors_and_metadata(step, self.epoch)
        if not final:
            path = self._step_file(step)
            save_lora_file(path, tensors, metadata, self.adapter.family.lora_file_prefixes)
            return [path]
        named = os.path.join(cfg.output_dir, f"{self.output_name}.safetensors")
        diffusers_name = os.path.join(cfg.output_dir, FINAL_DIFFUSERS_NAME)
        for path in (diffusers_name, named):
            save_lora_file(path, tensors, metadata, self.adapter.family.lora_file_prefixes)
        return [named, diffusers_name]
