"""The Hub module's pure parts: what a reference names, which files a use plans (and why a cut download's
snapshot never passes for a complete one), the progress watcher, the config keeping Hub ids as written."""

from __future__ import annotations

import os

import pytest

from lora_trainer.hub.files import ListedFiles, MissingRepoFiles, weight_files
from lora_trainer.hub.progress import DownloadProgress, IncompleteFileWatcher, format_bytes
from lora_trainer.hub.reference import HubReference, as_hub_reference, parse_hub_reference
from lora_trainer.models.hub_models import DiffusersSdFiles
from lora_trainer.text.model import CausalLmFiles

# The files of stable-diffusion-v1-5/stable-diffusion-v1-5 (as listed on the Hub), most of which training never reads.
SD15_REPO = [
    ".gitattributes",
    "README.md",
    "feature_extractor/preprocessor_config.json",
    "model_index.json",
    "safety_checker/config.json",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.safetensors",
    "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned.safetensors",
    "v1-inference.yaml",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", HubReference("stable-diffusion-v1-5/stable-diffusion-v1-5")),
        ("owner/name@v1.0", HubReference("owner/name", "v1.0")),
        ("owner/name@refs/pr/12/unet/x.safetensors", HubReference("owner/name", "refs/pr/12", "unet/x.safetensors")),
        ("owner/name/sub/model.safetensors", HubReference("owner/name", None, "sub/model.safetensors")),
        ("owner/name@abc123/model.safetensors", HubReference("owner/name", "abc123", "model.safetensors")),
        ("hf://owner/name", HubReference("owner/name")),
        (
            "https://huggingface.co/owner/name/blob/main/v1-5.safetensors",
            HubReference("owner/name", "main", "v1-5.safetensors"),
        ),
        ("https://huggingface.co/owner/name/tree/fp16", HubReference("owner/name", "fp16")),
        ("  owner/name  ", HubReference("owner/name")),
    ],
)
def test_hub_references_parse(text, expected):
    assert parse_hub_reference(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "gpt2",  # a bare legacy id: every typo would become a network lookup
        "./models/x",
        "/abs/model.safetensors",
        "~/models/x",
        "..\\models\\x",
        "C:/models/x.safetensors",
        "models/x.safetensors",  # folder/file.ext with one slash: a local file
        "owner/-bad",
        "own--er/name",
        "owner/na..me",
        "owner/name/../etc/passwd",
        "owner/name@",
        "",
    ],
)
def test_paths_and_malformed_ids_are_not_hub_references(text):
    assert parse_hub_reference(text) is None


def test_an_existing_local_folder_wins_over_a_hub_id(tmp_path):
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert as_hub_reference("owner/name", str(tmp_path)) is None
    assert as_hub_reference("owner/other", str(tmp_path)) == HubReference("owner/other")


def test_the_config_keeps_hub_ids_and_makes_paths_absolute(tmp_path):
    from lora_trainer.config import config_from_dict

    raw = {"train_data_dir": "data", "output_dir": "out"}
    cfg = config_from_dict(dict(raw, base_model="owner/name@v2"), base_dir=str(tmp_path))
    assert cfg.base_model == "owner/name@v2" and cfg.train_data_dir == str(tmp_path / "data")
    cfg = config_from_dict(dict(raw, base_model="models/x.safetensors"), base_dir=str(tmp_path))
    assert cfg.base_model == str(tmp_path / "models" / "x.safetensors")
    default = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert config_from_dict(raw, base_dir=str(tmp_path), default_base_model=default).base_model == default
    text = dict(raw, task_type="text-generation")
    with pytest.raises(Exception, match="base_model is required"):  # no default for the text route
        config_from_dict(text, base_dir=str(tmp_path), default_base_model=default)


def test_sd15_plan_takes_what_training_reads_and_nothing_else():
    plan = DiffusersSdFiles().plan(SD15_REPO)
    assert plan == [
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "model_index.json",
    ]


def test_sdxl_plan_adds_the_second_encoder_and_sharded_weights():
    names = [n for n in SD15_REPO if not n.startswith("unet/diffusion_pytorch_model")] + [
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "tokenizer_2/vocab.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
    ]
    plan = DiffusersSdFiles().plan(names)
    assert {"text_encoder_2/model.safetensors", "tokenizer_2/vocab.json"} <= set(plan)
    assert plan[-4:] == [
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "model_index.json",
    ]


def test_a_repository_without_what_training_reads_says_what_is_missing():
    with pytest.raises(MissingRepoFiles) as excinfo:
        DiffusersSdFiles().plan(["v1-5-pruned-emaonly.safetensors", "README.md"])
    assert excinfo.value.missing[0] == "model_index.json" and "unet/config.json" in excinfo.value.missing


LM_REPO = [
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "original/consolidated.00.pth",
    "model.gguf",
    "README.md",
]
CAPTIONER = ListedFiles(
    "captioner", (("config.json",), ("model.safetensors", "pytorch_model.bin")), ("tokenizer*", "vocab.txt")
)
CAPTIONER_REPO = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.txt", "tf.h5"]


@pytest.mark.parametrize(
    "files, names",
    [(DiffusersSdFiles(), SD15_REPO), (CausalLmFiles(), LM_REPO), (CAPTIONER, CAPTIONER_REPO)],
    ids=["diffusers", "causal-lm", "listed"],
)
def test_every_cut_short_download_fails_its_plan(files, names):
    """Files download in plan order, so a run cut after k files leaves the plan's first k: none of those
    snapshots may pass for complete (the plan raises), while the whole one does."""
    plan = files.plan(names)
    for k in range(len(plan)):
        with pytest.raises(MissingRepoFiles):
            files.plan(plan[:k], plan[:k])
    assert files.plan(plan, plan) == plan


def test_causal_lm_plan_takes_the_shards_and_tokenizer_not_other_formats():
    plan = CausalLmFiles().plan(LM_REPO)
    assert plan == [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
    ]


def test_listed_files_prefer_safetensors_but_reuse_an_alternative_already_cached():
    assert CAPTIONER.plan(CAPTIONER_REPO) == ["tokenizer.json", "vocab.txt", "config.json", "model.safetensors"]
    cached = ["config.json", "pytorch_model.bin"]
    assert CAPTIONER.plan(CAPTIONER_REPO, cached)[-1] == "pytorch_model.bin"


def test_weight_files_needs_every_shard_pattern():
    assert weight_files(["model.safetensors.index.json"], "", [("model", ".safetensors")]) is None
    assert weight_files(["pytorch_model.bin"], "", [("model", ".safetensors"), ("pytorch_model", ".bin")]) == [
        "pytorch_model.bin"
    ]


def test_the_watcher_reports_bytes_being_written_and_ignores_leftovers(tmp_path):
    leftover = tmp_path / "aaaa.1234.incomplete"
    leftover.write_bytes(b"x" * 500)  # a killed run's file: never written again
    seen = []
    watcher = IncompleteFileWatcher(str(tmp_path), seen.append, interval=3600)  # polled by hand below
    with watcher:
        watcher.poll()
        current = tmp_path / "bbbb.5678.incomplete"
        current.write_bytes(b"y" * 300)
        watcher.poll()
        with open(current, "ab") as fh:
            fh.write(b"y" * 200)
        watcher.poll()
        watcher.poll()  # unchanged: no report
        current.rename(tmp_path / "bbbb")  # finished and moved into place: the count never goes back
        watcher.poll()
    assert seen == [300, 500]


def test_progress_lines():
    assert format_bytes(None) == "?" and format_bytes(512) == "512 B" and format_bytes(4_265_146_304) == "4.27 GB"
    line = DownloadProgress("owner/name", "unet/x.safetensors", 3, 9, 1_200_000_000, 4_300_000_000).describe()
    assert line == (
        "Downloading owner/name (first use; cached afterwards): unet/x.safetensors, file 3 of 9, 1.20 GB of 4.30 GB"
    )
    done = DownloadProgress("owner/name", "", 9, 9, 4_300_000_000, 4_300_000_000, finished=True).describe()
    assert done == "Downloaded owner/name: 9 file(s), 4.30 GB."


def test_offline_captioner_message_names_the_download_command(tmp_path, monkeypatch):
    from lora_trainer.caption.base import CaptionerUnavailable
    from lora_trainer.caption.registry import CaptionerOptions, load_captioner

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CaptionerUnavailable) as excinfo:
        load_captioner("wd14", CaptionerOptions(device="cpu"))  # the suite runs with HF_HUB_OFFLINE=1
    message = str(excinfo.value)
    assert "SmilingWolf/wd-swinv2-tagger-v3" in message and "HF_HUB_OFFLINE=1" in message
    assert "`python -m lora_trainer download wd14`" in message and str(tmp_path / "hub") in message
    assert "--model-path models/caption/wd14" in message and "\n" not in message
    assert not os.path.exists(tmp_path / "hub")  # a failed lookup writes nothing
