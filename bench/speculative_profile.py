"""Where a speculative round's time goes: the teacher's passes (by width), the draft's token passes, and the rest
(the loop's own code, cache cuts, host-device copies), for the hybrid of a finished causal_lm run, beside plain
greedy decoding of the teacher with the same timers.

    python bench/speculative_profile.py --run runs/causal_lm_demo --draft-tokens 1 --prompts 16
    python bench/speculative_profile.py --run runs/causal_lm_demo --device cuda --torch-profile   # on a GPU
    python bench/speculative_profile.py --run runs/causal_lm_demo --quick                         # a smoke run

Every timed call is wrapped in a device synchronisation, so on a GPU the split is exact but the totals run a little
slower than untimed ones. Built after a lent H200 measured a k=1 round at about 40 ms more than its timed passes
(BENCHMARKS.md, "On a GPU"): run this there first. `--torch-profile` adds torch.profiler's top operators by self
time. Writes bench/results/speculative_profile.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_report.py, also when a test imports this file
from _report import device_from, prompts_from_file, speculative_run, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished causal_lm run folder (config.yaml, hybrid/)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--draft-tokens", type=int, default=1)
    p.add_argument("--confidence", type=float, default=0.0, help="hybrid.draft_confidence")
    p.add_argument("--draft-precision", default="auto", help="hybrid.draft_precision (auto, fp32, bf16, int8)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-file", default=None,
                   help="a .jsonl with a prompt column to take the prompts from (default: the run's test split)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--torch-profile", action="store_true", help="also torch.profiler's top operators by self time")
    p.add_argument("--quick", action="store_true", help="2 prompts, 6 new tokens, with the torch profile")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "speculative_profile.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens, args.torch_profile = 2, 6, True

    import torch

    from hybridft import speculative

    run = Path(args.run)
    loaded = speculative_run(run)
    if loaded is None:
        return 2
    device = device_from(args.device)
    examples = loaded[2]
    hybrid = speculative.load_hybrid(run / "hybrid").to(device)
    hybrid.draft_tokens, hybrid.confidence, hybrid.draft_precision = args.draft_tokens, args.confidence, \
        args.draft_precision
    prepared = hybrid.prepare()
    texts = prompts_from_file(args.prompt_file, args.prompts) if args.prompt_file else examples.texts[:args.prompts]
    ids = [speculative.prompt_tensor(hybrid.tokenizer, t, device) for t in texts]
    eos = speculative.eos_ids(hybrid.teacher, hybrid.tokenizer)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # the timed parts of the generation running now: one table per generation (`measure` switches between them)
    current: dict[str, dict[str, list[float]]] = {"timings": defaultdict(lambda: [0.0, 0])}

    def timed(name_of: Any, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            sync()
            start = time.perf_counter()
            out = fn(*a, **k)
            sync()
            entry = current["timings"][name_of(*a)]
            entry[0] += time.perf_counter() - start
            entry[1] += 1
            return out
        return wrapper

    teacher = hybrid.teacher
    real_forward, real_draft_token = speculative._forward, speculative._draft_token
    timed_teacher = timed(
        lambda model, feed, *_: f"teacher pass, {min(feed.shape[1], 9)}{'+' if feed.shape[1] > 9 else ''} tokens",
        real_forward)
    # the draft's passes run inside `_draft_token` (its first one over the whole prompt), timed there
    speculative._forward = lambda model, *a, **k: (  # type: ignore[assignment]
        timed_teacher(model, *a, **k) if model is teacher else real_forward(model, *a, **k))
    speculative._draft_token = timed(lambda *_: "draft token", real_draft_token)  # type: ignore[assignment]

    def measure(generates: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each generation on every prompt, taking turns prompt by prompt (a machine whose speed drifts then slows
        them alike: timed one after the other, the teacher alone once ran 15.6 tokens/s here and 17.5 interleaved)."""
        for generate in generates.values():
            generate(ids[0])  # warm-up
        runs = {name: {"timings": defaultdict(lambda: [0.0, 0]), "total": 0.0, "tokens": 0} for name in generates}
        for x in ids:
            for name, generate in generates.items():
                current["timings"] = runs[name]["timings"]
                sync()
                start = time.perf_counter()
                out, _ = generate(x)
                sync()
                runs[name]["total"] += time.perf_counter() - start
                runs[name]["tokens"] += out.shape[1] - x.shape[1]
        report = {}
        for name, r in runs.items():
            total, tokens, timings = r["total"], r["tokens"], r["timings"]
            parts = {part: {"ms": round(t * 1000, 1), "calls": n, "ms_per_call": round(t * 1000 / n, 2)}
                     for part, (t, n) in sorted(timings.items())}
            rest = total - sum(t for t, _ in timings.values())
            report[name] = {"seconds": round(total, 3), "new_tokens": int(tokens),
                            "tokens_per_s": round(tokens / total, 2), "parts": parts, "rest_ms": round(rest * 1000, 1)}
        return report

    try:
        report: dict[str, Any] = {
            "run": str(run), "device": str(device), "prompts": len(ids), "max_new_tokens": args.max_new_tokens,
            "draft_tokens": args.draft_tokens, "confidence": args.confidence, "draft_precision": prepared["precision"],
            **measure({"teacher_alone": lambda x: speculative.greedy_generate(teacher, x, args.max_new_tokens, eos),
                       "hybrid": lambda x: hybrid.generate(x, args.max_new_tokens)})}
        if args.torch_profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                for x in ids:
                    hybrid.generate(x, args.max_new_tokens)
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=15)
            report["torch_profile_top15"] = table.splitlines()
            print(table)
    finally:
        speculative._forward, speculative._draft_token = real_forward, real_draft_token
    for who in ("teacher_alone", "hybrid"):
        r = report[who]
        parts = "; ".join(f"{name}: {v['calls']} x {v['ms_per_call']} ms" for name, v in r["parts"].items())
        print(f"{who}: {r['tokens_per_s']} tokens/s over {r['new_tokens']} tokens; {parts}; the rest {r['rest_ms']} ms")
    print(f"wrote {write_report(report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
