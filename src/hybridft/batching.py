"""Batches: this process's share of each global micro-batch, length-grouped and sorted-split training batches,
length-sorted inference batches, and moving a batch to the device. Task-neutral: items are dicts with `input_ids`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors go to `device`; anything else a collate adds (e.g. a lazily read store slice) stays as is."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class ProcessShare:
    """This process's rows of each global micro-batch (every `world`-th row, from `rank`).

    A micro-batch with fewer rows than processes repeats rows so that no process is idle (as PyTorch's
    DistributedSampler pads); with one process it is the batch itself.
    """

    def __init__(self, batches: Any, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        for b in self.batches:
            b = list(b)
            if len(b) < self.world:
                b = (b * self.world)[: self.world]
            yield b[self.rank:: self.world]


class LengthGroupedBatches:
    """Micro-batches of similar length, in random order, so dynamic padding wastes little work.

    Each epoch: shuffle, cut into groups of 50 optimizer steps, sort each group by length, cut it into
    optimizer-step batches, shuffle those, and split each into `grad_accum` micro-batches. Unlike
    transformers' LengthGroupedSampler, the batches are not visited longest-first within a group (a
    curriculum we do not want), and grouping by whole optimizer steps makes batch 8 x accumulation 1 and
    batch 4 x accumulation 2 see the same examples in the same steps.
    """

    def __init__(self, lengths: list[int], batch_size: int, grad_accum: int, generator: torch.Generator,
                 steps_per_group: int = 50) -> None:
        self.lengths, self.batch_size, self.grad_accum = lengths, batch_size, grad_accum
        self.generator, self.steps_per_group = generator, steps_per_group

    def __len__(self) -> int:
        step = self.batch_size * self.grad_accum
        full, rest = divmod(len(self.lengths), step)
        return full * self.grad_accum + math.ceil(rest / self.batch_size)

    def __iter__(self) -> Any:
        step = self.batch_size * self.grad_accum
        perm = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        group = step * self.steps_per_group
        steps = []
        for g in range(0, len(perm), group):
            chunk = sorted(perm[g:g + group], key=lambda i: self.lengths[i])
            steps += [chunk[i:i + step] for i in range(0, len(chunk), step)]
        full = [s for s in steps if len(s) == step]
        partial = [s for s in steps if len(s) < step]  # at most one: it stays last, like drop_last=False
        order = torch.randperm(len(full), generator=self.generator).tolist()
        for s in [full[i] for i in order] + partial:
            for m in range(0, len(s), self.batch_size):
                yield s[m:m + self.batch_size]


class SortedSplitBatches:
    """Shuffled optimizer steps whose rows are sorted by length and cut into `splits` micro-batches each.

    Each epoch: shuffle, cut into optimizer steps of `batch_size * grad_accum` rows (the same steps as plain
    shuffled batching), sort each step's rows by length, and cut them into `grad_accum * splits` micro-batches of
    near-equal row counts. The training loop normalises the loss over the whole step, so the step's gradient is
    that of the unsorted step: the optimisation is plain shuffled batching. Only the padding changes: a random
    batch pads to its longest row (on SST-2, 3.0x the real tokens), four sorted pieces of it pad to 1.4x.

    Unlike LengthGroupedBatches, a step's rows are a uniform draw from the data, whatever their lengths; a
    step's micro-batch count is the same on every process (FSDP gathers parameters once per forward).
    """

    def __init__(self, lengths: list[int], batch_size: int, grad_accum: int, splits: int,
                 generator: torch.Generator) -> None:
        self.lengths, self.batch_size, self.grad_accum = lengths, batch_size, grad_accum
        self.splits, self.generator = splits, generator

    def _pieces(self, rows: int) -> int:
        return min(self.grad_accum * self.splits, rows)

    def __len__(self) -> int:
        step = self.batch_size * self.grad_accum
        full, rest = divmod(len(self.lengths), step)
        return full * self._pieces(step) + (self._pieces(rest) if rest else 0)

    def __iter__(self) -> Any:
        step = self.batch_size * self.grad_accum
        perm = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        for s in range(0, len(perm), step):
            rows = sorted(perm[s:s + step], key=lambda i: self.lengths[i])
            pieces = self._pieces(len(rows))
            size, extra = divmod(len(rows), pieces)  # the first `extra` pieces get one row more
            start = 0
            for p in range(pieces):
                end = start + size + (p < extra)
                yield rows[start:end]
                start = end


def length_sorted_loader(items: list[dict[str, Any]], batch_size: int, collate: Any) -> DataLoader:
    """For inference: batches of similar length pad little; callers restore the order from `index`."""
    ordered = sorted(items, key=lambda it: len(it["input_ids"]))
    return DataLoader(ordered, batch_size=batch_size, collate_fn=collate)
