"""Does token-level KD help a causal-LM student? The KD student against a CE-only student with the same steps.

    python bench/lm_kd_vs_ce.py                  # configs/causal_lm_chatterbot.yaml, seeds 1 and 2 (~40 min, 2 cores)
    python bench/lm_kd_vs_ce.py --quick          # 16 training rows, 1 epoch: a smoke run of the same code

The teacher (SmolLM2-135M-Instruct fine-tuned on the ChatterBot exchanges) is trained once, then for each seed
two students are cut from its layers and trained for the same number of steps: KD (the config's loss, from the
stored top-k) and CE only (loss.alpha=0, loss.beta=1). Reported on the test split's response tokens:
perplexity of the teacher and both students, the share of the CE-only student's perplexity gap to the teacher
that KD closes, (ppl_CE - ppl_KD) / (ppl_CE - ppl_teacher), next-token agreement with the teacher, and
generated tokens/s at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> None:
    from hybridft.cli import main

    code = main(args)
    if code != 0:
        sys.exit(f"hybridft {' '.join(args)} exited with {code}")


def summary(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "causal_lm_chatterbot.yaml"))
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--workdir", default=str(ROOT / "bench" / "results" / "lm_kd_vs_ce"))
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="16 training rows, 1 epoch, 8 test rows")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. student.train.epochs=2")
    a = p.parse_args()
    work = Path(a.workdir)
    extra = list(a.overrides) + ["--overwrite", "--quiet"]
    if a.quick:
        extra = ["data.max_train_samples=16", "data.max_eval_samples=8", "teacher.train.epochs=1",
                 "student.train.epochs=1", "eval.max_new_tokens=8", *extra]
    started = time.perf_counter()
    teacher_dir = work / "teacher"
    run(["teacher", "--config", a.config, f"output_dir={teacher_dir}", *extra])
    use_teacher = [f"teacher.model={teacher_dir / 'teacher'}", "teacher.finetune=never"]
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        result: dict[str, Any] = {"seed": seed}
        for name, loss in (("kd", []), ("ce", ["loss.alpha=0", "loss.beta=1"])):
            out = work / f"{name}-seed{seed}"
            run(["run", "--config", a.config, f"seed={seed}", f"output_dir={out}", *use_teacher, *loss, *extra])
            result[name] = summary(out)
        t, kd, ce = result["kd"]["teacher"], result["kd"]["student"], result["ce"]["student"]
        gap = ce["perplexity"] - t["perplexity"]
        rows.append({
            "seed": seed, "teacher_ppl": t["perplexity"], "kd_ppl": kd["perplexity"], "ce_ppl": ce["perplexity"],
            "gap_closed": (ce["perplexity"] - kd["perplexity"]) / gap if gap > 0 else None,
            "kd_agreement": result["kd"]["comparison"]["next_token_agreement"],
            "ce_agreement": result["ce"]["comparison"]["next_token_agreement"],
            "teacher_tps_b1": t["generate_tokens_per_s_batch1"], "teacher_tps_b8": t["generate_tokens_per_s_batch8"],
            "kd_tps_b1": kd["generate_tokens_per_s_batch1"], "kd_tps_b8": kd["generate_tokens_per_s_batch8"],
            "ce_tps_b1": ce["generate_tokens_per_s_batch1"], "ce_tps_b8": ce["generate_tokens_per_s_batch8"],
            "generations": result["kd"]["comparison"]["generations"],
            "ce_generations": [g["student"] for g in result["ce"]["comparison"]["generations"]],
        })
    print("| seed | teacher ppl | KD student ppl | CE-only student ppl | gap closed by KD | next-token agreement KD / CE | tokens/s b=1 teacher / KD / CE | tokens/s b=8 teacher / KD / CE |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        closed = f"{r['gap_closed']:.1%}" if r["gap_closed"] is not None else "n/a"
        print(f"| {r['seed']} | {r['teacher_ppl']:.2f} | {r['kd_ppl']:.2f} | {r['ce_ppl']:.2f} | {closed} | "
              f"{r['kd_agreement']:.3f} / {r['ce_agreement']:.3f} | {r['teacher_tps_b1']:.0f} / {r['kd_tps_b1']:.0f} / "
              f"{r['ce_tps_b1']:.0f} | {r['teacher_tps_b8']:.0f} / {r['kd_tps_b8']:.0f} / {r['ce_tps_b8']:.0f} |")
    closed = [r["gap_closed"] for r in rows if r["gap_closed"] is not None]
    if closed:
        print(f"\nmean gap closed: {statistics.mean(closed):.1%} over {len(closed)} seeds; "
              f"{time.perf_counter() - started:.0f} s in all")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
