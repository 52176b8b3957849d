"""Captions as comma-separated tags: splitting, trigger words, and tag frequencies."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, List


def split_tags(caption: str) -> List[str]:
    """The non-empty, stripped comma-separated parts of a caption."""
    return [part.strip() for part in caption.split(",") if part.strip()]


def add_trigger(caption: str, prefix: str = "", suffix: str = "") -> str:
    """``prefix, caption, suffix``, leaving out empty parts and any trigger the caption already has there."""
    tags = split_tags(caption)
    parts = [caption.strip()] if caption.strip() else []
    if prefix.strip() and (not tags or tags[0] != prefix.strip()):
        parts.insert(0, prefix.strip())
    if suffix.strip() and (not tags or tags[-1] != suffix.strip()):
        parts.append(suffix.strip())
    return ", ".join(parts)


def remove_tag(caption: str, tag: str) -> str:
    """The caption without every comma-separated part equal to ``tag`` (other text is left as it was)."""
    tag = tag.strip()
    if not tag:
        return caption
    return ", ".join(part for part in split_tags(caption) if part != tag)


def tag_frequencies(captions: Iterable[str]) -> Counter:
    """How many captions contain each tag (a tag counts once per caption)."""
    counts: Counter = Counter()
    for caption in captions:
        counts.update(set(split_tags(caption)))
    return counts


def format_tag_summary(counts: Counter, total: int, top: int = 20) -> str:
    """A few lines: the ``top`` most frequent tags with their counts and share of ``total`` captions."""
    if not counts:
        return "no tags"
    lines = [f"top tags over {total} caption(s):"]
    width = max(len(tag) for tag, _ in counts.most_common(top))
    for tag, count in counts.most_common(top):
        share = 100.0 * count / total if total else 0.0
        lines.append(f"  {tag:<{width}}  {count:>5}  {share:5.1f}%")
    return "\n".join(lines)
