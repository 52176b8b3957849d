"""The image dataset: captions from metadata.csv or sidecars, kohya repeat folders, buckets, epoch order."""

import os

from support.image_fixtures import image_config
from support.tiny_models import make_image_folder

from lora_trainer.data.buckets import make_buckets, nearest_bucket
from lora_trainer.data.dataset import ImageCaptionDataset


def test_repeat_folders_sidecars_and_class_token_fallback(tmp_path):
    data = tmp_path / "data"
    make_image_folder(str(data / "3_cyber city"), count=2, metadata=False)
    make_image_folder(str(data / "other"), count=1, metadata=False)
    (data / "3_cyber city" / "000.txt").write_text("neon street, rain\n")
    dataset = ImageCaptionDataset(image_config(tmp_path, "unused"))
    captions = {s.image.name: (s.caption, s.image.repeats) for s in dataset.samples}
    assert captions == {
        "3_cyber city/000.png": ("neon street, rain", 3),
        "3_cyber city/001.png": ("cyber city", 3),  # kohya's fallback: the folder's name
        "other/000.png": ("", 1),
    }
    assert dataset.num_repeated_images == 7
    assert len([i for batch in dataset.epoch_batches(0, 1, 2) for i in batch]) == 7
    assert "captions missing: 2" in dataset.summary_lines()[0]


def test_metadata_rows_win_and_the_unquoted_seed_form_reads_whole(tmp_path):
    data = tmp_path / "data"
    make_image_folder(str(data), count=3, metadata=False)
    (data / "001.txt").write_text("sidecar caption")
    (data / "metadata.csv").write_text(
        '000.png,futuristic metropolis at night, glowing advertisements\n"001.png","a ""quoted"", caption"\n',
        encoding="utf-8",
    )
    dataset = ImageCaptionDataset(image_config(tmp_path, "unused"))
    captions = {s.image.name: s.caption for s in dataset.samples}
    assert captions["000.png"] == "futuristic metropolis at night, glowing advertisements"
    assert captions["001.png"] == 'a "quoted", caption'
    assert captions["002.png"] == ""


def test_buckets_follow_aspect_ratio_within_the_area(tmp_path):
    buckets = make_buckets(512, 256, 1024, 64)
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert nearest_bucket((1920, 1080), buckets) == (640, 384)
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    data = tmp_path / "data"
    make_image_folder(str(data), count=2, size=[(300, 100), (100, 300)])
    dataset = ImageCaptionDataset(image_config(tmp_path, "unused", resolution=128, min_bucket_reso=64))
    assert [s.bucket for s in dataset.samples] == [(192, 64), (64, 192)]
    assert tuple(dataset.pixels(0).shape) == (3, 64, 192)
    assert all(len({dataset.samples[i].bucket for i in batch}) == 1 for batch in dataset.epoch_batches(0, 0, 2))


def test_caption_shuffle_keeps_the_first_tokens_and_is_reproducible(tmp_path):
    data = tmp_path / "data"
    make_image_folder(str(data), count=1, captions=["trigger, a, b, c, d, e, f"])
    dataset = ImageCaptionDataset(image_config(tmp_path, "unused", shuffle_caption=True, keep_tokens=1))
    epochs = [dataset.caption_for(0, epoch, seed=5) for epoch in range(6)]
    assert all(c.startswith("trigger, ") for c in epochs)
    assert len(set(epochs)) > 1
    assert epochs == [dataset.caption_for(0, epoch, seed=5) for epoch in range(6)]
    assert sorted(epochs[0].split(", ")) == sorted("trigger, a, b, c, d, e, f".split(", "))


def test_epoch_batches_split_across_processes_without_overlap(tmp_path):
    data = tmp_path / "data"
    make_image_folder(str(data), count=8)
    dataset = ImageCaptionDataset(image_config(tmp_path, "unused"))
    rank0, rank1 = dataset.epoch_batches(3, 7, 1, 0, 2), dataset.epoch_batches(3, 7, 1, 1, 2)
    assert len(rank0) == len(rank1) == 4
    assert sorted(i for b in rank0 + rank1 for i in b) == list(range(8))
    assert os.path.basename(dataset.cfg.train_data_dir) == "data"
