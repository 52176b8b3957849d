"""Each captioner end to end with a tiny randomly initialised model built here, and the missing-weights errors."""

import os

import pytest
from support.captioners import build_tiny_blip, build_tiny_clip, build_tiny_wd14, write_test_images

from lora_trainer.caption.base import CaptionerUnavailable
from lora_trainer.caption.blip import BLIP_WEIGHTS
from lora_trainer.caption.cli import main as caption_main
from lora_trainer.caption.registry import CaptionerOptions, detect_kind, load_captioner
from lora_trainer.caption.run import CaptionRunOptions, caption_folder
from lora_trainer.caption.wd14 import select_tags, tag_to_text
from lora_trainer.data.captions import read_metadata_csv

CPU = CaptionerOptions(device="cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_models")
    return {
        "blip": build_tiny_blip(str(root / "blip")),
        "clip": build_tiny_clip(str(root / "clip")),
        "wd14": build_tiny_wd14(str(root / "wd14")),
    }


@pytest.fixture
def images(tmp_path):
    write_test_images(tmp_path / "images", 5)
    return tmp_path / "images"


def _run(folder, captioner, **options):
    try:
        return caption_folder(str(folder), captioner, CaptionRunOptions(batch_size=2, **options))
    finally:
        captioner.close()


@pytest.mark.parametrize("kind", ["blip", "clip", "wd14"])
def test_each_captioner_writes_one_row_per_image(models, images, kind):
    by_name = load_captioner(kind, CaptionerOptions(device="cpu", model_path=models[kind]))
    report = _run(images, by_name, prefix="sks")
    rows = read_metadata_csv(report.output)
    assert sorted(rows) == [f"{i:03d}.png" for i in range(5)]
    assert all(caption.startswith("sks, ") and len(caption) > len("sks, ") for caption in rows.values())
    # The same model found by path: its kind is detected from the files.
    assert detect_kind(models[kind]) == kind
    by_path = load_captioner(models[kind], CPU)
    assert by_path.name == kind
    by_path.close()


def test_batched_and_single_blip_captions_agree(models, images):
    from lora_trainer.data.images import load_rgb

    captioner = load_captioner("blip", CaptionerOptions(device="cpu", model_path=models["blip"], max_new_tokens=8))
    pictures = [load_rgb(str(images / f"{i:03d}.png")) for i in range(3)]
    assert captioner.caption(pictures) == [captioner.caption([picture])[0] for picture in pictures]


def test_clip_appends_phrases_to_a_blip_base_caption(models, images):
    from lora_trainer.data.images import load_rgb

    options = CaptionerOptions(device="cpu", model_path=models["clip"], clip_base=models["blip"], max_new_tokens=6)
    interrogator = load_captioner("clip", options)
    blip = load_captioner("blip", CaptionerOptions(device="cpu", model_path=models["blip"], max_new_tokens=6))
    picture = load_rgb(str(images / "000.png"))
    combined = interrogator.caption([picture])[0]
    base = blip.caption([picture])[0]
    assert combined.startswith(base + ", ")
    assert len(combined.split(", ")) >= 5  # base + medium + style + lighting + flavours


def test_wd14_thresholds_ratings_and_underscores(models, images):
    tagger = load_captioner("wd14", CaptionerOptions(device="cpu", model_path=models["wd14"], threshold=0.35))
    rows = read_metadata_csv(_run(images, tagger).output)
    assert set(rows.values()) == {"hatsune miku, 1girl, long hair, ^_^"}  # rating "general" excluded
    strict = load_captioner(
        "wd14", CaptionerOptions(device="cpu", model_path=models["wd14"], threshold=0.35, character_threshold=0.85)
    )
    rows = read_metadata_csv(_run(images, strict, overwrite=True).output)
    assert set(rows.values()) == {"1girl, long hair, ^_^"}
    assert tag_to_text("o_o") == "o_o" and tag_to_text("black_hair") == "black hair"


def test_wd14_onnx_file_with_tags_csv_elsewhere(models, tmp_path):
    onnx_path = os.path.join(models["wd14"], "model.onnx")
    assert detect_kind(onnx_path) == "wd14"
    tags = os.path.join(models["wd14"], "selected_tags.csv")
    with pytest.raises(CaptionerUnavailable, match="--tags-csv"):
        load_captioner("wd14", CaptionerOptions(device="cpu", model_path=str(_copy(onnx_path, tmp_path))))
    tagger = load_captioner(
        "wd14", CaptionerOptions(device="cpu", model_path=str(_copy(onnx_path, tmp_path)), tags_csv=tags)
    )
    assert tagger.name == "wd14"


def _copy(path, folder):
    target = folder / os.path.basename(path)
    target.write_bytes(open(path, "rb").read())
    return target


def test_select_tags_orders_characters_then_probability():
    from lora_trainer.caption.wd14 import Tag

    tags = [Tag("a", 0), Tag("b", 0), Tag("char", 4), Tag("explicit", 9)]
    assert select_tags([0.5, 0.9, 0.95, 1.0], tags, 0.4, 0.9) == [("char", 0.95), ("b", 0.9), ("a", 0.5)]


@pytest.mark.parametrize("kind", ["blip", "clip", "wd14"])
def test_missing_weights_name_the_files_and_where_they_go(tmp_path, kind):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CaptionerUnavailable) as excinfo:
        load_captioner(kind, CaptionerOptions(device="cpu", model_path=str(empty)))
    message = str(excinfo.value)
    assert str(empty) in message and "missing" in message and "\n" not in message
    expected = {"blip": "model.safetensors", "clip": "open_clip_config.json", "wd14": "selected_tags.csv"}[kind]
    assert expected in message


def test_missing_cache_entry_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CaptionerUnavailable) as excinfo:
        load_captioner("blip", CPU)
    message = str(excinfo.value)
    assert BLIP_WEIGHTS.repo_id in message and "--model-path models/caption/blip" in message
    assert "config.json" in message and "\n" not in message


def test_cli_reports_missing_weights_as_one_line(tmp_path, images, capsys, models):
    code = caption_main(
        ["--input", str(images), "--model", "clip", "--model-path", str(tmp_path / "nowhere"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (images / "metadata.csv").exists()
    # ... and another captioner still works.
    code = caption_main(["--input", str(images), "--model", models["wd14"], "--no-progress"])
    assert code == 0 and len(read_metadata_csv(str(images / "metadata.csv"))) == 5


def test_unknown_model_and_undetectable_path(tmp_path):
    with pytest.raises(CaptionerUnavailable, match="unknown captioner"):
        load_captioner("llava", CPU)
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(CaptionerUnavailable, match="cannot tell"):
        load_captioner(str(tmp_path), CPU)


def test_clip_checkpoint_without_config_needs_and_uses_the_architecture(models, tmp_path, images):
    import json

    import open_clip

    # Register the tiny architecture under a name, as the built-in ones (ViT-L-14, ...) are.
    with open(os.path.join(models["clip"], "open_clip_config.json"), encoding="utf-8") as fh:
        model_cfg = json.load(fh)["model_cfg"]
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "TinyCaptionTestCLIP.json").write_text(json.dumps(model_cfg), encoding="utf-8")
    open_clip.add_model_config(str(config_dir))
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    _copy(os.path.join(models["clip"], "open_clip_model.safetensors"), weights_only)
    with pytest.raises(CaptionerUnavailable, match="--clip-arch"):
        load_captioner("clip", CaptionerOptions(device="cpu", model_path=str(weights_only)))
    for path in (weights_only, weights_only / "open_clip_model.safetensors"):
        captioner = load_captioner(
            "clip", CaptionerOptions(device="cpu", model_path=str(path), clip_arch="TinyCaptionTestCLIP")
        )
        assert len(_run(images, captioner, overwrite=True).captioned) == 5
    with pytest.raises(CaptionerUnavailable, match="--clip-arch"):
        load_captioner(str(weights_only / "open_clip_model.safetensors"), CPU)
