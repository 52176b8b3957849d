"""Captions encoded while training runs (cache_text_during_training): the same entries as the encoding pass in
any order and after any interruption, the text encoders beside the UNet only before the first two steps'
forward passes (never through one), only where they are smaller than a step's activations, and the size that
decides it read from the file's headers. The option off: tests/test_encoding_pass.py."""

import pytest
import torch
from support.image_fixtures import image_config, tiny_checkpoint, train
from support.tiny_models import build_tiny, save_diffusers_folder

from lora_trainer.models.diffusers_adapter import DiffusersAdapter
from lora_trainer.models.loading import load_stable_diffusion
from lora_trainer.train.callbacks import TrainingCallback
from lora_trainer.train.encoding_pass import CaptionsOnDemand, EncodingPass, on_demand_captions_per_batch

CAPTIONS = ["a red square", "two blue circles", "", "mytag, green", "a long caption, with tags, and more tags"]


def _on_demand(adapter, missing, per_batch, **options):
    stored, calls = {}, []
    stream = CaptionsOnDemand(
        EncodingPass(adapter, fp32_for_good=False),
        CAPTIONS,
        missing,
        1,
        stored.__setitem__,
        load=lambda: calls.append("load") or adapter.load(unet=False, vae=False, text_encoders=True),
        release=lambda: calls.append("release") or adapter.release(text_encoders=True),
        per_batch=per_batch,
        **options,
    )
    return stream, stored, calls


# SDXL's tiny encoders give different bits for a caption in different batch company (SD1's happen not to), so a
# chunk plan that were not followed would show there.
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("per_batch", [1, 2])
def test_captions_on_demand_equal_the_encoding_pass_in_any_order_and_after_an_interruption(tmp_path, per_batch, arch):
    adapter = DiffusersAdapter(tiny_checkpoint(tmp_path, arch), device=torch.device("cpu"))
    adapter.load(unet=False, vae=False, text_encoders=True)
    upfront = {}
    EncodingPass(adapter).captions(sorted(CAPTIONS), 1, upfront.__setitem__, per_batch=per_batch)
    adapter.release(text_encoders=True)
    for first, second in ((CAPTIONS[1], CAPTIONS[3]), (CAPTIONS[4], CAPTIONS[0])):
        stream, stored, calls = _on_demand(adapter, CAPTIONS, per_batch)
        stream.ensure([first])
        # The first call encodes what its batch needs (with its planned chunk), then frees the encoders.
        assert first in stored and len(stored) <= per_batch and calls == ["load", "release"]
        assert adapter.text_encoders is None
        stream.ensure([first])  # cached: nothing loads
        assert calls == ["load", "release"]
        stream.ensure([second])  # the next miss: every caption left, then never again
        assert set(stored) == set(CAPTIONS) and calls == ["load", "release"] * 2
        stream.ensure(CAPTIONS)
        assert calls == ["load", "release"] * 2
        for caption, entry in upfront.items():
            for key in entry:
                torch.testing.assert_close(stored[caption][key], entry[key], rtol=0, atol=0)
    # Interrupted after some were cached (a resumed run with the disk cache): only what is missing is stored,
    # each with its planned chunk, with the values of an uninterrupted run.
    missing = CAPTIONS[2:]
    stream, stored, calls = _on_demand(adapter, missing, per_batch)
    stream.ensure([CAPTIONS[3]])
    stream.ensure([CAPTIONS[4]])
    assert set(stored) == set(missing)
    for caption in missing:
        for key in upfront[caption]:
            torch.testing.assert_close(stored[caption][key], upfront[caption][key], rtol=0, atol=0)


def test_a_cancel_during_the_bulk_call_encodes_only_the_batchs_own_captions(tmp_path):
    adapter = DiffusersAdapter(tiny_checkpoint(tmp_path), device=torch.device("cpu"))
    events, stop = [], []
    stream, stored, calls = _on_demand(
        adapter, CAPTIONS, 1, progress=lambda *event: events.append(event), should_stop=lambda: bool(stop)
    )
    stream.ensure([CAPTIONS[0]])
    assert events == []  # the first call (one batch's captions) reports nothing
    stop.append(True)
    stream.ensure([CAPTIONS[3]])  # the bulk call, cancelled: the batch's own caption only
    assert set(stored) == {CAPTIONS[0], CAPTIONS[3]} and events == [(1, 4, "captions")]
    stop.clear()
    stream.ensure([CAPTIONS[1]])  # a later call (a resumed run's) encodes what was left
    assert set(stored) == set(CAPTIONS) and events[-1] == (3, 3, "captions")


class _OverflowingEncoder:
    """Text "boom" overflows in reduced precision; entries read 2 in bf16, 1 in fp32."""

    device = torch.device("cpu")
    encoding_autocast = torch.bfloat16

    def encode_text(self, captions, clip_skip):
        reduced = torch.is_autocast_enabled("cpu")
        values = [float("inf") if reduced and c == "boom" else (2.0 if reduced else 1.0) for c in captions]
        return {"context": torch.tensor(values).reshape(-1, 1)}


def test_an_overflowing_chunk_alone_is_redone_in_fp32_whatever_the_order():
    captions = ["a", "boom", "c"]
    results = []
    for order in (["boom", "a", "c"], ["a", "c", "boom"]):
        stored = {}
        stream = CaptionsOnDemand(
            EncodingPass(_OverflowingEncoder(), fp32_for_good=False),
            captions,
            captions,
            1,
            stored.__setitem__,
            load=lambda: None,
            release=lambda: None,
            per_batch=1,
        )
        for caption in order:
            stream.ensure([caption])
        results.append({c: float(stored[c]["context"][0]) for c in captions})
    assert results[0] == results[1] == {"a": 2.0, "boom": 1.0, "c": 2.0}


def test_a_cpu_encodes_one_caption_per_call_and_a_gpu_a_batch():
    assert on_demand_captions_per_batch(torch.device("cpu")) == 1
    assert on_demand_captions_per_batch(torch.device("cuda")) > 1


class _Steps(TrainingCallback):
    def __init__(self):
        self.done = 0

    def on_step_end(self, info):
        self.done = info.step


def _spy(monkeypatch):
    """Records each load/release (with the step count and what is loaded after it), which parts are loaded at
    each UNet forward pass, and the captions of each encoding call."""
    from lora_trainer.models import diffusers_adapter

    Adapter = diffusers_adapter.DiffusersAdapter
    steps, events, forwards, encoded = _Steps(), [], [], []

    def parts(adapter):
        return (adapter.unet is not None, adapter.vae is not None, adapter.text_encoders is not None)

    load, release, predict, captions = Adapter.load, Adapter.release, Adapter.predict, EncodingPass.captions

    def spy_load(self, **what):
        load(self, **what)
        events.append(("load", steps.done, parts(self)))

    def spy_release(self, **what):
        release(self, **what)
        events.append(("release", steps.done, parts(self)))

    def spy_predict(self, *args, **kwargs):
        forwards.append(parts(self))
        return predict(self, *args, **kwargs)

    def spy_captions(self, texts, *args, **kwargs):
        # On demand, an overflow in reduced precision redoes only its chunk (see the overflow test below).
        encoded.append((steps.done, list(texts), self.fp32_for_good))
        return captions(self, texts, *args, **kwargs)

    monkeypatch.setattr(Adapter, "load", spy_load)
    monkeypatch.setattr(Adapter, "release", spy_release)
    monkeypatch.setattr(Adapter, "predict", spy_predict)
    monkeypatch.setattr(EncodingPass, "captions", spy_captions)
    return steps, events, forwards, encoded


def test_the_text_encoders_sit_beside_the_unet_only_before_the_first_two_steps(tmp_path, monkeypatch):
    steps, events, forwards, encoded = _spy(monkeypatch)
    # 4 images with 4 captions, one kept for validation; batches of 2: step 1 needs two captions, step 2 one.
    cfg = image_config(tmp_path, tiny_checkpoint(tmp_path), max_train_steps=4, validation_split=0.25)
    result = train(cfg, callbacks=[steps])
    assert result.status == "finished"
    text_loads = [(step, held) for kind, step, held in events if kind == "load" and held[2]]
    # Nothing before the UNet; then the text encoders beside it before step 1 and before step 2 only.
    assert [e for e in events if e[0] == "load"][0] == ("load", 0, (True, True, False))
    assert [step for step, _held in text_loads] == [0, 1]
    assert all(held[0] for _step, held in text_loads)
    assert forwards and not any(text for _unet, _vae, text in forwards)  # never through a forward pass
    # Before step 1: its two captions only (one per call on a CPU); before step 2: every caption left, the
    # validation image's too.
    assert [(step, len(texts)) for step, texts, _fp32 in encoded] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert len({text for _step, texts, _fp32 in encoded for text in texts}) == 4
    assert not any(fp32_for_good for _step, _texts, fp32_for_good in encoded)


def test_text_encoders_larger_than_a_steps_activations_encode_every_caption_first(tmp_path, monkeypatch):
    steps, events, forwards, encoded = _spy(monkeypatch)
    big = 10 * 2**30  # bytes: more than a 64 px step's estimated activations
    monkeypatch.setattr(DiffusersAdapter, "text_encoder_bytes", lambda self: big)
    result = train(image_config(tmp_path, tiny_checkpoint(tmp_path), max_train_steps=2), callbacks=[steps])
    assert result.status == "finished"
    assert [e for e in events if e[0] == "load"][0] == ("load", 0, (False, False, True))  # before the UNet
    assert not any(kind == "load" and held[2] for kind, _step, held in events[1:])
    assert len(encoded) == 1 and len(encoded[0][1]) == 4


@pytest.mark.parametrize("layout", ["single_file", "diffusers_folder"])
def test_the_text_encoder_size_is_read_from_the_file_headers(tmp_path, layout):
    parts = build_tiny("sdxl")
    if layout == "single_file":
        path = tiny_checkpoint(tmp_path, "sdxl")
    else:
        path = save_diffusers_folder(parts, str(tmp_path / "folder"))
    probe = load_stable_diffusion(path, load_unet=False, load_vae=False, load_text_encoders=False)
    loaded = load_stable_diffusion(path, load_unet=False, load_vae=False, load_text_encoders=True)
    # Both of SDXL's encoders; the files hold no position_ids (a buffer, not a parameter).
    assert probe.text_encoder_parameters == sum(p.numel() for te in loaded.text_encoders for p in te.parameters())
    adapter = DiffusersAdapter(path, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert adapter.text_encoder_bytes() == 2 * probe.text_encoder_parameters


def test_an_unreadable_text_encoder_file_leaves_the_size_unknown(tmp_path):
    from lora_trainer.models.loading import _folder_parameters

    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    assert _folder_parameters([str(folder)]) is None  # captions are then encoded first; loading names the file
    (tmp_path / "bin_only").mkdir()
    (tmp_path / "bin_only" / "pytorch_model.bin").write_bytes(b"")
    assert _folder_parameters([str(tmp_path / "bin_only")]) is None
