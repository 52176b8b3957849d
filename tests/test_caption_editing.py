"""The caption editor's functions: load rows, bulk edits, atomic save."""

import os

import pytest
from support.captioners import write_test_images

from lora_trainer.caption.editing import (
    add_trigger_word,
    find_replace,
    load_caption_rows,
    remove_trigger_word,
    save_caption_rows,
)
from lora_trainer.data.captions import read_metadata_csv, read_sidecar
from lora_trainer.errors import DatasetError


def test_load_rows_lists_every_image_with_csv_then_sidecar_captions(tmp_path):
    paths = write_test_images(tmp_path, 3)
    (tmp_path / "metadata.csv").write_text("filename,prompt\n000.png,from csv, with comma\n", encoding="utf-8")
    with open(os.path.splitext(paths[1])[0] + ".txt", "w", encoding="utf-8") as fh:
        fh.write("from sidecar")
    assert load_caption_rows(str(tmp_path)) == [("000.png", "from csv, with comma"), ("001.png", ""), ("002.png", "")]
    assert load_caption_rows(str(tmp_path), sidecar=True)[1] == ("001.png", "from sidecar")


def test_save_merges_edits_keeps_other_rows_and_writes_sidecars(tmp_path):
    paths = write_test_images(tmp_path, 2)
    (tmp_path / "metadata.csv").write_text("filename,prompt\nother.png,keep me\n000.png,old\n", encoding="utf-8")
    path = save_caption_rows(str(tmp_path), [("000.png", 'new, "quoted"\ntext'), ("001.png", "b ")], sidecar=True)
    assert read_metadata_csv(path) == {"other.png": "keep me", "000.png": 'new, "quoted"\ntext', "001.png": "b"}
    assert read_sidecar(paths[1]) == "b"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_save_rejects_names_outside_the_folder(tmp_path):
    write_test_images(tmp_path, 1)
    for bad in ("../escape.png", "/etc/passwd", ""):
        with pytest.raises(DatasetError):
            save_caption_rows(str(tmp_path), [(bad, "x")])
    assert not (tmp_path / "metadata.csv").exists()


def test_bulk_trigger_word_and_find_replace():
    rows = [("a.png", "a photo, red car"), ("b.png", "sks, a photo"), ("c.png", "")]
    assert add_trigger_word(rows, "sks") == [
        ("a.png", "sks, a photo, red car"),
        ("b.png", "sks, a photo"),
        ("c.png", "sks"),
    ]
    assert add_trigger_word(rows, "sks", position="end")[0] == ("a.png", "a photo, red car, sks")
    assert remove_trigger_word(add_trigger_word(rows, "sks"), "sks") == [
        ("a.png", "a photo, red car"),
        ("b.png", "a photo"),
        ("c.png", ""),
    ]
    assert find_replace(rows, "photo", "picture")[:2] == [("a.png", "a picture, red car"), ("b.png", "sks, a picture")]
    assert find_replace(rows, "PHOTO", "x", case_sensitive=False)[0] == ("a.png", "a x, red car")
    assert find_replace(rows, r"(\w+) car", r"\1 bike", regex=True)[0] == ("a.png", "a photo, red bike")
    assert find_replace(rows, ".", "\\1")[0] == ("a.png", "a photo, red car")  # plain text: '.' is literal
    with pytest.raises(ValueError):
        find_replace(rows, "(", "x", regex=True)
    with pytest.raises(ValueError):
        add_trigger_word(rows, "sks", position="middle")
