"""Whole (unsharded) weights and optimizer state, whatever wraps the model: nothing, DDP or FSDP2.

Checkpoints, the best-weights copy and the saved model always hold whole tensors under the model's own
parameter names, so a run trained with FSDP saves the same files as one trained on one process, and a
checkpoint stays one `model.safetensors` plus one `training_state.pt`. Under FSDP the calls below are
collective: every process must make them at the same point.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state(train_model: nn.Module, model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The whole weights on the CPU, on every process."""
    if not sharded:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(train_model, options=_options())  # gathered on every process
    return {k: v.detach().to("cpu", copy=True) for k, v in full.items()}


def load_model_state(train_model: nn.Module, model: nn.Module, state: dict[str, torch.Tensor], sharded: bool) -> None:
    if not sharded:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(train_model, state, options=_options())  # each process keeps its shard


def optimizer_state(train_model: nn.Module, optimizer: Any, sharded: bool) -> dict[str, Any]:
    """The optimizer's state for a checkpoint (under FSDP: whole, on the main process only)."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(train_model, _inner(optimizer), options=_options(cpu_offload=True))


def load_optimizer_state(train_model: nn.Module, optimizer: Any, state: dict[str, Any], sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(train_model, _inner(optimizer), state, options=_options())


def plain_model(cls: type, config: Any, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A fresh, unwrapped model holding `state`: what comes out of FSDP training, for saving, evaluation and
    inference on one process (FSDP2 shards the trained module in place and cannot undo it)."""
    model = cls(config)
    model.load_state_dict(state)
    return model.to(device)


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
