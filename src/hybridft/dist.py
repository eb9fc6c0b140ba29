"""Multi-process data parallelism: the process group comes from Accelerate (`accelerate launch` or `torchrun`),
and these helpers keep the rest of the code free of `torch.distributed` calls.

With one process (the usual case) every helper is a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as torch_dist


def init() -> None:
    """Join the process group when launched with several processes (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch_dist.is_initialized():
        from accelerate import PartialState

        PartialState()


def rank_and_world() -> tuple[int, int]:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    if rank_and_world()[1] > 1:
        torch_dist.barrier()


def sum_across(values: list[float]) -> list[float]:
    """Element-wise sum of small counters over all processes."""
    if rank_and_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch_dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch_dist.all_gather_object(out, obj)
    return out
