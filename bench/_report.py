"""What the benchmarks share: the JSON report, written whole (to a temporary file, then renamed), its folder
created; the device a `--device` choice names; and a finished causal_lm run with a speculative hybrid."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """Write `report` to `out` as indented JSON; a run stopped mid-write leaves the previous file whole."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def device_from(choice: str) -> Any:
    """`--device auto|cpu|cuda` as a torch device: auto is a CUDA GPU when one is visible, else the CPU."""
    import torch

    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def speculative_run(run: Path) -> Any:
    """(config, splits, test examples, or validation ones without a test split) of a finished causal_lm run with a
    speculative hybrid; None, after one line on stderr, when `run` is not one."""
    import sys

    from hybridft import speculative
    from hybridft.config import load_config
    from hybridft.tasks import causal_lm

    if not (run / "config.yaml").is_file() or not speculative.is_speculative_folder(run / "hybrid"):
        print(f"{run} is not a finished causal_lm run with a speculative hybrid (config.yaml, hybrid/hybrid.json); "
              f"run `hybridft run task=causal_lm` first", file=sys.stderr)
        return None
    cfg = load_config(run / "config.yaml", ["progress=false"])
    splits = causal_lm.load_splits(cfg, cfg.seed)
    return cfg, splits, splits.test if splits.test is not None else splits.validation


def prompts_from_file(path: str, limit: int) -> list[str]:
    """The first `limit` prompts of a .jsonl with a `prompt` key per line (`bench/lm_prompts.py` writes one)."""
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["prompt"] for r in records[:limit]]
