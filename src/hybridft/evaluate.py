"""The cost of a model, for every task: size on disk, throughput at batch 32 and batch-1 latency of its
forward pass (the task's `logits_for_loss`). Quality metrics belong to the task (`task.report`).

Teacher and student are measured in the same process, one after the other, on the same examples, so their
ratio is meaningful even on a noisy machine.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from hybridft.batching import to_device

Forward = Callable[[nn.Module, dict[str, Any]], Any]


def size_on_disk_mb(folder: Optional[Path]) -> Optional[float]:
    if folder is None or not folder.exists():
        return None
    return round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20, 2)


@torch.no_grad()
def measure_speed(model: nn.Module, items: list[dict[str, Any]], collate: Any, device: torch.device,
                  batch_size: int = 32, batches: int = 8, latency_samples: int = 32,
                  forward: Optional[Forward] = None) -> dict[str, float]:
    """Samples per second at `batch_size` (after a warm-up batch) and median batch-1 latency in ms of
    `forward(model, batch)` (default: the model's logits for the batch's inputs)."""
    run = forward or _logits
    model.to(device).eval()
    n = min(len(items), batch_size * (batches + 1))
    loader = list(DataLoader(items[:n], batch_size=batch_size, collate_fn=collate))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run(model, to_device(loader[0], device))  # warm-up
    timed = loader[1:] or loader
    sync()
    start = time.perf_counter()
    count = 0
    for batch in timed:
        run(model, to_device(batch, device))
        count += batch["input_ids"].shape[0]
    sync()
    throughput = count / (time.perf_counter() - start)
    latencies = []
    for item in items[:latency_samples]:
        batch = to_device(collate([item]), device)
        t0 = time.perf_counter()
        run(model, batch)
        sync()
        latencies.append((time.perf_counter() - t0) * 1000)
    return {"throughput_samples_per_s": round(throughput, 1), "latency_ms_batch1": round(statistics.median(latencies), 2)}


def _logits(model: nn.Module, batch: dict[str, Any]) -> Any:
    names = ("input_ids", "attention_mask", "token_type_ids")
    return model(**{k: v for k, v in batch.items() if k in names}).logits
