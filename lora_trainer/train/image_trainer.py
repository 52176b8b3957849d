"""Image LoRA training: config -> dataset -> model adapter -> LoRA network -> loop -> kohya file.

Set-up (caches, LoRA, optimizer, resume) happens in ``ImageTrainingSession.__init__``-time helpers so the
loop in ``_train_loop`` reads top to bottom. Each step's randomness is seeded from (seed, step, process), so
resuming from a saved state continues exactly as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import time
from typing import List, Optional, Sequence, Tuple

import torch

from lora_trainer.config import (
    ImageConfig,
    check_output_name,
    resolved_output_name,
    save_config_snapshot,
)
from lora_trainer.data.buckets import Bucket, cover_size, crop_left_top
from lora_trainer.data.dataset import ImageCaptionDataset
from lora_trainer.data.encoding_cache import EncodingCache
from lora_trainer.errors import LoraTrainerError, TrainingStopped
from lora_trainer.export.lora_file import SAVE_DTYPES, save_lora_file
from lora_trainer.export.metadata import lora_metadata
from lora_trainer.lora.factory import build_network
from lora_trainer.lora.network import LoRANetwork
from lora_trainer.models.adapter import DiffusionAdapter, SizeCondition
from lora_trainer.models.long_captions import cut_caption_lines
from lora_trainer.train.callbacks import CallbackList, StepInfo, TensorBoardLogger, TrainingCallback
from lora_trainer.train.diffusion_loss import denoising_loss
from lora_trainer.train.encoding_pass import EncodingPass
from lora_trainer.train.extras import training_extras
from lora_trainer.train.loss_weights import batch_loss_weights
from lora_trainer.train.optim import build_optimizer, build_scheduler, load_optimizer_state
from lora_trainer.train.result import TrainingResult
from lora_trainer.train.runtime import Runtime
from lora_trainer.train.sample_prompts import load_sample_prompts
from lora_trainer.train.state import (
    apply_config_rates,
    check_resumable,
    describe_rate_changes,
    load_training_state,
    restore_rng_state,
    resume_hint,
    save_training_state,
    state_folder,
)

FINAL_DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"


def crop_offset(size, bucket: Bucket):
    """Where ``resize_to_bucket`` crops an image of ``size`` covering ``bucket``, in resized pixels."""
    return crop_left_top(cover_size(size, bucket), bucket)


def step_seed(seed: int, micro_step: int, process: int) -> int:
    return (seed * 1_000_003 + micro_step * 7_919 + process * 104_729) % (2**63)


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


class ImageTrainingSession:
    def __init__(self, cfg: ImageConfig, runtime, callbacks: List[TrainingCallback], log):
        self.cfg = cfg
        self.runtime = runtime
        self.log = log
        self.output_name = resolved_output_name(cfg)
        logger = (
            TensorBoardLogger(cfg.logging_dir or os.path.join(cfg.output_dir, "logs"))
            if runtime.is_main_process
            else None
        )
        self.callbacks = CallbackList([*callbacks, logger])
        self.started_at = time.time()
        self.saved_files: List[str] = []
        self.last_good_save: Optional[str] = None

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
        if runtime.is_main_process:
            os.makedirs(cfg.output_dir, exist_ok=True)
            save_config_snapshot(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        if adapter is None:
            from lora_trainer.models.diffusers_adapter import DiffusersAdapter

            adapter = DiffusersAdapter(
                cfg.base_model,
                device=runtime.device,
                dtype=runtime.dtype,
                prediction_type=cfg.prediction_type,
                on_download=self.callbacks.on_download,
                log=self.log,
            )
        elif cfg.prediction_type:
            adapter.prediction_type = cfg.prediction_type
        self.adapter = adapter
        adapter.set_max_token_length(cfg.max_token_length)
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
            self.callbacks.callbacks[:0] = training_extras(self)  # samples, validation, retention
            with self.network.attached():
                return self._train_loop()
        finally:
            adapter.restore()

    def _prepare_encodings(self) -> None:
        """Fill the latent/text caches with the encoders loaded, then free them before the UNet loads."""
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
        missing_text = [
            c
            for c in dataset.all_caption_variants()
            if self.cache_text and not self.cache.has(self.cache.text_key(c, cfg.clip_skip))
        ]
        if missing_latents or missing_text:
            adapter.load(unet=False, vae=bool(missing_latents), text_encoders=bool(missing_text))
            self.log(f"encoding {len(missing_latents)} images and {len(missing_text)} captions for the caches")
            encoder = EncodingPass(adapter, self.callbacks.on_encode_progress, self.callbacks.should_stop, self.log)
            encoder.latents(
                missing_latents,
                dataset.pixels,
                lambda sample, latents: self.cache.put(self.cache.latent_key(sample), {"latents": latents}),
            )
            encoder.captions(
                missing_text,
                cfg.clip_skip,
                lambda c, entry: self.cache.put(self.cache.text_key(c, cfg.clip_skip), entry),
            )
        # What the steps still need: the VAE only without latent caching, the encoders only when not cached.
        adapter.release(vae=self.cache_latents, text_encoders=self.cache_text)
        adapter.load(unet=True, vae=not self.cache_latents, text_encoders=not self.cache_text)

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
            latents = torch.stack([self.cache.get(self.cache.latent_key(s))["latents"] for s in samples])
        else:
            flips = [
                s.repeats > 0 and dataset.flips(s.index) and bool(torch.rand((), generator=generator) < 0.5)
                for s in samples
            ]
            pixels = torch.stack([dataset.pixels(s.index, flip) for s, flip in zip(samples, flips)])
            latents = adapter.encode_pixels(pixels)
        captions = [dataset.caption_for(s.index, epoch, cfg.seed) for s in samples]
        if self.cache_text:
            entries = [self.cache.get(self.cache.text_key(c, cfg.clip_skip)) for c in captions]
            cond = {k: torch.stack([e[k] for e in entries]).to(device) for k in entries[0]}
        else:
            with torch.set_grad_enabled(cfg.train_text_encoder and torch.is_grad_enabled()):
                cond = adapter.encode_text(captions, cfg.clip_skip)
        sizes = [SizeCondition(s.image.size, s.crop_left_top, s.bucket) for s in samples]
        return latents.to(device, torch.float32), cond, sizes, batch_loss_weights(dataset, samples, flips)

    def _loss(self, indices, epoch: int, generator: torch.Generator, timesteps=None) -> torch.Tensor:
        """The batch's loss; ``timesteps`` fixed instead of drawn (the validation loss)."""
        cfg, adapter, runtime = self.cfg, self.adapter, self.runtime
        latents, cond, sizes, weights = self._batch_inputs(indices, epoch, generator)
        with runtime.autocast():
            return denoising_loss(
                latents,
                lambda noisy, t: adapter.predict(noisy, t, cond, sizes),
                adapter.alphas_cumprod,
                adapter.prediction_type,
                generator,
                cfg.noise_offset,
                cfg.min_snr_gamma,
                weights=weights,
                timesteps=timesteps,
            )

    def _micro_step_loss(self, indices, epoch: int, micro_step: int) -> torch.Tensor:
        cfg, runtime = self.cfg, self.runtime
        seed = step_seed(cfg.seed, micro_step, runtime.process_index)
        torch.manual_seed(seed)  # LoRA dropout
        generator = torch.Generator(device=runtime.device).manual_seed(seed)
        return self._loss(indices, epoch, generator)

    # ------------------------------------------------------------ the loop

    def _plan_steps(self) -> None:
        cfg, runtime = self.cfg, self.runtime
        batches_per_epoch = len(
            self.dataset.epoch_batches(0, cfg.seed, cfg.batch_size, runtime.process_index, runtime.num_processes)
        )
        steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps))
        self.total_steps = cfg.max_train_steps or cfg.epochs * steps_per_epoch
        self.epochs = math.ceil(self.total_steps / steps_per_epoch)

    def _set_up_optimizer(self) -> Tuple[int, int, int]:
        """Optimizer and schedule (resumed when asked); returns the (step, epoch, batch) to start from."""
        cfg = self.cfg
        self.params = [p for p in self.network.parameters() if p.requires_grad]
        groups = self.network.parameter_groups(
            {"lora_unet": cfg.unet_lr, "lora_te": cfg.text_encoder_lr}, cfg.learning_rate
        )
        self.optimizer = build_optimizer(cfg.optimizer, groups, cfg.learning_rate, cfg.weight_decay)
        self.scheduler = build_scheduler(
            cfg.lr_scheduler, self.optimizer, cfg.lr_warmup_steps, self.total_steps, cfg.lr_scheduler_num_cycles
        )
        if not cfg.resume:
            return 0, 0, 0
        state = load_training_state(cfg.resume)
        shapes = {k: tuple(v.shape) for k, v in self.network.kohya_state_dict().items()}
        check_resumable(cfg.resume, state, self._resume_settings(), shapes)
        rates = list(self.scheduler.base_lrs)  # the config's, before the state's replace them
        self.network.load_kohya_state_dict(state.weights, cfg.resume)
        load_optimizer_state(self.optimizer, state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        for line in describe_rate_changes(apply_config_rates(self.optimizer, self.scheduler, rates), state.step):
            self.log(line)
        restore_rng_state(state.rng)
        self.started_at = float(state.info.get("started_at", self.started_at))
        self.log(f"resumed from {cfg.resume} at step {state.step}")
        return state.step, state.epoch, int(state.info.get("batch_in_epoch", 0))

    def _resume_settings(self) -> dict:
        """What a training state records and a resumed run must match (see ``state.check_resumable``)."""
        return {
            "lora_rank": self.rank,
            "lora_alpha": self.alpha,
            "base_model": self.adapter.model_name,
            # The type and its options (as ss_network_args records them: conv rank/alpha, factor, DoRA).
            "network_type": self.network_spec.network_type,
            "network_args": self.network_spec.network_args(),
        }

    def _optimizer_step(self, group: List[List[int]], epoch: int, step: int) -> float:
        """One optimizer step over ``group`` (the gradient-accumulation micro-batches); returns the mean loss."""
        cfg, runtime = self.cfg, self.runtime
        loss_value = 0.0
        for k, indices in enumerate(group):
            loss = self._micro_step_loss(indices, epoch, step * cfg.gradient_accumulation_steps + k)
            runtime.backward(loss / len(group))
            loss_value += float(loss.detach()) / len(group)
        runtime.reduce_gradients(self.params)
        loss_value = runtime.mean_across_processes(loss_value)
        if not math.isfinite(loss_value):
            raise TrainingStopped(self._nan_message(step + 1))
        if cfg.max_grad_norm > 0:
            runtime.clip_grad_norm(self.params, cfg.max_grad_norm, self.optimizer)
        runtime.optimizer_step(self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value

    def _train_loop(self) -> TrainingResult:
        cfg, runtime, dataset = self.cfg, self.runtime, self.dataset
        self._plan_steps()
        step, epoch, batch_offset = self._set_up_optimizer()
        total_steps = self.total_steps
        self.callbacks.on_train_start(total_steps, step, {"images": len(dataset.samples), "arch": self.adapter.arch})
        t0, info, losses, start_step = time.time(), None, [], step
        status, message = "finished", ""
        try:
            while step < total_steps and status == "finished":
                batches = dataset.epoch_batches(
                    epoch, cfg.seed, cfg.batch_size, runtime.process_index, runtime.num_processes
                )
                while batch_offset < len(batches) and step < total_steps:
                    group = batches[batch_offset : batch_offset + cfg.gradient_accumulation_steps]
                    loss_value = self._optimizer_step(group, epoch, step)
                    step, batch_offset = step + 1, batch_offset + len(group)
                    losses.append(loss_value)
                    finished_epoch = epoch + 1 if batch_offset >= len(batches) else None
                    info = StepInfo(
                        step,
                        total_steps,
                        epoch + 1,
                        loss_value,
                        self.scheduler.get_last_lr()[0],
                        time.time() - t0,
                        start_step=start_step,
                        epoch_finished=finished_epoch is not None,
                    )
                    self.callbacks.on_step_end(info)
                    if step < total_steps and self._save_due(step, finished_epoch):
                        self._save(step, epoch, batch_offset)
                    if runtime.broadcast_flag(self.callbacks.should_stop()):
                        if self.last_good_save != self._step_file(step):  # not saved at this step already
                            self._save(step, epoch, batch_offset)
                        status, message = "cancelled", self._cancel_message(step)
                        break
                if batch_offset >= len(batches):
                    epoch, batch_offset = epoch + 1, 0
            if status == "finished":
                self._save_final(step, epoch, batch_offset)
                message = f"saved {', '.join(self.saved_files[-2:])}"
        except TrainingStopped as exc:
            status, message = "stopped", str(exc)
        except torch.cuda.OutOfMemoryError:
            status, message = "stopped", self._oom_message(step)
        except LoraTrainerError:
            status = "failed"
            raise
        except KeyboardInterrupt:  # a second Ctrl+C on the command line: quit at once
            status = "cancelled"
            raise
        finally:
            self.callbacks.on_train_end(info, status)
        runtime.wait_for_everyone()
        kept = self.saved_files[-2:] if status == "finished" else [self.last_good_save] if self.last_good_save else []
        return TrainingResult(status=status, step=step, output_files=list(kept), message=message, losses=losses)

    def _save_due(self, step: int, finished_epoch: Optional[int]) -> bool:
        cfg = self.cfg
        by_steps = cfg.save_steps is not None and step % cfg.save_steps == 0
        by_epochs = (
            cfg.save_every_n_epochs is not None
            and finished_epoch is not None
            and finished_epoch % cfg.save_every_n_epochs == 0
        )
        return by_steps or by_epochs

    def _cancel_message(self, step: int) -> str:
        message = f"cancelled at step {step}; saved {self._step_file(step)}"
        return message + ("\n" + resume_hint(state_folder(self.cfg.output_dir, step)) if self.cfg.save_state else "")

    def _nan_message(self, step: int) -> str:
        kept = f"the last good save ({self.last_good_save}) is kept" if self.last_good_save else "nothing was saved"
        return (
            f"loss became NaN/inf at step {step}; training stopped and {kept}. Lower learning_rate, or use "
            "mixed_precision bf16/no instead of fp16."
        )

    def _oom_message(self, step: int) -> str:
        return (
            f"out of memory at step {step}; the last good save is kept. Lower batch_size, resolution or "
            "lora_rank, or turn on gradient_checkpointing / mixed_precision."
        )

    # ------------------------------------------------------------ saving

    def _lora_tensors_and_metadata(self, step: int, epoch: int):
        cfg, adapter = self.cfg, self.adapter
        tensors = self.network.kohya_state_dict(SAVE_DTYPES[cfg.save_precision])
        metadata = lora_metadata(
            cfg,
            arch=adapter.arch,
            model_name=adapter.model_name,
            prediction_type=adapter.prediction_type,
            rank=self.rank,
            alpha=self.alpha,
            network=self.network_spec.metadata(),
            dataset=self.dataset.metadata(),
            started_at=self.started_at,
            step=step,
            epoch=epoch,
            num_epochs=self.epochs,
            max_steps=self.total_steps,
        )
        return tensors, metadata

    def _save(self, step: int, epoch: int, batch_offset: int) -> None:
        if not self.runtime.is_main_process:
            return
        path = self._step_file(step)
        save_lora_file(path, *self._lora_tensors_and_metadata(step, epoch))
        self._save_state(step, epoch, batch_offset)
        self.last_good_save = path
        self.callbacks.on_save(path, step)

    def _step_file(self, step: int) -> str:
        return os.path.join(self.cfg.output_dir, f"{self.output_name}-step{step:08d}.safetensors")

    def _save_final(self, step: int, epoch: int, batch_offset: int) -> None:
        if not self.runtime.is_main_process:
            return
        cfg = self.cfg
        tensors, metadata = self._lora_tensors_and_metadata(step, epoch)
        named = os.path.join(cfg.output_dir, f"{self.output_name}.safetensors")
        diffusers_name = os.path.join(cfg.output_dir, FINAL_DIFFUSERS_NAME)
        for path in (diffusers_name, named):
            save_lora_file(path, tensors, metadata)
        self._save_state(step, epoch, batch_offset)
        self.saved_files += [diffusers_name, named]
        self.last_good_save = named
        self.callbacks.on_save(named, step)

    def _save_state(self, step: int, epoch: int, batch_offset: int) -> None:
        cfg = self.cfg
        if cfg.save_state:
            save_training_state(
                state_folder(cfg.output_dir, step),
                step=step,
                epoch=epoch,
                weights=self.network.kohya_state_dict(torch.float32),
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                info={
                    "batch_in_epoch": batch_offset,
                    "started_at": self.started_at,
                    "seed": cfg.seed,
                    **self._resume_settings(),
                },
            )
