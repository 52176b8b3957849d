"""Captions longer than one CLIP window: max_token_length 150/225 encodes them in 75-token windows as sd-scripts
does (checked against a window-by-window computation written from sd-scripts' description), the default 75
reports what it cuts, and the LoRA file records the setting as ss_max_token_length."""

import pytest
import torch
from safetensors import safe_open
from support.image_fixtures import image_config, tiny_checkpoint, train
from support.tiny_models import make_image_folder

from lora_trainer.data.encoding_cache import EncodingCache
from lora_trainer.errors import ConfigError
from lora_trainer.models.diffusers_adapter import DiffusersAdapter
from lora_trainer.models.long_captions import cut_caption_lines, split_into_windows

CPU = torch.device("cpu")
TRIGGER = "zebra"
LONG_CAPTION = "a " * 268 + TRIGGER  # 269 tokens, the trigger word last
MEDIUM_CAPTION = "a " * 190 + TRIGGER  # 191 tokens: fits in 225


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {arch: tiny_checkpoint(folder, arch) for arch in ("sd1", "sdxl")}


def loaded_adapter(path: str, max_token_length: int) -> DiffusersAdapter:
    adapter = DiffusersAdapter(path, device=CPU)
    adapter.load(unet=False, vae=False, text_encoders=True)
    adapter.set_max_token_length(max_token_length)
    return adapter


def by_hand_windows(tokenizer, caption: str, windows: int):
    """The 77-token windows sd-scripts builds, spelled out: start, 75 caption tokens, end, padding."""
    ids = tokenizer(caption, add_special_tokens=False).input_ids[: windows * 75]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    bodies = [ids[w * 75 : (w + 1) * 75] for w in range(windows)]
    return torch.tensor([[bos, *body, eos] + [pad] * (75 - len(body)) for body in bodies])


def test_windows_follow_sd_scripts_for_both_padding_styles():
    bos, eos, text = 1, 2, list(range(10, 90))  # 80 caption tokens, max_token_length 150
    for pad in (eos, 0):  # SD1 pads with the end token, SD2/SDXL's OpenCLIP with "!" (0)
        ids = torch.tensor([[bos, *text, eos] + [pad] * 70, [bos, eos] + [pad] * 150])
        windows = split_into_windows(ids, bos, eos, pad)
        assert windows.shape == (2, 2, 77)
        assert windows[0, 0].tolist() == [bos, *text[:75], eos]
        assert windows[0, 1].tolist() == [bos, *text[75:], eos] + [pad] * 70
        assert windows[1, 0].tolist() == [bos, eos] + [pad] * 75
        assert windows[1, 1].tolist() == [bos, eos] + [pad] * 75  # an empty window still reads start, end


def test_sd1_long_caption_hidden_states_match_a_window_by_window_encoding(checkpoints):
    adapter = loaded_adapter(checkpoints["sd1"], 225)
    te, tokenizer = adapter.text_encoders[0], adapter.tokenizers[0]
    seen = []
    te.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs.get("input_ids", args[0] if args else None)), with_kwargs=True
    )
    with torch.no_grad():
        ours = adapter.encode_text([MEDIUM_CAPTION], clip_skip=1)["crossattn"][0]
        states = [te(w[None]).last_hidden_state[0] for w in by_hand_windows(tokenizer, MEDIUM_CAPTION, 3)]
    expected = torch.cat([states[0][:76], states[1][1:76], states[2][1:]])
    assert ours.shape == expected.shape == (227, 64)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    trigger = tokenizer(TRIGGER, add_special_tokens=False).input_ids[0]
    assert (seen[0] == trigger).any()  # the last word reached the text encoder


def test_sd1_clip_skip_applies_to_every_window(checkpoints):
    adapter = loaded_adapter(checkpoints["sd1"], 150)
    te = adapter.text_encoders[0]
    final_norm = getattr(te, "text_model", te).final_layer_norm  # transformers 5 dropped the text_model level
    with torch.no_grad():
        ours = adapter.encode_text([MEDIUM_CAPTION], clip_skip=2)["crossattn"][0]
        windows = by_hand_windows(adapter.tokenizers[0], MEDIUM_CAPTION, 2)
        states = [final_norm(te(w[None], output_hidden_states=True).hidden_states[-2][0]) for w in windows]
    torch.testing.assert_close(ours, torch.cat([states[0][:76], states[1][1:]]), rtol=1e-5, atol=1e-5)


def test_sdxl_long_caption_uses_both_encoders_and_the_first_windows_pooled_output(checkpoints):
    adapter = loaded_adapter(checkpoints["sdxl"], 225)
    (te1, te2), (tok1, tok2) = adapter.text_encoders, adapter.tokenizers
    assert tok2.pad_token_id != tok2.eos_token_id  # OpenCLIP-G pads with "!"
    with torch.no_grad():
        ours = adapter.encode_text([MEDIUM_CAPTION], clip_skip=1)
        out1 = [te1(w[None], output_hidden_states=True) for w in by_hand_windows(tok1, MEDIUM_CAPTION, 3)]
        out2 = [te2(w[None], output_hidden_states=True) for w in by_hand_windows(tok2, MEDIUM_CAPTION, 3)]
    per_window = [torch.cat([a.hidden_states[-2][0], b.hidden_states[-2][0]], -1) for a, b in zip(out1, out2)]
    expected = torch.cat([per_window[0][:76], per_window[1][1:76], per_window[2][1:]])
    assert ours["crossattn"].shape == (1, 227, 128)
    torch.testing.assert_close(ours["crossattn"][0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["pooled"][0], out2[0].text_embeds[0], rtol=1e-5, atol=1e-5)


def test_the_default_is_the_plain_77_token_encoding(checkpoints):
    adapter = loaded_adapter(checkpoints["sd1"], 75)
    te, tokenizer = adapter.text_encoders[0], adapter.tokenizers[0]
    ids = tokenizer([LONG_CAPTION], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.encode_text([LONG_CAPTION], 1)["crossattn"], te(ids).last_hidden_state, rtol=0, atol=0
        )
    assert adapter.caption_token_counts([LONG_CAPTION, "a photo"]) == [269, 2]


def test_cut_captions_are_summarised_and_the_setting_is_recorded(tmp_path, checkpoints):
    make_image_folder(str(tmp_path / "data"), count=2, captions=["a photo", LONG_CAPTION])
    lines = []
    cfg = image_config(tmp_path, checkpoints["sd1"], max_train_steps=1, max_token_length=225)
    result = train(cfg, log=lines.append)  # one batch holds both captions: 227 positions each
    assert result.status == "finished", result.message
    summary = "\n".join(lines)
    assert "1 of 2 are longer than max_token_length 225 tokens" in summary and "001.png by 44 tokens" in summary
    with safe_open(result.output_files[-1], framework="pt") as fh:
        assert fh.metadata()["ss_max_token_length"] == "225"
    # The default: the same summary names the option that keeps more; sd-scripts records its default as None.
    adapter = DiffusersAdapter(checkpoints["sd1"], device=CPU)
    counts = adapter.caption_token_counts(["a photo", LONG_CAPTION])
    (line,) = cut_caption_lines(["000.png", "001.png"], counts, 75)
    assert "1 of 2 are longer than max_token_length 75 tokens" in line and "001.png by 194 tokens" in line
    assert "set max_token_length: 150 or 225" in line
    default = image_config(tmp_path, "unused")
    assert default.max_token_length == 75 and metadata_of(default)["ss_max_token_length"] == "None"


def metadata_of(cfg):
    from lora_trainer.export.metadata import lora_metadata
    from lora_trainer.models.families import SD1

    return lora_metadata(
        cfg,
        family=SD1,
        model_name="m",
        prediction_type="epsilon",
        rank=4,
        alpha=4.0,
        dataset={},
        started_at=0.0,
        step=1,
        epoch=0,
        num_epochs=1,
        max_steps=1,
    )


def test_settings_outside_sd_scripts_choices_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="max_token_length: 100 is not allowed; choose one of 75, 150, 225"):
        image_config(tmp_path, "unused", max_token_length=100)
    cache = EncodingCache(None, "model")
    assert cache.text_key("x", 1) != EncodingCache(None, "model", max_token_length=150).text_key("x", 1)
