"""Quality and cost of a model on a split: accuracy, macro-F1, per-class report, confusion matrix,
parameter counts, size on disk, throughput at batch 32 and batch-1 latency.

Teacher and student are measured in the same process, one after the other, on the same examples, so their
ratio is meaningful even on a noisy machine.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from hybridft.tasks.classification import compute_metrics, count_params, logits_for_loss
from hybridft.train import length_sorted_loader, predict_logits, to_device


def size_on_disk_mb(folder: Optional[Path]) -> Optional[float]:
    if folder is None or not folder.exists():
        return None
    return round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20, 2)


@torch.no_grad()
def measure_speed(model: nn.Module, items: list[dict[str, Any]], collate: Any, device: torch.device,
                  batch_size: int = 32, batches: int = 8, latency_samples: int = 32) -> dict[str, float]:
    """Samples per second at `batch_size` (after a warm-up batch) and median batch-1 latency in ms."""
    model.to(device).eval()
    n = min(len(items), batch_size * (batches + 1))
    loader = list(DataLoader(items[:n], batch_size=batch_size, collate_fn=collate))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    logits_for_loss(model, to_device(loader[0], device))  # warm-up
    timed = loader[1:] or loader
    sync()
    start = time.perf_counter()
    count = 0
    for batch in timed:
        logits_for_loss(model, to_device(batch, device))
        count += batch["input_ids"].shape[0]
    sync()
    throughput = count / (time.perf_counter() - start)
    latencies = []
    for item in items[:latency_samples]:
        batch = to_device(collate([item]), device)
        t0 = time.perf_counter()
        logits_for_loss(model, batch)
        sync()
        latencies.append((time.perf_counter() - t0) * 1000)
    return {"throughput_samples_per_s": round(throughput, 1), "latency_ms_batch1": round(statistics.median(latencies), 2)}


def evaluate_model(model: nn.Module, items: list[dict[str, Any]], collate: Any, label_names: list[str],
                   device: torch.device, folder: Optional[Path] = None, batch_size: int = 32,
                   speed_batches: int = 8, latency_samples: int = 32) -> dict[str, Any]:
    logits, labels = predict_logits(model, length_sorted_loader(items, batch_size, collate), device)
    result: dict[str, Any] = compute_metrics(logits, labels, label_names, full=True)
    result.update(count_params(model))
    result["size_mb"] = size_on_disk_mb(folder)
    result.update(measure_speed(model, items, collate, device, batch_size, speed_batches, latency_samples))
    return result
