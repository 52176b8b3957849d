"""sd-scripts' dataset options: several folders, regularisation images, caption options, bucket_no_upscale, loss
masks and the validation split. Each test asserts the value the option must produce (no model is loaded)."""

import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from support.image_fixtures import image_config
from support.tiny_models import make_image_folder

from lora_trainer.config import config_from_dict
from lora_trainer.data.buckets import no_upscale_bucket
from lora_trainer.data.caption_processing import CaptionOptions, process_caption
from lora_trainer.data.dataset import ImageCaptionDataset
from lora_trainer.data.roles import balance_reg_repeats, split_validation
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.train.loss_weights import LossWeights, batch_loss_weights, weighted_sample_losses


def _folders(tmp_path, **counts):
    paths = {}
    for name, count in counts.items():
        paths[name] = str(tmp_path / name)
        make_image_folder(paths[name], count=count, metadata=False, seed=len(paths))
    return paths


# --------------------------------------------------------------------------- several folders


def test_each_datasets_entry_has_its_own_options_and_the_rest_from_the_top_level(tmp_path):
    folders = _folders(tmp_path, style=2, extra=1)
    (tmp_path / "style" / "000.txt").write_text("neon, city")
    (tmp_path / "extra" / "000.caption").write_text("from a caption file")
    cfg = image_config(
        tmp_path,
        "unused",
        train_data_dir="",
        resolution=64,
        keep_tokens=1,
        datasets=[
            {"image_dir": folders["style"], "num_repeats": 3, "caption_prefix": "sks,"},
            {"image_dir": folders["extra"], "caption_extension": ".caption", "resolution": 128, "random_flip": True},
        ],
    )
    dataset = ImageCaptionDataset(cfg)
    by_name = {(dataset.subsets[s.subset].key, s.image.name): s for s in dataset.samples}
    style, extra = by_name[("datasets[0]", "000.png")], by_name[("datasets[1]", "000.png")]
    assert (style.repeats, style.bucket, style.caption) == (3, (64, 64), "neon, city")
    assert (extra.repeats, extra.bucket, extra.caption) == (1, (128, 128), "from a caption file")
    assert dataset.caption_for(style.index, 0, seed=1) == "sks, neon, city"
    assert dataset.subsets[0].captions.keep_tokens == 1 and dataset.subsets[1].captions.prefix == ""
    assert [dataset.flips(s.index) for s in (style, extra)] == [False, True]
    assert dataset.num_repeated_images == 3 + 3 + 1
    batches = dataset.epoch_batches(0, seed=1, batch_size=8)
    assert sorted(len(b) for b in batches) == [1, 6]  # one bucket per batch: the 128 px image alone


def test_train_data_dir_is_one_more_folder_and_the_seed_config_is_unchanged(tmp_path):
    folders = _folders(tmp_path, data=2, more=1)
    cfg = image_config(tmp_path, "unused", datasets=[folders["more"]])
    dataset = ImageCaptionDataset(cfg)
    assert [s.key for s in dataset.subsets] == ["train_data_dir", "datasets[0]"]
    assert [dataset.subsets[s.subset].image_dir for s in dataset.samples] == [folders["data"]] * 2 + [folders["more"]]
    single = ImageCaptionDataset(image_config(tmp_path, "unused"))
    assert len(single.subsets) == 1 and len(single.samples) == 2


def test_folder_entries_are_validated_with_the_top_level_rules():
    base = {"base_model": "m", "output_dir": "o"}
    with pytest.raises(ConfigError, match=r"Unknown key datasets\[0\]\.num_repeat\. Did you mean 'num_repeats'"):
        config_from_dict({**base, "datasets": [{"image_dir": "a", "num_repeat": 2}]})
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.resolution: 10 is out of range"):
        config_from_dict({**base, "datasets": [{"image_dir": "a", "resolution": 10}]})
    with pytest.raises(ConfigError, match=r"datasets\[1\]: image_dir is required"):
        config_from_dict({**base, "datasets": ["a", {"is_reg": True}]})
    with pytest.raises(ConfigError, match=r"datasets\[0\].*also train_data_dir"):
        config_from_dict({**base, "train_data_dir": "a", "datasets": ["a"]})
    with pytest.raises(ConfigError, match="at least one must hold training images"):
        config_from_dict({**base, "datasets": [{"image_dir": "a", "is_reg": True}]})
    with pytest.raises(ConfigError, match="train_data_dir is required"):
        config_from_dict(base)


def test_a_folder_inside_another_is_refused_by_name(tmp_path):
    folders = _folders(tmp_path, data=1)
    make_image_folder(str(tmp_path / "data" / "reg"), count=1, metadata=False)
    cfg = image_config(tmp_path, "unused", datasets=[{"image_dir": str(tmp_path / "data" / "reg"), "is_reg": True}])
    with pytest.raises(DatasetError, match=r"reg.*000\.png is in train_data_dir .* and in datasets\[0\]"):
        ImageCaptionDataset(cfg)
    assert folders


def test_the_snapshot_lists_only_what_each_entry_sets(tmp_path):
    import yaml

    from lora_trainer.config import save_config_snapshot

    cfg = image_config(tmp_path, "unused", datasets=[{"image_dir": "reg", "is_reg": True, "class_tokens": "dog"}])
    save_config_snapshot(cfg, str(tmp_path / "config.yaml"))
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["datasets"] == [{"image_dir": os.path.abspath("reg"), "is_reg": True, "class_tokens": "dog"}]
    assert config_from_dict(written).datasets == cfg.datasets


# --------------------------------------------------------------------------- regularisation images


@pytest.mark.parametrize(
    "num_train,reg,expected",
    [
        (6, [1, 1, 1, 1], [2, 2, 1, 1]),  # all join, then one more repeat each in turn
        (2, [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]),  # more regularisation images than training ones: the rest left out
        (5, [3, 3], [3, 3]),  # an image joins with all its repeats, even past the count
        (7, [2, 1], [4, 3]),
    ],
)
def test_regularisation_repeats_are_balanced_as_sd_scripts_does(num_train, reg, expected):
    assert balance_reg_repeats(num_train, reg) == expected


def test_an_epoch_holds_each_regularisation_image_as_often_as_balanced(tmp_path):
    folders = _folders(tmp_path, data=3, reg=4)
    cfg = image_config(
        tmp_path,
        "unused",
        train_data_dir="",
        prior_loss_weight=0.25,
        datasets=[
            {"image_dir": folders["data"], "num_repeats": 2},
            {"image_dir": folders["reg"], "is_reg": True, "class_tokens": "a dog"},
        ],
    )
    dataset = ImageCaptionDataset(cfg)
    seen = [i for batch in dataset.epoch_batches(0, seed=3, batch_size=2) for i in batch]
    counts = {
        (dataset.subsets[dataset.samples[i].subset].role, dataset.samples[i].image.name): seen.count(i)
        for i in set(seen)
    }
    assert counts == {
        ("train", "000.png"): 2,
        ("train", "001.png"): 2,
        ("train", "002.png"): 2,
        ("reg", "000.png"): 2,
        ("reg", "001.png"): 2,
        ("reg", "002.png"): 1,
        ("reg", "003.png"): 1,
    }
    assert {dataset.samples[i].caption for i in seen if dataset.samples[i].role == "reg"} == {"a dog"}
    # prior_loss_weight applies to the regularisation samples of a batch, 1 to the others
    mixed = [next(s for s in dataset.samples if s.role == "train"), next(s for s in dataset.samples if s.role == "reg")]
    weights = batch_loss_weights(dataset, mixed, [False, False])
    assert weights.sample.tolist() == [1.0, 0.25] and weights.mask is None
    meta = dataset.metadata()
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("6", "4")
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"reg": {"n_repeats": 1, "img_count": 4}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"data": {"n_repeats": 2, "img_count": 3}}
    subsets = json.loads(meta["ss_datasets"])[0]["subsets"]
    assert [(s["image_dir"], s["is_reg"], s["num_repeats"], s["img_count"]) for s in subsets] == [
        ("data", False, 2, 3),
        ("reg", True, 1, 4),
    ]
    summary = "\n".join(dataset.summary_lines())
    assert "regularisation images: 4 with repeats, balanced to 6 per epoch against 6 training images" in summary


def test_left_out_regularisation_images_are_not_encoded_and_are_counted(tmp_path):
    folders = _folders(tmp_path, data=1, reg=3)
    cfg = image_config(tmp_path, "unused", datasets=[{"image_dir": folders["reg"], "is_reg": True}])
    dataset = ImageCaptionDataset(cfg)
    assert [(s.role, s.image.name, s.repeats) for s in dataset.samples] == [
        ("train", "000.png", 1),
        ("reg", "000.png", 1),
    ]
    assert "2 left out" in "\n".join(dataset.summary_lines())


def test_regularisation_weight_scales_that_samples_loss():
    elementwise = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 4, 2, 2)
    weighted = weighted_sample_losses(elementwise, LossWeights(sample=torch.tensor([1.0, 0.5])))
    assert weighted.tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------- caption options


def _options(**kwargs):
    return CaptionOptions(**kwargs)


def test_prefix_and_suffix_join_with_a_space_before_anything_else():
    opts = _options(prefix="sks,", suffix=", best quality")
    assert process_caption("a dog, grass", opts, random.Random(0)) == "sks, a dog, grass , best quality"
    assert process_caption("a dog", _options(prefix="photo of"), None) == "photo of a dog"


def test_keep_tokens_separator_holds_head_and_tail_and_is_removed():
    opts = _options(shuffle=True, keep_tokens_separator="|||")
    caption = "sks, dog ||| a, b, c, d, e ||| best, detailed"
    outputs = {process_caption(caption, opts, random.Random(seed)) for seed in range(20)}
    assert len(outputs) > 1
    for out in outputs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "dog"] and tags[-2:] == ["best", "detailed"]
        assert sorted(tags[2:-2]) == ["a", "b", "c", "d", "e"]
    # without shuffling the separator still goes (sd-scripts would leave "|||" in the text)
    assert process_caption(caption, _options(keep_tokens_separator="|||"), None) == (
        "sks, dog, a, b, c, d, e, best, detailed"
    )


def test_tag_dropout_and_shuffle_give_the_same_caption_for_a_seed():
    opts = _options(shuffle=True, keep_tokens=1, tag_dropout_rate=0.5, secondary_separator=";;;")
    caption = "trigger, red hair;;;long hair, smile, outdoors, sky, tree"
    # sd-scripts' order with the same random stream: shuffle the middle, then keep each tag if random() >= 0.5
    rng = random.Random(7)
    middle = ["red hair;;;long hair", "smile", "outdoors", "sky", "tree"]
    rng.shuffle(middle)
    kept = [t for t in middle if rng.random() >= 0.5]
    expected = ", ".join(["trigger"] + kept).replace(";;;", ",")
    assert process_caption(caption, opts, random.Random(7)) == expected
    assert process_caption(caption, opts, random.Random(7)) == "trigger, red hair,long hair, outdoors"


def test_dataset_captions_vary_by_epoch_and_repeat_by_seed(tmp_path):
    make_image_folder(str(tmp_path / "data"), count=1, captions=["sks ||| a, b, c, d ||| end"])
    cfg = image_config(tmp_path, "unused", caption_tag_dropout_rate=0.5, keep_tokens_separator="|||")
    dataset = ImageCaptionDataset(cfg)
    epochs = [dataset.caption_for(0, epoch, seed=5) for epoch in range(8)]
    assert epochs == [dataset.caption_for(0, epoch, seed=5) for epoch in range(8)]
    assert all(c.startswith("sks") and c.endswith("end") for c in epochs) and len(set(epochs)) > 1
    assert not dataset.captions_are_fixed()  # tag dropout: no text caching
    fixed = ImageCaptionDataset(image_config(tmp_path, "unused", caption_prefix="pre", caption_dropout_rate=0.5))
    assert fixed.captions_are_fixed()
    assert fixed.all_caption_variants() == ["", "pre sks ||| a, b, c, d ||| end"]


# --------------------------------------------------------------------------- bucket_no_upscale


@pytest.mark.parametrize(
    "size,resolution,bucket,resized",
    [
        # values from sd-scripts' BucketManager(no_upscale=True).select_bucket
        ((300, 200), 512, (256, 192), (300, 200)),
        ((1920, 1080), 512, (640, 384), (683, 384)),
        ((700, 300), 512, (640, 256), (700, 300)),
        ((100, 900), 512, (64, 896), (100, 900)),
        ((200, 150), 128, (64, 64), (85, 64)),
    ],
)
def test_bucket_no_upscale_buckets_as_sd_scripts(size, resolution, bucket, resized):
    assert no_upscale_bucket(size, resolution, 64) == (bucket, resized)


def test_a_small_image_keeps_its_size_and_is_only_cropped(tmp_path):
    data = tmp_path / "data"
    make_image_folder(str(data), count=2, size=[(150, 100), (40, 100)], metadata=False)
    cfg = image_config(tmp_path, "unused", resolution=512, bucket_no_upscale=True)
    dataset = ImageCaptionDataset(cfg)
    (sample,) = dataset.samples  # 40 px is narrower than one 64 px step: skipped and said why
    assert (sample.bucket, sample.resized_size, sample.crop_left_top) == ((128, 64), (150, 100), (11, 18))
    original = np.asarray(Image.open(data / "000.png"), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(dataset.pixels(0).permute(1, 2, 0).numpy(), original[18:82, 11:139], atol=1e-6)
    summary = dataset.summary_lines()
    assert "  bucket 0: resolution (128, 64), count: 1" in summary
    assert any("001.png" in line and "narrower than bucket_reso_steps" in line for line in summary)
    assert dataset.metadata()["ss_bucket_no_upscale"] == "True"
    upscaled = ImageCaptionDataset(image_config(tmp_path, "unused", resolution=512)).samples[0]
    assert upscaled.bucket[0] * upscaled.bucket[1] > 150 * 100  # without the option it is enlarged


def test_the_summary_prints_sd_scripts_bucket_table(tmp_path):
    make_image_folder(str(tmp_path / "data" / "2_x"), count=3, size=[(64, 64), (64, 64), (192, 64)])
    dataset = ImageCaptionDataset(image_config(tmp_path, "unused", resolution=128, min_bucket_reso=64))
    table = [line for line in dataset.summary_lines() if "bucket " in line and "resolution" in line]
    # sd-scripts numbers a bucket by its place among all the resolution's buckets, sorted: for 128 px, sides
    # 64..1024 in steps of 64, make_bucket_resolutions gives (64, 192), (64, 256), (128, 128), (192, 64), (256, 64)
    assert table == ["  bucket 2: resolution (128, 128), count: 4", "  bucket 3: resolution (192, 64), count: 2"]
    assert "  mean ar error (without repeats): 0" in dataset.summary_lines()
    info = json.loads(dataset.metadata()["ss_bucket_info"])
    assert info["buckets"] == {"2": {"resolution": [128, 128], "count": 4}, "3": {"resolution": [192, 64], "count": 2}}


# --------------------------------------------------------------------------- masked loss


def _halves_mask(path, size=(64, 64)):
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[:, : size[0] // 4] = 255  # the left quarter counts
    Image.fromarray(mask).save(path)


def test_a_mask_file_weights_the_latent_pixels_under_its_white_part(tmp_path):
    data = tmp_path / "data"
    make_image_folder(str(data), count=2, metadata=False)
    (data / "masks").mkdir()
    _halves_mask(data / "masks" / "000.png")
    dataset = ImageCaptionDataset(image_config(tmp_path, "unused", resolution=64, masked_loss=True))
    assert len(dataset.samples) == 2  # masks/ is not read as training images
    mask = dataset.loss_mask(0)
    expected = torch.zeros(1, 8, 8)
    expected[:, :, :2] = 1.0
    assert torch.equal(mask, expected)
    assert torch.equal(dataset.loss_mask(0, flip=True), expected.flip(-1))
    assert dataset.loss_mask(1) is None  # no mask, no alpha: every pixel counts
    weights = batch_loss_weights(dataset, dataset.samples, [False, False])
    assert torch.equal(weights.mask[1], torch.ones(1, 8, 8)) and torch.equal(weights.mask[0], expected)
    # the loss is the masked mean, not renormalised (sd-scripts' apply_masked_loss)
    elementwise = torch.ones(2, 4, 8, 8)
    assert weighted_sample_losses(elementwise, weights).tolist() == [0.25, 1.0]


def test_the_alpha_channel_is_the_mask_without_a_mask_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rgba = np.full((64, 128, 4), 200, np.uint8)
    rgba[:, :64, 3], rgba[:, 64:, 3] = 255, 0  # the left half opaque, the right half transparent
    Image.fromarray(rgba, "RGBA").save(data / "cut.png")
    dataset = ImageCaptionDataset(image_config(tmp_path, "unused", resolution=96, min_bucket_reso=64, masked_loss=True))
    sample = dataset.samples[0]
    assert sample.bucket == (128, 64)
    mask = dataset.loss_mask(0)
    assert mask.shape == (1, 8, 16)
    assert torch.equal(mask[:, :, :8], torch.ones(1, 8, 8)) and torch.equal(mask[:, :, 8:], torch.zeros(1, 8, 8))
    unmasked = ImageCaptionDataset(image_config(tmp_path, "unused", resolution=96, min_bucket_reso=64))
    assert unmasked.loss_mask(0) is None


# --------------------------------------------------------------------------- validation images


def test_the_validation_split_holds_out_the_same_images_for_a_seed(tmp_path):
    names = [f"{i:03d}.png" for i in range(10)]
    held = split_validation(names, 0.3, seed=4)
    assert len(held) == 3 and held == split_validation(list(reversed(names)), 0.3, seed=4)
    assert split_validation(names, 0.3, seed=5) != held
    make_image_folder(str(tmp_path / "data"), count=10, metadata=False)
    dataset = ImageCaptionDataset(image_config(tmp_path, "unused", validation_split=0.3, validation_seed=4))
    assert {s.image.name for s in dataset.validation_samples} == held
    trained = {dataset.samples[i].image.name for batch in dataset.epoch_batches(0, 1, 2) for i in batch}
    assert trained == set(names) - held
    assert dataset.metadata()["ss_num_validation_images"] == "3"


def test_a_validation_folder_is_never_trained_and_batches_are_fixed(tmp_path):
    folders = _folders(tmp_path, data=2, val=3)
    cfg = image_config(tmp_path, "unused", datasets=[{"image_dir": folders["val"], "is_val": True}])
    dataset = ImageCaptionDataset(cfg)
    val = [s.index for s in dataset.validation_samples]
    assert len(val) == 3
    assert not {i for batch in dataset.epoch_batches(0, 1, 1) for i in batch} & set(val)
    assert dataset.validation_batches(2) == [val[:2], val[2:]] and dataset.validation_batches(2, limit=1) == [val[:2]]


def test_validation_options_need_validation_images():
    with pytest.raises(ConfigError, match="validate_every_n_steps: there are no validation images"):
        config_from_dict({"train_data_dir": "d", "base_model": "m", "validate_every_n_steps": 5})


# --------------------------------------------------------------------------- the config template


def test_the_template_documents_every_folder_key_and_its_example_loads(tmp_path):
    import dataclasses

    import yaml

    from lora_trainer.config import DatasetEntry

    with open(os.path.join(os.path.dirname(__file__), "..", "configs", "my_lora_config.yaml"), encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    for f in dataclasses.fields(DatasetEntry):
        if f.metadata.get("inherited"):  # documented at the top level, named in the list of per-folder options
            assert any(f.name in line and "for its folder alone" in line for line in lines), f.name
            assert any(line.startswith(f"# {f.name}: ") for line in lines), f.name
        else:
            assert f"#   {f.name}: {f.metadata['doc']}" in lines, f.name
    start = lines.index("# datasets:")
    example = [line[2:] for line in lines[start:] if line.startswith(("# datasets:", "#   - "))]
    cfg = config_from_dict({"base_model": "m", "output_dir": "o", **yaml.safe_load("\n".join(example))})
    assert [(os.path.basename(e.image_dir), e.is_reg, e.is_val, e.num_repeats) for e in cfg.datasets] == [
        ("cyberpunk_extra", False, False, None),
        ("reg_city", True, False, None),
        ("cyberpunk_val", False, True, None),
        ("closeups", False, False, 3),
    ]
