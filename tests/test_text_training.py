"""Text training on a tiny random LLaMA: memorisation, the saved adapter, every data format, resume,
continuing from an adapter, NaN and cancel stops, and the merged model."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from support.text_models import CAPITALS, build_tiny_lm, capitals_records, cpu_runtime, text_config, write_jsonl

import lora_trainer.text.trainer as text_trainer
from lora_trainer.text.trainer import train_text
from lora_trainer.train.callbacks import TrainingCallback

# peft probes a transformers attribute that transformers 5 deprecates when the tests load adapters themselves.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The tiny model's matmuls gain nothing from threads, and on busy shared cores they lose several-fold.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return build_tiny_lm(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def capitals(tmp_path_factory):
    return write_jsonl(str(tmp_path_factory.mktemp("capitals") / "capitals.jsonl"), capitals_records())


def train_capturing_model(cfg, runtime=None):
    """Train and also return the in-memory PeftModel the trainer built (spied on where it is created)."""
    captured = {}

    def spy(*args, **kw):
        captured["model"] = real(*args, **kw)
        return captured["model"]

    real = text_trainer.attach_adapter
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text_trainer, "attach_adapter", spy)
        result = train_text(cfg, runtime=runtime or cpu_runtime())
    return result, captured["model"]


@pytest.fixture(scope="module")
def memorised(base_model, capitals, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("memorised"))
    cfg = text_config(base_model, capitals, out, max_train_steps=40, batch_size=4)
    result, model = train_capturing_model(cfg)
    return cfg, result, model.eval()


def load_tokenizer(base_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model)


def fresh_base(base_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_model).eval()


def greedy_completion(model, tokenizer, prompt: str) -> list:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=2,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.convert_ids_to_tokens(out[0, ids.shape[1] :].tolist())


def test_loss_falls_and_the_model_completes_training_prompts(memorised, base_model):
    _, result, model = memorised
    assert result.status == "finished" and result.step == 40 and len(result.losses) == 40
    first, last = result.losses[0], sum(result.losses[-5:]) / 5
    assert last < 0.1 * first and last < 0.3, (first, last)
    tokenizer = load_tokenizer(base_model)
    for prompt, target in CAPITALS:
        assert greedy_completion(model, tokenizer, prompt) == [target.strip(), "</s>"]


def test_saved_adapter_reproduces_the_trained_model(memorised, base_model):
    from peft import PeftModel

    cfg, result, model = memorised
    adapter = result.output_files[0]
    assert adapter == os.path.join(cfg.output_dir, os.path.basename(cfg.output_dir))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(adapter))
    loaded = PeftModel.from_pretrained(fresh_base(base_model), adapter).eval()
    ids = load_tokenizer(base_model)([p + c for p, c in CAPITALS], return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # ... and differs from the bare base model, so the comparison means something.
    with torch.no_grad():
        assert (fresh_base(base_model)(input_ids=ids).logits - expected).abs().max() > 1.0


def test_adapter_defaults_snapshot_and_logs(memorised):
    cfg, result, _ = memorised
    with open(os.path.join(result.output_files[0], "adapter_config.json"), encoding="utf-8") as fh:
        adapter_cfg = json.load(fh)
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"], adapter_cfg["lora_dropout"]) == (8, 16, 0.1)
    assert sorted(adapter_cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert adapter_cfg["base_model_name_or_path"] == cfg.base_model
    assert os.path.isfile(os.path.join(cfg.output_dir, "config.yaml"))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(cfg.output_dir, "logs")))
    assert os.path.isdir(os.path.join(cfg.output_dir, "state-40"))  # save_state: the run can be extended


def test_pipeline_loads_the_adapter(memorised, base_model):
    from peft import PeftModel
    from transformers import pipeline

    _, result, _ = memorised
    prompt, target = CAPITALS[1]
    tokenizer = load_tokenizer(base_model)
    peft_model = PeftModel.from_pretrained(fresh_base(base_model), result.output_files[0])
    for generator in (
        pipeline("text-generation", model=peft_model, tokenizer=tokenizer),
        pipeline("text-generation", model=result.output_files[0]),
    ):
        out = generator(prompt, max_new_tokens=1, do_sample=False, return_full_text=False)
        assert out[0]["generated_text"].strip() == target.strip()


CHAT_RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "what is the capital of france ?"},
            {"role": "assistant", "content": "paris"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "you are helpful"},
            {"role": "user", "content": "say hello"},
            {"role": "assistant", "content": "hello world"},
        ]
    },
]


@pytest.mark.parametrize(
    "name, lines, options",
    [
        ("lines.txt", ["hello world", "good morning", "cats and dogs"], {}),
        ("whole.txt", ["hello world", "good morning"], {"text_sample_unit": "file"}),
        ("text.jsonl", [{"text": "hello world"}, {"text": "cats and dogs"}], {}),
        ("pc.jsonl", capitals_records(), {"packing": True}),
        (
            "alpaca.jsonl",
            [
                {"instruction": "translate to english", "input": "bonjour", "output": "hello"},
                {"instruction": "name the sky colour", "output": "blue"},
            ],
            {},
        ),
        ("chat.jsonl", CHAT_RECORDS, {"data_format": "chat", "gradient_accumulation_steps": 2}),
    ],
)
def test_each_data_format_trains(base_model, tmp_path, name, lines, options):
    data = tmp_path / "data" / name
    write_jsonl(str(data), lines)
    cfg = text_config(base_model, str(data.parent), str(tmp_path / "out"), max_train_steps=3, **options)
    result = train_text(cfg, runtime=cpu_runtime())
    assert result.status == "finished" and result.step == 3
    assert all(math.isfinite(x) for x in result.losses) and result.losses[-1] < result.losses[0]
    assert os.path.isfile(os.path.join(result.output_files[0], "adapter_model.safetensors"))


def adapter_weights(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_resume_equals_an_uninterrupted_run(base_model, capitals, tmp_path):
    # Dropout (0.1 by default), shuffling and accumulation all draw on randomness the resume must reproduce.
    common = dict(
        max_train_steps=6,
        batch_size=1,
        gradient_accumulation_steps=2,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        output_name="caps",
    )
    whole = train_text(
        text_config(base_model, capitals, str(tmp_path / "whole"), save_steps=3, **common), runtime=cpu_runtime()
    )
    assert os.path.isdir(tmp_path / "whole" / "caps-step00000003")
    resumed = train_text(
        text_config(
            base_model, capitals, str(tmp_path / "resumed"), resume=str(tmp_path / "whole" / "state-3"), **common
        ),
        runtime=cpu_runtime(),
    )
    assert resumed.status == "finished" and resumed.step == 6
    assert resumed.losses == whole.losses[3:]
    expected, got = adapter_weights(whole.output_files[0]), adapter_weights(resumed.output_files[0])
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # A different seed gives a different run, so the equality above is not a given.
    other = train_text(
        text_config(base_model, capitals, str(tmp_path / "other"), **{**common, "seed": 4}), runtime=cpu_runtime()
    )
    assert other.losses != whole.losses


def test_network_weights_continue_from_an_adapter_keeping_its_rank(memorised, base_model, capitals, tmp_path):
    _, first, _ = memorised
    cfg = text_config(
        base_model,
        capitals,
        str(tmp_path / "more"),
        network_weights=first.output_files[0],
        lora_rank=4,
        learning_rate=0.0,
        max_train_steps=1,
    )
    result = train_text(cfg, runtime=cpu_runtime())
    assert result.losses[0] < 0.5  # it starts from the memorised adapter, not from scratch
    with open(os.path.join(result.output_files[0], "adapter_config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["r"] == 8
    before, after = adapter_weights(first.output_files[0]), adapter_weights(result.output_files[0])
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nan_loss_stops_and_keeps_the_last_good_save(base_model, capitals, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = text_trainer.summed_token_loss

    def blows_up_at_step_3(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(text_trainer, "summed_token_loss", blows_up_at_step_3)
    out = tmp_path / "out"
    cfg = text_config(base_model, capitals, str(out), max_train_steps=5, save_steps=2, output_name="caps")
    result = train_text(cfg, runtime=cpu_runtime())
    assert result.status == "stopped" and result.step == 2 and result.output_files == []
    assert "nan at step 3" in result.message and str(out / "caps-step00000002") in result.message
    assert os.path.isdir(out / "caps-step00000002") and not os.path.exists(out / "caps")
    assert sorted(n for n in os.listdir(out) if not n.startswith(("logs", "config"))) == [
        "caps-step00000002",
        "state-2",
    ]


class StopAfter(TrainingCallback):
    def __init__(self, steps: int) -> None:
        self.steps, self.seen, self.status = steps, 0, None

    def on_step_end(self, info):
        self.seen = info.step

    def on_train_end(self, info, status):
        self.status = status

    def should_stop(self):
        return self.seen >= self.steps


def test_cancel_stops_between_steps(base_model, capitals, tmp_path):
    stop = StopAfter(2)
    cfg = text_config(base_model, capitals, str(tmp_path / "out"), max_train_steps=10)
    result = train_text(cfg, callbacks=[stop], runtime=cpu_runtime())
    assert (result.status, result.step, stop.status) == ("cancelled", 2, "cancelled")
    assert "Cancelled after step 2" in result.message
    # saved as the image route saves on Cancel, with the line that resumes from there
    assert result.output_files == [str(tmp_path / "out" / "out-step00000002")]
    assert result.message.endswith(f"resume: {tmp_path / 'out' / 'state-2'}")


def test_merged_model_matches_the_adapter(base_model, capitals, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = text_config(
        base_model, capitals, str(tmp_path / "out"), max_train_steps=3, merge_adapter=True, save_state=False
    )
    result = train_text(cfg, runtime=cpu_runtime())
    adapter, merged = result.output_files
    assert merged == adapter + "-merged" and not any(n.startswith("state-") for n in os.listdir(cfg.output_dir))
    ids = torch.tensor([[2, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(fresh_base(base_model), adapter).eval()(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_bf16_with_checkpointing_trains_and_saves_fp16(base_model, capitals, tmp_path):
    from peft import get_peft_model_state_dict

    from lora_trainer.train.runtime import LocalRuntime

    cfg = text_config(
        base_model,
        capitals,
        str(tmp_path / "out"),
        max_train_steps=12,
        batch_size=4,
        gradient_checkpointing=True,
        save_precision="fp16",
    )
    result, model = train_capturing_model(cfg, LocalRuntime(torch.device("cpu"), "bf16"))
    assert result.status == "finished" and result.losses[-1] < 0.5 * result.losses[0]
    weights = adapter_weights(result.output_files[0])
    assert {w.dtype for w in weights.values()} == {torch.float16}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trained.values()} == {torch.float32}  # the adapter trains in fp32 under bf16
    reference = get_peft_model_state_dict(model)
    assert weights.keys() == reference.keys()
    for key, value in weights.items():
        torch.testing.assert_close(value.float(), reference[key], rtol=1e-3, atol=1e-4)


def test_epochs_set_the_length_and_epoch_saves(base_model, capitals, tmp_path):
    out = tmp_path / "out"
    cfg = text_config(
        base_model,
        capitals,
        str(out),
        max_train_steps=None,
        epochs=3,
        batch_size=2,
        save_every_n_epochs=2,
        output_name="caps",
        save_state=False,
    )
    result = train_text(cfg, runtime=cpu_runtime())
    assert result.step == 6  # 4 samples in batches of 2: 2 steps an epoch
    assert sorted(n for n in os.listdir(out) if n.startswith("caps")) == ["caps", "caps-step00000004"]


def test_packed_samples_do_not_see_each_other(base_model, capitals):
    from lora_trainer.text.batches import collate
    from lora_trainer.text.data import load_text_dataset
    from lora_trainer.text.tokenize import tokenize_dataset

    dataset = load_text_dataset(os.path.dirname(capitals))
    tokenizer = load_tokenizer(base_model)
    single = tokenize_dataset(dataset, tokenizer, max_seq_length=40).sequences
    packed = collate(tokenize_dataset(dataset, tokenizer, max_seq_length=40, packing=True).sequences[:1], 0)
    model = fresh_base(base_model)
    with torch.no_grad():
        together = model(**packed.model_inputs(), use_cache=False).logits[0]  # as in training
        apart = [model(input_ids=torch.tensor([row.input_ids])).logits[0] for row in single[:3]]
    torch.testing.assert_close(together[: sum(len(r) for r in single[:3])], torch.cat(apart), rtol=0, atol=1e-4)
