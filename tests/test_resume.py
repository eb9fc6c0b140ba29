"""Interrupted training: a SIGKILL at a random step, then --resume, ends with the same student as an
uninterrupted run; a kill during a checkpoint write leaves the previous checkpoint loadable."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (checkpoint_steps, kill_when_checkpointed, make_bert, make_tokenizer, sentiment_rows,
                      tiny_overrides)
from hybridft.checkpoint import latest_checkpoint, load_checkpoint
from hybridft.config import TrainConfig
from hybridft.data import Examples
from hybridft.runlog import read_metrics
from hybridft.tasks import classification as task
from hybridft.train import LossWeights, fit


def _command(teacher_dir: Path, data, out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "hybridft", "run", *tiny_overrides(teacher_dir, data, out),
            "student.train.epochs=20", "student.train.checkpoint_every=1", "student.train.log_every=1",
            "hybrid.enabled=false",
            "export.enabled=false", f"distill.cache_dir={cache}"]


def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(tmp_path: Path, tiny_teacher_dir: Path,
                                                                   tiny_data):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cache = tmp_path / "cache"
    done = subprocess.run(_command(tiny_teacher_dir, tiny_data, tmp_path / "whole", cache), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    total = max(checkpoint_steps(tmp_path / "whole" / "checkpoints" / "student"))
    kill_at = random.Random().randint(3, total - 10)  # a different step on every run of the suite

    out = tmp_path / "killed"
    cmd = _command(tiny_teacher_dir, tiny_data, out, cache)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    student_ckpts = out / "checkpoints" / "student"
    kill_when_checkpointed(proc, student_ckpts, kill_at, lambda p: p.send_signal(signal.SIGKILL))
    assert proc.returncode == -signal.SIGKILL, "the run must have been killed mid-training"
    assert not (out / "student").exists(), "killed before the student was saved"
    killed_at = max(checkpoint_steps(student_ckpts))
    assert kill_at <= killed_at < total

    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # the weights after the last step, and the saved student (the best epoch's, which may predate the kill)
    for part in (f"checkpoints/student/step-{total:06d}", "student"):
        a = load_file(str(tmp_path / "whole" / part / "model.safetensors"))
        b = load_file(str(out / part / "model.safetensors"))
        assert a.keys() == b.keys()
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        assert diff <= 1e-6, f"{part}: killed at step {killed_at} of {total}: max |difference| {diff}"
    # the metrics file reads as one uninterrupted run: the lines logged between the checkpoint and the kill
    # are not repeated when those steps are trained again
    whole_log, resumed_log = read_metrics(tmp_path / "whole" / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [(r["stage"], r["split"], r["step"]) for r in resumed_log] == \
        [(r["stage"], r["split"], r["step"]) for r in whole_log]
    for a_rec, b_rec in zip(whole_log, resumed_log):
        for key in ("loss", "accuracy"):
            if key in a_rec:
                assert abs(a_rec[key] - b_rec[key]) <= 1e-5, (a_rec, b_rec)


def test_resume_with_a_changed_config_names_the_keys_and_refuses(tmp_path: Path, tiny_teacher_dir: Path, tiny_data,
                                                                  capsys):
    from hybridft.cli import main

    base = tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / "r") + ["hybrid.enabled=false",
                                                                         "export.enabled=false"]
    assert main(["run", *base]) == 0
    before = (tmp_path / "r" / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(["run", *base, "loss.temperature=4", "student.train.lr=1e-3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "loss.temperature" in err and "student.train.lr" in err and "--force" in err
    assert (tmp_path / "r" / "summary.json").read_bytes() == before
    assert main(["run", *base, "loss.temperature=4", "--force"]) == 2  # --force alone was ignored without a word
    assert "--force only applies with --resume" in capsys.readouterr().err

    # the run's own config.yaml is the base of `run output_dir=RUN --resume`, and a machine setting may change
    assert main(["run", f"output_dir={tmp_path / 'r'}", "num_threads=1", "--resume", "--quiet"]) == 0
    assert "differs" not in capsys.readouterr().err

    # a forced resume continues under the new settings, and config.yaml says so for the next --resume
    assert main(["run", *base, "student.train.lr=1e-3", "--resume", "--force", "--quiet"]) == 0
    assert "continuing with changed student.train.lr" in capsys.readouterr().err
    import yaml

    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    previous = yaml.safe_load((tmp_path / "r" / "config.before-resume.yaml").read_text())
    assert (saved["student"]["train"]["lr"], previous["student"]["train"]["lr"]) == (1e-3, 3e-3)
    assert main(["run", *base, "student.train.lr=1e-3", "--resume", "--quiet"]) == 0


def test_resume_of_a_run_begun_before_a_setting_existed(tmp_path: Path, tiny_teacher_dir: Path, tiny_data, capsys):
    """A run begun by an earlier hybridft (its config.yaml lacks a setting added since) resumes when the setting is
    at its default, with a line saying so, and is refused when it is set to anything else."""
    import yaml

    from hybridft.cli import main

    base = tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / "r") + ["hybrid.enabled=false",
                                                                         "export.enabled=false"]
    assert main(["run", *base]) == 0
    saved_file = tmp_path / "r" / "config.yaml"
    saved = yaml.safe_load(saved_file.read_text())
    del saved["student"]["train"]["best_on_tie"], saved["data"]["assistant_turns"]  # as an older version wrote it
    saved_file.write_text(yaml.safe_dump(saved, sort_keys=False))
    capsys.readouterr()
    assert main(["run", *base, "student.train.best_on_tie=later", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "differs from the run's config.yaml in student.train.best_on_tie;" in err  # the other one is no change
    assert main(["run", *base, "--resume", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "without data.assistant_turns, student.train.best_on_tie; they take their defaults" in err
    assert "differs" not in err


def _items(tmp_path: Path):
    tok = make_tokenizer(tmp_path / "tok")
    rows = sentiment_rows(24, seed=2)
    ex = Examples([t for t, _ in rows], [i % 2 == 0 and 1 or 0 for i in range(24)], source="x")
    return tok, task.encode(ex, tok, 16, teacher_logits=torch.randn(24, 2, generator=torch.Generator().manual_seed(0)))


def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    import hybridft.checkpoint as ck

    tok, items = _items(tmp_path)
    tc = TrainConfig(epochs=4, batch_size=4, checkpoint_every=1, keep_checkpoints=3)
    kwargs = dict(collate=task.make_collate(tok), tc=tc, weights=LossWeights(0.5, 0.5, 2.0), task=task,
                  device=torch.device("cpu"), seed=3)
    whole = make_bert(layers=1, dropout=0.1, seed=5)
    fit(whole, items, items[:8], checkpoint_dir=tmp_path / "whole", **kwargs)

    real_save = torch.save
    calls = {"n": 0}

    def dies_on_the_seventh_write(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            Path(path).write_bytes(b"half a file")  # the write had begun when the process died
            raise KeyboardInterrupt("killed mid-write")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ck.torch, "save", dies_on_the_seventh_write)
    folder = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        fit(make_bert(layers=1, dropout=0.1, seed=5), items, items[:8], checkpoint_dir=folder, **kwargs)
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert (folder / "step-000007.tmp").exists()
    latest = latest_checkpoint(folder)
    assert latest is not None and latest.name == "step-000006"
    weights, _, state = load_checkpoint(latest)
    assert state["step"] == 6 and set(weights) == set(whole.state_dict())
    resumed = make_bert(layers=1, dropout=0.1, seed=99)  # other initial weights: all must come from the checkpoint
    fit(resumed, items, items[:8], checkpoint_dir=folder, resume=True, **kwargs)
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)
    assert len(checkpoint_steps(folder)) == 3, "old checkpoints are pruned to keep_checkpoints"


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path: Path, monkeypatch):
    """torch.save on a full disk raised "basic_ios::clear: iostream error" as a traceback (a benchmark hit it)."""
    import hybridft.checkpoint as ck
    from hybridft.errors import HybridFTError

    tok, items = _items(tmp_path)
    tc = TrainConfig(epochs=4, batch_size=4, checkpoint_every=1, keep_checkpoints=3)
    real_save = torch.save
    calls = {"n": 0}

    def disk_fills_on_the_fifth_write(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 46911168 vs 46911056")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ck.torch, "save", disk_fills_on_the_fifth_write)
    folder = tmp_path / "full"
    with pytest.raises(HybridFTError, match=r"could not write the checkpoint .*step-000005 \(\[enforce fail.*MiB are "
                                            r"free on its disk.*--resume continues"):
        fit(make_bert(layers=1, seed=5), items, items[:8], checkpoint_dir=folder, collate=task.make_collate(tok),
            tc=tc, weights=LossWeights(0.5, 0.5, 2.0), task=task, device=torch.device("cpu"), seed=3)
    assert not (folder / "step-000005.tmp").exists() and latest_checkpoint(folder).name == "step-000004"


def test_resume_drops_the_log_lines_written_after_the_checkpoint(tmp_path: Path):
    from hybridft.runlog import MetricsWriter

    tok, items = _items(tmp_path)
    tc = TrainConfig(epochs=3, batch_size=4, checkpoint_every=3, log_every=1, eval_every=2)
    kwargs = dict(collate=task.make_collate(tok), tc=tc, weights=LossWeights(0.5, 0.5, 2.0), task=task,
                  device=torch.device("cpu"), seed=3)
    fit(make_bert(layers=1, seed=5), items, items[:8], writer=MetricsWriter(tmp_path / "whole.jsonl"),
        checkpoint_dir=tmp_path / "whole", **kwargs)

    class DiesAfterStepFive(MetricsWriter):
        def write(self, record):
            super().write(record)
            if record["step"] == 5:
                raise KeyboardInterrupt("killed after logging step 5; the last checkpoint is step 3")

    log = tmp_path / "killed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        fit(make_bert(layers=1, seed=5), items, items[:8], writer=DiesAfterStepFive(log),
            checkpoint_dir=tmp_path / "killed", **kwargs)
    assert max(r["step"] for r in read_metrics(log)) == 5
    fit(make_bert(layers=1, seed=5), items, items[:8], writer=MetricsWriter(log), checkpoint_dir=tmp_path / "killed",
        resume=True, **kwargs)
    whole, resumed = read_metrics(tmp_path / "whole.jsonl"), read_metrics(log)
    assert [(r["split"], r["step"]) for r in resumed] == [(r["split"], r["step"]) for r in whole]
    for a, b in zip(whole, resumed):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert abs(a[k] - b[k]) <= 1e-6, (k, a, b)


def test_a_checkpoint_whose_weights_are_the_best_stores_them_once(tmp_path: Path):
    from hybridft.checkpoint import load_checkpoint, save_checkpoint

    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    older = {"w": torch.zeros(2, 3)}
    same = save_checkpoint(tmp_path, 1, weights, {"step": 1}, weights, keep=5)
    assert (same / "best.safetensors").stat().st_ino == (same / "model.safetensors").stat().st_ino
    other = save_checkpoint(tmp_path, 2, weights, {"step": 2}, older, keep=5)
    assert (other / "best.safetensors").stat().st_ino != (other / "model.safetensors").stat().st_ino
    for path, best in ((same, weights), (other, older)):
        got, got_best, state = load_checkpoint(path)
        assert torch.equal(got["w"], weights["w"]) and torch.equal(got_best["w"], best["w"])
    save_checkpoint(tmp_path, 3, weights, {"step": 3}, None, keep=1)  # the default keeps one: the newest
    assert [p.name for p in tmp_path.iterdir()] == ["step-000003"]


def test_a_bf16_run_resumed_in_process_equals_the_uninterrupted_one(tmp_path: Path, tiny_teacher_dir: Path,
                                                                    tiny_data, monkeypatch: pytest.MonkeyPatch):
    """Under bf16 autocast a student cut from its just-trained teacher must train exactly as the same student read
    back from a checkpoint. It did not: the copy carried Accelerate's "prepared" mark from the teacher, so it was
    left without Accelerate's fp32 cast of its logits, and the loss's gradient differed by a bf16 rounding from the
    resumed run's (max |difference| 1e-3 after 36 steps). The embedding rows no training text uses only decay,
    in closed form, so they may differ in the last bit."""
    from hybridft import runlog
    from hybridft.cli import main

    def argv(out: Path) -> list[str]:
        return ["run", *tiny_overrides(tiny_teacher_dir, tiny_data, out), "precision=bf16",
                "student.train.epochs=4", "student.train.checkpoint_every=1", "student.train.log_every=1",
                "hybrid.enabled=false", "export.enabled=false", f"distill.cache_dir={tmp_path / 'cache'}"]

    assert main(argv(tmp_path / "whole")) == 0
    write = runlog.MetricsWriter.write

    def dies_at_step_7(self, record):
        write(self, record)
        if (record["stage"], record["split"], record["step"]) == ("student", "train", 7):
            raise KeyboardInterrupt

    monkeypatch.setattr(runlog.MetricsWriter, "write", dies_at_step_7)
    assert main(argv(tmp_path / "killed")) == 130
    monkeypatch.undo()
    assert main(argv(tmp_path / "killed") + ["--resume"]) == 0
    for part in ("checkpoints/student/" + max((tmp_path / "whole/checkpoints/student").iterdir()).name, "student"):
        a = load_file(str(tmp_path / "whole" / part / "model.safetensors"))
        b = load_file(str(tmp_path / "killed" / part / "model.safetensors"))
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if "word_embeddings" not in k)
        assert diff == 0.0, f"{part}: max |difference| {diff}"
        rows = (a["bert.embeddings.word_embeddings.weight"] - b["bert.embeddings.word_embeddings.weight"]).abs()
        assert float(rows.max()) <= 1e-7
