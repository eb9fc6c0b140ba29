"""The teacher's schedule on small data: its default 3 epochs against a floor of optimizer steps (`min_steps`).

    python bench/teacher_steps.py --dataset sst2-tune --seeds 1,2,3 --variants e3,min500 --set num_threads=1
    python bench/teacher_steps.py --quick          # a smoke run of the same code (64 rows)

Each (variant, seed) runs `hybridft teacher` on one of bench/student_quality.py's datasets and scores the saved
teacher on that dataset's test split. Choose defaults on `sst2-tune`, whose test sentences no reported table uses.
Prints and writes (--out) per run: test accuracy, best validation accuracy, evaluations, seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import student_quality  # noqa: E402  (bench/ is not a package)

VARIANTS: dict[str, list[str]] = {
    "e3": [],  # the default: teacher.train.epochs=3
    "min500": ["teacher.train.min_steps=500"],
}
QUICK: dict[str, list[str]] = {  # 1 epoch of 64 rows is 2 steps; the floor makes it 6 (3 epochs, 3 evaluations)
    "e3": ["teacher.train.epochs=1"],
    "min500": ["teacher.train.epochs=1", "teacher.train.min_steps=6"],
}


def test_accuracy(run: Path, args: list[str]) -> float:
    """The saved teacher's accuracy on the run's test split, read and encoded as `hybridft run` would."""
    import torch

    from hybridft.config import load_config
    from hybridft.data import load_splits
    from hybridft.models import load_tokenizer
    from transformers import AutoModelForSequenceClassification

    config, overrides = student_quality.split_config(args)
    cfg = load_config(config[1] if config else None, overrides)
    test = load_splits(cfg.data, cfg.seed).test
    folder = str(run / "teacher")
    tokenizer = load_tokenizer(folder, "teacher.model")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    right = 0
    with torch.inference_mode():
        for start in range(0, len(test.texts), 64):
            texts, labels = test.texts[start:start + 64], test.labels[start:start + 64]
            enc = tokenizer(texts, padding=True, truncation=True, max_length=cfg.data.max_length, return_tensors="pt")
            right += int((model(**enc).logits.argmax(-1) == torch.tensor(labels)).sum())
    return right / len(test.texts)


def validation_history(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["accuracy"] for r in rows if r.get("stage") == "teacher" and r.get("split") == "validation"]


def main(argv: list[str] | None = None) -> int:
    from hybridft.cli import main as hybridft

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(student_quality.DATASETS), default="sst2-tune")
    p.add_argument("--seeds", default=None, help="comma-separated (default 1,2,3; with --quick, 1)")
    p.add_argument("--variants", default="e3,min500", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--workdir", default=None, help="default bench/results/teacher_steps/DATASET")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for every run (e.g. --set num_threads=1)")
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown variants {unknown}")
    seeds = [int(s) for s in (args.seeds or ("1" if args.quick else "1,2,3")).split(",")]
    work = Path(args.workdir or student_quality.ROOT / "bench" / "results" / "teacher_steps" / args.dataset)
    work.mkdir(parents=True, exist_ok=True)
    data_args = student_quality.DATASETS[args.dataset](work, args.quick)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for variant in variants:
        for seed in seeds:
            run = work / f"{variant}_seed{seed}"
            run_args = [*data_args, *(QUICK if args.quick else VARIANTS)[variant], *args.set, f"seed={seed}"]
            start = time.perf_counter()
            if hybridft(["teacher", *run_args, f"output_dir={run}", "progress=false", "--overwrite"]) != 0:
                sys.exit(f"hybridft teacher {' '.join(run_args)} failed")
            seconds = time.perf_counter() - start
            history = validation_history(run)
            row = {"test": round(test_accuracy(run, run_args), 4), "best_validation": max(history),
                   "evaluations": len(history), "seconds": round(seconds, 1)}
            results.setdefault(variant, {})[str(seed)] = row
            print(f"[bench] {variant} seed {seed}: {row}", flush=True)
    for variant, by_seed in results.items():
        tests = [r["test"] for r in by_seed.values()]
        print(f"{variant}: test {statistics.mean(tests):.4f} over seeds {', '.join(by_seed)} "
              f"({', '.join(f'{t:.4f}' for t in tests)})")
    if args.out:
        Path(args.out).write_text(json.dumps({"dataset": args.dataset, "runs": results}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
