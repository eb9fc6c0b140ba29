"""ONNX and int8 parity of a real student, with size and speed against the PyTorch student.

    python bench/export_parity.py --run runs/sst2_hybrid     # a finished `hybridft run` folder

Reads the run's config.yaml (for its test split and max_length) and its student/, exports the student to
ONNX fp32 and int8 (to RUN/export), and checks both against the PyTorch student on the test split: logits
within the fp32 tolerance, prediction agreement and accuracy for int8. All three are timed in this process.
Writes bench/results/export_parity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished run folder (config.yaml, student/)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "export_parity.json"))
    args = p.parse_args()

    from hybridft.config import load_config
    from hybridft.data import load_splits
    from hybridft.export import FP32_TOLERANCE, INT8_TOLERANCE, export_student
    from hybridft.tasks import classification as task
    from hybridft.train import pick_device

    run = Path(args.run)
    if not (run / "config.yaml").is_file() or not (run / "student").is_dir():
        print(f"{run} is not a finished run folder (needs config.yaml and student/)", file=sys.stderr)
        return 2
    cfg = load_config(run / "config.yaml", ["progress=false"])
    splits = load_splits(cfg.data, cfg.seed)
    examples = splits.test if splits.test is not None else splits.validation
    student_dir = str(run / "student")
    student = task.load_classifier(student_dir, splits.label_names, "student")
    tokenizer = task.load_tokenizer(student_dir, "student")
    items = task.encode(examples, tokenizer, cfg.data.max_length)
    result = export_student(student, tokenizer, run / "export", items, splits.label_names, pick_device(cfg.device))
    print(f"{run}: {len(items)} test examples; tolerances: fp32 {FP32_TOLERANCE}, int8 {INT8_TOLERANCE}")
    print(f"{'model':<10} {'accuracy':>8} {'agree':>6} {'max|dlogit|':>11} {'size MB':>8} {'samples/s':>9} {'b=1 ms':>7}  ok")
    for name, r in result.items():
        print(f"{name:<10} {r['accuracy']:>8.4f} {r.get('prediction_agreement', 1.0):>6.3f} "
              f"{r.get('max_abs_logit_diff', 0.0):>11.2e} {r['size_mb']:>8} {r['throughput_samples_per_s']:>9.0f} "
              f"{r['latency_ms_batch1']:>7.2f}  {r.get('within_tolerance', '-')}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"run": str(run), "examples": len(items), "result": result}, indent=2,
                                         default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
