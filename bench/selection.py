"""Which of the student's weights to keep: every epoch's test accuracy, and what each way of choosing gives.

    python bench/selection.py --teachers bench/results/sq/sst2-tune-20261205 --seeds 1,2,3 --jobs 2
    python bench/selection.py --teachers bench/results/sq/sst2-600-20261205 --seeds 1,2,3,42 --jobs 2
    python bench/selection.py --teachers bench/results/sq/sst2-tune-4000-20261206 --seeds 1,2 --jobs 2
    python bench/selection.py --quick          # a smoke run: student_quality.py --quick's teacher, 3 short epochs

`--teachers` is a `student_quality.py` work folder: its data files and each seed's `defaults/teacher`. Per seed,
one `hybridft run` distils the default student from that teacher (as the `control` variant there) and keeps the
checkpoint of every epoch; each epoch's weights are then scored on validation (as the run scores them, same
precision) and on test (fp32, as the run's report). Rules compared, each choosing from validation only:

    earliest_best   the highest validation accuracy, the earlier epoch on a tie (`best_metric=accuracy`, the
                    student's default until 2026-12-06)
    latest_best     the same, the later epoch on a tie (best_on_tie=later)
    last            no choice: the final weights
    best_then_loss  the highest validation accuracy, a tie broken by the lower validation cross-entropy
    lowest_loss     the lowest validation cross-entropy (`student.train.best_metric=loss`, the default from the
                    morning of 2026-12-06)
    lowest_kl       the lowest KL(teacher || student) on validation, T=1: the student closest to its teacher
                    (`best_metric=kl`, what the student's default `auto` chooses since the same day)
    average_last3   the mean of the last three epochs' weights (Izmailov et al. 2018, "Averaging weights leads to
                    wider optima"), chosen without validation
    average_all     the mean of every epoch's weights
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RULES = ("earliest_best", "latest_best", "last", "best_then_loss", "lowest_loss", "lowest_kl", "average_last3",
         "average_all")


def run_args(teachers: Path, seed: int, out: Path, extra: list[str]) -> list[str]:
    if (teachers / "train.tsv").is_file():
        data = [f"data.train={teachers / 'train.tsv'}", f"data.test={teachers / 'test.tsv'}"]
    elif (teachers / "tune_train.tsv").is_file():  # sst2-tune's files
        data = [f"data.train={teachers / 'tune_train.tsv'}", f"data.test={teachers / 'tune_test.tsv'}"]
    else:  # a config's dataset (sst2-4000): the seed's run config, whose data section names the files (a folder
        # made by `hybridft teacher` alone has config.teacher.yaml)
        folder = teachers / f"seed{seed}" / "defaults"
        config = folder / "config.yaml"
        data = ["--config", str(config if config.is_file() else folder / "config.teacher.yaml")]
    return [*data, 'data.labels=["0","1"]', "export.enabled=false", "progress=false", "num_threads=1",
            "teacher.finetune=never", f"teacher.model={teachers / f'seed{seed}' / 'defaults' / 'teacher'}",
            "hybrid.enabled=false", f"seed={seed}", "student.train.keep_checkpoints=1000", *extra,
            f"output_dir={out}"]


def score(out: Path) -> dict[str, Any]:
    """Validation and test numbers of every epoch's weights, and of the averaged weights."""
    from safetensors.torch import load_file

    from hybridft.batching import length_sorted_loader
    from hybridft.config import load_config
    from hybridft.tasks import classification as cl

    cfg = load_config(out / "config.yaml")
    splits = cl.load_splits(cfg, cfg.seed)
    summary = json.loads((out / "summary.json").read_text())
    precision = (summary.get("precision") or {}).get("chosen", cfg.precision)
    device = torch.device("cpu")
    student, tokenizer = cl.load_model(str(out / "student"), splits, "student")
    teacher, t_tokenizer = cl.load_model(cfg.teacher.model, splits, "teacher")

    def loader(examples: Any, tok: Any) -> Any:
        return length_sorted_loader(cl.encode(examples, tok, cfg.data.max_length), cfg.eval.batch_size,
                                    cl.make_collate(tok))

    val_t, _ = cl.predict_logits(teacher, loader(splits.validation, t_tokenizer), device, precision)
    val_loader, test_loader = loader(splits.validation, tokenizer), loader(splits.test, tokenizer)

    def measure(state: dict[str, torch.Tensor]) -> dict[str, float]:
        student.load_state_dict(state)
        v, yv = cl.predict_logits(student, val_loader, device, precision)  # what training's validation sees
        t, yt = cl.predict_logits(student, test_loader, device)  # fp32, as the run's report
        p_t = val_t.log_softmax(-1)
        kl = float((p_t.exp() * (p_t - v.log_softmax(-1))).sum(-1).mean())
        return {"val_accuracy": float((v.argmax(-1) == yv).float().mean()),
                "val_loss": float(torch.nn.functional.cross_entropy(v, yv)), "val_kl": kl,
                "test_accuracy": float((t.argmax(-1) == yt).float().mean())}

    steps = sorted((p for p in (out / "checkpoints" / "student").glob("step-*") if not p.name.endswith(".tmp")),
                   key=lambda p: int(p.name.split("-")[1]))
    states = [load_file(str(p / "model.safetensors")) for p in steps]
    epochs = [{"step": int(p.name.split("-")[1]), **measure(s)} for p, s in zip(steps, states)]

    def mean_state(group: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: (sum(s[k].float() for s in group) / len(group)).to(group[0][k].dtype)
                if group[0][k].is_floating_point() else group[0][k] for k in group[0]}

    averages = {"average_last3": measure(mean_state(states[-3:])), "average_all": measure(mean_state(states))}
    return {"teacher": summary["teacher"]["accuracy"], "student_reported": summary["student"]["accuracy"],
            "epochs": epochs, **averages}


def choose(scored: dict[str, Any]) -> dict[str, float]:
    """Each rule's test accuracy."""
    e = scored["epochs"]
    best = max(r["val_accuracy"] for r in e)
    tied = [r for r in e if r["val_accuracy"] == best]
    return {"earliest_best": tied[0]["test_accuracy"], "latest_best": tied[-1]["test_accuracy"],
            "last": e[-1]["test_accuracy"],
            "best_then_loss": min(tied, key=lambda r: r["val_loss"])["test_accuracy"],
            "lowest_loss": min(e, key=lambda r: r["val_loss"])["test_accuracy"],
            "lowest_kl": min(e, key=lambda r: r["val_kl"])["test_accuracy"],
            "average_last3": scored["average_last3"]["test_accuracy"],
            "average_all": scored["average_all"]["test_accuracy"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", type=Path, default=None,
                   help="a student_quality.py work folder (with --quick: made by student_quality.py --quick)")
    p.add_argument("--seeds", default="1,2,3,42")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="64 training sentences, 3 epochs of a few steps, seed 1")
    args = p.parse_args()
    if args.teachers is None and not args.quick:
        p.error("--teachers is required (a student_quality.py work folder), except with --quick")
    seeds = [1] if args.quick else [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.workdir = args.workdir or ROOT / "bench" / "results" / "selection" / "quick"
        args.set = ["precision=fp32", "augment.factor=3", "student.train.epochs=3", "eval.speed_batches=1",
                    "eval.latency_samples=2", *args.set]
        if args.teachers is None:
            args.teachers = args.workdir / "teachers"
            subprocess.run([sys.executable, str(ROOT / "bench" / "student_quality.py"), "--quick", "--variants",
                            "defaults", "--set", "precision=fp32", "--set", "augment.factor=3", "--set",
                            "hybrid.enabled=false", "--workdir", str(args.teachers)], check=True)
    work = args.workdir or ROOT / "bench" / "results" / "selection" / args.teachers.name
    work.mkdir(parents=True, exist_ok=True)
    pending, running = [s for s in seeds if not (work / f"seed{s}" / "summary.json").is_file()], []
    while pending or running:
        while pending and len(running) < args.jobs:
            s = pending.pop(0)
            log = (work / f"seed{s}.log").open("w")
            cmd = [sys.executable, "-m", "hybridft", "run", *run_args(args.teachers, s, work / f"seed{s}", args.set),
                   "--overwrite"]
            running.append((s, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        s, proc = running[0]
        if proc.wait() != 0:
            sys.exit(f"seed {s} failed; see {work / f'seed{s}.log'}")
        running.pop(0)
    results = {}
    for s in seeds:
        scored = score(work / f"seed{s}")
        results[str(s)] = {**scored, "rules": choose(scored)}
        print(f"seed {s}: teacher {scored['teacher']:.4f} reported student {scored['student_reported']:.4f}")
        for r in scored["epochs"]:
            print(f"  step {r['step']:>5} val {r['val_accuracy']:.4f} loss {r['val_loss']:.4f} kl {r['val_kl']:.4f} "
                  f"test {r['test_accuracy']:.4f}")
    print(f"{'rule':<16} {'test mean':>9} {'retention':>9} {'worst':>7}  per seed")
    table = {}
    for rule in RULES:
        acc = [results[str(s)]["rules"][rule] for s in seeds]
        kept = [a / results[str(s)]["teacher"] for a, s in zip(acc, seeds)]
        table[rule] = {"test_mean": statistics.mean(acc), "retention_mean": statistics.mean(kept),
                       "retention_min": min(kept)}
        print(f"{rule:<16} {statistics.mean(acc):>9.4f} {statistics.mean(kept):>9.4f} {min(kept):>7.4f}  "
              + " ".join(f"{a:.4f}" for a in acc))
    if args.out:
        args.out.write_text(json.dumps({"seeds": seeds, "table": table, "runs": results,
                                        "command": " ".join(sys.argv)}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
