"""Text files users write (caption sidecars, metadata.csv, text-route data, YAML configs) are read as UTF-8,
with or without a byte-order mark; anything else is one clear error naming the file and the byte offset, with
exit status 2 before any model loads. Sidecars with another common extension are pointed out by name."""

import pytest
from support.image_fixtures import image_config
from support.tiny_models import make_image_folder

from lora_trainer.cli import main
from lora_trainer.data.dataset import ImageCaptionDataset
from lora_trainer.errors import DatasetError
from lora_trainer.io.text_files import read_text

CAFE = "café terrace, night"


def train_cli(tmp_path, capsys, **overrides):
    """Run ``train`` from the command line on a base model that does not exist: any error about the data
    must come first, since nothing model-related may load before the data is checked."""
    lines = [f"{key}: {value!r}" for key, value in overrides.items()]
    config = tmp_path / "config.yaml"
    config.write_text(
        "\n".join(
            [
                f"train_data_dir: {str(tmp_path / 'data')!r}",
                f"base_model: {str(tmp_path / 'missing.safetensors')!r}",
                f"output_dir: {str(tmp_path / 'out')!r}",
                *lines,
            ]
        ),
        encoding="utf-8",
    )
    status = main(["train", "--config", str(config)])
    return status, capsys.readouterr().err


def test_a_cp1252_sidecar_is_one_error_naming_file_and_offset(tmp_path, capsys):
    make_image_folder(str(tmp_path / "data"), count=2, metadata=False)
    (tmp_path / "data" / "000.txt").write_bytes(CAFE.encode("cp1252"))
    (tmp_path / "data" / "001.txt").write_text("fine", encoding="utf-8")
    status, err = train_cli(tmp_path, capsys)
    assert status == 2
    assert err.startswith("error: ") and "Traceback" not in err
    assert "000.txt" in err and "byte 0xE9 at offset 3 (line 1)" in err and "Windows-1252" in err
    assert "missing.safetensors" not in err  # the data was checked before the model


def test_every_bad_caption_file_is_listed_at_once(tmp_path):
    make_image_folder(str(tmp_path / "data"), count=3, metadata=False)
    for name in ("000.txt", "002.txt"):
        (tmp_path / "data" / name).write_bytes(CAFE.encode("cp1252"))
    with pytest.raises(DatasetError) as caught:
        ImageCaptionDataset(image_config(tmp_path, "unused"))
    assert "000.txt" in str(caught.value) and "002.txt" in str(caught.value)


def test_metadata_csv_and_yaml_in_cp1252_are_refused_by_name(tmp_path, capsys):
    make_image_folder(str(tmp_path / "data"), count=1, metadata=False)
    (tmp_path / "data" / "metadata.csv").write_bytes(f"filename,prompt\n000.png,{CAFE}\n".encode("cp1252"))
    status, err = train_cli(tmp_path, capsys)
    assert status == 2 and "metadata.csv" in err and "offset 27 (line 2)" in err
    (tmp_path / "bad.yaml").write_bytes(f"output_name: {CAFE}\n".encode("cp1252"))
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "offset 16" in err and "Traceback" not in err


def test_text_route_data_in_another_encoding_is_refused_by_name(tmp_path):
    from lora_trainer.text.data import load_text_dataset

    (tmp_path / "notes.txt").write_bytes("first line\nsecond line\n".encode() + CAFE.encode("cp1252"))
    with pytest.raises(DatasetError, match=r"notes\.txt: not UTF-8 text: byte 0xE9 at offset 26 \(line 3\)"):
        load_text_dataset(str(tmp_path))
    (tmp_path / "notes.txt").write_bytes(CAFE.encode("utf-16"))  # Notepad's "Unicode"
    with pytest.raises(DatasetError, match=r"notes\.txt: not UTF-8 text: byte 0xFF at offset 0 \(line 1\).*UTF-16"):
        load_text_dataset(str(tmp_path))


def test_utf8_with_bom_and_windows_line_ends_reads(tmp_path):
    make_image_folder(str(tmp_path / "data"), count=2, metadata=False)
    (tmp_path / "data" / "000.txt").write_bytes(b"\xef\xbb\xbf" + CAFE.encode() + b"\r\n")
    (tmp_path / "data" / "metadata.csv").write_bytes(b'\xef\xbb\xbffilename,prompt\r\n001.png,"two\r\nlines"\r\n')
    captions = {s.image.name: s.caption for s in ImageCaptionDataset(image_config(tmp_path, "unused")).samples}
    assert captions == {"000.png": CAFE, "001.png": "two\nlines"}
    (tmp_path / "plain.txt").write_bytes(CAFE.encode())
    assert read_text(str(tmp_path / "plain.txt")) == CAFE


def test_caption_sidecars_with_another_extension_are_pointed_out(tmp_path):
    folder = tmp_path / "data" / "5_mychar"
    make_image_folder(str(folder), count=2, metadata=False)
    for name in ("000", "001"):
        (folder / f"{name}.caption").write_text(f"mychar, {name}")
    dataset = ImageCaptionDataset(image_config(tmp_path, "unused"))
    assert {s.caption for s in dataset.samples} == {"mychar"}  # the folder's class token
    summary = "\n".join(dataset.summary_lines())
    assert "2 of the images without a caption have a .caption file" in summary
    assert "caption_extension: .caption" in summary
    told = ImageCaptionDataset(image_config(tmp_path, "unused", caption_extension=".caption"))
    assert {s.caption for s in told.samples} == {"mychar, 000", "mychar, 001"}
    assert "have a" not in "\n".join(told.summary_lines())
