"""The teacher-output store: the teacher runs once over the training text, its logits go to disk, and the
student trains from them (classification logits are tiny: 4 bytes x classes per example).

Format (version 1), one safetensors file:
    tensors  `logits` float32 [N, C]   raw teacher logits (before temperature), classes in `label_names` order
             `keys`   uint8   [N, 16]  blake2b-128 digest of the UTF-8 text, or of text + "\\x1f" + pair for
                                       sentence pairs (`hybridft.data.example_key`)
    metadata `format` = "hybridft.teacher_outputs/1", `label_names` = JSON list,
             `fingerprint` = hex digest of teacher weights + tokenizer settings + data keys (may be "external")
Rows are looked up by key, so row order and extra rows do not matter. `write_store` writes the file for
logits computed anywhere else; `distill.teacher_logits=FILE` then distils with no teacher weights at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from hybridft.errors import HybridFTError

FORMAT = "hybridft.teacher_outputs/1"


@dataclass
class Store:
    logits: torch.Tensor  # [N, C] float32
    keys: list[str]
    label_names: list[str]
    fingerprint: str

    def lookup(self, keys: list[str], source: str) -> torch.Tensor:
        """Logits [len(keys), C] in the order of `keys`; every key must be present."""
        row = {k: i for i, k in enumerate(self.keys)}
        missing = [i for i, k in enumerate(keys) if k not in row]
        if missing:
            raise HybridFTError(f"the teacher-output store has no logits for {len(missing)} of {len(keys)} "
                                f"examples of {source} (first: row {missing[0] + 1}); recompute it for this data")
        return self.logits[torch.tensor([row[k] for k in keys], dtype=torch.long)]


def write_store(path: str | Path, keys: list[str], logits: torch.Tensor, label_names: list[str],
                fingerprint: str = "external") -> Path:
    """Write a store atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    logits = logits.detach().float().cpu().contiguous()
    if logits.ndim != 2 or logits.shape[0] != len(keys) or logits.shape[1] != len(label_names):
        raise HybridFTError(f"teacher logits have shape {tuple(logits.shape)}, expected ({len(keys)}, "
                            f"{len(label_names)}) for {len(keys)} examples and {len(label_names)} labels")
    key_bytes = torch.tensor([list(bytes.fromhex(k)) for k in keys], dtype=torch.uint8).reshape(len(keys), 16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({"logits": logits, "keys": key_bytes}, str(tmp),
              metadata={"format": FORMAT, "label_names": json.dumps(label_names), "fingerprint": fingerprint})
    os.replace(tmp, path)
    return path


def read_store(path: str | Path) -> Store:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise HybridFTError(f"teacher-output store not found: {path}; check distill.teacher_logits")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            logits, key_bytes = f.get_tensor("logits"), f.get_tensor("keys")
    except (SafetensorError, OSError, KeyError) as e:
        raise HybridFTError(f"{path} is not a teacher-output store ({e}); see docs/teacher_outputs.md") from None
    if meta.get("format") != FORMAT:
        raise HybridFTError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}; "
                            f"see docs/teacher_outputs.md")
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(-1).sum())
        raise HybridFTError(f"{path}: {bad} rows of teacher logits are NaN or infinite; recompute them")
    keys = [bytes(row).hex() for row in key_bytes.tolist()]
    return Store(logits=logits.float(), keys=keys, label_names=json.loads(meta["label_names"]),
                 fingerprint=meta.get("fingerprint", ""))


def fingerprint(teacher: nn.Module, tokenizer: Any, max_length: int, keys: list[str], precision: str) -> str:
    """What the stored logits depend on: teacher weights, tokenisation settings, the examples and precision."""
    h = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    h.update(f"max_length={max_length};precision={precision};labels={teacher.config.id2label}".encode())
    for k in keys:
        h.update(k.encode())
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("HYBRIDFT_CACHE", Path.home() / ".cache" / "hybridft")) / "teacher_outputs"


@torch.no_grad()
def compute_logits(teacher: nn.Module, items: list[dict[str, Any]], collate: Any, device: torch.device,
                   precision: str, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Teacher logits [N, C] for the items, in item order. Items are batched by length so that dynamic
    padding wastes little work. Under several processes each computes every `world`-th batch and all
    processes receive the merged result."""
    from tqdm.auto import tqdm

    from hybridft import dist
    from hybridft.train import autocast, to_device
    from hybridft.tasks.classification import logits_for_loss

    rank, world = dist.rank_and_world()
    teacher.to(device).eval()
    by_length = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    # whole length-sorted batches per process, so each process pads as little as one process would
    order = [i for b, start in enumerate(range(0, len(by_length), batch_size)) if b % world == rank
             for i in by_length[start:start + batch_size]]
    out = torch.empty(len(items), teacher.config.num_labels)
    batches = DataLoader([items[i] for i in order], batch_size=batch_size, collate_fn=collate)
    done = 0
    for batch in tqdm(batches, desc="teacher outputs", disable=not progress, leave=False):
        batch = to_device(batch, device)
        with autocast(device, precision):
            logits = logits_for_loss(teacher, batch).float().cpu()
        idx = torch.tensor(order[done: done + len(logits)])
        out[idx] = logits
        done += len(logits)
    if world > 1:
        merged = torch.empty_like(out)
        for part_order, part in dist.gather_objects((order, out[torch.tensor(order, dtype=torch.long)])):
            if part_order:
                merged[torch.tensor(part_order, dtype=torch.long)] = part
        out = merged
    return out
