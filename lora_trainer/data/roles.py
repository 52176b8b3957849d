"""Which images train, regularise or validate, and how often each is seen per epoch.

- Regularisation images are balanced against the training images as sd-scripts' ``DreamBoothDataset`` does:
  in folder order, each regularisation image joins with its own repeats until the regularisation images per
  epoch reach the training images per epoch (the rest are left out); if they all joined and fall short, each
  gains one more repeat in turn until they reach it.
- A validation split holds out a seeded random fraction of each training folder (never of a regularisation
  folder), the same images whatever else changes in the run.
"""

from __future__ import annotations

import random
from typing import List, Sequence, Set


def balance_reg_repeats(num_train: int, reg_repeats: Sequence[int]) -> List[int]:
    """The repeats per epoch of each regularisation image (0: left out), given ``num_train`` training images
    per epoch (repeats included) and each regularisation image's own repeats, in folder order."""
    result = [0] * len(reg_repeats)
    if not reg_repeats or num_train <= 0:
        return result
    count, first_round = 0, True
    while count < num_train:
        for i, repeats in enumerate(reg_repeats):
            added = repeats if first_round else 1
            result[i] += added
            count += added
            if count >= num_train:
                break
        first_round = False
    return result


def split_validation(names: Sequence[str], fraction: float, seed: int) -> Set[str]:
    """The names held out for validation: ``round(len(names) * fraction)`` of them (at least one image is left
    to train on), drawn by shuffling the sorted names with ``seed``."""
    if fraction <= 0 or len(names) < 2:
        return set()
    shuffled = sorted(names)
    random.Random(seed).shuffle(shuffled)
    held_out = min(len(shuffled) - 1, int(len(shuffled) * fraction + 0.5))
    return set(shuffled[len(shuffled) - held_out :])
