"""Training checkpoints: everything needed to continue a stage exactly where it stopped.

    CHECKPOINT_DIR/step-000123/
        model.safetensors      the weights being trained
        best.safetensors       the best weights so far (by `train.best_metric` on validation), if any
        training_state.pt      optimizer, scheduler, step, data position, RNG states, best metric, history

A checkpoint is written to `step-000123.tmp` and renamed, so a kill during the write leaves the previous
checkpoint as the latest complete one. `training_state.pt` holds only tensors and plain Python values and is
read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from hybridft.errors import HybridFTError

STATE_FILE = "training_state.pt"


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:06d}"


def latest_checkpoint(folder: Optional[Path]) -> Optional[Path]:
    """The complete checkpoint with the highest step (`.tmp` folders are half-written and ignored)."""
    if folder is None or not folder.is_dir():
        return None
    done = [p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
            and (p / STATE_FILE).is_file() and (p / "model.safetensors").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(folder: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    best_state: Optional[dict[str, torch.Tensor]], keep: int) -> Path:
    """Write a checkpoint atomically, then prune all but the newest `keep`. `weights` and `best_state` are
    CPU copies (`sharding.model_state`)."""
    from safetensors.torch import save_file

    target = checkpoint_path(folder, step)
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        save_file(_contiguous(weights), str(tmp / "model.safetensors"))
        if best_state is weights:  # this step is the best so far: one file, two names (an 8-layer SmolLM2: 250 MB)
            link_or_copy(tmp / "model.safetensors", tmp / "best.safetensors")
        elif best_state is not None:
            save_file(_contiguous(best_state), str(tmp / "best.safetensors"))
        torch.save(state, tmp / STATE_FILE)
    except (OSError, RuntimeError) as e:  # a full disk: torch.save raises "iostream error", not an OSError
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(folder).free / 2**20
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HybridFTError(f"could not write the checkpoint {target} ({reason}); {free:,.0f} MiB are free on its "
                            f"disk: free space (or lower *.train.keep_checkpoints), then --resume continues from the "
                            f"last complete checkpoint") from None
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    complete = sorted((p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")),
                      key=lambda p: int(p.name.split("-")[1]))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def link_or_copy(src: "str | Path", dst: "str | Path") -> None:
    """A hard link costs no disk space; copy where the file system has none (or across devices)."""
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], Optional[dict[str, torch.Tensor]], dict[str, Any]]:
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else None
    state = torch.load(path / STATE_FILE, weights_only=True)
    return weights, best, state


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage (tied embeddings). The weights come from
    # `sharding.model_state`, one fresh CPU copy per key, so only contiguity is left to ensure.
    return {k: v.contiguous() for k, v in tensors.items()}
