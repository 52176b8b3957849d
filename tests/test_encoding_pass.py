"""The encoding pass before training: batches per bucket, reduced precision within a stated error, progress,
cancel, and never the encoders beside the UNet."""

import os

import pytest
import torch
from support.image_fixtures import image_config, tiny_checkpoint, train
from support.tiny_models import make_image_folder

from lora_trainer.data.dataset import ImageCaptionDataset, Sample
from lora_trainer.data.images import ImageFile
from lora_trainer.errors import TrainingCancelled
from lora_trainer.models.diffusers_adapter import DiffusersAdapter
from lora_trainer.models.precision import encoding_autocast_dtype
from lora_trainer.train.callbacks import TqdmProgress, TrainingCallback
from lora_trainer.train.encoding_pass import EncodingPass, latent_batches

# How far bf16 encoding may be from fp32: the relative RMS error ||bf16 - fp32|| / ||fp32|| and the largest
# single difference relative to the spread (std) of the fp32 outputs. bf16 rounds to 8 significant bits
# (2**-9 = 0.2 %) per operation and a VAE/CLIP forward accumulates a few dozen of those. Measured on these
# tiny models: 1.2 % RMS (largest element 6 % of the std) for latents, 0.6 % (2.5 %) for text embeddings;
# bench/bench_encoding.py states the same figures for the full-size SD1.5 VAE and text encoder.
BF16_MAX_RELATIVE_ERROR = 0.02
BF16_MAX_ELEMENT_ERROR = 0.1


def relative_errors(reduced: torch.Tensor, exact: torch.Tensor):
    diff = reduced - exact
    return float(diff.norm() / exact.norm()), float(diff.abs().max() / exact.std())


def _sample(index: int, bucket) -> Sample:
    return Sample(index, ImageFile(path=f"{index}.png", name=f"{index}.png", repeats=1, size=bucket), "", bucket)


def test_latent_batches_share_a_bucket_and_stay_within_the_pixel_budget():
    samples = [_sample(i, (64, 64) if i % 3 else (128, 64)) for i in range(10)]
    batches = latent_batches(samples, pixels_per_batch=64 * 64 * 4)
    assert sorted(s.index for b in batches for s in b) == list(range(10))
    for batch in batches:
        assert len({s.bucket for s in batch}) == 1
        assert sum(s.bucket[0] * s.bucket[1] for s in batch) <= 64 * 64 * 4
    assert [len(b) for b in batches] == [4, 2, 2, 2]  # six 64x64 (4 + 2), four 128x64 (2 + 2)
    assert latent_batches([_sample(0, (2048, 2048))], pixels_per_batch=64) == [[_sample(0, (2048, 2048))]]


def _adapter(tmp_path, arch="sd1"):
    adapter = DiffusersAdapter(tiny_checkpoint(tmp_path, arch), device=torch.device("cpu"))
    adapter.load(unet=False, vae=True, text_encoders=True)
    return adapter


def _encode_all(adapter, dataset, autocast_dtype=None, per_batch=None):
    adapter.encoding_autocast = autocast_dtype
    latents, texts = {}, {}
    encoder = EncodingPass(adapter)
    budget = {} if per_batch is None else {"pixels_per_batch": per_batch}
    encoder.latents(dataset.samples, dataset.pixels, lambda s, x: latents.__setitem__(s.index, x), **budget)
    captions = dataset.all_caption_variants()
    encoder.captions(captions, 1, lambda c, e: texts.__setitem__(c, e))
    return latents, texts


def test_batched_encoding_equals_one_image_at_a_time(tmp_path):
    adapter = _adapter(tmp_path)
    make_image_folder(str(tmp_path / "data"), count=5, size=[(64, 64), (96, 64), (64, 64), (96, 64), (64, 64)])
    dataset = ImageCaptionDataset(image_config(tmp_path, adapter.path))
    batched, texts = _encode_all(adapter, dataset)
    single, _ = _encode_all(adapter, dataset, per_batch=1)
    assert set(batched) == set(range(5)) and set(texts) == set(dataset.all_caption_variants())
    for index, latent in batched.items():
        sample = dataset.samples[index]
        assert latent.dtype == torch.float32 and latent.shape == (4, sample.bucket[1] // 8, sample.bucket[0] // 8)
        torch.testing.assert_close(latent, single[index], rtol=1e-4, atol=1e-5)
    for caption in texts:  # and a caption batch equals the caption encoded alone
        with torch.no_grad():
            alone = adapter.encode_text([caption], 1)["crossattn"][0]
        torch.testing.assert_close(texts[caption]["crossattn"], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_bf16_encoding_differs_from_fp32_by_a_small_stated_error(tmp_path, arch):
    adapter = _adapter(tmp_path, arch)
    make_image_folder(str(tmp_path / "data"), count=4)
    dataset = ImageCaptionDataset(image_config(tmp_path, adapter.path))
    exact_latents, exact_texts = _encode_all(adapter, dataset)
    bf16_latents, bf16_texts = _encode_all(adapter, dataset, torch.bfloat16)
    exact = torch.stack(list(exact_latents.values()))
    reduced = torch.stack([bf16_latents[i] for i in exact_latents])
    assert reduced.dtype == torch.float32 and torch.isfinite(reduced).all()
    rms, largest = relative_errors(reduced, exact)
    assert 0 < rms < BF16_MAX_RELATIVE_ERROR and largest < BF16_MAX_ELEMENT_ERROR, (rms, largest)  # > 0: bf16 ran
    for key in exact_texts[next(iter(exact_texts))]:
        rms, largest = relative_errors(
            torch.stack([bf16_texts[c][key] for c in exact_texts]), torch.stack([e[key] for e in exact_texts.values()])
        )
        assert 0 < rms < BF16_MAX_RELATIVE_ERROR and largest < BF16_MAX_ELEMENT_ERROR, (key, rms, largest)


class _OverflowingAdapter:
    """Encodes to inf under fp16 autocast (as an fp16 SD VAE can), to finite values in fp32."""

    device = torch.device("cpu")
    encoding_autocast = torch.bfloat16

    def __init__(self):
        self.calls = []

    def encode_pixels(self, pixels):
        reduced = torch.is_autocast_enabled("cpu")
        self.calls.append(reduced)
        value = torch.full((pixels.shape[0], 4, 2, 2), float("inf") if reduced else 1.0)
        return value


def test_overflow_in_reduced_precision_re_encodes_in_fp32_for_the_rest_of_the_pass():
    adapter = _OverflowingAdapter()
    stored = {}
    messages = []
    samples = [_sample(i, (16, 16)) for i in range(3)]
    EncodingPass(adapter, log=messages.append).latents(
        samples, lambda i: torch.zeros(3, 16, 16), lambda s, x: stored.__setitem__(s.index, x), pixels_per_batch=256
    )
    assert adapter.calls == [True, False, False, False]  # batch 1 in bf16 (inf), again in fp32, then fp32
    assert all(torch.equal(x, torch.ones(4, 2, 2)) for x in stored.values()) and len(stored) == 3
    assert "fp32" in messages[0]


def test_encoding_precision_is_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    from lora_trainer.models import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert encoding_autocast_dtype(torch.device("cpu")) is None
    assert encoding_autocast_dtype(torch.device("cpu"), torch.bfloat16) == torch.bfloat16  # the user's choice
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert encoding_autocast_dtype(torch.device("cpu")) == torch.bfloat16


class _Recorder(TrainingCallback):
    def __init__(self, stop_during_encoding=False):
        self.events = []
        self.stop = stop_during_encoding

    def on_encode_progress(self, done, total, what):
        self.events.append((what, done, total))

    def on_train_start(self, total_steps, start_step, summary):
        self.events.append(("train", 0, total_steps))

    def should_stop(self):
        return self.stop and any(e[0] == "latents" and e[1] > 0 for e in self.events)


def test_progress_is_reported_per_batch_before_training_starts(tmp_path, monkeypatch):
    from lora_trainer.train import encoding_pass

    monkeypatch.setattr(encoding_pass, "PIXELS_PER_BATCH", 64 * 64 * 2)  # two 64x64 images per batch
    recorder = _Recorder()
    base = tiny_checkpoint(tmp_path)
    # Encoding before training (cache_*_during_training off; tests/test_latents_on_demand.py and
    # tests/test_captions_on_demand.py have them on).
    cfg = image_config(
        tmp_path, base, max_train_steps=1, cache_latents_during_training=False, cache_text_during_training=False
    )
    result = train(cfg, callbacks=[recorder, TqdmProgress()])
    assert result.status == "finished"
    assert recorder.events == [
        ("latents", 0, 4),
        ("latents", 2, 4),
        ("latents", 4, 4),
        ("captions", 0, 4),
        ("captions", 4, 4),
        ("train", 0, 1),
    ]


def test_cancel_during_encoding_stops_before_any_training(tmp_path, monkeypatch):
    from lora_trainer.train import encoding_pass

    monkeypatch.setattr(encoding_pass, "PIXELS_PER_BATCH", 64 * 64)
    recorder = _Recorder(stop_during_encoding=True)
    with pytest.raises(TrainingCancelled, match="while encoding"):
        train(
            image_config(tmp_path, tiny_checkpoint(tmp_path), cache_latents_during_training=False),
            callbacks=[recorder],
        )
    assert ("train", 0, 4) not in recorder.events
    assert [e for e in recorder.events if e[0] == "latents"] == [("latents", 0, 4), ("latents", 1, 4)]
    assert not os.path.exists(tmp_path / "out" / "pytorch_lora_weights.safetensors")


def test_the_encoders_and_the_unet_are_never_loaded_together(tmp_path, monkeypatch):
    from lora_trainer.models import diffusers_adapter

    held = []
    original = diffusers_adapter.DiffusersAdapter.load

    def spy(self, *, unet, vae, text_encoders):
        original(self, unet=unet, vae=vae, text_encoders=text_encoders)
        held.append((self.unet is not None, self.vae is not None, self.text_encoders is not None))

    monkeypatch.setattr(diffusers_adapter.DiffusersAdapter, "load", spy)
    cfg = image_config(
        tmp_path,
        tiny_checkpoint(tmp_path),
        max_train_steps=1,
        cache_latents_during_training=False,
        cache_text_during_training=False,
    )
    assert train(cfg).status == "finished"
    assert held == [(False, True, True), (True, False, False)]
