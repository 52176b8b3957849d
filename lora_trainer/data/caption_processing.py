"""What a caption becomes at a training step: sd-scripts' caption options, in sd-scripts' order.

``BaseDataset.process_caption`` in sd-scripts' ``library/train_util.py`` defines them:

1. ``caption_prefix`` and ``caption_suffix`` are joined on with a space;
2. ``caption_dropout_rate``: the whole caption is dropped (empty) with that probability;
3. the tags (comma-separated parts) are split into a fixed head, a flexible middle and a fixed tail: by
   ``keep_tokens_separator`` when the caption contains it (head before the first separator, tail after a
   second one), else the first ``keep_tokens`` tags are the head;
4. ``shuffle_caption`` shuffles the middle, then ``caption_tag_dropout_rate`` drops each of its tags with that
   probability; the parts are joined with ", ";
5. ``secondary_separator`` is replaced by a comma, so the words it bound stay one tag through 3-4.

One difference: sd-scripts leaves the keep_tokens_separator in captions it does not shuffle or drop tags from
(the text encoder then reads "|||"); here step 3 always removes it.

The randomness comes from the ``random.Random`` passed in (the dataset seeds one per sample and epoch), so a
caption is a pure function of (seed, epoch, sample).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

TAG_SEPARATOR = ","  # sd-scripts' caption_separator default


@dataclass(frozen=True)
class CaptionOptions:
    """One folder's caption options (see the config's documentation of each)."""

    shuffle: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0
    prefix: str = ""
    suffix: str = ""
    secondary_separator: str = ""

    @property
    def varies(self) -> bool:
        """Whether the caption's tags change from epoch to epoch (beyond dropping the whole caption)."""
        return self.shuffle or self.tag_dropout_rate > 0


def split_tags(text: str) -> List[str]:
    """The non-empty comma-separated tags of ``text``, stripped."""
    return [t.strip() for t in text.split(TAG_SEPARATOR) if t.strip()]


def fixed_and_flexible_tags(caption: str, options: CaptionOptions) -> Tuple[List[str], List[str], List[str]]:
    """(head, middle, tail): the tags kept first, the ones shuffling and tag dropout act on, the ones kept last."""
    separator = options.keep_tokens_separator
    if separator and separator in caption:
        head, rest = caption.split(separator, 1)
        tail = ""
        if separator in rest:
            rest, tail = rest.split(separator, 1)
        return split_tags(head), split_tags(rest), split_tags(tail)
    tags = split_tags(caption)
    return tags[: options.keep_tokens], tags[options.keep_tokens :], []


def process_caption(caption: str, options: CaptionOptions, rng: Optional[random.Random] = None) -> str:
    """``caption`` as a step trains on it (see the module docstring). Without ``rng`` nothing random happens:
    no dropout, no shuffling, no tag dropout (the form validation captions and the text cache use)."""
    if options.prefix:
        caption = options.prefix + " " + caption
    if options.suffix:
        caption = caption + " " + options.suffix
    if rng is not None and options.dropout_rate > 0 and rng.random() < options.dropout_rate:
        return ""
    separator = options.keep_tokens_separator
    if (rng is not None and options.varies) or (separator and separator in caption):
        head, middle, tail = fixed_and_flexible_tags(caption, options)
        if rng is not None and options.shuffle:
            rng.shuffle(middle)
        if rng is not None and options.tag_dropout_rate > 0:
            middle = [tag for tag in middle if rng.random() >= options.tag_dropout_rate]
        caption = ", ".join(head + middle + tail)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, TAG_SEPARATOR)
    return caption
