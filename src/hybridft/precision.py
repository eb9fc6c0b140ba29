"""`precision: auto`: bf16 autocast where it is faster on this machine, fp32 where it is not.

bf16 autocast is not faster on every CPU. With AMX (Intel Sapphire Rapids and later) bf16 matrix products are
several times faster than fp32; with only AVX512-BF16 (some Xeons, AMD EPYC) the casts autocast inserts can
cost more than the products save: the same `hybridft distill` took 62 s in bf16 and 43-52 s in fp32 on one such
Xeon, while another 2-core machine ran bf16 1.3-2x faster. So on a CPU without AMX the choice is measured: a
2-layer model of the teacher's architecture runs a few forward and backward passes of a typical batch in each
precision, and bf16 is chosen only when it is clearly faster. A CUDA GPU gets bf16 where it supports it.

The choice and its reason go to the log and to `summary.json` (`precision`), and the chosen value is written
into the run's config.yaml, so a resume keeps it. A timed choice is remembered per machine, architecture and
length (`$HYBRIDFT_CACHE/precision.json`), so later runs neither pay for the probe again nor flip between
precisions on timing noise (which would also make them recompute stored teacher outputs). A probe timed while
other work holds the cores is used for that run only (see `machine_busy`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

BF16_MARGIN = 0.9
"""bf16 is chosen when its probe time is below this fraction of fp32's: a tie keeps fp32's exact arithmetic."""
PROBE_REPEATS = 2


@dataclass
class PrecisionChoice:
    precision: str
    reason: str
    probe_ms: dict[str, float] = field(default_factory=dict)
    """Median milliseconds of one forward + backward pass of the probe, per precision (when timed)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"chosen": self.precision, "reason": self.reason}
        if self.probe_ms:
            out["probe_ms"] = self.probe_ms
        return out


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def emulates_bf16() -> bool:
    """True on a Linux CPU that reports neither AVX-512 nor AMX (its bf16 matmuls are emulated); False when the
    flags are unknown."""
    flags = cpu_flags()
    return bool(flags) and not flags & {"amx_bf16", "avx512_bf16", "avx512bw"}


def choose(device: str, model_config: Optional[dict[str, Any]], max_length: int, processes: int = 1) -> PrecisionChoice:
    """The precision for `precision: auto`.

    Args:
        device: "cuda" or "cpu" (where training will run).
        model_config: The teacher's config.json as a dict (the probe's architecture); None or {} skips timing.
        max_length: Tokens per example; the probe's batch is 16 x min(max_length, 64).
        processes: Processes in the launch; several CPU processes get fp32 (the same everywhere, untimed).
    """
    if device == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "CUDA GPU with bf16 support")
        return PrecisionChoice("fp32", "CUDA GPU without bf16 support (fp16 needs loss scaling; set it explicitly)")
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return PrecisionChoice("bf16", "CPU with AMX bf16 units")
    if "avx512_bf16" not in flags and "avx512bw" not in flags:
        return PrecisionChoice("fp32", "CPU without bf16 instructions (bf16 would be emulated)")
    if processes > 1:
        return PrecisionChoice("fp32", "several CPU processes: an untimed choice that every process shares")
    if not model_config:
        return PrecisionChoice("fp32", "CPU without AMX and no model config to time; fp32")
    tokens = min(max_length, 64)
    key = _machine_key(flags, model_config, tokens)
    remembered = _remembered().get(key)
    if remembered:
        return PrecisionChoice(remembered["chosen"], remembered["reason"] + " (timed earlier on this machine)",
                               remembered.get("probe_ms", {}))
    busy = machine_busy()
    try:
        ms = time_probe(model_config, tokens)
    except Exception as e:  # a probe that cannot run must not stop the run; fp32 always works
        return PrecisionChoice("fp32", f"CPU without AMX; the timing probe failed ({type(e).__name__}), so fp32")
    ratio = ms["bf16"] / ms["fp32"]
    load = f"; other jobs were running (load {busy:.1f}), so this choice is not remembered" if busy else ""
    if ratio < BF16_MARGIN:
        choice = PrecisionChoice("bf16", f"CPU without AMX, bf16 timed {1 / ratio:.2f}x faster than fp32{load}", ms)
    else:
        choice = PrecisionChoice("fp32", f"CPU without AMX, bf16 timed {ratio:.2f}x the time of fp32{load}", ms)
    if not busy:
        _remember(key, choice)
    return choice


def machine_busy() -> Optional[float]:
    """The 1-minute load average when other work holds more than half the cores, else None.

    bf16 autocast suffers far more than fp32 from sharing cores: on this project's 2-core EPYC a probe at load 5
    timed bf16 2.2x slower than fp32, and the same probe on the idle machine 2.2x faster. A choice timed on a busy
    machine serves that run only.
    """
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    return load if load > 0.5 * (os.cpu_count() or 1) else None


def cache_file() -> Path:
    from hybridft.teacher_outputs import default_cache_dir

    return default_cache_dir().parent / "precision.json"  # beside the stored teacher outputs


def _machine_key(flags: set[str], model_config: dict[str, Any], tokens: int) -> str:
    cpu = next((line for line in _cpuinfo().splitlines() if line.startswith("model name")), platform.processor())
    arch = {k: model_config.get(k) for k in ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                                             "vocab_size")}
    payload = json.dumps([cpu, sorted(f for f in flags if "avx" in f or "amx" in f), torch.__version__,
                          torch.get_num_threads(), arch, tokens], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _remembered() -> dict[str, Any]:
    try:
        loaded = json.loads(cache_file().read_text(encoding="utf-8"))
        return loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(key: str, choice: PrecisionChoice) -> None:
    try:
        table = _remembered()
        table[key] = choice.to_dict()
        target = cache_file()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1), encoding="utf-8")
        os.replace(tmp, target)
    except OSError:
        pass  # a read-only cache only costs the probe next time


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def time_probe(model_config: dict[str, Any], tokens: int, batch: int = 16) -> dict[str, float]:
    """Median ms of forward + backward of a 2-layer model of this architecture, in fp32 and in bf16 autocast."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(**{k: v for k, v in model_config.items() if k != "quantization_config"})
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key):
            setattr(config, key, 2)
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    vocab = int(getattr(config, "vocab_size", 1000))
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    out: dict[str, float] = {}
    for precision in ("fp32", "bf16", "fp32", "bf16"):  # interleaved, so a burst of other load hits both
        times = []
        for _ in range(PROBE_REPEATS + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                hidden = model(input_ids=ids).last_hidden_state
            hidden.float().square().mean().backward()
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        best = sorted(times[1:])[len(times[1:]) // 2] * 1000  # the first pass warms up
        out[precision] = round(min(out.get(precision, best), best), 2)
    return out
