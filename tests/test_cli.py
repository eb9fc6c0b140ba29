"""The CLI end to end on tiny models: stage by stage (teacher -> distill -> evaluate), and the public API."""

import json
from pathlib import Path

import pytest
import torch

import hybridft
from conftest import make_tokenizer, tiny_overrides
from hybridft.cli import main


def test_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "teacher", "distill", "evaluate"):
        assert cmd in out


def test_stages_one_by_one(tmp_path: Path, tiny_teacher_dir: Path, tiny_data, capsys):
    base = tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / "t")
    assert main(["teacher", *base]) == 0
    teacher = tmp_path / "t" / "teacher"
    assert (teacher / "model.safetensors").exists()
    # distil from the fine-tuned teacher folder: it is used as is (no second fine-tuning)
    distill_args = [a for a in tiny_overrides(teacher, tiny_data, tmp_path / "d")]
    assert main(["distill", *distill_args]) == 0
    assert (tmp_path / "d" / "student" / "model.safetensors").exists()
    assert (tmp_path / "d" / "teacher_outputs.safetensors").exists()
    stages = {json.loads(x)["stage"] for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"student"}
    # evaluate needs a run folder holding teacher/ and student/: assemble one from the two stages
    run = tmp_path / "d"
    (run / "config.yaml").write_text((run / "config.distill.yaml").read_text())
    (run / "teacher").symlink_to(teacher)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) >= {"teacher", "student", "comparison"}
    assert "student" in capsys.readouterr().out


def test_nan_teacher_logits_are_refused(tmp_path: Path, tiny_teacher_dir: Path, tiny_data, capsys):
    from hybridft.config import load_config
    from hybridft.data import load_splits
    from hybridft.teacher_outputs import write_store

    cfg = load_config(None, tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / "x"))
    s = load_splits(cfg.data, 0)
    logits = torch.zeros(len(s.train), 2)
    logits[3, 1] = float("nan")
    store = write_store(tmp_path / "nan.safetensors", s.train.keys(), logits, s.label_names)
    code = main(["run", *tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / "out"),
                 f"distill.teacher_logits={store}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN" in err[0]


def test_nan_loss_stops_training_with_one_clear_error(tmp_path: Path):
    from conftest import make_bert, sentiment_rows
    from hybridft.config import TrainConfig
    from hybridft.data import Examples
    from hybridft.errors import HybridFTError
    from hybridft.tasks import classification as task
    from hybridft.train import LossWeights, fit

    tok = make_tokenizer(tmp_path / "tok")
    rows = sentiment_rows(8)
    ex = Examples([t for t, _ in rows], [i % 2 for i in range(8)], source="x")
    bad = torch.zeros(8, 2)
    bad[0, 0] = float("nan")
    items = task.encode(ex, tok, 16, teacher_logits=bad)
    with pytest.raises(HybridFTError, match="loss became nan"):
        fit(make_bert(layers=1), items, items, collate=task.make_collate(tok), tc=TrainConfig(epochs=1, batch_size=8),
            weights=LossWeights(0.5, 0.5, 2.0), task=task, device=torch.device("cpu"))


def test_public_api_is_declared():
    import inspect

    public = {n for n in dir(hybridft) if not n.startswith("_") and not inspect.ismodule(getattr(hybridft, n))}
    assert public == set(hybridft.__all__)


def test_a_full_disk_is_one_line_not_a_traceback(monkeypatch, capsys):
    import errno

    from hybridft import cli

    def full(_args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/student/model.safetensors")

    monkeypatch.setattr(cli, "_dispatch", full)
    assert cli.main(["run", "output_dir=runs/x"]) == 1
    assert capsys.readouterr().err.strip() == (
        "hybridft: error: the disk is full (runs/x/student/model.safetensors); free space and run again (a training "
        "run continues from its last checkpoint with --resume)")
    monkeypatch.setattr(cli, "_dispatch", lambda _a: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    with pytest.raises(OSError):  # other OS errors are not disguised as a full disk
        cli.main(["run", "output_dir=runs/x"])


def test_evaluate_reports_into_the_folder_it_is_given_and_keeps_the_rest(tmp_path: Path, tiny_teacher_dir: Path,
                                                                         tiny_data, capsys):
    """A copied run (its config.yaml names the original's output_dir) is evaluated into the copy: the original's
    summary.json stays byte for byte, and the copy's keeps what evaluation does not measure (the hybrid, the stage
    times). The copy also resumes where it lies: output_dir is where a run is, not one of its settings."""
    import os
    import shutil

    from hybridft.hybrid import HybridModel

    original = tmp_path / "original"
    assert main(["run", *tiny_overrides(tiny_teacher_dir, tiny_data, original), "export.enabled=false"]) == 0
    before = (original / "summary.json").read_bytes()
    for name in ("student", "teacher"):  # hybrid/ links the run's models instead of holding a second copy
        weights, linked = (os.stat(original / f / "model.safetensors") for f in (name, f"hybrid/{name}"))
        assert (weights.st_ino, weights.st_dev) == (linked.st_ino, linked.st_dev), f"hybrid/{name} is a copy"
    model = HybridModel.load(original / "hybrid")  # the manifest's checksums hold for the linked files
    assert len(model.predict(["a fine film", "a dull plot"]).answered_by) == 2
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    (copy / "summary.json").write_text(json.dumps({**json.loads(before), "note": "kept"}))
    capsys.readouterr()
    assert main(["evaluate", "--run", str(copy), "--quiet"]) == 0
    assert "(hybrid: the run's own numbers; evaluate measured the teacher and the student again)" in \
        capsys.readouterr().out
    assert (original / "summary.json").read_bytes() == before
    first, again = json.loads(before), json.loads((copy / "summary.json").read_text())
    assert again["note"] == "kept" and again["hybrid"] == first["hybrid"]
    assert again["stage_seconds"] == first["stage_seconds"]
    assert again["student"]["accuracy"] == first["student"]["accuracy"]
    capsys.readouterr()
    assert main(["run", f"output_dir={copy}", "--resume", "--quiet"]) == 0
    assert "differs" not in capsys.readouterr().err
    assert (original / "summary.json").read_bytes() == before
    # a teacher that scores 0 (a broken test set) leaves nothing to divide by: the table says so, no traceback
    from hybridft.cli import print_table

    print_table({**first, "comparison": {**first["comparison"], "accuracy_retained": None}}, str(copy))
    assert "student keeps n/a of the teacher's accuracy" in capsys.readouterr().out
    # the test file changed since the run: what evaluate would keep was measured on the old rows, so it goes
    rows = tiny_data["test"].read_text().splitlines()
    tiny_data["test"].write_text("\n".join(rows[:-3]) + "\n")
    assert main(["evaluate", "--run", str(copy), "--quiet"]) == 0
    assert "data.test (16 -> 13 rows) changed since the run" in capsys.readouterr().err
    assert "hybrid" not in json.loads((copy / "summary.json").read_text())


def test_an_unfinished_run_is_pointed_at_resume(tmp_path: Path, tiny_teacher_dir: Path, tiny_data, capsys,
                                                monkeypatch: pytest.MonkeyPatch):
    """Ctrl-C, then the same command again: both lines name --resume, the way to keep the checkpoints."""
    import hybridft.cli as cli

    out = tmp_path / "r"
    args = ["run", *tiny_overrides(tiny_teacher_dir, tiny_data, out)]

    def interrupted(_args):
        out.mkdir()
        (out / "config.yaml").write_text("task: classification\n")
        (out / "checkpoints").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert main(args) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unfinished run" in err[0] and "--resume" in err[0] and "--overwrite" in err[0]


def test_a_folder_made_by_the_stage_commands_is_evaluated(tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    """`hybridft teacher` then `hybridft distill` into one folder (the README's two steps) leave config.teacher.yaml
    and config.distill.yaml, no config.yaml: `evaluate` reads the distill stage's."""
    folder = tmp_path / "staged"
    assert main(["teacher", *tiny_overrides(tiny_teacher_dir, tiny_data, folder), "--quiet"]) == 0
    assert main(["distill", *tiny_overrides(folder / "teacher", tiny_data, folder), "--quiet"]) == 0
    assert not (folder / "config.yaml").exists()
    assert main(["evaluate", "--run", str(folder), "--quiet"]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["teacher"]["accuracy"] > 0 and summary["student"]["accuracy"] > 0


def test_the_hybrids_goal_is_printed_in_words():
    from hybridft.cli import _goal_words

    assert _goal_words({"teacher_budget": 0.3, "spend_whole_budget": False}) == "a teacher budget of 30%"
    assert _goal_words({"teacher_budget": 0.1, "spend_whole_budget": True}) == "a teacher budget of 10%, spent whole"
    assert _goal_words({"target_accuracy_within": 0.01}) == "accuracy within 0.01 of the teacher's"


def test_without_a_test_file_the_hybrid_line_says_it_scored_validation(tmp_path: Path, tiny_teacher_dir: Path,
                                                                        tiny_data, capsys):
    args = [a for a in tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / "r") if not a.startswith("data.test=")]
    assert main(["run", *args, "export.enabled=false", "progress=true", "teacher.train.epochs=2",
                 "student.train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "hybrid: validation (no data.test, so optimistic" in out and "hybrid: test accuracy" not in out
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["split"] == "validation"



def test_evaluate_and_resume_from_another_folder_find_the_runs_relative_data_files(tmp_path: Path, tiny_teacher_dir: Path,
                                                                         tiny_data, monkeypatch: pytest.MonkeyPatch):
    """A run started with relative data paths (data/train.csv) is evaluated and resumed from elsewhere: the paths
    are read from the folder the run started in (data.json), not the current one, where they do not exist."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    for name, path in tiny_data.items():
        (project / "data" / path.name).write_bytes(path.read_bytes())
    relative = [f"data.{name}=data/{path.name}" for name, path in tiny_data.items()]
    monkeypatch.chdir(project)
    assert main(["run", *tiny_overrides(tiny_teacher_dir, tiny_data, project / "run"), *relative,
                 "teacher.train.epochs=1", "student.train.epochs=1", "hybrid.enabled=false",
                 "export.enabled=false"]) == 0
    first = json.loads((project / "run" / "summary.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", "--run", str(project / "run"), "--quiet"]) == 0
    again = json.loads((project / "run" / "summary.json").read_text())
    assert again["student"]["accuracy"] == first["student"]["accuracy"]
    # --resume from there too: the run's config.yaml is compared as saved, and its data read from where it started
    (project / "run" / "summary.json").unlink()  # as if the run had stopped before its end
    assert main(["run", f"output_dir={project / 'run'}", "--resume", "--quiet"]) == 0
    assert json.loads((project / "run" / "summary.json").read_text())["student"]["accuracy"] == \
        first["student"]["accuracy"]
    assert "test: data/test.csv" in (project / "run" / "config.yaml").read_text()  # kept as the user wrote it
