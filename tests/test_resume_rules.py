"""Resuming: the config's learning rates apply from the saved state on (the schedule keeps its position), the
log and the LoRA's metadata say so, and what shapes the LoRA (rank, alpha, modules, base model) cannot change.
Both routes share the rules (``train/state.py``)."""

import pytest
import torch
from safetensors import safe_open
from support.image_fixtures import StopAfter, image_config, tiny_checkpoint, train

from lora_trainer.errors import ConfigError
from lora_trainer.train.state import TrainingState, check_resumable, load_training_state


@pytest.fixture
def used_rates(monkeypatch):
    """The learning rate of every parameter group at each optimizer step, as AdamW applies it."""
    seen = []
    real = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return seen


def test_image_resume_trains_at_the_configs_new_rate_and_records_what_cannot_change(tmp_path, used_rates):
    base = tiny_checkpoint(tmp_path)
    common = dict(max_train_steps=3, lr_scheduler="linear", lr_warmup_steps=1, batch_size=1)
    first = train(image_config(tmp_path, base, learning_rate=1e-4, **common), callbacks=[StopAfter(1)])
    assert first.status == "cancelled" and used_rates == [[1e-4 / 2]]  # half way through the warm-up
    used_rates.clear()
    lines = []
    cfg = image_config(tmp_path, base, learning_rate=1e-6, resume=str(tmp_path / "out" / "state-1"), **common)
    resumed = train(cfg, log=lines.append)
    assert resumed.status == "finished"
    # resumed at step 1 of "1 warm-up step, then linear decay over 2": factors 1 and 1/2 of the new base rate
    assert [rates[0] for rates in used_rates] == pytest.approx([1e-6, 1e-6 / 2])
    assert "learning rate of lora_unet: 1e-06 from the config from step 1 on (the state had 0.0001)" in "\n".join(lines)
    with safe_open(resumed.output_files[-1], framework="pt") as fh:
        meta = fh.metadata()
    assert meta["ss_learning_rate"] == meta["ss_unet_lr"] == "1e-06"
    # The state records what may not change; another rank and alpha are refused naming both.
    state = load_training_state(str(tmp_path / "out" / "state-1"))
    recorded = {key: state.info[key] for key in ("lora_rank", "lora_alpha", "base_model")}
    assert recorded == {"lora_rank": 4, "lora_alpha": 4.0, "base_model": "tiny_sd1.safetensors"}
    shapes = {k: tuple(v.shape) for k, v in state.weights.items()}
    with pytest.raises(ConfigError, match=r"lora_rank is 4 in the state but 8 in this config.*lora_alpha is 4"):
        check_resumable("state-1", state, {**recorded, "lora_rank": 8, "lora_alpha": 8.0}, shapes)


def state_with(weights, **info):
    return TrainingState(step=1, epoch=0, weights=weights, optimizer={}, scheduler={}, rng={}, info=info)


def test_every_fixed_setting_is_named_when_it_changes():
    saved = {"a.lora_down.weight": torch.zeros(4, 8), "a.lora_up.weight": torch.zeros(8, 4)}
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    state = state_with(saved, lora_rank=4, lora_alpha=4.0, base_model="one.safetensors")
    same = {"lora_rank": 4, "lora_alpha": 4.0, "base_model": "one.safetensors"}
    check_resumable("state-1", state, same, shapes)  # nothing changed: no error
    for key, value in (("lora_alpha", 1.0), ("base_model", "two.safetensors")):
        with pytest.raises(ConfigError, match=f"{key} is .* in the state but {value!r} in this config"):
            check_resumable("state-1", state, {**same, key: value}, shapes)
    more = {**shapes, "lora_te_b.lora_down.weight": (4, 8)}
    with pytest.raises(ConfigError, match="trained modules differ .*train_text_encoder changed"):
        check_resumable("state-1", state, same, more)
    older = state_with(saved)  # written before states recorded their settings: the weights still tell
    with pytest.raises(ConfigError, match=r"\(4, 8\) in the state but \(8, 8\) in this config: lora_rank"):
        check_resumable("state-1", older, {}, {**shapes, "a.lora_down.weight": (8, 8)})


def test_text_resume_applies_the_new_rate_and_refuses_another_rank(tmp_path, used_rates, capsys):
    from support.text_models import build_tiny_lm, capitals_records, cpu_runtime, text_config, write_jsonl

    from lora_trainer.text.trainer import train_text

    base = build_tiny_lm(str(tmp_path / "lm"))
    data = write_jsonl(str(tmp_path / "capitals.jsonl"), capitals_records())
    out = str(tmp_path / "out")
    train_text(text_config(base, data, out, max_train_steps=1, learning_rate=1e-3), runtime=cpu_runtime())
    used_rates.clear()
    state = str(tmp_path / "out" / "state-1")
    resumed = train_text(
        text_config(base, data, out, max_train_steps=2, learning_rate=1e-5, resume=state), runtime=cpu_runtime()
    )
    assert resumed.status == "finished" and used_rates == [[1e-5]]
    assert "1e-05 from the config from step 1 on (the state had 0.001)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="lora_rank is 8 in the state but 4 in this config"):
        train_text(text_config(base, data, out, max_train_steps=2, lora_rank=4, resume=state), runtime=cpu_runtime())
