"""Render a conversation with the tokenizer's chat template into segments marked trainable or not.

The template is rendered for growing prefixes of the conversation; each turn's text is what its rendering
adds to the previous one. Before an assistant turn the prefix is rendered with the generation prompt, so the
assistant header (``<|assistant|>`` or the like) counts as context and only what the model must write at
inference time (the reply and its end-of-turn marker) is trained.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from lora_trainer.errors import DatasetError

Segment = Tuple[str, bool]  # (text, trainable)


def _render(tokenizer, messages: Sequence[Tuple[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=generation_prompt
    )


def require_chat_template(tokenizer, base_model: str) -> None:
    """Chat data needs a template; say so before the model loads."""
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            f'The tokenizer of {base_model} has no chat template, which chat data ("messages") '
            "needs. Use a chat/instruct model, add a chat_template to its tokenizer_config.json, "
            "or convert the data to prompt/completion lines."
        )


def chat_segments(tokenizer, messages: Sequence[Tuple[str, str]], origin: str) -> List[Segment]:
    """The rendered conversation as consecutive (text, trainable) segments; assistant replies are trainable."""
    segments: List[Segment] = []
    done = ""
    for i, (role, _content) in enumerate(messages):
        if role == "assistant":
            head = _render(tokenizer, messages[:i], True) if i else _opening(tokenizer)
            segments.append((_extend(done, head, origin), False))
            done = head
        full = _render(tokenizer, messages[: i + 1], False)
        segments.append((_extend(done, full, origin), role == "assistant"))
        done = full
    return [s for s in segments if s[0]]


def _opening(tokenizer) -> str:
    """What the template writes before a conversation that opens with an assistant turn, if it can say."""
    try:
        return _render(tokenizer, [], True)
    except Exception:  # many templates index messages[0]; then the whole first turn counts as the reply
        return ""


def _extend(done: str, rendered: str, origin: str) -> str:
    if not rendered.startswith(done):
        # Templates that rewrite earlier turns (e.g. dropping past reasoning) cannot be split into turns.
        raise DatasetError(
            f"{origin}: the tokenizer's chat template renders this conversation differently "
            "once more turns follow, so the assistant turns cannot be located. Use a template "
            "that renders each turn the same way regardless of the turns after it."
        )
    return rendered[len(done) :]
