"""bench/student_quality.py --reuse continues a run that a session's end interrupted, instead of starting it again;
a run it cannot resume (its config changed) runs again. `hybridft run` itself is replaced by a recorder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import student_quality  # noqa: E402


def _interrupted(folder: Path) -> Path:
    (folder / "checkpoints" / "student" / "step-000620").mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 1\n")
    return folder


def _recorder(monkeypatch: pytest.MonkeyPatch, resume_code: int) -> list[list[str]]:
    import hybridft.cli

    calls: list[list[str]] = []

    def main(argv: list[str]) -> int:
        calls.append(argv)
        if "--resume" in argv and resume_code != 0:
            return resume_code
        out = Path(next(a for a in argv if a.startswith("output_dir=")).split("=", 1)[1])
        (out / "summary.json").write_text(json.dumps({"student": {"accuracy": 0.8}}))
        return 0

    monkeypatch.setattr(hybridft.cli, "main", main)
    return calls


def test_reuse_resumes_an_interrupted_run_and_marks_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = _recorder(monkeypatch, resume_code=0)
    out = _interrupted(tmp_path / "run")
    result = student_quality.hybridft(["seed=1"], out, reuse=True)
    assert calls == [["run", "seed=1", f"output_dir={out}", "--resume"]]
    assert result["resumed"] is True and not (out / "checkpoints").exists()
    assert json.loads((out / "bench_args.json").read_text()) == ["seed=1"]
    # finished now: the next call reuses it and runs nothing
    assert student_quality.hybridft(["seed=1"], out, reuse=True)["resumed"] is True and len(calls) == 1


def test_a_run_that_cannot_resume_runs_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = _recorder(monkeypatch, resume_code=2)  # hybridft refuses: the config differs
    out = _interrupted(tmp_path / "run")
    result = student_quality.hybridft(["seed=1"], out, reuse=True)
    assert [c[-1] for c in calls] == ["--resume", "--overwrite"] and "resumed" not in result


def test_without_reuse_an_interrupted_run_starts_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = _recorder(monkeypatch, resume_code=0)
    out = _interrupted(tmp_path / "run")
    student_quality.hybridft(["seed=1"], out)
    assert [c[-1] for c in calls] == ["--overwrite"]
