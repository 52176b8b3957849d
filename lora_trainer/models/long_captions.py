"""Captions longer than one CLIP window, encoded as sd-scripts does with ``--max_token_length 150/225``.

A CLIP text encoder sees 77 positions: a start token, 75 caption tokens and an end token. sd-scripts
(``library/strategy_base.py`` ``_get_input_ids``, ``strategy_sd.py`` / ``strategy_sdxl.py`` ``encode_tokens``)
tokenizes the caption to ``max_token_length + 2`` tokens, cuts the caption tokens into 75-token windows, gives
each window its own start and end token, encodes the windows as one batch and joins the hidden states back
into ``max_token_length + 2`` positions: the first window's start state, each window's 75 caption states, the
last window's final state. SDXL's pooled embedding comes from the first window. With one window (75, the
default) this is exactly the plain 77-token encoding.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

WINDOW_TOKENS = 75  # caption tokens per CLIP window
WINDOW = WINDOW_TOKENS + 2  # with its start and end token
MAX_TOKEN_LENGTHS = (75, 150, 225)  # sd-scripts' choices (its default, None, is one window)


def window_count(max_token_length: int) -> int:
    """CLIP windows for ``max_token_length`` caption tokens (75 -> 1, 150 -> 2, 225 -> 3)."""
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length must be one of {MAX_TOKEN_LENGTHS}, got {max_token_length}")
    return max_token_length // WINDOW_TOKENS


def split_into_windows(ids: torch.Tensor, bos: int, eos: int, pad: int) -> torch.Tensor:
    """(B, 75n + 2) token ids, padded to that length -> (B, n, 77) windows, each ``[start, 75 tokens, end]``.

    When padding differs from the end token (SD2's and SDXL's OpenCLIP tokenizers pad with "!"), a window
    whose text runs to its last slot gets an end token there, and a window with no text starts with one, so
    every window reads ``start ... end pad ...`` as the encoder was trained on.
    """
    windows = []
    for start in range(1, ids.shape[1] - 1, WINDOW_TOKENS):
        window = torch.cat([ids[:, :1], ids[:, start : start + WINDOW_TOKENS], ids[:, -1:]], dim=1)
        if pad != eos:
            body_ends_in_text = (window[:, -2] != eos) & (window[:, -2] != pad)
            window[body_ends_in_text, -1] = eos
            window[window[:, 1] == pad, 1] = eos
        windows.append(window)
    return torch.stack(windows, dim=1)


def merge_window_states(states: torch.Tensor, windows: int) -> torch.Tensor:
    """Hidden states of ``windows`` windows per caption, (B * windows, 77, C) -> (B, 75 * windows + 2, C):
    the first start state, every window's 75 caption states, the last window's final state."""
    per_caption = states.reshape(-1, windows * WINDOW, states.shape[-1])
    parts = [per_caption[:, :1]]
    parts += [per_caption[:, w * WINDOW + 1 : w * WINDOW + 1 + WINDOW_TOKENS] for w in range(windows)]
    parts.append(per_caption[:, -1:])
    return torch.cat(parts, dim=1)


def first_window(values: torch.Tensor, windows: int) -> torch.Tensor:
    """(B * windows, ...) per-window values (SDXL's pooled embedding) -> (B, ...) of each caption's first."""
    return values.reshape(-1, windows, *values.shape[1:])[:, 0]


def cut_caption_lines(names: Sequence[str], token_counts: Optional[Sequence[int]], max_token_length: int) -> List[str]:
    """Start-of-run summary lines about captions longer than ``max_token_length`` tokens (without start/end
    tokens): how many are cut and by how many tokens, and which option keeps more. Empty when none is cut or
    the backend cannot count tokens (``token_counts`` None)."""
    if token_counts is None:
        return []
    cut = [(name, count - max_token_length) for name, count in zip(names, token_counts) if count > max_token_length]
    if not cut:
        return []
    cut.sort(key=lambda item: -item[1])
    shown = ", ".join(f"{name} by {excess}" for name, excess in cut[:5]) + (", ..." if len(cut) > 5 else "")
    longer = [n for n in MAX_TOKEN_LENGTHS if n > max_token_length]
    advice = (
        f"set max_token_length: {' or '.join(map(str, longer))} to encode more of them"
        if longer
        else "shorten them or put what matters first"
    )
    return [
        f"  captions: {len(cut)} of {len(names)} are longer than max_token_length {max_token_length} tokens and "
        f"are cut at the end ({shown} tokens); {advice}"
    ]
