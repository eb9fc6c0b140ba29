"""`--overwrite` replaces a run as a whole: nothing of the old run (hybrid/, export/, checkpoints, summary) is left
beside the new one, whether the new run finishes or is interrupted; and `hybridft distill` continues the folder of
`hybridft teacher` without being asked to replace it."""

import hashlib
import json
from pathlib import Path

import pytest

from conftest import tiny_overrides
from hybridft import pipeline
from hybridft.cli import main


FAST = ["teacher.train.epochs=1", "student.train.epochs=1"]  # what is checked here is which files are left


def _overrides(teacher: Path, data: dict[str, Path], out: Path) -> list[str]:
    return tiny_overrides(teacher, data, out) + FAST


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_overwrite_leaves_nothing_of_the_previous_run(tmp_path: Path, tiny_teacher_dir: Path, tiny_data, capsys):
    run = tmp_path / "run"
    base = _overrides(tiny_teacher_dir, tiny_data, run)
    assert main(["run", *base, "export.enabled=false"]) == 0
    assert (run / "hybrid" / "hybrid.json").is_file() and (run / "hybrid_curve.json").is_file()
    old_student = _digest(run / "student" / "model.safetensors")
    (run / "notes.txt").write_text("the user's own file")
    capsys.readouterr()
    # the new run builds no hybrid: the old one must not survive to be served by `predict --model run/hybrid`
    assert main(["run", *base, "export.enabled=false", "hybrid.enabled=false", "seed=7", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "--overwrite: removed the previous run's" in err and "hybrid" in err
    assert not (run / "hybrid").exists() and not (run / "hybrid_curve.json").exists()
    assert _digest(run / "student" / "model.safetensors") != old_student
    assert "hybrid" not in json.loads((run / "summary.json").read_text())
    assert (run / "notes.txt").read_text() == "the user's own file"  # files hybridft does not write are kept
    assert main(["predict", "--model", str(run / "hybrid"), "--input", str(tiny_data["test"]),
                 "--output", str(tmp_path / "labels.jsonl")]) == 2


def test_an_interrupted_overwrite_resumes_as_the_new_run(tmp_path: Path, tiny_teacher_dir: Path, tiny_data,
                                                          monkeypatch: pytest.MonkeyPatch):
    run = tmp_path / "run"
    base = _overrides(tiny_teacher_dir, tiny_data, run) + ["export.enabled=false", "hybrid.enabled=false"]
    assert main(["run", *base]) == 0
    old = {who: _digest(run / who / "model.safetensors") for who in ("teacher", "student")}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the new run stops after its teacher stage, inside the student's

    monkeypatch.setattr(pipeline, "distill", killed)
    assert main(["run", *base, "teacher.train.lr=2e-3", "--overwrite"]) == 130  # Ctrl-C
    monkeypatch.undo()
    # the new teacher is there; the old student, summary and checkpoints are not, so --resume trains a new student
    assert _digest(run / "teacher" / "model.safetensors") != old["teacher"]
    assert not (run / "student").exists() and not (run / "summary.json").exists()
    assert not (run / "checkpoints" / "student").exists()
    assert main(["run", *base, "teacher.train.lr=2e-3", "--resume"]) == 0
    assert _digest(run / "student" / "model.safetensors") != old["student"]
    stages = [json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert stages.count("teacher") > 0 and stages.count("student") > 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["stage"] == "teacher" and json.loads(line)["split"] == "train"]
    assert steps == sorted(steps), "one teacher history: the old run's lines were dropped"


def test_distill_continues_the_folder_of_the_teacher_stage(tmp_path: Path, tiny_teacher_dir: Path, tiny_data,
                                                           capsys):
    folder = tmp_path / "x"
    assert main(["teacher", *_overrides(tiny_teacher_dir, tiny_data, folder)]) == 0
    teacher = folder / "teacher" / "model.safetensors"
    before = _digest(teacher)
    second = _overrides(folder / "teacher", tiny_data, folder)  # the README's two steps, one output_dir
    assert main(["distill", *second]) == 0  # no --overwrite: only a student is added
    assert (folder / "student" / "model.safetensors").is_file() and _digest(teacher) == before
    capsys.readouterr()
    assert main(["distill", *second]) == 2  # now a student is there: replacing it is asked for
    assert "already holds a student" in capsys.readouterr().err
    assert main(["distill", *second, "student.train.lr=2e-3", "--overwrite"]) == 0
    removed = capsys.readouterr().err.split("removed the previous run's ")[1].split(" from ")[0].split(", ")
    assert "student" in removed and "teacher" not in removed  # the distill stage replaces the student's outputs
    assert _digest(teacher) == before and (folder / "student" / "model.safetensors").is_file()
    assert (folder / "teacher_outputs.safetensors").is_file()
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    student_steps = [r["step"] for r in records if r["stage"] == "student" and r["split"] == "train"]
    assert student_steps == sorted(student_steps), "the replaced student's lines are gone"
    assert any(r["stage"] == "teacher" for r in records), "the teacher's history stays"


def test_overwrite_never_removes_what_the_config_reads(tmp_path: Path):
    run = tmp_path / "run"
    for name in ("teacher", "student", "hybrid", "checkpoints/teacher"):
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_text("x")
    (run / "summary.json").write_text("{}")
    (run / "data.csv").write_text("text,label\n")
    removed, kept = pipeline.clear_previous_run(run, "run", {"teacher.model": run / "teacher",
                                                             "data.train": run / "data.csv"})
    assert kept == [("teacher", "teacher.model")]
    assert set(removed) == {"student", "hybrid", "checkpoints", "summary.json"}
    assert (run / "teacher" / "model.safetensors").is_file() and (run / "data.csv").is_file()
    # the distill stage replaces only the student's outputs
    (run / "student").mkdir()
    (run / "config.teacher.yaml").write_text("")
    removed, kept = pipeline.clear_previous_run(run, "distill", {})
    assert removed == ["student"] and kept == []
    assert (run / "teacher").is_dir() and (run / "config.teacher.yaml").is_file()
