"""Captioning a folder: CSV round trip, skipping captioned images, unreadable images, sidecars, triggers.

A CallableCaptioner stands in for the models here; the models themselves are covered in
test_caption_models.py.
"""

import os

import pytest
from support.captioners import write_test_images

from lora_trainer.caption.base import CallableCaptioner
from lora_trainer.caption.run import CaptionRunOptions, caption_folder
from lora_trainer.caption.tags import add_trigger, format_tag_summary, split_tags, tag_frequencies
from lora_trainer.data.captions import read_metadata_csv, read_sidecar
from lora_trainer.errors import DatasetError

TRICKY = [
    'a cat, sitting on a "red" chair',
    "line one\nline two, with a comma",
    "café, naïve, 東京の夜, emoji ✨",
    'quotes "" and, commas,, everywhere',
    "  padded caption  ",
]


def _by_colour(image):
    return "colour " + "-".join(str(value) for value in image.getpixel((0, 0)))


def test_round_trip_of_tricky_captions(tmp_path):
    write_test_images(tmp_path, len(TRICKY))
    captions = iter(TRICKY)
    report = caption_folder(str(tmp_path), CallableCaptioner(lambda image: next(captions)))
    assert read_metadata_csv(report.output) == {f"{i:03d}.png": text.strip() for i, text in enumerate(TRICKY)}


def test_seed_unquoted_form_reads_back_and_survives_a_rerun(tmp_path):
    write_test_images(tmp_path, 3)
    metadata = tmp_path / "metadata.csv"
    metadata.write_text(
        "filename,prompt\n000.png,cyberpunk city\n002.png,futuristic metropolis at night, glowing advertisements\n",
        encoding="utf-8",
    )
    assert read_metadata_csv(str(metadata))["002.png"] == "futuristic metropolis at night, glowing advertisements"
    report = caption_folder(str(tmp_path), CallableCaptioner(lambda image: "new caption"))
    assert report.captioned == {"001.png": "new caption"}
    assert read_metadata_csv(str(metadata)) == {
        "000.png": "cyberpunk city",
        "002.png": "futuristic metropolis at night, glowing advertisements",
        "001.png": "new caption",
    }


def test_rerun_captions_only_new_images_unless_overwrite(tmp_path):
    write_test_images(tmp_path, 3)
    calls = []
    captioner = CallableCaptioner(lambda images: calls.append(len(images)) or ["first"] * len(images), batched=True)
    caption_folder(str(tmp_path), captioner, CaptionRunOptions(batch_size=2))
    assert calls == [2, 1]
    write_test_images(tmp_path, 2, start=3)
    calls.clear()
    again = CallableCaptioner(lambda images: calls.append(len(images)) or ["second"] * len(images), batched=True)
    report = caption_folder(str(tmp_path), again, CaptionRunOptions(batch_size=8))
    assert calls == [2]
    assert sorted(report.captioned) == ["003.png", "004.png"]
    assert sorted(report.skipped) == ["000.png", "001.png", "002.png"]
    rows = read_metadata_csv(report.output)
    assert [rows[f"{i:03d}.png"] for i in range(5)] == ["first"] * 3 + ["second"] * 2
    report = caption_folder(str(tmp_path), again, CaptionRunOptions(overwrite=True))
    assert len(report.captioned) == 5 and set(read_metadata_csv(report.output).values()) == {"second"}


def test_rows_of_images_not_recaptioned_are_kept(tmp_path):
    write_test_images(tmp_path, 1)
    (tmp_path / "metadata.csv").write_text("filename,prompt\ngone.png,an image that was deleted\n", encoding="utf-8")
    report = caption_folder(str(tmp_path), CallableCaptioner(lambda image: "x"))
    assert read_metadata_csv(report.output) == {"gone.png": "an image that was deleted", "000.png": "x"}


def test_unreadable_images_are_reported_and_skipped(tmp_path):
    write_test_images(tmp_path, 2)
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    good = (tmp_path / "000.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    report = caption_folder(str(tmp_path), CallableCaptioner(_by_colour))
    assert sorted(name for name, _ in report.failed) == ["broken.png", "truncated.png"]
    assert all(reason for _, reason in report.failed)
    assert sorted(read_metadata_csv(report.output)) == ["000.png", "001.png"]


def test_captions_go_to_the_right_images_across_batches(tmp_path):
    paths = write_test_images(tmp_path, 5)
    report = caption_folder(str(tmp_path), CallableCaptioner(_by_colour), CaptionRunOptions(batch_size=2))
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            assert report.captioned[os.path.basename(path)] == _by_colour(image.convert("RGB"))


def test_prefix_suffix_sidecars_and_output_elsewhere(tmp_path):
    images = tmp_path / "images"
    paths = write_test_images(images, 2)
    output = tmp_path / "out" / "captions.csv"
    options = CaptionRunOptions(output=str(output), prefix="sks", suffix="best quality", sidecar=True)
    caption_folder(str(images), CallableCaptioner(lambda image: "a photo"), options)
    assert read_metadata_csv(str(output)) == {
        "000.png": "sks, a photo, best quality",
        "001.png": "sks, a photo, best quality",
    }
    assert [read_sidecar(path) for path in paths] == ["sks, a photo, best quality"] * 2
    assert not (images / "metadata.csv").exists()


def test_existing_sidecars_count_as_captions(tmp_path):
    paths = write_test_images(tmp_path, 2)
    with open(os.path.splitext(paths[0])[0] + ".txt", "w", encoding="utf-8") as fh:
        fh.write("hand written")
    report = caption_folder(str(tmp_path), CallableCaptioner(lambda image: "auto"), CaptionRunOptions(sidecar=True))
    assert report.captioned == {"001.png": "auto"}
    assert read_metadata_csv(report.output) == {"000.png": "hand written", "001.png": "auto"}


def test_kohya_repeat_folders_are_keyed_by_relative_path(tmp_path):
    write_test_images(tmp_path / "10_sks", 1)
    report = caption_folder(str(tmp_path), CallableCaptioner(lambda image: "x"))
    assert read_metadata_csv(report.output) == {"10_sks/000.png": "x"}


def test_stop_request_keeps_finished_captions(tmp_path):
    write_test_images(tmp_path, 4)
    progress = []
    report = caption_folder(
        str(tmp_path),
        CallableCaptioner(lambda image: "x"),
        CaptionRunOptions(batch_size=2),
        on_progress=lambda done, total: progress.append((done, total)),
        should_stop=lambda: len(progress) >= 1,
    )
    assert report.stopped and progress == [(2, 4)]
    assert sorted(read_metadata_csv(report.output)) == ["000.png", "001.png"]


def test_captioner_failure_still_saves_earlier_batches(tmp_path):
    write_test_images(tmp_path, 4)
    calls = []

    def flaky(images):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return ["ok"] * len(images)

    with pytest.raises(RuntimeError):
        caption_folder(str(tmp_path), CallableCaptioner(flaky, batched=True), CaptionRunOptions(batch_size=2))
    assert read_metadata_csv(str(tmp_path / "metadata.csv")) == {"000.png": "ok", "001.png": "ok"}


def test_empty_or_missing_folder_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        caption_folder(str(tmp_path), CallableCaptioner(lambda image: "x"))
    with pytest.raises(DatasetError, match="not found"):
        caption_folder(str(tmp_path / "nope"), CallableCaptioner(lambda image: "x"))


def test_tag_helpers_and_summary(tmp_path):
    write_test_images(tmp_path, 3)
    captions = iter(["1girl, long hair", "1girl, short hair", "1girl, long hair, smile"])
    report = caption_folder(str(tmp_path), CallableCaptioner(lambda image: next(captions)))
    assert report.tag_counts == {"1girl": 3, "long hair": 2, "short hair": 1, "smile": 1}
    summary = format_tag_summary(report.tag_counts, report.total_images, top=2)
    assert summary.splitlines()[1].split() == ["1girl", "3", "100.0%"]
    assert len(summary.splitlines()) == 3
    assert split_tags(" a, ,b ,") == ["a", "b"]
    assert add_trigger("sks, a photo", prefix="sks") == "sks, a photo"
    assert add_trigger("", prefix="sks", suffix="end") == "sks, end"
    assert tag_frequencies(["a, a, b"]) == {"a": 1, "b": 1}


def test_callable_captioner_checks_batch_length():
    captioner = CallableCaptioner(lambda images: ["only one"], batched=True, name="host")
    with pytest.raises(ValueError, match="host"):
        captioner.caption([object(), object()])
