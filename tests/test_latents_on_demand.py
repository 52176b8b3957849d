"""Latents encoded while training runs (cache_latents_during_training): the same latents as the encoding pass
in any order and after any interruption, only the VAE's encoder beside the UNet and only until every image is
cached, and a resumed run equal to an uninterrupted one. The option off: tests/test_encoding_pass.py."""

import torch
from support.image_fixtures import StopAfter, image_config, tiny_checkpoint, train
from support.tiny_models import make_image_folder

from lora_trainer.data.dataset import ImageCaptionDataset
from lora_trainer.models.diffusers_adapter import DiffusersAdapter
from lora_trainer.models.loading import load_stable_diffusion
from lora_trainer.train.callbacks import TrainingCallback
from lora_trainer.train.encoding_pass import EncodingPass, LatentsOnDemand

TWO_IMAGES = 64 * 64 * 2  # a pixel budget of two 64x64 images per planned batch


def test_the_vae_loads_without_its_decoder_to_encode_and_whole_to_decode(tmp_path, monkeypatch):
    from lora_trainer.io.safetensors_stream import SafetensorsStream

    path = tiny_checkpoint(tmp_path)
    full = load_stable_diffusion(path, load_unet=False, load_vae=True, load_text_encoders=False).vae
    read = []
    original = SafetensorsStream.read
    monkeypatch.setattr(SafetensorsStream, "read", lambda self, key: read.append(key) or original(self, key))
    encoder = load_stable_diffusion(
        path, load_unet=False, load_vae=True, load_text_encoders=False, vae_encoder_only=True
    ).vae
    assert encoder.decoder is None and encoder.post_quant_conv is None
    assert read and not any(".decoder." in key or "post_quant_conv" in key for key in read)
    assert sum(p.numel() for p in encoder.parameters()) < sum(p.numel() for p in full.parameters())
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(encoder.encode(pixels).latent_dist.mode(), full.encode(pixels).latent_dist.mode())
    # The adapter loads the encoder to encode; decoding (sample images) brings in the whole VAE.
    adapter = DiffusersAdapter(path, device=torch.device("cpu"))
    adapter.load(unet=False, vae=True, text_encoders=False)
    assert adapter.vae is not None and adapter.vae.decoder is None
    latents = adapter.encode_pixels(pixels)
    # The adapter runs the VAE channels_last (faster convolutions): the latents match diffusers' VAE run as
    # loaded (contiguous) to float rounding, and come back contiguous for the cache.
    with torch.no_grad():
        reference = full.encode(pixels).latent_dist.mode() * adapter.vae_scaling_factor
    torch.testing.assert_close(latents, reference, rtol=0, atol=1e-5)
    assert latents.is_contiguous()
    decoded = adapter.decode_latents(latents)
    assert adapter.vae.decoder is not None
    full = full.to(memory_format=torch.channels_last)  # as the adapter runs it (faster convolutions)
    with torch.no_grad():
        torch.testing.assert_close(decoded, full.decode(latents / adapter.vae_scaling_factor).sample, rtol=0, atol=0)


def _dataset(tmp_path, adapter):
    sizes = [(64, 64), (96, 64), (64, 64), (96, 64), (64, 64), (64, 64)]
    make_image_folder(str(tmp_path / "data"), count=len(sizes), size=sizes)
    return ImageCaptionDataset(image_config(tmp_path, adapter.path, validation_split=0.2))


def _into(latents: dict):
    return lambda sample, latent: latents.__setitem__(sample.index, latent)


def _on_demand(adapter, dataset, missing, budget=None):
    stored, released = {}, []
    stream = LatentsOnDemand(
        EncodingPass(adapter, fp32_for_good=False),
        dataset.samples,
        missing,
        dataset.pixels,
        _into(stored),
        release=lambda: released.append(len(stored)),
        pixels_per_batch=budget,
    )
    return stream, stored, released


def test_latents_on_demand_equal_the_encoding_pass_in_any_order_and_after_an_interruption(tmp_path):
    adapter = DiffusersAdapter(tiny_checkpoint(tmp_path), device=torch.device("cpu"))
    adapter.load(unet=False, vae=True, text_encoders=False)
    dataset = _dataset(tmp_path, adapter)
    samples = dataset.samples
    drawn = [s for s in samples if s.repeats]
    assert len(drawn) < len(samples)  # a validation image, which training never draws
    for budget in (TWO_IMAGES, None):  # planned batches of two images; the default, one image
        upfront = {}
        EncodingPass(adapter).latents(samples, dataset.pixels, _into(upfront), pixels_per_batch=budget or 1)
        for order in (drawn, drawn[::-1]):
            stream, stored, released = _on_demand(adapter, dataset, samples, budget)
            for sample in order:
                stream.ensure([sample])
                assert sample.index in stored
                # The VAE is freed once every drawn image is cached (and then the validation image), not before.
                assert bool(released) == all(s.index in stored for s in drawn)
            # The last drawn image brought in the validation image too, and then the VAE went.
            assert released == [len(samples)] and set(stored) == set(upfront)
            for index, latent in upfront.items():
                torch.testing.assert_close(stored[index], latent, rtol=0, atol=0)
        # Interrupted after the first image of a planned batch was stored: the rest is encoded with its batch
        # (as planned), only what was missing is stored, and the values are those of an uninterrupted run.
        missing = samples[1:]
        stream, stored, released = _on_demand(adapter, dataset, missing, budget)
        stream.ensure(drawn)
        assert set(stored) == {s.index for s in missing} and released == [len(missing)]
        for index, latent in stored.items():
            torch.testing.assert_close(latent, upfront[index], rtol=0, atol=0)


class _Steps(TrainingCallback):
    def __init__(self):
        self.done = 0

    def on_step_end(self, info):
        self.done = info.step


def test_only_the_vae_encoder_stays_beside_the_unet_and_only_through_the_first_epoch(tmp_path, monkeypatch):
    from lora_trainer.models import diffusers_adapter

    Adapter = diffusers_adapter.DiffusersAdapter
    steps, events = _Steps(), []

    def state(adapter):
        vae = adapter.vae
        return {
            "unet": adapter.unet is not None,
            "vae": None if vae is None else ("encoder" if vae.decoder is None else "whole"),
            "text": adapter.text_encoders is not None,
        }

    load, release, encode = Adapter.load, Adapter.release, Adapter.encode_pixels

    def spy_load(self, **parts):
        load(self, **parts)
        events.append(("load", state(self)))

    def spy_release(self, **parts):
        release(self, **parts)
        events.append(("release", steps.done, state(self)))

    def spy_encode(self, pixels):
        events.append(("encode", steps.done, len(pixels), state(self)))
        return encode(self, pixels)

    monkeypatch.setattr(Adapter, "load", spy_load)
    monkeypatch.setattr(Adapter, "release", spy_release)
    monkeypatch.setattr(Adapter, "encode_pixels", spy_encode)
    # 4 images, batches of 2: the first epoch is steps 1 and 2; the run goes on to step 4. The captions are
    # encoded first here (tests/test_captions_on_demand.py has them encoded during training too).
    cfg = image_config(tmp_path, tiny_checkpoint(tmp_path), max_train_steps=4, cache_text_during_training=False)
    result = train(cfg, callbacks=[steps])
    assert result.status == "finished"
    trained = {"unet": True, "vae": "encoder", "text": False}
    assert events == [
        ("load", {"unet": False, "vae": None, "text": True}),  # the captions, before the UNet
        ("release", 0, {"unet": False, "vae": None, "text": False}),
        ("load", trained),  # the UNet and the VAE's encoder, not the text encoder
        ("encode", 0, 1, trained),  # step 1's two images, one at a time
        ("encode", 0, 1, trained),
        ("encode", 1, 1, trained),  # step 2's
        ("encode", 1, 1, trained),
        ("release", 1, {"unet": True, "vae": None, "text": False}),  # every image cached: the VAE goes
    ]


def test_resume_with_latents_encoded_during_training_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    from lora_trainer.train import encoding_pass

    # Planned batches of two images and the disk cache: the resumed run finds some latents cached and
    # encodes the rest, as it reaches them, in the same planned batches as the uninterrupted run.
    monkeypatch.setattr(encoding_pass, "ON_DEMAND_PIXELS_PER_BATCH", TWO_IMAGES)
    base = tiny_checkpoint(tmp_path)
    overrides = dict(max_train_steps=6, batch_size=1, lora_dropout=0.1, cache_to_disk=True, shuffle_caption=True)
    full = train(image_config(tmp_path / "a", base, **overrides))
    stopped = train(image_config(tmp_path / "b", base, **overrides), callbacks=[StopAfter(1)])
    assert stopped.status == "cancelled" and stopped.step == 1
    cached = sorted((tmp_path / "b" / "data" / ".lora_trainer_cache").rglob("*.safetensors"))
    resumed = train(image_config(tmp_path / "b", base, resume=str(tmp_path / "b" / "out" / "state-1"), **overrides))
    assert resumed.status == "finished" and resumed.step == 6
    assert 0 < len(cached) < len(sorted((tmp_path / "b" / "data" / ".lora_trainer_cache").rglob("*.safetensors")))
    from safetensors.torch import load_file

    a, b = load_file(full.output_files[0]), load_file(resumed.output_files[0])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
