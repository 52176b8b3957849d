"""Which rows each optimizer step trains on, and how a micro-batch becomes padded tensors.

The order is a pure function of (seed, epoch) and a step's rows a pure function of (seed, step), so a run
resumed at any step sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from lora_trainer.text.tokenize import IGNORE_INDEX, TokenSequence


def epoch_order(count: int, seed: int, epoch: int) -> List[int]:
    """A shuffled order of ``count`` rows for one epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_777_777)
    return torch.randperm(count, generator=generator).tolist()


class BatchSchedule:
    """Maps optimizer steps to this process's micro-batches of row indices.

    A micro-batch holds ``batch_size`` rows on each of ``num_processes`` processes; an optimizer step takes
    ``accumulation`` micro-batches (fewer at the end of an epoch). An epoch's order is padded by repeating
    its start until every micro-batch is full, so that all processes always run the same number of passes.
    """

    def __init__(
        self, count: int, batch_size: int, accumulation: int, seed: int, num_processes: int = 1, process_index: int = 0
    ):
        self.count = count
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        self.global_batch = batch_size * num_processes
        self.micro_batches_per_epoch = max(1, math.ceil(count / self.global_batch))
        self.steps_per_epoch = math.ceil(self.micro_batches_per_epoch / accumulation)
        self._orders: Dict[int, List[int]] = {}

    def epoch_of(self, step: int) -> int:
        """The 0-based epoch that optimizer step ``step`` (0-based) belongs to."""
        return step // self.steps_per_epoch

    def _order(self, epoch: int) -> List[int]:
        if epoch not in self._orders:
            order = epoch_order(self.count, self.seed, epoch)
            wanted = self.micro_batches_per_epoch * self.global_batch
            self._orders = {epoch: [order[i % self.count] for i in range(wanted)]}  # keep one epoch cached
        return self._orders[epoch]

    def micro_batches(self, step: int) -> List[List[int]]:
        """This process's row indices for each micro-batch of optimizer step ``step`` (0-based)."""
        order = self._order(self.epoch_of(step))
        first = (step % self.steps_per_epoch) * self.accumulation
        last = min(first + self.accumulation, self.micro_batches_per_epoch)
        mine = slice(self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size)
        return [order[m * self.global_batch : (m + 1) * self.global_batch][mine] for m in range(first, last)]


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: Optional[torch.Tensor]  # None for packed rows: their position ids separate the samples
    position_ids: Optional[torch.Tensor]

    @property
    def trained_tokens(self) -> int:
        """Tokens the loss is computed on (labels shift left by one: the first label is never predicted)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.position_ids))

    def model_inputs(self) -> Dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs


def collate(rows: Sequence[TokenSequence], pad_id: int) -> Batch:
    """Right-pad rows to the longest; padding is masked out of attention (or, packed, is its own sample)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    packed = any(r.position_ids is not None for r in rows)
    mask = None if packed else torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long) if packed else None
    for i, row in enumerate(rows):
        n = len(row)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        if mask is not None:
            mask[i, :n] = 1
        if positions is not None:
            own = row.position_ids if row.position_ids is not None else range(n)
            positions[i, :n] = torch.tensor(list(own))
            # Padding restarts at position 0, so the model treats it as one more sample the others cannot see.
            positions[i, n:] = torch.arange(width - n)
    return Batch(ids, labels, mask, positions)
