"""Several processes on Accelerate: one `Accelerator` per process sets up the process group (`accelerate
launch` or `torchrun`), picks this process's device, wraps the trained model in DDP or FSDP2 as the launch
config says and, for fp16, scales the loss. These helpers keep the rest of the code free of
`torch.distributed` calls.

With one process (the usual case) the collective helpers are no-ops.
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as torch_dist

from hybridft.errors import HybridFTError

# our precision names -> Accelerate's mixed_precision names
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

T = TypeVar("T")
_accelerator: Optional[Any] = None
_FSDP1 = ("the Accelerate config asks for FSDP version 1; hybridft supports FSDP2: set fsdp_version: 2 in the "
          "config (or pass --fsdp_version 2)")


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
    _check_launch_env()
    if _accelerator is not None:
        same_device = (_accelerator.device.type == "cpu") == cpu or not torch.cuda.is_available()
        if _accelerator.mixed_precision == wanted and same_device:
            return _accelerator
        if world_size_from_env() > 1:
            raise HybridFTError(f"precision={precision} differs from this process's Accelerate state "
                                f"({_accelerator.mixed_precision}); use one precision per launch")
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    acc = Accelerator(cpu=cpu, mixed_precision=wanted)
    if acc.distributed_type.name == "MULTI_CPU" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        _fsdp_on_cpu(acc)
    kind = acc.distributed_type.name
    if kind in ("DEEPSPEED", "MEGATRON_LM", "XLA"):
        raise HybridFTError(f"the Accelerate config asks for {kind}, which hybridft does not support yet; use "
                            f"FSDP (configs/accelerate/fsdp.yaml) or data parallelism (configs/accelerate/ddp.yaml)")
    _accelerator = acc
    return acc


def _check_launch_env() -> None:
    """Refuse what we do not support before Accelerate sees it (on CPU processes it would silently ignore
    DeepSpeed, and fail on FSDP1 with an unrelated message)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise HybridFTError("the Accelerate config asks for DeepSpeed, which hybridft does not support yet; use "
                            "FSDP (configs/accelerate/fsdp.yaml) or data parallelism (configs/accelerate/ddp.yaml)")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise HybridFTError(_FSDP1)
        # Every process needs the whole teacher (its outputs are computed in shards of the data, and the
        # student is cut from its layers), so weights are never loaded on the main process only; transformers
        # reads this variable when it loads a model.
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def _fsdp_on_cpu(acc: Any) -> None:
    """Accelerate turns FSDP on only for GPU processes and silently falls back to DDP on CPU ones; torch's
    FSDP2 runs on CPU with gloo, so we apply the launch config's FSDP plugin ourselves (CPU clusters, tests)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables that `accelerate launch` sets
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    # as Accelerate does itself: every later AcceleratorState() copies the type back from PartialState
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded(acc: Any) -> bool:
    """Whether the model's weights are split across processes (FSDP), rather than copied (DDP, one process)."""
    return acc.distributed_type.name == "FSDP"


def describe() -> dict[str, Any]:
    """How this process was launched, for the run's summary."""
    acc = _accelerator
    return {"processes": rank_and_world()[1],
            "distributed_type": acc.distributed_type.name if acc is not None else "NO",
            "mixed_precision": acc.mixed_precision if acc is not None else "no",
            "device": str(acc.device) if acc is not None else "cpu"}


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


def shutdown() -> None:
    """Leave the process group together: a process that exits while another still talks to it can abort."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch_dist.all_gather_object(out, obj)
    return out


def from_main(fn: Callable[[], T]) -> T:
    """`fn()` run on the main process only, its result shared with every process (a HybridFTError too).

    For what lives on the main process's disk: on several machines, a cache folder under $HOME exists on each
    machine and may hold a file on one and not on another; deciding on each process would split them."""
    if rank_and_world()[1] == 1:
        return fn()
    payload: list[Any] = [None]
    if is_main():
        try:
            payload[0] = ("ok", fn())
        except HybridFTError as e:
            payload[0] = ("error", str(e))
    torch_dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise HybridFTError(value)
    return value


def set_sync_gradients(acc: Any, sync: bool) -> None:
    """Tell Accelerate whether this micro-batch ends the optimizer step.

    We cut the accumulation groups ourselves (a short last group at an epoch's end, and a resume mid-epoch,
    would put `accelerator.accumulate`'s own counter out of step), so we set the flag it reads directly.
    """
    acc.gradient_state._set_sync_gradients(sync)


# ---------------------------------------------------------------------------------------------------
# device, precision and seeds


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def pick_device(name: str, precision: str = "fp32", option: str = "device") -> torch.device:
    """This process's device: under `accelerate launch` or `torchrun`, the GPU of its local rank. `option`: how
    the user gave `name`, for the error (`device`, the config key, or `--device`, a command-line option)."""
    if name == "cuda" and not torch.cuda.is_available():
        say = (lambda v: f"{option} {v}") if option.startswith("--") else (lambda v: f"{option}={v}")
        raise HybridFTError(f"{say('cuda')}, but no CUDA device is visible; use {say('auto')} or {say('cpu')}")
    cpu = name == "cpu" or not torch.cuda.is_available()
    if precision == "fp16" and cpu:
        raise HybridFTError("precision=fp16 needs a CUDA GPU (CPU autocast is bf16); use precision=bf16 or fp32")
    return accelerator(precision, cpu=cpu).device


def autocast(device: torch.device, precision: str) -> Any:
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision in ("bf16", "fp16"))
