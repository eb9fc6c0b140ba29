"""How much of the teacher's accuracy the student keeps, and what each lever buys (issue 10).

    python bench/student_quality.py --dataset sst2-600 --seeds 1,2,3,42          # ~30 min on 2 cores
    python bench/student_quality.py --dataset sst2-tune --variants tuning --seeds 1,2,3 --jobs 3
    python bench/student_quality.py --quick                                       # a smoke run of the same code

Per seed, `hybridft run` with the defaults fine-tunes the teacher and distils the default student (with the
hybrid); every other variant is a `hybridft run` that reuses that teacher (`teacher.finetune=never`), so variants
differ only in the student's training. Reported per variant: the teacher's and the student's test accuracy,
retention = student / teacher, mean and standard deviation over seeds, the worst seed, the hybrid's accuracy and
teacher fraction (defaults row), and the student's cost in seconds (summary.json's stage_seconds: teacher outputs,
augmentation included, plus distillation).

Datasets (files are written to the work folder, never to the repository):
    sst2-600      600 sentences: the first 600 of a shuffle (seed 0) of the sentence-level SST-2 train file, and
                  300 test sentences, the first 300 of a shuffle (seed 0) of its test file; validation is the
                  default 10% held out of the 600.
    sst2-tune     for choosing defaults only: the next 600 sentences of the same shuffle for training, the 300
                  after them as test; no reported table tests on them.
    sst2-tune-4000  for choosing defaults at sst2-4000's size: rows 4,000-7,999 of the GLUE train file, rows
                  1,000-1,999 of its dev file as validation, and 1,000 test sentences from the sentence-level test
                  file (rows 300-1,299 of sst2-600's shuffle, after the 300 it tests on); no reported table tests
                  on them.
    sst2-4000     configs/sst2_hybrid.yaml (4,000 GLUE rows, 1,000 validation rows, the GLUE dev set as test).
    bbc           the built-in BBC News demo (configs/demo_bbc_news.yaml).
    emotion       configs/emotion.yaml with 2,000 training rows.
    ag_news-1000  1,000 labelled rows of AG News (a shuffle, seed 0, of dev.tsv), the other 9,000 rows as
                  unlabeled text, 2,000 rows of test.tsv.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_report.py, also when a test imports this file
from _report import write_report  # noqa: E402
DATA = ROOT.parent / "shared" / "data"

VARIANTS: dict[str, list[str]] = {
    "defaults": [],  # augment.factor=auto: a generated transfer set (issue 10's lever 1, the default since)
    "no_augment": ["augment.factor=0"],  # plain KD on the labelled rows: the defaults before augmentation
    "ce_only": ["loss.alpha=0", "loss.beta=1", "augment.factor=0"],  # no teacher at all
    "hidden": ["loss.hidden_weight=1"],  # + TinyBERT hidden-state MSE
    "attention": ["loss.attention_weight=1"],  # + MiniLM last-layer attention KL
    "min_steps": ["student.train.min_steps=1500"],
    "more_generated": ["augment.max_rows=80000", "augment.max_tokens=1600000"],  # 4x the default caps
    # one setting at a time around the defaults (lr 2e-4, T 2, alpha 0.5 / beta 0.5), for tuning on sst2-tune
    "lr1e-4": ["student.train.lr=1e-4"],
    "lr5e-4": ["student.train.lr=5e-4"],
    "T1": ["loss.temperature=1"],
    "T4": ["loss.temperature=4"],
    "alpha0.2": ["loss.alpha=0.2", "loss.beta=0.8"],
    "alpha0.8": ["loss.alpha=0.8", "loss.beta=0.2"],
    # the defaults through the variants' path (the teacher read back from the defaults run's folder, no hybrid):
    # the fair baseline of every other variant, if this path alone changes the student
    "control": [],
    "later_ties": ["student.train.best_on_tie=later"],  # a validation tie keeps the further-trained weights
    "lr1e-4_alpha0.8": ["student.train.lr=1e-4", "loss.alpha=0.8", "loss.beta=0.2"],  # the two leads together
    "epochs6": ["student.train.epochs=6"],  # the default since 2026-12-04; the rows before it ran with 3
    "epochs3": ["student.train.epochs=3"],  # the default before 2026-12-04
    "T4_epochs6": ["loss.temperature=4", "student.train.epochs=6"],
    # twice the generated texts per training text, with the caps raised so small data gets them all
    "nodropout": ["student.dropout=0"],  # the student trains without dropout: what "auto" gives with KD since 2026-12-05
    "dropout": ["student.dropout=null"],  # the model's own dropout (BERT: 0.1), the default before 2026-12-05
    "augment40": ["augment.factor=40", "augment.max_rows=40000", "augment.max_tokens=800000"],
    # which teacher layers the 2-layer student keeps (the default is evenly spaced, first and last: [0, 5])
    "layers01": ["student.layers=[0,1]"],
    "layers03": ["student.layers=[0,3]"],
}
MAIN = "defaults,no_augment,ce_only,hidden,min_steps"
TUNING = "defaults,lr1e-4,lr5e-4,T1,T4,alpha0.2,alpha0.8,epochs6"


def _sentence_file(path: Path) -> list[tuple[str, str]]:
    """`<label> <sentence>` per line (the sentence-level SST-2 files)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            label, text = line.split(" ", 1)
            rows.append((text, label))
    return rows


def _write(path: Path, text: str) -> Path:
    """Write atomically: seeds run in parallel (--jobs) write the same files into one work folder."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    return _write(path, "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))


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


def sst2_tune(work: Path, quick: bool) -> list[str]:
    """For choosing defaults: sentences 600-1199 of the same shuffle for training and 1200-1499 for testing, all
    from the sentence-level train file, so disjoint from every test split a reported table uses (the
    sentence-level dev file is the GLUE dev set, sst2-4000's test)."""
    folder = DATA / "sst2" / "sentence"
    n_train, n_test = (64, 32) if quick else (600, 300)
    rows = _shuffled(_sentence_file(folder / "stsa.binary.train"))
    train, test = rows[600:600 + n_train], rows[1200:1200 + n_test]
    return [f"data.train={_write_tsv(work / 'tune_train.tsv', train)}",
            f"data.test={_write_tsv(work / 'tune_test.tsv', test)}", "data.labels=[\"0\",\"1\"]"]


def _glue_file(path: Path) -> list[tuple[str, str]]:
    """`sentence<TAB>label` with a header (the GLUE SST-2 files)."""
    return [tuple(line.split("\t")) for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]


def sst2_tune_4000(work: Path, quick: bool) -> list[str]:
    """For choosing defaults on a large validation split (1,000 rows, as configs/sst2_hybrid.yaml has): the GLUE
    rows after the config's 4,000 training and 1,000 validation rows, tested on sentence-level test sentences that
    neither sst2-600 (the first 300 of the shuffle) nor sst2-4000 (the GLUE dev set) tests on."""
    n_train, n_val, n_test = (64, 32, 32) if quick else (4000, 1000, 1000)
    train = _glue_file(DATA / "sst2" / "glue" / "train.tsv")[4000:4000 + n_train]
    validation = _glue_file(DATA / "sst2" / "glue" / "dev.tsv")[1000:1000 + n_val]
    test = _shuffled(_sentence_file(DATA / "sst2" / "sentence" / "stsa.binary.test"))[300:300 + n_test]
    return [f"data.train={_write_tsv(work / 'tune4k_train.tsv', train)}",
            f"data.validation={_write_tsv(work / 'tune4k_validation.tsv', validation)}",
            f"data.test={_write_tsv(work / 'tune4k_test.tsv', test)}", "data.labels=[\"0\",\"1\"]",
            "data.max_length=64"]


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
    _write(unlabeled, "text\n" + "".join(t.replace("\t", " ") + "\n" for t, _ in rows[n_train:n_train * 10]))
    return [f"data.train={_write_tsv(work / 'train.tsv', rows[:n_train])}",
            f"data.test={_write_tsv(work / 'test.tsv', test)}", f"data.unlabeled={unlabeled}"]


DATASETS: dict[str, Callable[[Path, bool], list[str]]] = {
    "sst2-600": sst2_600, "sst2-tune": sst2_tune, "sst2-tune-4000": sst2_tune_4000,
    "sst2-4000": sst2_4000, "bbc": bbc, "emotion": emotion, "ag_news-1000": ag_news_1000}


def hybridft(args: list[str], out: Path, reuse: bool = False, collect: bool = False) -> dict[str, Any] | None:
    """The summary of `hybridft run ARGS` in folder `out`: an earlier one with the same arguments when `reuse`
    or `collect`; with `collect`, None instead of running anything."""
    from hybridft.cli import main

    done = out / "summary.json"
    if (reuse or collect) and done.is_file() and (out / "bench_args.json").is_file() and \
            json.loads((out / "bench_args.json").read_text()) == args:
        print(f"[bench] reusing {out} (same arguments)", flush=True)
        return json.loads(done.read_text())
    if collect:
        print(f"[bench] missing: {out}", flush=True)
        return None
    start = time.perf_counter()
    resumed = reuse and not done.is_file() and (out / "config.yaml").is_file() and (out / "checkpoints").is_dir()
    if resumed:  # an interrupted run (a session that ended): continue it, unless its config differs from ARGS
        print(f"[bench] resuming {out}", flush=True)
        resumed = main(["run", *args, f"output_dir={out}", "--resume"]) == 0
        if not resumed:
            print(f"[bench] could not resume {out} (message above): running it again", flush=True)
    if not resumed:
        code = main(["run", *args, f"output_dir={out}", "--overwrite"])
        if code != 0:
            sys.exit(f"hybridft run {' '.join(args)} exited with {code}")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # resumable states: dozens of runs filled a 64 GB disk
    result = json.loads(done.read_text())
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    if resumed:  # its seconds count only what ran after the restart
        result["resumed"] = True
    done.write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "bench_args.json").write_text(json.dumps(args), encoding="utf-8")
    return result


def student_validation_accuracy(run: Path) -> float | None:
    """The student's validation accuracy after its last epoch (metrics.jsonl): what a lever is chosen by, since
    the test split must not choose it."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    last = None
    for line in metrics.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("stage") == "student" and row.get("split") == "validation" and "accuracy" in row:
            last = row["accuracy"]
    return last


def split_config(args: list[str]) -> tuple[list[str], list[str]]:
    """(`--config FILE` if any, the KEY=VALUE overrides)."""
    if args[:1] == ["--config"]:
        return args[:2], args[2:]
    return [], args


def run_seeds_in_parallel(args: argparse.Namespace, seeds: list[int], work: Path) -> dict[str, dict[str, Any]]:
    """Each seed in a process of its own (`--seeds S`), `args.jobs` at a time; their runs merged."""
    pending, running, runs, jobs = list(seeds), [], {}, args.jobs
    base = ["--dataset", args.dataset, "--variants", args.variants, "--workdir", str(work),
            *[f"--set={kv}" for kv in args.set], *(["--quick"] if args.quick else []),
            *(["--reuse"] if args.reuse else [])]
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            out = work / f"seed{seed}.json"
            log = (work / f"seed{seed}.log").open("w")
            cmd = [sys.executable, str(Path(__file__).resolve()), *base, f"--seeds={seed}", "--jobs=1", f"--out={out}"]
            running.append((seed, out, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for item in [r for r in running if r[3].poll() is not None]:
            seed, out, log, proc = item
            running.remove(item)
            log.close()
            if proc.returncode != 0 or not out.is_file():
                sys.exit(f"seed {seed} failed (exit {proc.returncode}); see {work / f'seed{seed}.log'}")
            for variant, by_seed in json.loads(out.read_text())["runs"].items():
                runs.setdefault(variant, {}).update(by_seed)
            print(f"[bench] seed {seed} done", flush=True)
    return runs


def run_seed(config: list[str], base: list[str], seed: int, variants: list[str], work: Path, quick: bool,
             reuse: bool, collect: bool = False) -> dict[str, dict[str, Any]]:
    """Every variant for one seed: the defaults' run fine-tunes the teacher the other variants share. With
    `collect`, only the variants whose runs are finished (none if the defaults' is not)."""
    first = work / f"seed{seed}" / "defaults"
    defaults = hybridft([*config, *base, f"seed={seed}"], first, reuse, collect)
    if defaults is None:
        return {}
    teacher = ["teacher.finetune=never", f"teacher.model={first / 'teacher'}", "hybrid.enabled=false"]
    rows = {}
    for variant in variants:
        if variant == "defaults":
            summary, run = defaults, first
        else:
            run = work / f"seed{seed}" / variant
            extra = VARIANTS[variant] + (["student.train.min_steps=20"] if quick and "min_steps" in variant else [])
            summary = hybridft([*config, *base, *teacher, *extra, f"seed={seed}"], run, reuse, collect)
            if summary is None:
                continue
        row = {"teacher": summary["teacher"]["accuracy"], "student": summary["student"]["accuracy"],
               "retention": summary["comparison"]["accuracy_retained"],
               "student_validation": student_validation_accuracy(run), "speedup": summary["comparison"]["speedup"],
               "wall_seconds": summary["wall_seconds"], "transfer_set": summary.get("transfer_set"),
               # the student's cost alone: teacher outputs (augmentation included) + distillation
               "student_seconds": round(summary["stage_seconds"]["teacher_outputs"]
                                        + summary["stage_seconds"]["student"], 1),
               "precision": (summary.get("precision") or {}).get("chosen", summary["config"]["precision"])}
        if summary.get("resumed"):
            row["resumed"] = True  # continued after an interruption: its seconds count only the last part
        if "hybrid" in summary:
            row["hybrid"] = {k: summary["hybrid"][k] for k in ("accuracy", "teacher_fraction", "gap_closed")}
        rows[variant] = row
        print(f"[bench] seed {seed} {variant}: teacher {row['teacher']:.4f} student {row['student']:.4f} "
              f"retention {row['retention']:.3f} ({row['wall_seconds']:.0f} s)", flush=True)
    return rows


def _mean_or_none(values: list[float | None]) -> float | None:
    return round(statistics.mean(values), 4) if values and None not in values else None


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="sst2-600")
    p.add_argument("--seeds", default=None, help="comma-separated (default 1,2,3,42; with --quick, 1)")
    p.add_argument("--variants", default=MAIN,
                   help=f"comma-separated, from {', '.join(VARIANTS)}; 'tuning' = {TUNING} (default: {MAIN})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for every run (e.g. --set precision=fp32)")
    p.add_argument("--workdir", default=None, help="default bench/results/student_quality/DATASET")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in a process of its own")
    p.add_argument("--quick", action="store_true", help="64 training rows, 1 epoch: a smoke run")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: the table of the finished runs in the work folder (seeds and variants that are "
                        "missing are left out, and the JSON lists them)")
    p.add_argument("--reuse", action="store_true",
                   help="keep a variant's finished run from an earlier call with the same arguments (wall times are "
                        "those of the earlier call), and continue an interrupted one from its last checkpoint "
                        "(`hybridft run --resume`, which refuses a changed config; it then runs again)")
    args = p.parse_args(raw_argv)
    variants = [v.strip() for v in (TUNING if args.variants == "tuning" else args.variants).split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}")
    if variants[0] != "defaults":
        variants.insert(0, "defaults")  # the run that fine-tunes the shared teacher, and the baseline of the table
    needs = {"sst2-600": DATA / "sst2" / "sentence", "sst2-tune": DATA / "sst2" / "sentence",
             "sst2-4000": DATA / "sst2" / "glue", "sst2-tune-4000": DATA / "sst2", "emotion": DATA / "emotion", "ag_news-1000": DATA / "ag_news"
             }.get(args.dataset)
    if needs is not None and not needs.is_dir():
        print(f"skipped: {needs} is not here (the data lives outside the repository)")
        return 0
    seeds = [int(s) for s in (args.seeds or ("1" if args.quick else "1,2,3,42")).split(",")]
    work = Path(args.workdir or ROOT / "bench" / "results" / "student_quality" / args.dataset)
    work.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1 and len(seeds) > 1 and not args.collect:
        runs = run_seeds_in_parallel(args, seeds, work)
    else:
        config, base = split_config(DATASETS[args.dataset](work, args.quick))
        base += ["export.enabled=false", "progress=false", *args.set]
        if args.quick:
            base += ["teacher.train.epochs=1", "student.train.epochs=1", "eval.speed_batches=1",
                     "eval.latency_samples=2"]
        runs = {v: {} for v in variants}
        for seed in seeds:
            for variant, row in run_seed(config, base, seed, variants, work, args.quick, args.reuse,
                                         args.collect).items():
                runs[variant][str(seed)] = row
    missing = {v: [s for s in map(str, seeds) if s not in runs.get(v, {})] for v in variants}
    missing = {v: m for v, m in missing.items() if m}
    table = {}
    for variant in variants:
        by_seed = runs.get(variant, {})
        if not by_seed:
            continue
        kept = [r["retention"] for r in by_seed.values()]
        table[variant] = {
            "student_mean": round(statistics.mean(r["student"] for r in by_seed.values()), 4),
            "student_std": round(statistics.pstdev([r["student"] for r in by_seed.values()]), 4),
            "retention_mean": round(statistics.mean(kept), 4), "retention_min": round(min(kept), 4),
            "retention_std": round(statistics.pstdev(kept), 4), "seeds": len(kept),
            "student_validation_mean": _mean_or_none([r.get("student_validation") for r in by_seed.values()]),
            "wall_seconds_mean": round(statistics.mean(r["wall_seconds"] for r in by_seed.values()), 1),
            "student_seconds_mean": round(statistics.mean(r["student_seconds"] for r in by_seed.values()), 1)}
        hybrid = [r["hybrid"] for r in by_seed.values() if "hybrid" in r]
        if hybrid:
            table[variant]["hybrid_mean"] = round(statistics.mean(h["accuracy"] for h in hybrid), 4)
            table[variant]["hybrid_teacher_fraction_mean"] = round(
                statistics.mean(h["teacher_fraction"] for h in hybrid), 4)
    teachers = [r["teacher"] for r in runs.get("defaults", {}).values()]
    if not teachers:
        print(f"no finished runs in {work}")
        return 1
    result = {"dataset": args.dataset, "seeds": seeds, "extra": args.set, "quick": args.quick,
              "teacher_mean": round(statistics.mean(teachers), 4), "teacher_std": round(statistics.pstdev(teachers), 4),
              "table": table, "runs": runs, "missing": missing, "command": " ".join(["python bench/student_quality.py", *raw_argv])}
    print(f"\n{args.dataset}: teacher mean {result['teacher_mean']:.4f} over seeds {seeds}"
          + (f"; missing (variant: seeds) {missing}" if missing else ""))
    print(f"{'variant':<20} {'student':>14} {'retention':>10} {'worst':>7} {'hybrid':>7} {'student s':>9} {'val':>7}")
    for variant, t in table.items():
        hybrid = f"{t['hybrid_mean']:.4f}" if "hybrid_mean" in t else "-"
        print(f"{variant:<20} {t['student_mean']:.4f}±{t['student_std']:.4f} {t['retention_mean']:>10.4f} "
              f"{t['retention_min']:>7.4f} {hybrid:>7} {t['student_seconds_mean']:>9.0f} "
              f"{t['student_validation_mean'] if t['student_validation_mean'] is not None else '-':>7}")
    if args.out:
        write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
