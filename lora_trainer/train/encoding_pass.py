"""The encoding pass before training: VAE latents of the images and text-encoder outputs of the captions, in
batches, with progress, in the adapter's fastest precision.

Images are grouped by bucket (one tensor shape per batch) and batched up to a pixel budget, so a batch of
large images is as heavy as one of small ones and the pass never needs more memory than a few megapixels of
VAE activations. The next batch's images are decoded in a background thread while the current one encodes.
When the adapter asks for reduced precision (``DiffusionAdapter.encoding_autocast``) and a batch comes out
non-finite (fp16 VAEs overflow on some images), that batch and the rest of the pass run in fp32.

``LatentsOnDemand`` is the other way to fill the latent cache (``cache_latents_during_training``): training
starts without them, and each image's latents are encoded when its first batch needs them, with the VAE's
encoder kept beside the UNet until every image is cached. ``CaptionsOnDemand`` does the same for the text cache
(``cache_text_during_training``), loading the text encoders only for the two calls that encode.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from typing import Callable, Dict, List, Optional, Sequence

import torch

from lora_trainer.data.dataset import Sample
from lora_trainer.errors import TrainingCancelled
from lora_trainer.models.adapter import Conditioning, DiffusionAdapter

PIXELS_PER_BATCH = 1024 * 1024  # 16 images of 256x256, 4 of 512x512, 1 of 1024x1024 per VAE call
# Encoding during training: one image per VAE call. The first step then waits for its own batch only, the VAE
# activations beside the resident UNet are one image's, and on CPUs batching gains nothing (the full-size SD
# VAE encodes 8 images at 256 px as fast one at a time as in one batch).
ON_DEMAND_PIXELS_PER_BATCH = 1
CAPTIONS_PER_BATCH = 32

Progress = Callable[[int, int, str], None]  # (done, total, what) with what "latents" or "captions"


def latent_batches(samples: Sequence[Sample], pixels_per_batch: int) -> List[List[Sample]]:
    """``samples`` grouped by bucket (in bucket order, dataset order within one) and cut into batches of at most
    ``pixels_per_batch`` pixels (at least one image each)."""
    per_batch = {}
    batches: List[List[Sample]] = []
    for bucket, group in groupby(sorted(samples, key=lambda s: (s.bucket, s.index)), key=lambda s: s.bucket):
        size = per_batch.setdefault(bucket, max(1, pixels_per_batch // (bucket[0] * bucket[1])))
        group = list(group)
        batches += [group[i : i + size] for i in range(0, len(group), size)]
    return batches


def _finite(value) -> bool:
    tensors = value.values() if isinstance(value, dict) else [value]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class EncodingPass:
    """Encodes what the caches miss. ``progress(done, total, what)`` is called after each batch (and once with
    done=0 before the first); ``should_stop()`` is asked between batches and raises ``TrainingCancelled``."""

    def __init__(
        self,
        adapter: DiffusionAdapter,
        progress: Optional[Progress] = None,
        should_stop: Callable[[], bool] = lambda: False,
        log: Callable[[str], None] = lambda _message: None,
        fp32_for_good: bool = True,
    ):
        self.adapter = adapter
        self.progress = progress or (lambda done, total, what: None)
        self.should_stop = should_stop
        self.log = log
        self.autocast_dtype = getattr(adapter, "encoding_autocast", None)
        # False: only the batch that overflowed is redone in fp32, so a batch's result never depends on what
        # was encoded before it (encoding during training, in an order a resumed run does not repeat).
        self.fp32_for_good = fp32_for_good

    def _run(self, encode: Callable, *args):
        """``encode(*args)`` in the pass's precision; again in fp32 (for good, with ``fp32_for_good``) if reduced
        precision gave inf/NaN."""
        if self.autocast_dtype is not None:
            with torch.no_grad(), torch.autocast(self.adapter.device.type, dtype=self.autocast_dtype):
                value = encode(*args)
            if _finite(value):
                return value
            if self.fp32_for_good:
                self.log(f"encoding in {self.autocast_dtype} overflowed; encoding the rest in fp32")
                self.autocast_dtype = None
        with torch.no_grad():
            return encode(*args)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> fp32 (B, 4, H/8, W/8) latents on the CPU, in the pass's precision."""
        return self._run(self.adapter.encode_pixels, images).float().cpu()

    def _check_stop(self, what: str) -> None:
        if self.should_stop():
            raise TrainingCancelled(f"Cancelled while encoding {what}; nothing was trained.")

    def latents(
        self,
        samples: Sequence[Sample],
        pixels: Callable[[int], torch.Tensor],
        store: Callable[[Sample, torch.Tensor], None],
        pixels_per_batch: Optional[int] = None,
    ) -> None:
        """Encode ``samples`` (``pixels(index)`` -> (3, H, W) in [-1, 1]); ``store(sample, latents)`` gets each
        sample's fp32 (4, H/8, W/8) latents on the CPU. ``pixels_per_batch`` defaults to ``PIXELS_PER_BATCH``."""
        batches = latent_batches(samples, pixels_per_batch or PIXELS_PER_BATCH)
        total, done = len(samples), 0
        self.progress(0, total, "latents")

        def load(batch: List[Sample]) -> torch.Tensor:
            return torch.stack([pixels(s.index) for s in batch])

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-trainer-images") as loader:
            upcoming = loader.submit(load, batches[0]) if batches else None
            for i, batch in enumerate(batches):
                images = upcoming.result()
                upcoming = loader.submit(load, batches[i + 1]) if i + 1 < len(batches) else None
                self._check_stop("latents")
                latents = self.encode_images(images)
                for sample, latent in zip(batch, latents):
                    store(sample, latent)
                done += len(batch)
                self.progress(done, total, "latents")

    def captions(
        self,
        captions: Sequence[str],
        clip_skip: int,
        store: Callable[[str, Dict[str, torch.Tensor]], None],
        per_batch: int = CAPTIONS_PER_BATCH,
    ) -> None:
        """Encode ``captions``; ``store(caption, entry)`` gets each caption's fp32 conditioning tensors (no batch
        dimension) on the CPU."""
        total = len(captions)
        self.progress(0, total, "captions")
        for start in range(0, total, per_batch):
            chunk = list(captions[start : start + per_batch])
            self._check_stop("captions")
            cond: Conditioning = self._run(self.adapter.encode_text, chunk, clip_skip)
            cond = {k: v.float().cpu() for k, v in cond.items()}
            for j, caption in enumerate(chunk):
                store(caption, {k: v[j] for k, v in cond.items()})
            self.progress(start + len(chunk), total, "captions")


class LatentsOnDemand:
    """Fills the latent cache while training runs: ``ensure(batch)`` before a batch reads its latents.

    The plan is fixed up front over every sample whose latents are cached (``latent_batches`` with
    ``pixels_per_batch``, default ``ON_DEMAND_PIXELS_PER_BATCH``), independent of the training order: a missing
    sample is encoded with its whole planned batch (members already cached are encoded again and not stored),
    so each latent is the same whenever, and after whatever interruption, it is encoded. Once every sample
    training draws is cached, the rest (validation images, regularisation images left out) are encoded too and
    ``release()`` frees the VAE.
    ``store(sample, latents)`` gets fp32 (4, H/8, W/8) CPU latents as in ``EncodingPass.latents``.
    """

    def __init__(
        self,
        encoder: EncodingPass,
        samples: Sequence[Sample],
        missing: Sequence[Sample],
        pixels: Callable[[int], torch.Tensor],
        store: Callable[[Sample, torch.Tensor], None],
        release: Callable[[], None],
        pixels_per_batch: Optional[int] = None,
    ):
        self.encoder, self.pixels, self.store, self.release = encoder, pixels, store, release
        batches = latent_batches(samples, pixels_per_batch or ON_DEMAND_PIXELS_PER_BATCH)
        self.plan = {s.index: batch for batch in batches for s in batch}
        self.missing: Dict[int, Sample] = {s.index: s for s in missing}
        self.total = len(missing)

    def ensure(self, samples: Sequence[Sample]) -> None:
        """Encode and store the latents of ``samples`` that are not cached yet (with their planned batches)."""
        if not self.missing:
            return
        for sample in samples:
            if sample.index in self.missing:
                self._encode(self.plan[sample.index])
        if self.missing and all(s.repeats == 0 for s in self.missing.values()):
            for sample in list(self.missing.values()):  # never drawn by training: encode them now
                if sample.index in self.missing:
                    self._encode(self.plan[sample.index])
        if not self.missing:
            self.release()

    def _encode(self, batch: List[Sample]) -> None:
        images = torch.stack([self.pixels(s.index) for s in batch])
        latents = self.encoder.encode_images(images)
        for sample, latent in zip(batch, latents):
            if self.missing.pop(sample.index, None) is not None:
                self.store(sample, latent)


def on_demand_captions_per_batch(device: torch.device) -> int:
    """Captions per text-encoder call when encoding during training: one on a CPU, where a caption costs about
    a tenth of a second and batching saves a quarter at most, so the first step waits for its own caption
    only; ``CAPTIONS_PER_BATCH`` elsewhere, where a batch costs about as much as one caption."""
    return 1 if device.type == "cpu" else CAPTIONS_PER_BATCH


class CaptionsOnDemand:
    """Fills the text cache while training runs: ``ensure(captions)`` before a batch reads its text entries.

    The first call that misses a caption encodes what its batch needs, so the first step waits for one
    batch's captions rather than the dataset's; the next one encodes every caption left (validation and
    caption-dropout variants too, with ``progress``), after which the text encoders are never loaded again.
    ``load()`` and ``release()`` bracket each call: the encoders sit beside the UNet only before a step's
    forward pass, when no activations are alive (the trainer asks for this only where they are smaller than a
    step's activations, so the peak does not rise), never through one. Once ``should_stop()`` (a Cancel) the
    call encodes only what its own batch needs and leaves the rest missing, so the step ends soon and the run
    stops after it as usual.

    Captions are encoded in a fixed plan (every caption of ``captions``, sorted, cut into chunks of
    ``per_batch``; a ``missing`` caption is encoded with its whole chunk, whose members already cached are
    encoded again and not stored), and ``encoder`` must redo only the chunk that overflows in reduced
    precision (``fp32_for_good=False``), so an entry is the same whenever, and after whatever interruption, it
    is encoded. ``store(caption, entry)`` gets fp32 CPU tensors as in ``EncodingPass.captions``.
    """

    def __init__(
        self,
        encoder: EncodingPass,
        captions: Sequence[str],
        missing: Sequence[str],
        clip_skip: int,
        store: Callable[[str, Dict[str, torch.Tensor]], None],
        load: Callable[[], None],
        release: Callable[[], None],
        per_batch: int,
        progress: Optional[Progress] = None,
        should_stop: Callable[[], bool] = lambda: False,
        log: Callable[[str], None] = lambda _message: None,
    ):
        self.encoder, self.clip_skip, self.store = encoder, clip_skip, store
        self.load, self.release, self.per_batch, self.log = load, release, per_batch, log
        self.progress = progress or (lambda done, total, what: None)
        self.should_stop = should_stop
        ordered = sorted(set(captions))
        self.chunks = [ordered[i : i + per_batch] for i in range(0, len(ordered), per_batch)]
        self.chunk_of = {caption: i for i, chunk in enumerate(self.chunks) for caption in chunk}
        self.missing = set(missing)
        self.calls = 0

    def ensure(self, captions: Sequence[str]) -> None:
        """Encode and store the entries of ``captions`` not cached yet (all the rest after the first call)."""
        needed = {self.chunk_of[c] for c in captions if c in self.missing}
        if not needed:
            return
        bulk = self.calls > 0
        self.calls += 1
        chunks = sorted({self.chunk_of[c] for c in self.missing} if bulk else needed)
        if bulk:
            self.log(f"encoding the other {len(self.missing)} captions for the text cache; text encoders then freed")
        total, done = sum(len(self.chunks[i]) for i in chunks), 0
        self.load()
        try:
            for i in chunks:
                if i not in needed and self.should_stop():
                    continue  # cancelled: only this batch's own captions still matter
                self.encoder.captions(self.chunks[i], self.clip_skip, self._store, per_batch=self.per_batch)
                done += len(self.chunks[i])
                if bulk:
                    self.progress(done, total, "captions")
        finally:
            self.release()

    def _store(self, caption: str, entry: Dict[str, torch.Tensor]) -> None:
        if caption in self.missing:
            self.missing.discard(caption)
            self.store(caption, entry)


__all__ = [
    "CAPTIONS_PER_BATCH",
    "CaptionsOnDemand",
    "ON_DEMAND_PIXELS_PER_BATCH",
    "PIXELS_PER_BATCH",
    "EncodingPass",
    "LatentsOnDemand",
    "latent_batches",
    "on_demand_captions_per_batch",
]
