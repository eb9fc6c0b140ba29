"""The hybrid model: routing, calibration, the threshold choice, save/load and tampering."""

from __future__ import annotations

import json
import shutil
import re
from pathlib import Path

import pytest
import torch

from conftest import make_bert, make_tokenizer, sentiment_rows, tiny_overrides
from hybridft import hybrid as hy
from hybridft.errors import HybridFTError

LABELS = ["neg", "pos"]


class RowCounter:
    """Counts the forward calls of a model and the rows they carry."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls, self.rows = 0, 0

        def pre(module, args, kwargs):
            self.calls += 1
            self.rows += kwargs["input_ids"].shape[0]

        model.register_forward_pre_hook(pre, with_kwargs=True)


@pytest.fixture
def pair(tmp_path: Path):
    tok = make_tokenizer(tmp_path / "tok")
    student, teacher = make_bert(layers=1, seed=1), make_bert(layers=2, seed=2)
    for m in (student, teacher):
        m.config.id2label, m.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    return student, teacher, tok


def _model(pair, threshold: float) -> hy.HybridModel:
    student, teacher, tok = pair
    return hy.HybridModel(student, tok, teacher, tok, LABELS, threshold=threshold, student_temperature=0.05,
                          max_length=16)


TEXTS = [t for t, _ in sentiment_rows(20, seed=4)]


def test_only_deferred_rows_reach_the_teacher(pair):
    student, teacher, tok = pair
    model = _model(pair, threshold=0.0)
    conf = hy.confidence(model._logits(student, tok, TEXTS, None, 32), 0.05, "max_prob")
    model.threshold = float(conf.median())  # about half the rows below it
    expected = int((conf < model.threshold).sum())
    assert 0 < expected < len(TEXTS)
    counter = RowCounter(teacher)
    pred = model.predict(TEXTS, batch_size=64)
    assert pred.answered_by.count("teacher") == expected
    assert counter.rows == expected and counter.calls == 1, "one batch holding exactly the deferred rows"


def test_threshold_that_defers_nothing_is_the_student_and_everything_is_the_teacher(pair):
    student, teacher, tok = pair
    counter = RowCounter(teacher)
    nothing = _model(pair, threshold=-1.0).predict(TEXTS)
    assert counter.calls == 0 and set(nothing.answered_by) == {"student"}
    s_logits = _model(pair, 0)._logits(student, tok, TEXTS, None, 32)
    assert torch.equal(nothing.label_ids, s_logits.argmax(-1))
    everything = _model(pair, threshold=2.0).predict(TEXTS)
    t_logits = _model(pair, 0)._logits(teacher, tok, TEXTS, None, 32)
    assert set(everything.answered_by) == {"teacher"}
    assert torch.equal(everything.label_ids, t_logits.argmax(-1))
    torch.testing.assert_close(everything.probs, t_logits.softmax(-1))


def test_calibration_lowers_held_out_nll_of_an_overconfident_model():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2000,), generator=g)
    clean = torch.nn.functional.one_hot(labels, 3).float() * 1.5 + torch.randn(2000, 3, generator=g)
    logits = clean * 6  # the same ranking, far too confident
    t = hy.fit_temperature(logits[:1000], labels[:1000])
    assert t > 2
    assert hy.nll(logits[1000:], labels[1000:], t) < 0.8 * hy.nll(logits[1000:], labels[1000:])


def test_curve_endpoints_and_budget_choice():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (200,), generator=g)
    teacher_pred = torch.where(torch.rand(200, generator=g) < 0.9, labels, 1 - labels)
    student_logits = torch.randn(200, 2, generator=g)
    conf = hy.confidence(student_logits, 1.0, "margin")
    curve = hy.cascade_curve(conf, student_logits.argmax(-1), teacher_pred, labels)
    assert curve[0]["teacher_fraction"] == 0 and curve[-1]["teacher_fraction"] == 1
    assert curve[0]["accuracy"] == pytest.approx(float((student_logits.argmax(-1) == labels).float().mean()))
    assert curve[-1]["accuracy"] == pytest.approx(float((teacher_pred == labels).float().mean()))
    point = hy.choose_threshold(curve, teacher_budget=0.3)
    allowed = [p for p in curve if p["teacher_fraction"] <= 0.3]
    assert point["accuracy"] == max(p["accuracy"] for p in allowed)  # the best reachable within the budget,
    assert all(p["accuracy"] < point["accuracy"] for p in allowed if p["teacher_fraction"] < point["teacher_fraction"])
    whole = hy.choose_threshold(curve, teacher_budget=0.3, spend_whole_budget=True)
    assert whole["teacher_fraction"] == max(p["teacher_fraction"] for p in allowed)
    teacher_logits = torch.nn.functional.one_hot(teacher_pred, 2).float()
    applied = hy.apply_threshold(student_logits, teacher_logits, labels, point["threshold"], 1.0, "margin")
    assert applied["teacher_fraction"] == pytest.approx(point["teacher_fraction"])
    assert applied["accuracy"] == pytest.approx(point["accuracy"])
    target = hy.choose_threshold(curve, target_accuracy=curve[-1]["accuracy"] - 0.005)
    assert target["accuracy"] >= curve[-1]["accuracy"] - 0.005


def test_save_load_gives_identical_predictions_and_tampering_is_refused(pair, tmp_path: Path):
    model = _model(pair, threshold=0.9)
    model.teacher_temperature = 1.7
    folder = model.save(tmp_path / "hybrid")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"student/model.safetensors", "teacher/model.safetensors", "hybrid.json"} <= set(manifest["files"])
    assert set(manifest["versions"]) == {"hybridft", "torch", "transformers"}
    loaded = hy.HybridModel.load(folder)
    a, b = model.predict(TEXTS), loaded.predict(TEXTS)
    assert torch.equal(a.label_ids, b.label_ids) and a.answered_by == b.answered_by
    torch.testing.assert_close(a.probs, b.probs)
    weights = folder / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(HybridFTError, match="checksum"):
        hy.HybridModel.load(folder)
    (folder / "teacher" / "config.json").unlink()
    with pytest.raises(HybridFTError):
        hy.HybridModel.load(folder)


def test_pipeline_builds_reports_and_saves_the_hybrid(tmp_path: Path, tiny_teacher_dir: Path, tiny_data, capsys):
    from hybridft import pipeline
    from hybridft.config import load_config

    out = tmp_path / "run"
    summary = pipeline.run(load_config(None, tiny_overrides(tiny_teacher_dir, tiny_data, out)))
    h = summary["hybrid"]
    for key in ("accuracy", "macro_f1", "teacher_fraction", "threshold", "throughput_samples_per_s"):
        assert key in h
    assert 0 <= h["teacher_fraction"] <= 1
    assert (out / "hybrid_curve.png").stat().st_size > 1000
    curves = json.loads((out / "hybrid_curve.json").read_text())
    assert set(curves) == {"validation", "test"}
    loaded = hy.HybridModel.load(out / "hybrid")
    assert loaded.threshold == pytest.approx(h["threshold"])
    # the table names a threshold below every validation confidence for what it is
    from hybridft.cli import print_table

    h["validation"]["teacher_fraction"] = 0.0
    print_table(summary, str(out))
    assert "the student answers every validation row alone" in " ".join(capsys.readouterr().out.split())


def test_predict_command_labels_a_file_with_the_hybrid_and_stops_on_a_bad_row(pair, tmp_path: Path, capsys):
    from hybridft.cli import main

    folder = _model(pair, threshold=0.9).save(tmp_path / "hybrid")
    good = tmp_path / "in.csv"
    good.write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(TEXTS)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(folder), "--input", str(good), "--output", str(out), "--quiet",
                 "--batch-size", "7"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(len(TEXTS))]
    expected = hy.HybridModel.load(folder).predict(TEXTS)
    assert [r["label"] for r in rows] == [LABELS[i] for i in expected.label_ids.tolist()] == expected.labels
    assert [r["answered_by"] for r in rows] == expected.answered_by
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"id,text\n1,good film\n2,\n3,\xff\xfe bad bytes\n4,fine plot\n")
    capsys.readouterr()
    assert main(["predict", "--model", str(folder), "--input", str(bad), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 3" in err[0]
    assert [json.loads(x) for x in out.read_text().splitlines()] == rows, "the earlier output is untouched"
    assert main(["predict", "--model", str(folder), "--input", str(bad), "--output", str(out), "--quiet",
                 "--skip-bad-rows"]) == 0
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report["skipped"] == 2 and report["rows_written"] == 2
    # the formats the training files accept: Parquet and a JSON array label the same rows the same way
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [str(i) for i in range(len(TEXTS))], "text": TEXTS})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=4)
    (tmp_path / "in.json").write_text(json.dumps(table.to_pylist()), encoding="utf-8")
    for name in ("in.parquet", "in.json"):
        again = tmp_path / f"{name}.jsonl"
        assert main(["predict", "--model", str(folder), "--input", str(tmp_path / name), "--output", str(again),
                     "--quiet"]) == 0
        assert [json.loads(x) for x in again.read_text().splitlines()] == rows, name
    from hybridft.cli import fewer_lines_than

    assert fewer_lines_than(str(tmp_path / "in.parquet"), len(TEXTS) + 1)  # its rows count, not its bytes' newlines
    assert not fewer_lines_than(str(tmp_path / "in.parquet"), len(TEXTS))


def test_run_exports_the_student_with_parity(tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    pytest.importorskip("onnxruntime")
    from hybridft import pipeline
    from hybridft.config import load_config

    out = tmp_path / "run"
    summary = pipeline.run(load_config(None, tiny_overrides(tiny_teacher_dir, tiny_data, out) + ["hybrid.enabled=false"]))
    assert "hybrid" not in summary
    exp = summary["export"]
    assert set(exp) == {"pytorch", "onnx", "onnx_int8"}
    assert exp["onnx"]["within_tolerance"] and exp["onnx"]["prediction_agreement"] == 1.0
    for entry in exp.values():
        assert {"size_mb", "throughput_samples_per_s", "latency_ms_batch1", "accuracy"} <= set(entry)
    assert (out / "export" / "model.onnx").exists() and (out / "export" / "model_int8.onnx").exists()


def test_predict_with_the_exported_onnx_student_matches_pytorch(pair, tmp_path: Path):
    pytest.importorskip("onnxruntime")
    from hybridft.cli import main
    from hybridft.export import export_onnx

    student, teacher, tok = pair
    folder = _model(pair, threshold=0.9).save(tmp_path / "hybrid")
    onnx_path = export_onnx(student, tok, tmp_path / "export")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    outs = []
    for extra in ([], ["--student-onnx", str(onnx_path)]):
        out = tmp_path / f"out{len(outs)}.jsonl"
        assert main(["predict", "--model", str(folder), "--input", str(src), "--output", str(out), "--quiet",
                     *extra]) == 0
        outs.append([json.loads(x) for x in out.read_text().splitlines()])
    assert [(r["label"], r["answered_by"]) for r in outs[0]] == [(r["label"], r["answered_by"]) for r in outs[1]]
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(*outs)) < 1e-4


def test_predict_with_a_single_classifier_folder_reports_no_teacher(pair, tmp_path: Path, capsys, monkeypatch):
    from hybridft import cli
    from hybridft.cli import main

    monkeypatch.setattr(cli, "PREPACK_MIN_ROWS", 2)  # a 6-line file: large enough to prepack

    student, _, tok = pair
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    tok.save_pretrained(folder)
    src = tmp_path / "in.csv"
    src.write_text("text\n" + "".join(f"{t}\n" for t in TEXTS[:5]), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert main(["predict", "--model", str(folder), "--input", str(src), "--output", str(out)]) == 0
    printed = capsys.readouterr()
    assert "wrote 5 rows" in printed.out and "teacher" not in printed.out
    assert "linear weights: student" in printed.err and "teacher" not in printed.err
    assert {json.loads(x)["answered_by"] for x in out.read_text().splitlines()} == {"student"}
    # the same model as a run's teacher/ folder, or a folder of the user's own, is named as what it is
    for name, expected in (("teacher", "teacher"), ("my_classifier", "model")):
        other = shutil.copytree(folder, tmp_path / name)
        assert main(["predict", "--model", str(other), "--input", str(src), "--output", str(out), "--quiet"]) == 0
        assert {json.loads(x)["answered_by"] for x in out.read_text().splitlines()} == {expected}
    # a run's student/ folder reads the text column the run trained on, from the run's config.yaml
    run = tmp_path / "run"
    shutil.copytree(folder, run / "student")
    (run / "config.yaml").write_text("data:\n  text_column: review\n", encoding="utf-8")
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("review\n" + "".join(f"{t}\n" for t in TEXTS[:5]), encoding="utf-8")
    assert main(["predict", "--model", str(run / "student"), "--input", str(reviews), "--output", str(out),
                 "--quiet"]) == 0
    assert len(out.read_text().splitlines()) == 5


def test_predict_prepacks_only_for_files_large_enough_to_win_the_timing_back(pair, tmp_path: Path, capsys,
                                                                              monkeypatch):
    from hybridft import cli
    from hybridft.hybrid import HybridModel

    folder = _model(pair, threshold=0.9).save(tmp_path / "hybrid")
    src = tmp_path / "in.csv"
    src.write_text("text\n" + "".join(f"{t}\n" for t in TEXTS), encoding="utf-8")
    calls = []
    real = HybridModel.prepack
    monkeypatch.setattr(HybridModel, "prepack", lambda self: calls.append(1) or real(self))
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(folder), "--input", str(src), "--output", str(tmp_path / "a.jsonl")]) == 0
    assert calls == [] and "linear weights: plain (under 2,000 input lines" in capsys.readouterr().err
    monkeypatch.setattr(cli, "PREPACK_MIN_ROWS", len(TEXTS))  # a header and len(TEXTS) rows are not fewer
    assert cli.main(["predict", "--model", str(folder), "--input", str(src), "--output", str(tmp_path / "b.jsonl")]) == 0
    assert calls == [1] and "linear weights: student" in capsys.readouterr().err
    labels = [[json.loads(x)["label"] for x in (tmp_path / f).read_text().splitlines()] for f in ("a.jsonl", "b.jsonl")]
    assert labels[0] == labels[1]
    assert cli.fewer_lines_than(str(src), len(TEXTS) + 2) and not cli.fewer_lines_than(str(src), len(TEXTS) + 1)


def test_predict_reads_the_text_column_the_run_trained_on(pair, tmp_path: Path, capsys):
    from hybridft.cli import main

    student, teacher, tok = pair
    folder = hy.HybridModel(student, tok, teacher, tok, LABELS, threshold=0.9, max_length=16,
                            text_column="review").save(tmp_path / "hybrid")
    assert hy.HybridModel.load(folder).text_column == "review"
    src = tmp_path / "in.csv"
    src.write_text("id,review\n" + "".join(f"{i},{t}\n" for i, t in enumerate(TEXTS)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(folder), "--input", str(src), "--output", str(out), "--quiet"]) == 0
    assert len(out.read_text().splitlines()) == len(TEXTS)
    other = tmp_path / "other.csv"  # an explicit --text-column still wins
    other.write_text("body\n" + "".join(f"{t}\n" for t in TEXTS), encoding="utf-8")
    assert main(["predict", "--model", str(folder), "--input", str(other), "--output", str(out), "--quiet",
                 "--text-column", "body"]) == 0
    capsys.readouterr()
    # a run's folder given as the model: the message names the folder to give instead
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "hybrid").symlink_to(folder)
    assert main(["predict", "--model", str(tmp_path / "run"), "--input", str(src), "--output", str(out)]) == 2
    assert f"give {tmp_path / 'run' / 'hybrid'}" in capsys.readouterr().err


@pytest.mark.parametrize("texts, expected", [([None], "texts[0] is not a string (NoneType)"),
                                             (["ok", 3], "texts[1] is not a string (int)"),
                                             (["ok", "  "], "texts[1] is empty"),
                                             (["\ud83d half"], "texts[0] holds a lone UTF-16 surrogate")])
def test_the_python_api_names_the_bad_item(pair, texts, expected):
    from hybridft.errors import HybridFTError

    with pytest.raises(HybridFTError, match=re.escape(expected)):
        _model(pair, threshold=0.9).predict(texts)


def test_a_classification_hybrid_given_to_generate_or_as_one_model_is_named(pair, tmp_path: Path, capsys):
    """The advice was "a run's folder, give .../hybrid/student", which then was "not a causal language model"."""
    from hybridft.cli import main
    from hybridft.models import check_model_folder

    folder = _model(pair, threshold=0.9).save(tmp_path / "hybrid")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    assert main(["generate", "--model", str(folder), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "is a classification hybrid; label texts with `hybridft predict" in capsys.readouterr().err
    with pytest.raises(HybridFTError, match="is a hybrid folder \\(a teacher and a student\\), not one model"):
        check_model_folder(str(folder), "teacher.model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_loading_onto_cuda_without_a_gpu_is_one_clear_error(pair, tmp_path: Path):
    folder = _model(pair, threshold=0.9).save(tmp_path / "hybrid")
    for device in ("cuda", torch.device("cuda")):
        with pytest.raises(HybridFTError, match="no CUDA device is visible; use device='cpu'"):
            hy.HybridModel.load(folder, device=device)
    assert hy.HybridModel.load(folder, device="cpu").device == torch.device("cpu")


def test_hybrid_model_is_importable_from_the_package():
    from hybridft import HybridModel

    assert HybridModel is hy.HybridModel
    with pytest.raises(AttributeError, match="no attribute 'HybridModle'"):
        __import__("hybridft").HybridModle
