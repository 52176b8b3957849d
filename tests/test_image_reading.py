"""Every image is read as a viewer shows it (EXIF orientation applied) and converted to 8-bit RGB faithfully,
whatever its PIL mode, in training, caching, captioning and thumbnails alike; what cannot be converted is
skipped with a reason naming the file and the mode."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from support.image_fixtures import image_config

from lora_trainer.data.dataset import ImageCaptionDataset
from lora_trainer.data.encoding_cache import EncodingCache
from lora_trainer.data.images import open_image, scan_images, to_rgb8

RED, BLUE = (255, 0, 0), (0, 0, 255)
# What each EXIF orientation asks a viewer to do with the stored pixels (EXIF 2.3, tag 0x0112).
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored about the main diagonal
    6: lambda a: np.rot90(a, -1),  # rotated 90 clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # mirrored about the other diagonal
    8: lambda a: np.rot90(a, 1),  # rotated 90 counter-clockwise
}


def save_with_orientation(image: Image.Image, path, orientation: int, **kwargs) -> None:
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, **kwargs)


def halves(width: int, height: int, left=RED, right=BLUE) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2 :] = right
    return Image.fromarray(pixels)


def write_png16(path, values: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written byte by byte (PIL writes 16-bit grey only): color type 2 = RGB, 6 = RGBA."""
    height, width = values.shape[:2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def grey_halves(dtype, left, right) -> np.ndarray:
    values = np.zeros((8, 16), dtype)
    values[:, :8], values[:, 8:] = left, right
    return values


def test_exif_orientation_6_gives_a_portrait_bucket_and_upright_pixels(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    # Stored 120x60 with red on the left; orientation 6 shows it 60x120 with the red half on top.
    save_with_orientation(halves(120, 60), data / "photo.jpg", 6, quality=95)
    (data / "photo.txt").write_text("a photo")
    dataset = ImageCaptionDataset(image_config(tmp_path, "unused", resolution=128, min_bucket_reso=64))
    sample = dataset.samples[0]
    assert sample.image.size == (60, 120) and sample.image.orientation == 6
    assert sample.bucket == (64, 192)  # portrait; the stored pixels would give the landscape (192, 64)
    pixels = (dataset.pixels(0).permute(1, 2, 0).numpy() + 1) * 127.5
    top, bottom = pixels[: 192 // 3].reshape(-1, 3).mean(0), pixels[-192 // 3 :].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(top, RED, atol=20)
    np.testing.assert_allclose(bottom, BLUE, atol=20)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, size=(3, 5, 3), dtype=np.uint8)
    path = tmp_path / "image.png"  # lossless, so the pixels compare exactly
    save_with_orientation(Image.fromarray(stored), path, orientation)
    shown = np.asarray(open_image(str(path)))
    np.testing.assert_array_equal(shown, DISPLAYED[orientation](stored))
    images, rejected = scan_images(str(tmp_path))
    assert not rejected and images[0].size == (shown.shape[1], shown.shape[0])


def test_thumbnails_and_captioners_see_the_oriented_image(tmp_path):
    from lora_trainer.caption.base import CallableCaptioner
    from lora_trainer.caption.run import caption_folder
    from lora_trainer.ui.caption_panel import thumbnails

    save_with_orientation(halves(120, 60), tmp_path / "photo.jpg", 6, quality=95)
    seen = []
    caption_folder(str(tmp_path), CallableCaptioner(lambda image: seen.append(image) or "x"))
    assert seen[0].size == (60, 120)
    np.testing.assert_allclose(np.asarray(seen[0])[:60].reshape(-1, 3).mean(0), RED, atol=20)
    (thumbnail, name), *_ = thumbnails(str(tmp_path), [("photo.jpg", "")])
    assert name == "photo.jpg" and thumbnail.height > thumbnail.width
    np.testing.assert_allclose(np.asarray(thumbnail)[:5].reshape(-1, 3).mean(0), RED, atol=30)


def test_the_latent_cache_key_changes_with_the_orientation_tag(tmp_path):
    import os

    data = tmp_path / "data"
    data.mkdir()
    path = data / "square.jpg"
    square = halves(64, 64)
    save_with_orientation(square, path, 1, quality=95)
    cfg = image_config(tmp_path, "unused", resolution=64)
    cache = EncodingCache(None, "model")
    before = cache.latent_key(ImageCaptionDataset(cfg).samples[0])
    stat = os.stat(path)
    save_with_orientation(square, path, 8, quality=95)  # only the tag differs; same size on disk, same mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    after = cache.latent_key(ImageCaptionDataset(cfg).samples[0])
    assert after != before


def test_16_bit_grey_png_scales_to_8_bits_in_training(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(grey_halves(np.uint16, 6000, 30000)).save(data / "deep.png")
    assert Image.open(data / "deep.png").mode == "I;16"
    dataset = ImageCaptionDataset(image_config(tmp_path, "unused", resolution=64, enable_bucket=False))
    pixels = (dataset.pixels(0).numpy() + 1) * 127.5  # (3, 64, 64), cropped from the 16x8 image scaled up
    assert round(float(pixels[:, :, 4].mean())) == 23  # 6000 / 65535 * 255 = 23.3
    assert round(float(pixels[:, :, -4].mean())) == 117  # 30000 / 65535 * 255 = 116.7


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N"])
def test_every_16_bit_mode_scales(mode):
    byte_order = {"I;16B": ">u2", "I;16N": "=u2"}.get(mode, "<u2")
    image = Image.frombytes(mode, (16, 8), grey_halves(byte_order, 6000, 30000).tobytes())
    assert image.mode == mode
    rgb = np.asarray(to_rgb8(image))
    assert rgb.dtype == np.uint8 and rgb[0, 0].tolist() == [23] * 3 and rgb[0, -1].tolist() == [117] * 3


def test_32_bit_integer_and_float_tiffs_scale(tmp_path):
    full = 2**32 - 1
    Image.fromarray(grey_halves(np.int32, 0, 2**31 - 1)).save(tmp_path / "int32.tif")
    Image.fromarray(grey_halves(np.float32, 6000 / 65535, 30000 / 65535)).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "int32.tif").mode == "I" and Image.open(tmp_path / "float.tif").mode == "F"
    integer = np.asarray(open_image(str(tmp_path / "int32.tif")))
    assert integer[0, 0].tolist() == [0] * 3 and integer[0, -1].tolist() == [round((2**31 - 1) / full * 255)] * 3
    floating = np.asarray(open_image(str(tmp_path / "float.tif")))
    assert floating[0, 0].tolist() == [23] * 3 and floating[0, -1].tolist() == [117] * 3


def test_16_bit_rgb_and_rgba_pngs_keep_their_values(tmp_path):
    rgb = np.zeros((4, 8, 3), np.uint16)
    rgb[:, :4], rgb[:, 4:] = (6000, 30000, 65535), (30000, 6000, 0)
    write_png16(tmp_path / "rgb16.png", rgb, 2)
    assert np.asarray(open_image(str(tmp_path / "rgb16.png")))[0, 0].tolist() == [23, 117, 255]
    rgba = np.concatenate([rgb, np.full((4, 8, 1), 65535, np.uint16)], axis=2)
    rgba[:, 4:, 3] = 0  # the right half fully transparent: flattened onto white
    write_png16(tmp_path / "rgba16.png", rgba, 6)
    pixels = np.asarray(open_image(str(tmp_path / "rgba16.png")))
    assert pixels[0, 0].tolist() == [23, 117, 255] and pixels[0, -1].tolist() == [255, 255, 255]


def test_transparency_cmyk_and_palette_modes_convert(tmp_path):
    la = Image.fromarray(np.stack([grey_halves(np.uint8, 40, 40), grey_halves(np.uint8, 255, 0)], axis=2), "LA")
    assert np.asarray(to_rgb8(la))[0, 0].tolist() == [40] * 3 and np.asarray(to_rgb8(la))[0, -1].tolist() == [255] * 3
    palette = Image.fromarray(grey_halves(np.uint8, 0, 1), "P")
    palette.putpalette([10, 20, 30, 0, 0, 0])
    palette.info["transparency"] = 1
    palette.save(tmp_path / "palette.png")
    pixels = np.asarray(open_image(str(tmp_path / "palette.png")))
    assert pixels[0, 0].tolist() == [10, 20, 30] and pixels[0, -1].tolist() == [255, 255, 255]
    Image.new("CMYK", (16, 8), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=100)
    np.testing.assert_allclose(np.asarray(open_image(str(tmp_path / "cyan.jpg")))[4, 8], (0, 255, 255), atol=4)


def test_modes_that_cannot_convert_are_skipped_naming_file_and_mode(tmp_path):
    Image.fromarray(grey_halves(np.float32, -0.5, 4.0)).save(tmp_path / "hdr.tif")
    halves(16, 8).save(tmp_path / "fine.png")
    images, rejected = scan_images(str(tmp_path))
    assert [i.name for i in images] == ["fine.png"]
    assert [r.path for r in rejected] == [str(tmp_path / "hdr.tif")]
    assert "mode F" in rejected[0].reason and "-0.5 to 4" in rejected[0].reason
    with pytest.raises(ValueError, match="mode La"):
        to_rgb8(Image.new("LA", (2, 2)).convert("La"))
