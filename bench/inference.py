"""Inference cost of a finished run's models, same process, same test texts: the teacher and the student in fp32,
under bf16 autocast and in fp32 from weights prepacked for oneDNN (what `hybridft predict` runs where faster), and
the student exported to ONNX fp32 and int8 (onnxruntime).

    python bench/inference.py --run runs/sst2_hybrid           # a finished `hybridft run` folder, with export/
    python bench/inference.py --run runs/sst2_hybrid --quick   # a smoke run of the same code

Per model: test accuracy, throughput at batch 32 (samples/s over `--batches` batches after a warm-up batch),
median batch-1 latency (over `--latency-samples` texts), and size on disk. Rows run one after another in the
order given by ROWS; compare ratios within one run. Writes bench/results/inference.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_report.py, also when a test imports this file
from _report import write_report  # noqa: E402
ROWS = ("teacher", "teacher_bf16", "teacher_packed", "student", "student_bf16", "student_packed", "student_onnx",
        "student_onnx_int8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished run folder (config.yaml, teacher/, student/, export/)")
    p.add_argument("--batches", type=int, default=20, help="timed batches of 32 per model")
    p.add_argument("--latency-samples", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="2 batches, 4 latency samples")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "inference.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.latency_samples = 2, 4

    import torch
    import transformers

    from hybridft.config import load_config
    from hybridft.data import load_splits
    from hybridft.dist import autocast
    from hybridft.evaluate import measure_speed
    from hybridft.export import INT8_FILE, ONNX_FILE, OnnxClassifier, file_size_mb
    from hybridft.packed_linear import prepack_linears
    from hybridft.tasks import classification as task

    run = Path(args.run)
    missing = [n for n in ("config.yaml", "teacher", "student", f"export/{ONNX_FILE}", f"export/{INT8_FILE}")
               if not (run / n).exists()]
    if missing:
        print(f"{run} is not a finished run with an export (missing {', '.join(missing)}); run `hybridft run` "
              f"with export.enabled=true first", file=sys.stderr)
        return 2
    cfg = load_config(run / "config.yaml", ["progress=false"])
    splits = load_splits(cfg.data, cfg.seed)
    examples = splits.test if splits.test is not None else splits.validation
    cpu = torch.device("cpu")
    inputs = {}  # the teacher's and the student's tokenizers may differ (a student from another model)
    for who in ("teacher", "student"):
        tokenizer = task.load_tokenizer(str(run / who), who)
        items = task.encode(examples, tokenizer, cfg.data.max_length)
        collate = task.make_collate(tokenizer)
        inputs[who] = items, collate, task.length_sorted_loader(items, 64, collate)

    def model_for(row: str) -> tuple[Any, str, float]:
        """(model, precision, size on disk in MB)"""
        if row.startswith("student_onnx"):
            path = run / "export" / (INT8_FILE if row.endswith("int8") else ONNX_FILE)
            return OnnxClassifier(path), "fp32", file_size_mb(path)
        who = row.split("_")[0]
        model = task.load_classifier(str(run / who), splits.label_names, who)
        if row.endswith("packed"):
            prepack_linears(model.eval(), cpu)  # unconditionally: the row measures the packed kernels
        size = sum(f.stat().st_size for f in (run / who).glob("*.safetensors")) / 2**20
        return model, ("bf16" if row.endswith("bf16") else "fp32"), size

    results: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        model, precision, size = model_for(row)
        model.eval()

        def forward(m: Any, batch: dict[str, Any], precision: str = precision) -> Any:
            with autocast(cpu, precision):
                return task.logits_for_loss(m, batch)

        items, collate, loader = inputs[row.split("_")[0]]
        logits, labels = task.predict_logits(model, loader, cpu, precision)
        accuracy = float((logits.argmax(-1) == labels).float().mean())
        speed = measure_speed(model, items, collate, cpu, 32, args.batches, args.latency_samples, forward=forward)
        results[row] = {"accuracy": round(accuracy, 4), "size_mb": round(size, 2), **speed}
        print(f"[bench] {row}: accuracy {accuracy:.4f}, {speed['throughput_samples_per_s']:.0f} samples/s at batch 32, "
              f"{speed['latency_ms_batch1']:.2f} ms at batch 1, {size:.1f} MB", flush=True)
    base = results["teacher"]
    for r in results.values():
        r["speedup_batch32"] = round(r["throughput_samples_per_s"] / base["throughput_samples_per_s"], 2)
        r["speedup_batch1"] = round(base["latency_ms_batch1"] / r["latency_ms_batch1"], 2)
    report = {"benchmark": "inference", "run": str(run), "examples": len(examples), "max_length": cfg.data.max_length,
              "batches": args.batches, "latency_samples": args.latency_samples, "quick": args.quick,
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "python": platform.python_version()},
              "rows": results, "command": " ".join(["python bench/inference.py", *(argv or sys.argv[1:])])}
    write_report(report, args.out)
    print(f"\n{run}: {len(examples)} test texts, max_length {cfg.data.max_length}, {torch.get_num_threads()} threads")
    print(f"{'model':<18} {'accuracy':>8} {'samples/s':>10} {'x teacher':>9} {'b=1 ms':>7} {'x teacher':>9} {'MB':>7}")
    for name, r in results.items():
        print(f"{name:<18} {r['accuracy']:>8.4f} {r['throughput_samples_per_s']:>10.0f} {r['speedup_batch32']:>8.2f}x "
              f"{r['latency_ms_batch1']:>7.2f} {r['speedup_batch1']:>8.2f}x {r['size_mb']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
