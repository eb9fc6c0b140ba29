"""Sequence-level KD against token-level KD alone, for a causal-LM student and as the teacher's draft model.

    python bench/lm_sequence_kd.py                 # configs/causal_lm_chatterbot.yaml, seed 1 (~40 min, 2 cores)
    python bench/lm_sequence_kd.py --quick         # 16 training rows, 1 epoch: a smoke run of the same code

The teacher (SmolLM2-135M-Instruct fine-tuned on the ChatterBot exchanges) is trained once. Then, from it, 8-layer
students are trained with the same steps and the config's loss (0.5 token KD from the stored top-64 + 0.5 CE):
    token_kd      on the true responses (distill.sequence.fraction=0)
    sequence_kd   on the teacher's greedy responses to the same prompts (fraction=1), token KD along them
    mixed         half and half (fraction=0.5)
Reported on the test split: perplexity on the true responses, next-token agreement with the teacher, and the
speculative hybrid (summary.json's hybrid: the student as the teacher's draft, 4 drafted tokens, batch 1):
acceptance rate and speed against the teacher alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ["distill.sequence.max_new_tokens=64"]  # the exchanges' answers: 14 tokens on average, 127 at most
VARIANTS = {"token_kd": ["distill.sequence.fraction=0"], "sequence_kd": ["distill.sequence.fraction=1", *GENERATE],
            "mixed": ["distill.sequence.fraction=0.5", *GENERATE]}


def run(args: list[str]) -> None:
    from hybridft.cli import main

    code = main(args)
    if code != 0:
        sys.exit(f"hybridft {' '.join(args)} exited with {code}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "causal_lm_chatterbot.yaml"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--variants", default="token_kd,sequence_kd")
    p.add_argument("--workdir", default=str(ROOT / "bench" / "results" / "lm_sequence_kd"))
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="16 training rows, 1 epoch, 8 test rows, 8 new tokens")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. student.train.epochs=2")
    a = p.parse_args(argv)
    work = Path(a.workdir)
    extra = list(a.overrides) + ["--overwrite", "--quiet"]
    if a.quick:
        extra = ["data.max_train_samples=16", "data.max_eval_samples=8", "teacher.train.epochs=1",
                 "student.train.epochs=1", "eval.max_new_tokens=8", "distill.sequence.max_new_tokens=8",
                 "hybrid.speculative_prompts=1", *extra]
    started = time.perf_counter()
    teacher_dir = work / "teacher"
    if not (teacher_dir / "teacher" / "model.safetensors").is_file():
        run(["teacher", "--config", a.config, f"output_dir={teacher_dir}", f"seed={a.seed}", *extra])
    use_teacher = [f"teacher.model={teacher_dir / 'teacher'}", "teacher.finetune=never"]
    rows: dict[str, dict[str, Any]] = {}
    for name in a.variants.split(","):
        out = work / f"{name}-seed{a.seed}"
        run(["run", "--config", a.config, f"seed={a.seed}", f"output_dir={out}", *use_teacher, *VARIANTS[name], *extra])
        s = json.loads((out / "summary.json").read_text())
        h = s.get("hybrid", {})
        rows[name] = {
            "teacher_ppl": s["teacher"]["perplexity"], "student_ppl": s["student"]["perplexity"],
            "agreement": s["comparison"]["next_token_agreement"],
            "acceptance": h.get("hybrid", {}).get("acceptance_rate"),
            "hybrid_speedup": h.get("hybrid", {}).get("speedup_vs_teacher"),
            "matches_teacher": h.get("matches_teacher"),
            "student_tps_b1": s["student"]["generate_tokens_per_s_batch1"],
            "teacher_tps_b1": s["teacher"]["generate_tokens_per_s_batch1"],
            "sequence_kd": (s.get("transfer_set", {}).get("augment") or {}).get("sequence_kd"),
            "stage_seconds": s.get("stage_seconds"),
        }
    print("| variant | teacher ppl | student ppl (true responses) | next-token agreement | draft acceptance | hybrid speed vs teacher |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        accepted = "n/a" if r["acceptance"] is None else f"{r['acceptance']:.1%}"
        print(f"| {name} | {r['teacher_ppl']:.2f} | {r['student_ppl']:.2f} | {r['agreement']:.3f} | {accepted} | "
              f"{r['hybrid_speedup']}x |")
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
