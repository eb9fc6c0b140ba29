"""How much of the teacher's accuracy the student keeps, and what each lever buys (issue 10).

    python bench/student_quality.py --dataset sst2-600 --seeds 1,2,3,42          # ~15 min on 2 cores
    python bench/student_quality.py --dataset sst2-600 --variants kd,augment --seeds 1
    python bench/student_quality.py --quick                                       # a smoke run of the same code

Per seed, `hybridft run` with the defaults fine-tunes the teacher and distils the default (KD) student; every
other variant is a `hybridft run` that reuses that teacher (`teacher.finetune=never`), so variants differ only
in the student's training. Reported per variant: the teacher's and the student's test accuracy, retention =
student / teacher, mean and standard deviation over seeds, the worst seed, and the wall time of the variant's run
(teacher outputs + student + evaluation; the shared teacher's fine-tuning is not counted).

Datasets (files are written to the work folder, never to the repository):
    sst2-600      600 sentences: the first 600 of a shuffle (seed 0) of the sentence-level SST-2 train file, and
                  300 test sentences, the first 300 of a shuffle (seed 0) of its test file; validation is the
                  default 10% held out of the 600.
    sst2-4000     configs/sst2_hybrid.yaml (4,000 GLUE rows, 1,000 validation rows, the GLUE dev set as test).
    bbc           the built-in BBC News demo (configs/demo_bbc_news.yaml).
    emotion       configs/emotion.yaml with 2,000 training rows.
    ag_news-1000  1,000 labelled rows of AG News (a shuffle, seed 0, of dev.tsv), the other 9,000 rows as
                  unlabeled text, 2,000 rows of test.tsv.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

VARIANTS: dict[str, list[str]] = {
    "kd": [],  # the defaults
    "ce_only": ["loss.alpha=0", "loss.beta=1"],
    "augment": ["augment.factor=20"],
    "min_steps": ["student.train.min_steps=600"],
    "augment+min_steps": ["augment.factor=20", "student.train.min_steps=600"],
}


def _sentence_file(path: Path) -> list[tuple[str, str]]:
    """`<label> <sentence>` per line (the sentence-level SST-2 files)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            label, text = line.split(" ", 1)
            rows.append((text, label))
    return rows


def _write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    return path


def _shuffled(rows: list[Any], seed: int = 0) -> list[Any]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def sst2_600(work: Path, quick: bool) -> list[str]:
    folder = DATA / "sst2" / "sentence"
    n_train, n_test = (64, 32) if quick else (600, 300)
    train = _shuffled(_sentence_file(folder / "stsa.binary.train"))[:n_train]
    test = _shuffled(_sentence_file(folder / "stsa.binary.test"))[:n_test]
    return [f"data.train={_write_tsv(work / 'train.tsv', train)}", f"data.test={_write_tsv(work / 'test.tsv', test)}",
            "data.labels=[\"0\",\"1\"]"]


def sst2_4000(work: Path, quick: bool) -> list[str]:
    args = ["--config", str(ROOT / "configs" / "sst2_hybrid.yaml")]
    return args + (["data.max_train_samples=64", "data.max_eval_samples=32"] if quick else [])


def bbc(work: Path, quick: bool) -> list[str]:
    return ["--config", str(ROOT / "configs" / "demo_bbc_news.yaml")] + (["data.max_train_samples=64"] if quick else [])


def emotion(work: Path, quick: bool) -> list[str]:
    return ["--config", str(ROOT / "configs" / "emotion.yaml"),
            f"data.max_train_samples={64 if quick else 2000}"] + (["data.max_eval_samples=32"] if quick else [])


def ag_news_1000(work: Path, quick: bool) -> list[str]:
    import csv

    def read(path: Path) -> list[tuple[str, str]]:
        with path.open(encoding="utf-8", newline="") as f:
            return [(r[0], r[1]) for r in csv.reader(f, delimiter="\t") if len(r) == 2]

    rows = _shuffled(read(DATA / "ag_news" / "dev.tsv"))
    n_train, n_test = (64, 32) if quick else (1000, 2000)
    test = _shuffled(read(DATA / "ag_news" / "test.tsv"))[:n_test]
    unlabeled = work / "unlabeled.tsv"
    unlabeled.write_text("text\n" + "".join(t.replace("\t", " ") + "\n" for t, _ in rows[n_train:n_train * 10]),
                         encoding="utf-8")
    return [f"data.train={_write_tsv(work / 'train.tsv', rows[:n_train])}",
            f"data.test={_write_tsv(work / 'test.tsv', test)}", f"data.unlabeled={unlabeled}"]


DATASETS: dict[str, Callable[[Path, bool], list[str]]] = {
    "sst2-600": sst2_600, "sst2-4000": sst2_4000, "bbc": bbc, "emotion": emotion, "ag_news-1000": ag_news_1000}


def hybridft(args: list[str], out: Path, reuse: bool = False) -> dict[str, Any]:
    from hybridft.cli import main

    done = out / "summary.json"
    if reuse and done.is_file() and (out / "bench_args.json").is_file() and \
            json.loads((out / "bench_args.json").read_text()) == args:
        print(f"[bench] reusing {out} (same arguments)", flush=True)
        return json.loads(done.read_text())
    start = time.perf_counter()
    code = main(["run", *args, f"output_dir={out}", "--overwrite"])
    if code != 0:
        sys.exit(f"hybridft run {' '.join(args)} exited with {code}")
    result = json.loads(done.read_text())
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    done.write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "bench_args.json").write_text(json.dumps(args), encoding="utf-8")
    return result


def split_config(args: list[str]) -> tuple[list[str], list[str]]:
    """(`--config FILE` if any, the KEY=VALUE overrides)."""
    if args[:1] == ["--config"]:
        return args[:2], args[2:]
    return [], args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="sst2-600")
    p.add_argument("--seeds", default="1,2,3,42")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for every run (e.g. --set precision=fp32)")
    p.add_argument("--workdir", default=None, help="default bench/results/student_quality/DATASET")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="64 training rows, 1 epoch, seed 1: a smoke run")
    p.add_argument("--reuse", action="store_true",
                   help="keep a variant's finished run from an earlier call with the same arguments (wall times are "
                        "those of the earlier call)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}")
    needs = {"sst2-600": DATA / "sst2" / "sentence", "sst2-4000": DATA / "sst2" / "glue",
             "emotion": DATA / "emotion", "ag_news-1000": DATA / "ag_news"}.get(args.dataset)
    if needs is not None and not needs.is_dir():
        print(f"skipped: {needs} is not here (the data lives outside the repository)")
        return 0
    seeds = [1] if args.quick else [int(s) for s in args.seeds.split(",")]
    work = Path(args.workdir or ROOT / "bench" / "results" / "student_quality" / args.dataset)
    work.mkdir(parents=True, exist_ok=True)
    config, base = split_config(DATASETS[args.dataset](work, args.quick))
    base += ["export.enabled=false", "progress=false", *args.set]
    if args.quick:
        base += ["teacher.train.epochs=1", "student.train.epochs=1", "eval.speed_batches=1", "eval.latency_samples=2"]
    runs: dict[str, dict[str, Any]] = {v: {} for v in variants}
    for seed in seeds:
        first = work / f"seed{seed}" / "kd"
        kd = hybridft([*config, *base, f"seed={seed}"], first, args.reuse)  # fine-tunes the teacher every variant shares
        teacher = ["teacher.finetune=never", f"teacher.model={first / 'teacher'}", "hybrid.enabled=false"]
        for variant in variants:
            if variant == "kd":
                summary = kd
            else:
                extra = VARIANTS[variant] + (["student.train.min_steps=20"] if args.quick and "min_steps" in variant
                                             else [])
                summary = hybridft([*config, *base, *teacher, *extra, f"seed={seed}"], work / f"seed{seed}" / variant,
                                   args.reuse)
            row = {"teacher": summary["teacher"]["accuracy"], "student": summary["student"]["accuracy"],
                   "retention": summary["comparison"]["accuracy_retained"], "speedup": summary["comparison"]["speedup"],
                   "wall_seconds": summary["wall_seconds"]}
            if "hybrid" in summary:
                row["hybrid"] = {k: summary["hybrid"][k] for k in ("accuracy", "teacher_fraction", "gap_closed")}
            runs[variant][str(seed)] = row
            print(f"[bench] seed {seed} {variant}: teacher {row['teacher']:.4f} student {row['student']:.4f} "
                  f"retention {row['retention']:.3f} ({row['wall_seconds']:.0f} s)", flush=True)
    table = {}
    for variant, by_seed in runs.items():
        kept = [r["retention"] for r in by_seed.values()]
        table[variant] = {
            "student_mean": round(statistics.mean(r["student"] for r in by_seed.values()), 4),
            "student_std": round(statistics.pstdev([r["student"] for r in by_seed.values()]), 4),
            "retention_mean": round(statistics.mean(kept), 4), "retention_min": round(min(kept), 4),
            "retention_std": round(statistics.pstdev(kept), 4),
            "wall_seconds_mean": round(statistics.mean(r["wall_seconds"] for r in by_seed.values()), 1)}
    result = {"dataset": args.dataset, "seeds": seeds, "extra": args.set, "quick": args.quick,
              "teacher_mean": round(statistics.mean(r["teacher"] for r in runs[variants[0]].values()), 4),
              "table": table, "runs": runs, "command": " ".join(sys.argv)}
    print(f"\n{args.dataset}: teacher mean {result['teacher_mean']:.4f} over seeds {seeds}")
    print(f"{'variant':<20} {'student':>14} {'retention':>10} {'worst':>7} {'wall s':>7}")
    for variant, t in table.items():
        print(f"{variant:<20} {t['student_mean']:.4f}±{t['student_std']:.4f} {t['retention_mean']:>10.4f} "
              f"{t['retention_min']:>7.4f} {t['wall_seconds_mean']:>7.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
