"""Sample prompts in sd-scripts' format: prompt lines and .txt/.json/.toml prompt files."""

import json

import pytest

from lora_trainer.config import config_from_dict
from lora_trainer.errors import ConfigError
from lora_trainer.train.sample_prompts import SamplePrompt, load_sample_prompts, parse_prompt_line


def test_every_option_of_a_prompt_line_is_read():
    line = "a cat, on a sofa --n blurry, lowres --w 768 --h 512 --s 28 --l 6.5 --d 42 --ss euler_a"
    assert parse_prompt_line(line) == SamplePrompt(
        prompt="a cat, on a sofa",
        negative_prompt="blurry, lowres",
        width=768,
        height=512,
        steps=28,
        scale=6.5,
        seed=42,
        sampler="euler_a",
    )


def test_defaults_follow_the_run_and_sizes_snap_to_multiples_of_8():
    prompt = parse_prompt_line("a dog --w 100 --s 5000").resolve(index=2, resolution=512, seed=10, sampler="ddim")
    assert (prompt.width, prompt.height, prompt.steps, prompt.seed, prompt.sampler) == (96, 512, 1000, 12, "ddim")
    assert prompt.scale == 7.5 and prompt.negative_prompt == ""


def test_options_for_other_models_are_ignored_and_unknown_ones_refused():
    assert parse_prompt_line("a dog --g 3.5 --cn c.png --d 1").seed == 1
    with pytest.raises(ConfigError, match="unknown option --x in"):
        parse_prompt_line("a dog --x 5")
    with pytest.raises(ConfigError, match="sampler 'fast' is not known"):
        parse_prompt_line("a dog --ss fast")


def test_prompt_files_in_txt_json_and_toml(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\n\nfirst --d 1\nsecond --w 64\n")
    (tmp_path / "p.json").write_text(json.dumps(["third --s 3", {"prompt": "fourth", "sample_steps": 7, "seed": 9}]))
    (tmp_path / "p.toml").write_text(
        '[prompt]\nwidth = 64\nscale = 5.0\n[[prompt.subset]]\nprompt = "fifth"\n[[prompt.subset]]\nprompt = "sixth"\n'
        "height = 128\n"
    )
    cfg = config_from_dict(
        {
            "train_data_dir": "d",
            "base_model": "m",
            "sample_every_n_steps": 10,
            "sample_prompts": f"{tmp_path / 'p.txt'}\n{tmp_path / 'p.json'}\n{tmp_path / 'p.toml'}\nseventh --n bad",
        }
    )
    prompts = load_sample_prompts(cfg.sample_prompts)
    assert [p.prompt for p in prompts] == ["first", "second", "third", "fourth", "fifth", "sixth", "seventh"]
    assert (prompts[0].seed, prompts[1].width, prompts[2].steps) == (1, 64, 3)
    assert (prompts[3].steps, prompts[3].seed) == (7, 9)
    assert (prompts[4].width, prompts[4].scale, prompts[5].height) == (64, 5.0, 128)
    assert prompts[6].negative_prompt == "bad"


def test_a_bad_prompt_file_names_the_file_and_line(tmp_path):
    (tmp_path / "p.txt").write_text("fine\nbroken --w wide\n")
    with pytest.raises(ConfigError, match=r"p\.txt, line 2: --w 'wide' is not a number"):
        load_sample_prompts([str(tmp_path / "p.txt")])
    with pytest.raises(ConfigError, match="prompt file not found"):
        load_sample_prompts([str(tmp_path / "missing.txt")])


def test_samples_need_a_schedule_and_a_schedule_needs_prompts():
    base = {"train_data_dir": "d", "base_model": "m"}
    with pytest.raises(ConfigError, match="say when to sample"):
        config_from_dict({**base, "sample_prompts": ["a cat"]})
    with pytest.raises(ConfigError, match="need sample_prompts"):
        config_from_dict({**base, "sample_every_n_epochs": 1})
