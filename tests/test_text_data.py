"""Text data: format detection, validation messages, chat/completion loss masks, truncation, packing, batches."""

from __future__ import annotations

import os

import pytest
from support.text_models import build_tiny_lm, build_tokenizer, capitals_records, text_config, write_jsonl

from lora_trainer.errors import DatasetError
from lora_trainer.text.batches import BatchSchedule, collate
from lora_trainer.text.chat import chat_segments
from lora_trainer.text.data import TextSample, load_text_dataset
from lora_trainer.text.tokenize import IGNORE_INDEX, encode_segments, sample_segments, tokenize_dataset

CHAT = {
    "messages": [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "say hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "say good night"},
        {"role": "assistant", "content": "good night"},
    ]
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def trained_words(tokenizer, sample: TextSample):
    segments, special = sample_segments(sample, tokenizer)
    ids, labels = encode_segments(tokenizer, segments, special)
    return tokenizer.convert_ids_to_tokens([t for t in labels if t != IGNORE_INDEX]), ids


@pytest.mark.parametrize(
    "records, expected",
    [
        ([{"prompt": "a", "completion": "b"}], {"prompt_completion": 1}),
        ([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "output": "b"}], {"alpaca": 2}),
        ([CHAT], {"chat": 1}),
        ([{"text": "hello world"}], {"text": 1}),
    ],
)
def test_jsonl_formats_are_detected(tmp_path, records, expected):
    write_jsonl(str(tmp_path / "d.jsonl"), records)
    assert load_text_dataset(str(tmp_path)).formats == expected


def test_txt_is_one_sample_per_line_or_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n\n  \ngood morning\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("cats and dogs\n", encoding="utf-8")
    by_line = load_text_dataset(str(tmp_path))
    assert [s.completion for s in by_line.samples] == ["hello world", "good morning", "cats and dogs"]
    assert by_line.samples[1].origin.endswith("a.txt line 4")
    by_file = load_text_dataset(str(tmp_path), sample_unit="file")
    assert [s.completion for s in by_file.samples] == ["hello world\n\n  \ngood morning", "cats and dogs"]


@pytest.mark.parametrize(
    "line, message",
    [
        (
            '{"prompt": "a", "completion": "b"',
            r"line 2: not valid JSON .*expected an object with \"prompt\" and "
            r"\"completion\" strings",
        ),
        (
            '["a", "b"]',
            r"line 2: expected an object with \"prompt\" and \"completion\" strings \(prompt_completion "
            r"format\), got a JSON list",
        ),
        (
            '{"instruction": "a", "output": "b"}',
            r"line 2: expected an object with \"prompt\" and \"completion\" "
            r"strings .*got an object with keys 'instruction', 'output'",
        ),
        ('{"prompt": "a", "completion": 5}', r"line 2: 'completion' must be a string, got 5"),
        ('{"prompt": "a", "completion": "  "}', r"line 2: 'completion' is empty"),
    ],
)
def test_malformed_prompt_completion_lines_are_named(tmp_path, line, message):
    path = write_jsonl(str(tmp_path / "d.jsonl"), [{"prompt": "q", "completion": "a"}, line])
    with pytest.raises(DatasetError, match=message) as err:
        load_text_dataset(str(tmp_path))
    assert str(err.value).startswith(path)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": []}, r'"messages" must be a non-empty list'),
        ({"messages": "hi"}, r'"messages" must be a non-empty list'),
        ({"messages": [{"role": "user"}]}, r'message 1: expected an object with "role" and "content"'),
        ({"messages": [{"role": "robot", "content": "x"}]}, r'message 1: role "robot" is not one of system, user'),
        ({"messages": [{"role": "user", "content": ["x"]}]}, r"message 1: 'content' must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"has no assistant message"),
    ],
)
def test_malformed_chat_lines_are_named(tmp_path, record, message):
    write_jsonl(str(tmp_path / "chat.jsonl"), [CHAT, record])
    with pytest.raises(DatasetError, match=r"chat.jsonl line 2.*" + message):
        load_text_dataset(str(tmp_path))


@pytest.mark.parametrize(
    "record, message",
    [
        ({"instruction": "a", "input": 3, "output": "b"}, r"'input' must be a string"),
        ({"instruction": " ", "output": "b"}, r"'instruction' is empty"),
    ],
)
def test_malformed_alpaca_lines_are_named(tmp_path, record, message):
    write_jsonl(str(tmp_path / "a.jsonl"), [{"instruction": "a", "output": "b"}, record])
    with pytest.raises(DatasetError, match=r"a.jsonl line 2: " + message):
        load_text_dataset(str(tmp_path))


def test_unknown_first_line_lists_the_formats(tmp_path):
    write_jsonl(str(tmp_path / "d.jsonl"), [{"question": "a", "answer": "b"}])
    with pytest.raises(
        DatasetError,
        match=r"d.jsonl line 1: got an object with keys 'question', 'answer', which "
        r"matches no data format.*\(prompt_completion\).*\(chat\)",
    ):
        load_text_dataset(str(tmp_path))


def test_explicit_format_rejects_other_lines(tmp_path):
    write_jsonl(str(tmp_path / "d.jsonl"), [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DatasetError, match=r"line 1: expected an object with \"messages\".*\(chat format\)"):
        load_text_dataset(str(tmp_path), data_format="chat")


def test_invalid_utf8_names_the_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello\nworld \xff\n")
    with pytest.raises(DatasetError, match=r"a.txt: not UTF-8 text: byte 0xFF at offset 12 \(line 2\)"):
        load_text_dataset(str(tmp_path))


def test_empty_and_missing_data_are_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_text_dataset(str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match=r"has no .txt or .jsonl files"):
        load_text_dataset(str(tmp_path))
    (tmp_path / "a.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DatasetError, match="no training samples"):
        load_text_dataset(str(tmp_path))
    write_jsonl(str(tmp_path / "b.jsonl"), [{"text": "x"}])
    with pytest.raises(DatasetError, match="mixes .txt and .jsonl"):
        load_text_dataset(str(tmp_path))


def test_empty_dataset_fails_before_the_model_loads(tmp_path):
    from lora_trainer.text.trainer import train_text

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("\n", encoding="utf-8")
    # base_model does not exist: had the trainer loaded it first, this would be a ModelLoadError instead.
    cfg = text_config(str(tmp_path / "no-model"), str(tmp_path / "data"), str(tmp_path / "out"))
    with pytest.raises(DatasetError, match="no training samples"):
        train_text(cfg)
    assert not os.path.exists(tmp_path / "out")


def test_prompt_completion_trains_only_the_completion_and_eos(tokenizer):
    words, ids = trained_words(
        tokenizer, TextSample("x", prompt="what is the capital of france ?", completion=" paris")
    )
    assert words == ["paris", "</s>"]
    assert ids[0] == tokenizer.bos_token_id


def test_alpaca_trains_only_the_output(tmp_path, tokenizer):
    write_jsonl(
        str(tmp_path / "a.jsonl"), [{"instruction": "translate to english", "input": "bonjour", "output": "hello"}]
    )
    sample = load_text_dataset(str(tmp_path)).samples[0]
    assert "### Input:\nbonjour" in sample.prompt and sample.prompt.endswith("### Response:\n")
    assert trained_words(tokenizer, sample)[0] == ["hello", "</s>"]


def test_chat_trains_only_assistant_replies_and_their_end_marks(tokenizer):
    sample = TextSample("x", messages=tuple((m["role"], m["content"]) for m in CHAT["messages"]))
    segments = chat_segments(tokenizer, sample.messages, "x")
    assert "".join(t for t, _ in segments) == tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    words, _ = trained_words(tokenizer, sample)
    assert words == ["hello", "world", "</s>", "good", "night", "</s>"]


def test_plain_text_trains_every_token_but_bos(tokenizer):
    assert trained_words(tokenizer, TextSample("x", completion="cats and dogs"))[0] == ["cats", "and", "dogs", "</s>"]


def test_truncation_is_counted_and_samples_without_completion_skipped(tmp_path, tokenizer):
    long_prompt = " ".join(["hello"] * 20)
    write_jsonl(
        str(tmp_path / "d.jsonl"),
        [
            {"prompt": "say", "completion": " " + " ".join(["world"] * 20)},
            {"prompt": long_prompt, "completion": " paris"},
            {"prompt": "say", "completion": " hello"},
        ],
    )
    tokens = tokenize_dataset(load_text_dataset(str(tmp_path)), tokenizer, max_seq_length=10)
    assert (tokens.samples, tokens.truncated, tokens.skipped, len(tokens.sequences)) == (3, 2, 1, 2)
    assert max(len(s) for s in tokens.sequences) == 10


def test_chat_without_template_is_an_error_before_the_model_loads(tmp_path):
    from lora_trainer.text.trainer import train_text

    model = build_tiny_lm(str(tmp_path / "lm"), chat_template=None)
    os.remove(os.path.join(model, "model.safetensors"))  # loading the model would now fail differently
    write_jsonl(str(tmp_path / "data" / "chat.jsonl"), [CHAT])
    cfg = text_config(model, str(tmp_path / "data"), str(tmp_path / "out"))
    with pytest.raises(DatasetError, match="has no chat template"):
        train_text(cfg)


def test_packing_keeps_samples_apart_by_position(tmp_path, tokenizer):
    write_jsonl(str(tmp_path / "d.jsonl"), capitals_records())
    dataset = load_text_dataset(str(tmp_path))
    plain = tokenize_dataset(dataset, tokenizer, max_seq_length=32)
    packed = tokenize_dataset(dataset, tokenizer, max_seq_length=32, packing=True)
    assert len(plain.sequences) == 4 and len(packed.sequences) == 2
    assert packed.trained_tokens == plain.trained_tokens
    row = packed.sequences[0]
    assert row.position_ids == tuple(range(len(plain.sequences[0]))) * 2
    batch = collate(packed.sequences, pad_id=0)
    assert batch.attention_mask is None and batch.position_ids.shape == batch.input_ids.shape


def test_batch_schedule_covers_each_epoch_and_is_a_function_of_the_step():
    schedule = BatchSchedule(count=10, batch_size=3, accumulation=2, seed=5)
    assert schedule.steps_per_epoch == 2  # 4 micro-batches of 3 (the last padded from the epoch's start)
    epoch0 = [i for step in range(2) for mb in schedule.micro_batches(step) for i in mb]
    assert len(epoch0) == 12 and set(epoch0) == set(range(10))
    assert schedule.micro_batches(2) != schedule.micro_batches(0)  # a new epoch, a new order
    again = BatchSchedule(count=10, batch_size=3, accumulation=2, seed=5)
    assert again.micro_batches(3) == schedule.micro_batches(3)
    # Two processes split each global micro-batch; together they cover the epoch in one step.
    shares = [BatchSchedule(10, 3, 2, 5, num_processes=2, process_index=p).micro_batches(0) for p in (0, 1)]
    assert [len(mb) for share in shares for mb in share] == [3, 3, 3, 3]
    assert {i for share in shares for mb in share for i in mb} == set(range(10))


CHATML_WITH_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nyou are helpful<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_segments_with_a_template_that_adds_a_default_system_turn():
    tokenizer = build_tokenizer(CHATML_WITH_DEFAULT_SYSTEM)
    messages = (("user", "say hello"), ("assistant", "hello world"), ("user", "again"), ("assistant", "hello"))
    segments = chat_segments(tokenizer, messages, "x")
    assert [t for t, trained in segments if trained] == ["hello world<|im_end|>\n", "hello<|im_end|>\n"]
    assert segments[0] == (
        "<|im_start|>system\nyou are helpful<|im_end|>\n<|im_start|>user\nsay hello<|im_end|>\n",
        False,
    )
    assert segments[1] == ("<|im_start|>assistant\n", False)


def test_chat_template_that_rewrites_earlier_turns_is_explained():
    tokenizer = build_tokenizer(
        "{% for m in messages %}{% if loop.last %}[last] {% endif %}{{ m['content'] }} {% endfor %}"
    )
    with pytest.raises(
        DatasetError,
        match=r"d.jsonl line 3: the tokenizer's chat template renders this "
        r"conversation differently once more turns follow",
    ):
        chat_segments(tokenizer, (("user", "hi"), ("assistant", "hello")), "d.jsonl line 3")
