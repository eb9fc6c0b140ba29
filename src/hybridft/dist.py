"""Multi-process data parallelism on Accelerate: one `Accelerator` per process sets up the process group
(`accelerate launch` or `torchrun`), picks this process's device, wraps the student in DDP and, for fp16,
scales the loss. These helpers keep the rest of the code free of `torch.distributed` calls.

With one process (the usual case) the collective helpers are no-ops.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as torch_dist

from hybridft.errors import HybridFTError

# our precision names -> Accelerate's mixed_precision names
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

_accelerator: Optional[Any] = None


def accelerator(precision: str = "fp32", cpu: bool = False) -> Any:
    """This process's Accelerator, created on first use.

    Accelerate keeps one state per process, fixed at creation. A single process may switch precision between
    runs (tests, notebooks: the state is reset); a multi-process run cannot, and never needs to, because
    the precision is settled once in `launch_settings` before the first Accelerator exists.
    """
    global _accelerator
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    wanted = MIXED_PRECISION[precision]
    if _accelerator is not None:
        same_device = (_accelerator.device.type == "cpu") == cpu or not torch.cuda.is_available()
        if _accelerator.mixed_precision == wanted and same_device:
            return _accelerator
        if world_size_from_env() > 1:
            raise HybridFTError(f"precision={precision} differs from this process's Accelerate state "
                                f"({_accelerator.mixed_precision}); use one precision per launch")
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    _accelerator = Accelerator(cpu=cpu, mixed_precision=wanted)
    unsupported = {"FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"}
    if _accelerator.distributed_type.name in unsupported:
        raise HybridFTError(f"the Accelerate config asks for {_accelerator.distributed_type.name}, which hybridft "
                            f"does not support yet; use data parallelism (distributed_type: MULTI_GPU, or torchrun)")
    return _accelerator


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


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
    if torch_dist.get_backend() == "nccl":
        t = t.cuda()
    torch_dist.all_reduce(t)
    return t.cpu().tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch_dist.all_gather_object(out, obj)
    return out


def set_sync_gradients(acc: Any, sync: bool) -> None:
    """Tell Accelerate whether this micro-batch ends the optimizer step.

    We cut the accumulation groups ourselves (a short last group at an epoch's end, and a resume mid-epoch,
    would put `accelerator.accumulate`'s own counter out of step), so we set the flag it reads directly.
    """
    acc.gradient_state._set_sync_gradients(sync)
