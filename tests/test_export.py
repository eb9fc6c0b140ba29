"""ONNX and int8 export on a tiny trained BERT: parity with PyTorch at several batch shapes, the HF seam
(logits_for_loss, measure_speed, the hybrid) on the exported model, and the export report."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from conftest import NEGATIVE, POSITIVE, WORDS, make_bert, make_tokenizer  # noqa: E402
from hybridft import export as ex  # noqa: E402
from hybridft.config import TrainConfig  # noqa: E402
from hybridft.data import Examples  # noqa: E402
from hybridft.errors import HybridFTError  # noqa: E402
from hybridft.evaluate import measure_speed  # noqa: E402
from hybridft.tasks import classification as task  # noqa: E402
from hybridft.train import LossWeights, fit  # noqa: E402

LABELS = ["neg", "pos"]
CPU = torch.device("cpu")


def varied_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Sentiment sentences of 2 to 14 words, so that batches pad and sequence lengths differ."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % 2]
        words = rng.sample(POSITIVE if label == "pos" else NEGATIVE, rng.randint(1, 3))
        words += rng.choices(WORDS[20:], k=rng.randint(1, 11))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def encode(tok, rows) -> list[dict]:
    exs = Examples(texts=[t for t, _ in rows], labels=[LABELS.index(y) for _, y in rows], source="test")
    return task.encode(exs, tok, 32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer tiny BERT trained until its logits are well separated, exported to fp32 and int8 ONNX."""
    folder = tmp_path_factory.mktemp("export")
    tok = make_tokenizer(folder / "tok")
    model = make_bert(layers=2, seed=0)
    model.config.id2label, model.config.label2id = dict(enumerate(LABELS)), {n: i for i, n in enumerate(LABELS)}
    train_items = encode(tok, varied_rows(96, seed=1))
    result = fit(model, train_items, encode(tok, varied_rows(16, seed=2)), collate=task.make_collate(tok),
                 tc=TrainConfig(epochs=20, batch_size=8, lr=3e-3, warmup_ratio=0.0),
                 weights=LossWeights(0.0, 1.0), task=task, device=CPU)
    assert result.best_metric == 1.0, "the tiny model must learn the task for the int8 agreement test to mean much"
    onnx_path = ex.export_onnx(model, tok, folder / "onnx")
    int8_path = ex.quantize_int8(onnx_path, folder / "onnx" / ex.INT8_FILE)
    test_items = encode(tok, varied_rows(32, seed=3))
    return {"model": model, "tok": tok, "fp32": onnx_path, "int8": int8_path, "items": test_items,
            "collate": task.make_collate(tok)}


def test_graph_declares_dynamic_batch_and_sequence(trained):
    onnx_model = ex.OnnxClassifier(trained["fp32"])
    assert onnx_model.input_names == ("input_ids", "attention_mask", "token_type_ids")
    for i in onnx_model.session.get_inputs():
        assert i.shape == ["batch", "sequence"], i
    assert onnx_model.session.get_outputs()[0].shape == ["batch", 2]
    assert onnx_model.config.id2label == {0: "neg", 1: "pos"}
    folder = trained["fp32"].parent
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


@pytest.mark.parametrize("batch_size", [32, 5])
def test_fp32_onnx_matches_pytorch(trained, batch_size: int):
    """32 sentences of 4 to 16 tokens in one padded batch, then in batches of 5 of other lengths: same graph."""
    lengths = {len(it["input_ids"]) for it in trained["items"]}
    assert len(lengths) >= 5, "the test sentences must differ in length"
    result = ex.check_parity(trained["model"], ex.OnnxClassifier(trained["fp32"]), trained["items"],
                             trained["collate"], LABELS, ex.FP32_TOLERANCE, batch_size=batch_size)
    assert result["max_abs_logit_diff"] <= 1e-4
    assert result["prediction_agreement"] == 1.0
    assert result["within_tolerance"] is True
    assert result["accuracy"] >= 0.9


def test_fp32_onnx_matches_pytorch_at_batch_one_and_with_padding(trained):
    model, onnx_model, collate = trained["model"], ex.OnnxClassifier(trained["fp32"]), trained["collate"]
    items = sorted(trained["items"], key=lambda it: len(it["input_ids"]))
    for batch in (collate(items[-1:]), collate(items[:1]), collate(items[::4])):  # longest, shortest, mixed
        with torch.no_grad():
            expected = task.logits_for_loss(model, batch)
        torch.testing.assert_close(task.logits_for_loss(onnx_model, batch), expected, atol=1e-4, rtol=0)


def test_int8_is_smaller_and_keeps_the_predictions(trained):
    assert trained["int8"].stat().st_size < trained["fp32"].stat().st_size
    result = ex.check_parity(trained["model"], ex.OnnxClassifier(trained["int8"]), trained["items"],
                             trained["collate"], LABELS, ex.INT8_TOLERANCE)
    # A real split is judged by INT8_TOLERANCE (>= 99% agreement, <= 1 point of accuracy); on 32 tiny examples
    # one flip is 3%, and whether a near-tie flips depends on the CPU's int8 kernels (AVX2 and AVX-512 differ).
    # What must hold everywhere: only predictions whose fp32 margin is within int8's error can flip.
    assert 0 < result["max_abs_logit_diff"] < 1.0  # lossy, but not broken
    batch = trained["collate"](trained["items"])
    with torch.no_grad():
        fp32 = task.logits_for_loss(trained["model"].eval(), batch)
    int8 = task.logits_for_loss(ex.OnnxClassifier(trained["int8"]), batch)
    margin = (fp32[:, 0] - fp32[:, 1]).abs()
    flipped = fp32.argmax(-1) != int8.argmax(-1)
    assert result["prediction_agreement"] == pytest.approx(1 - flipped.float().mean().item())
    assert bool((margin[flipped] <= 2 * result["max_abs_logit_diff"]).all()), (margin[flipped], result)
    assert result["prediction_agreement"] >= 0.9
    assert result["tolerance"]["max_abs_logit_diff"] is None


def test_onnx_classifier_works_through_the_seam(trained):
    onnx_model = ex.OnnxClassifier(trained["int8"])
    assert onnx_model.to(CPU).eval() is onnx_model  # the nn.Module no-ops measure_speed and predict_logits use
    batch = trained["collate"](trained["items"][:6])
    logits = task.logits_for_loss(onnx_model, batch)  # the batch also carries labels and index: not fed
    assert logits.shape == (6, 2) and logits.dtype == torch.float32
    speed = measure_speed(onnx_model, trained["items"], trained["collate"], CPU, batch_size=8, batches=2,
                          latency_samples=3)
    assert speed["throughput_samples_per_s"] > 0 and speed["latency_ms_batch1"] > 0


def test_graph_without_token_type_ids_gets_only_what_it_declares(trained, tmp_path: Path):
    tok = make_tokenizer(tmp_path / "tok")
    tok.model_input_names = ["input_ids", "attention_mask"]  # like a DistilBERT tokenizer
    path = ex.export_onnx(trained["model"], tok, tmp_path / "no-segments")
    onnx_model = ex.OnnxClassifier(path)
    assert onnx_model.input_names == ("input_ids", "attention_mask")
    batch = trained["collate"](trained["items"][:8])  # has token_type_ids: must be left out, not passed on
    with torch.no_grad():
        expected = task.logits_for_loss(trained["model"], batch)
    torch.testing.assert_close(task.logits_for_loss(onnx_model, batch), expected, atol=1e-4, rtol=0)


def test_the_hybrid_runs_on_the_exported_student(trained):
    from hybridft.hybrid import HybridModel

    teacher = make_bert(layers=1, seed=4)
    texts = [it_text for it_text, _ in varied_rows(12, seed=5)]
    onnx_student, tok = ex.load_exported(trained["fp32"].parent)
    with torch.no_grad():  # a threshold at the median confidence: half the rows go to the teacher
        batch = trained["collate"](encode(tok, [(t, "pos") for t in texts]))
        threshold = float(task.logits_for_loss(trained["model"], batch).softmax(-1).max(-1).values.median())
    results = []
    for student in (trained["model"], onnx_student):
        hybrid = HybridModel(student, tok, teacher, trained["tok"], LABELS, threshold=threshold, max_length=32)
        results.append(hybrid.predict(texts))
    torch_run, onnx_run = results
    assert onnx_run.answered_by == torch_run.answered_by
    assert {"student", "teacher"} == set(onnx_run.answered_by)
    assert torch.equal(onnx_run.label_ids, torch_run.label_ids)
    torch.testing.assert_close(onnx_run.probs, torch_run.probs, atol=1e-4, rtol=0)


def test_export_student_reports_all_three(trained, tmp_path: Path):
    out = tmp_path / "export"
    report = ex.export_student(trained["model"], trained["tok"], out, trained["items"], LABELS, CPU,
                               speed_batches=1, latency_samples=2)
    assert set(report) == {"pytorch", "onnx", "onnx_int8"}
    for entry in report.values():
        for key in ("size_mb", "throughput_samples_per_s", "latency_ms_batch1", "accuracy", "macro_f1", "device"):
            assert key in entry
    for key in ("onnx", "onnx_int8"):
        for k in ("max_abs_logit_diff", "prediction_agreement", "tolerance", "within_tolerance", "file"):
            assert k in report[key]
        assert (out / report[key]["file"]).is_file()
    assert report["onnx"]["within_tolerance"] and report["onnx"]["max_abs_logit_diff"] <= 1e-4
    assert report["onnx_int8"]["prediction_agreement"] >= 0.9  # near-ties may flip (see the int8 test above)
    assert report["pytorch"]["accuracy"] == report["onnx"]["accuracy"]
    json.dumps(report)  # ready for summary.json
    assert not (tmp_path / "export.tmp").exists()
    ex.load_exported(out, int8=True)  # the folder is self-contained


def test_parity_judges_logits_flips_and_accuracy():
    reference = torch.tensor([[2.0, 0.0], [0.1, 0.0], [0.0, 3.0], [1.0, 0.0]])
    candidate = torch.tensor([[2.0, 0.0], [0.0, 0.1], [0.0, 3.0], [1.0, 0.0]])  # one near-tie flipped
    labels = torch.tensor([0, 0, 1, -100])  # the unlabeled row counts for agreement, not accuracy
    r = ex.parity_from_logits(reference, candidate, labels, LABELS, ex.FP32_TOLERANCE)
    assert r["prediction_agreement"] == 0.75
    assert r["max_abs_logit_diff"] == pytest.approx(0.1)
    assert r["max_flipped_margin"] == pytest.approx(0.1)
    assert r["accuracy"] == pytest.approx(2 / 3) and r["accuracy_drop"] == pytest.approx(1 / 3)
    assert r["within_tolerance"] is False
    loose = ex.Tolerance(max_abs_logit_diff=None, min_agreement=0.75, max_accuracy_drop=0.5)
    assert ex.parity_from_logits(reference, candidate, labels, LABELS, loose)["within_tolerance"] is True
    same = ex.parity_from_logits(reference, reference, labels, LABELS, ex.FP32_TOLERANCE)
    assert same["within_tolerance"] is True and same["max_flipped_margin"] == 0.0


def test_missing_onnxruntime_names_the_extra(trained, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(HybridFTError, match=r"hybridft\[export\]"):
        ex.OnnxClassifier(trained["fp32"])


def test_unusable_model_files_are_user_errors(tmp_path: Path, trained):
    with pytest.raises(HybridFTError, match="not found"):
        ex.OnnxClassifier(tmp_path / "nothing.onnx")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((trained["fp32"].parent / "config.json").read_text())
    (broken / "model.onnx").write_text("not a graph")
    with pytest.raises(HybridFTError, match="cannot load"):
        ex.OnnxClassifier(broken)
