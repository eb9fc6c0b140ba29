"""How distillation time grows with the training rows and the epochs: hybridft against the plain loop that runs
the teacher on every step (bench/distill_speed.py's `baseline` row), cell by cell.

    python bench/growth.py                    # rows 1k/4k/16k x epochs 1/3 (16k: 1 epoch); ~15 min on 2 cores
    python bench/growth.py --quick            # a smoke run of the same code

Each cell is one `bench/distill_speed.py` call (its own teacher, fine-tuned on about 2,000 rows' worth of steps,
not timed; each row in a process of its own). The plain loop pays the teacher's forward pass on every step of
every epoch; hybridft pays it once per row (the stored logits), so its advantage grows with the epochs.
Writes bench/results/growth.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEED = REPO / "bench" / "distill_speed.py"
GRID = [(1000, 1), (1000, 3), (4000, 1), (4000, 3), (16000, 1)]
QUICK_GRID = [(64, 1)]
ROWS = "baseline,hybridft"
TEACHER_ROWS_SEEN = 2000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one tiny cell: checks the code, says nothing of growth")
    p.add_argument("--rows", default=ROWS, help="distill_speed rows to run in each cell")
    p.add_argument("--cells", default=None, metavar="ROWSxEPOCHS,...",
                   help="run these cells instead of the grid, e.g. 16000x1")
    p.add_argument("--workdir", default=None, help="default: a temporary folder")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "growth.json"))
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hybridft-growth-"))
    work.mkdir(parents=True, exist_ok=True)
    cells = []
    grid = QUICK_GRID if args.quick else GRID
    if args.cells:
        grid = [(int(c.split("x")[0]), int(c.split("x")[1])) for c in args.cells.split(",")]
    for train, epochs in grid:
        out = work / f"cell-{train}-{epochs}.json"
        teacher_epochs = max(TEACHER_ROWS_SEEN / train, 0.125) if not args.quick else 1.0
        cmd = [sys.executable, str(SPEED), "--train", str(train), "--epochs", str(epochs),
               "--teacher-epochs", f"{teacher_epochs:g}", "--rows", args.rows, "--workdir", str(work / f"w{train}"),
               "--out", str(out)] + (["--eval", "32"] if args.quick else [])
        print(f"[growth] {train} rows x {epochs} epochs", flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not out.is_file():
            print(f"[growth] the cell {train} x {epochs} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        report = json.loads(out.read_text())
        cells.append({"train": train, "epochs": epochs, "machine": report["machine"],
                      "rows": {name: {k: r.get(k) for k in ("seconds", "samples_per_s", "dev_accuracy", "peak_rss_mb",
                                                            "speedup_vs_baseline", "error")}
                               for name, r in report["rows"].items()}})
    result = {"benchmark": "growth", "quick": args.quick, "cells": cells,
              "command": " ".join(["python bench/growth.py", *(argv if argv is not None else sys.argv[1:])])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    names = [r.strip() for r in args.rows.split(",")]
    print(f"\n{'rows':>6} {'epochs':>6} " + " ".join(f"{n + ' s':>18}" for n in names) + "  speed-up of each")
    for c in cells:
        secs = " ".join(f"{(c['rows'][n].get('seconds') or float('nan')):>18.1f}" for n in names)
        ups = " ".join(f"{c['rows'][n].get('speedup_vs_baseline') or '-'}" for n in names)
        print(f"{c['train']:>6} {c['epochs']:>6} {secs}  {ups}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
