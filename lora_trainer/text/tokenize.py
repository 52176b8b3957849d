"""Turn text samples into token ids and labels: loss only on what the model must learn to write.

Labels are the token ids where the model is trained and ``IGNORE_INDEX`` (-100, which the cross-entropy
skips) on prompts, chat context and padding. Samples longer than ``max_seq_length`` are truncated and counted;
with packing, several samples share one sequence, each with its own position ids so that the model's
attention keeps them apart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from lora_trainer.errors import DatasetError
from lora_trainer.text.chat import Segment, chat_segments
from lora_trainer.text.data import TextDataset, TextSample

IGNORE_INDEX = -100

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenSequence:
    """One training row. ``position_ids`` is set for packed rows (it restarts at 0 for each sample)."""

    input_ids: Tuple[int, ...]
    labels: Tuple[int, ...]
    position_ids: Optional[Tuple[int, ...]] = None

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizedDataset:
    sequences: List[TokenSequence]
    samples: int  # samples read
    truncated: int  # samples cut at max_seq_length
    skipped: int  # samples with no trained token left after truncation
    max_seq_length: int
    packed: bool

    @property
    def trained_tokens(self) -> int:
        return sum(sum(1 for t in s.labels if t != IGNORE_INDEX) for s in self.sequences)

    def summary(self) -> Dict[str, int]:
        return {
            "samples": self.samples,
            "sequences": len(self.sequences),
            "truncated": self.truncated,
            "skipped": self.skipped,
            "tokens": sum(len(s) for s in self.sequences),
            "trained_tokens": self.trained_tokens,
            "max_seq_length": self.max_seq_length,
            "packing": int(self.packed),
        }


def sample_segments(sample: TextSample, tokenizer) -> Tuple[List[Segment], bool]:
    """The sample as (text, trainable) segments, and whether the tokenizer's own BOS/EOS are to be added.

    Chat templates write their own special tokens; plain samples get the tokenizer's BOS (when it adds one)
    and an EOS after the completion, so that the model learns where to stop.
    """
    if sample.is_chat:
        return chat_segments(tokenizer, sample.messages, sample.origin), False
    segments = [(sample.prompt, False), (sample.completion, True)]
    return [s for s in segments if s[0]], True


def encode_segments(tokenizer, segments: Sequence[Segment], add_special_tokens: bool) -> Tuple[List[int], List[int]]:
    """Token ids of the joined segments and their labels (``IGNORE_INDEX`` outside trainable segments)."""
    if getattr(tokenizer, "is_fast", False):
        ids, trainable = _encode_with_offsets(tokenizer, segments, add_special_tokens)
    else:
        ids, trainable = _encode_piecewise(tokenizer, segments, add_special_tokens)
    eos = tokenizer.eos_token_id
    if add_special_tokens and eos is not None:
        if not ids or ids[-1] != eos:
            ids.append(eos)
            trainable.append(True)
        else:
            trainable[-1] = True
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trainable, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX  # nothing in the row predicts its first token (matters when rows are packed)
    return ids, labels


def _encode_with_offsets(tokenizer, segments, add_special_tokens):
    # Tokenizing the joined text (not each segment) gives exactly the ids the model sees at inference.
    text = "".join(t for t, _ in segments)
    spans, start = [], 0
    for piece, train in segments:
        if train:
            spans.append((start, start + len(piece)))
        start += len(piece)
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    # A token is trained when its characters overlap a trainable segment; tokens the tokenizer adds itself
    # (BOS) have empty spans and are not.
    trainable = [
        end > begin and any(begin < hi and end > lo for lo, hi in spans) for begin, end in enc["offset_mapping"]
    ]
    return ids, trainable


def _encode_piecewise(tokenizer, segments, add_special_tokens):
    ids: List[int] = []
    trainable: List[bool] = []
    if add_special_tokens:
        # The tokenizer's own prefix (BOS) is what it adds around an empty string, minus any EOS suffix.
        prefix = [t for t in tokenizer("", add_special_tokens=True)["input_ids"] if t != tokenizer.eos_token_id]
        ids += prefix
        trainable += [False] * len(prefix)
    for piece, train in segments:
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        trainable += [train] * len(piece_ids)
    return ids, trainable


def pack_sequences(rows: Sequence[TokenSequence], max_seq_length: int) -> List[TokenSequence]:
    """Fill rows of up to ``max_seq_length`` tokens with whole samples, in order."""
    packed: List[TokenSequence] = []
    ids: List[int] = []
    labels: List[int] = []
    positions: List[int] = []
    for row in rows:
        if ids and len(ids) + len(row) > max_seq_length:
            packed.append(TokenSequence(tuple(ids), tuple(labels), tuple(positions)))
            ids, labels, positions = [], [], []
        ids += row.input_ids
        labels += row.labels
        positions += range(len(row))
    if ids:
        packed.append(TokenSequence(tuple(ids), tuple(labels), tuple(positions)))
    return packed


def tokenize_dataset(dataset: TextDataset, tokenizer, max_seq_length: int, packing: bool = False) -> TokenizedDataset:
    """Encode every sample, truncate to ``max_seq_length`` and optionally pack; report what was cut."""
    rows: List[TokenSequence] = []
    truncated = skipped = 0
    for sample in dataset.samples:
        segments, add_special = sample_segments(sample, tokenizer)
        ids, labels = encode_segments(tokenizer, segments, add_special)
        if len(ids) > max_seq_length:
            truncated += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if all(t == IGNORE_INDEX for t in labels):
            skipped += 1  # its completion lies wholly past max_seq_length: no loss to compute
            continue
        rows.append(TokenSequence(tuple(ids), tuple(labels)))
    if truncated:
        logger.warning(
            "%d of %d samples are longer than max_seq_length %d tokens and were truncated.",
            truncated,
            len(dataset),
            max_seq_length,
        )
    if skipped:
        logger.warning(
            "%d samples had no completion tokens within max_seq_length %d and were skipped.", skipped, max_seq_length
        )
    if not rows:
        raise DatasetError(
            f"No sample has a completion within max_seq_length {max_seq_length} tokens; raise "
            "max_seq_length or shorten the prompts."
        )
    sequences = pack_sequences(rows, max_seq_length) if packing else rows
    return TokenizedDataset(
        sequences=sequences,
        samples=len(dataset),
        truncated=truncated,
        skipped=skipped,
        max_seq_length=max_seq_length,
        packed=packing,
    )
