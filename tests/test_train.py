"""The training loop and the pipeline on tiny in-process models: equivalent settings give equal updates, the
teacher never changes, stored teacher outputs are reused and invalidated correctly, and it learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_bert, make_tokenizer, sentiment_rows, tiny_overrides
from hybridft import pipeline, train
from hybridft.batching import SortedSplitBatches, length_sorted_loader
from hybridft.config import TrainConfig, load_config
from hybridft.data import Examples
from hybridft.tasks import classification as task
from hybridft.train import LossWeights, fit

LABELS = ["neg", "pos"]


def _items(tok, n: int, with_teacher: bool = True, unlabeled_every: int = 0):
    rows = sentiment_rows(n, seed=5)
    labels = [LABELS.index(y) for _, y in rows]
    if unlabeled_every:
        labels = [-100 if i % unlabeled_every == 0 else y for i, y in enumerate(labels)]
    ex = Examples(texts=[t for t, _ in rows], labels=labels, source="test")
    teacher_logits = torch.randn(n, 2, generator=torch.Generator().manual_seed(1)) * 2 if with_teacher else None
    return task.encode(ex, tok, 16, teacher_logits=teacher_logits)


def _fit_once(tok, items, batch_size: int, grad_accum: int):
    model = make_bert(layers=2, seed=3)
    tc = TrainConfig(epochs=1, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, warmup_ratio=0.0,
                     max_grad_norm=None, weight_decay=0.0)
    fit(model, items, items[:4], collate=task.make_collate(tok), tc=tc, weights=LossWeights(0.5, 0.5, 2.0),
        task=task, device=torch.device("cpu"), seed=7)
    return model


def test_batch8_accum1_equals_batch4_accum2(tmp_path: Path):
    tok = make_tokenizer(tmp_path / "tok")
    # Uneven label counts per micro-batch (some rows unlabeled): a mean of per-micro-batch means would differ.
    items = _items(tok, 8, unlabeled_every=3)
    a = _fit_once(tok, items, batch_size=8, grad_accum=1).state_dict()
    b = _fit_once(tok, items, batch_size=4, grad_accum=2).state_dict()
    start = make_bert(layers=2, seed=3).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a), "one optimizer step must change the weights"
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5, msg=k)


def test_sorted_split_steps_are_the_shuffled_steps_sorted_and_cut():
    from torch.utils.data import BatchSampler, RandomSampler

    lengths = [int(x) for x in torch.randint(1, 60, (50,), generator=torch.Generator().manual_seed(0))]
    batch_size, accum, splits = 4, 2, 3  # steps of 8 rows, 6 passes each; 50 rows: 6 full steps and 2 rows left
    sampler = SortedSplitBatches(lengths, batch_size, accum, splits, torch.Generator().manual_seed(11))
    pieces = list(sampler)
    assert len(pieces) == len(sampler) == 6 * 6 + 2
    plain = list(BatchSampler(RandomSampler(range(50), generator=torch.Generator().manual_seed(11)), 8, False))
    for s, rows in enumerate(plain):
        step = pieces[6 * s: 6 * s + 6]
        assert sorted(i for p in step for i in p) == sorted(rows)  # the same uniform draw as plain shuffling
        flat = [lengths[i] for p in step for i in p]
        assert flat == sorted(flat)  # shortest rows first, so each pass pads to little more than its own rows
        assert max(map(len, step)) - min(map(len, step)) <= 1
    assert sorted(i for p in pieces for i in p) == list(range(50))


def test_auto_length_splits_split_only_where_it_saves_padding():
    tc = TrainConfig(batch_size=32)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    varied = [int(x) for x in torch.randint(3, 64, (500,), generator=torch.Generator().manual_seed(0))]
    articles = [128] * 480 + [90] * 20  # long texts cut at max_length: nearly every row has one length
    assert train.length_splits(tc, cpu, varied) == train.CPU_LENGTH_SPLITS
    assert train.length_splits(tc, cpu, articles) == 1
    assert train.length_splits(tc, gpu, varied) == 1
    assert train.length_splits(tc, cpu, varied, "bf16") == 1  # autocast's per-pass casts cost more than padding
    assert train.length_splits(TrainConfig(length_splits=3), gpu, articles) == 3  # an explicit number is kept
    assert train.length_splits(TrainConfig(batch_size=16), cpu, varied) <= 2  # passes keep at least 8 rows
    assert train.length_splits(TrainConfig(batch_size=8), cpu, varied) == 1
    assert train.padded_tokens(articles, 32, 1) == 64 * 32 * 128


def test_length_splits_leave_the_update_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Plain SGD: the update is the gradient itself (AdamW's first step would magnify float noise)
    monkeypatch.setattr(train, "make_optimizer", lambda model, lr, wd: torch.optim.SGD(model.parameters(), lr=lr))
    tok = make_tokenizer(tmp_path / "tok")
    rows = sentiment_rows(24, seed=5)
    texts = [t + " very" * (i % 5) for i, (t, _) in enumerate(rows)]  # lengths differ, so the passes pad differently
    labels = [-100 if i % 3 == 0 else LABELS.index(y) for i, (_, y) in enumerate(rows)]
    logits = torch.randn(24, 2, generator=torch.Generator().manual_seed(1))
    items = task.encode(Examples(texts=texts, labels=labels, source="test"), tok, 16, teacher_logits=logits)
    assert len({len(it["input_ids"]) for it in items}) > 2
    finals = []
    for splits in (1, 4):
        model = make_bert(layers=2, seed=3)
        tc = TrainConfig(epochs=2, batch_size=8, lr=1e-1, warmup_ratio=0.0, max_grad_norm=None, weight_decay=0.0,
                         group_by_length=False, length_splits=splits)
        fit(model, items, items[:4], collate=task.make_collate(tok), tc=tc, weights=LossWeights(0.5, 0.5, 2.0),
            task=task, device=torch.device("cpu"), seed=7)
        finals.append(model.state_dict())
    start = make_bert(layers=2, seed=3).state_dict()
    assert any(not torch.equal(finals[0][k], start[k]) for k in start)
    for k in start:
        torch.testing.assert_close(finals[0][k], finals[1][k], atol=2e-6, rtol=1e-5, msg=k)


def test_teacher_is_frozen_and_never_in_the_optimizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    tok = make_tokenizer(tmp_path / "tok")
    teacher, student = make_bert(layers=2, seed=1), make_bert(layers=1, seed=2)
    teacher.train()  # fit must put it in eval mode itself
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []
    real = train.make_optimizer

    def spy(model, lr, wd):
        opt = real(model, lr, wd)
        seen.append({id(p) for g in opt.param_groups for p in g["params"]})
        return opt

    monkeypatch.setattr(train, "make_optimizer", spy)
    items = _items(tok, 16, with_teacher=False)
    fit(student, items, items[:4], collate=task.make_collate(tok), tc=TrainConfig(epochs=2, batch_size=4, lr=1e-2),
        weights=LossWeights(0.5, 0.5, 2.0), task=task, device=torch.device("cpu"), teacher=teacher)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(id(p) not in seen[0] for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()), "teacher weights changed"


def test_tiny_student_overfits_a_tiny_set(tmp_path: Path):
    tok = make_tokenizer(tmp_path / "tok")
    items = _items(tok, 16, with_teacher=False)
    model = make_bert(layers=1, seed=0)
    result = fit(model, items, items, collate=task.make_collate(tok),
                 tc=TrainConfig(epochs=30, batch_size=8, lr=3e-3, warmup_ratio=0.0),
                 weights=LossWeights(0.0, 1.0), task=task, device=torch.device("cpu"))
    assert result.best_metric == 1.0


def test_a_validation_tie_keeps_the_earlier_or_the_later_weights_as_configured(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch):
    tok = make_tokenizer(tmp_path / "tok")
    items = _items(tok, 16)

    def validate(*args, **kwargs):
        return {"accuracy": next(accuracies), "macro_f1": 0.0}

    monkeypatch.setattr(task, "validate", validate)
    kept = {}
    for rule in ("earlier", "later"):
        accuracies = iter([0.5, 0.75, 0.5, 0.75, 0.25])  # the best, 0.75, at the 2nd and 4th evaluations
        result = fit(make_bert(layers=1, seed=0), items, items[:4], collate=task.make_collate(tok),
                     tc=TrainConfig(epochs=5, batch_size=8, lr=1e-2, best_on_tie=rule),
                     weights=LossWeights(0.5, 0.5, 2.0), task=task, device=torch.device("cpu"))
        assert result.best_metric == 0.75
        kept[rule] = result.best_step
    assert kept == {"earlier": 4, "later": 8}  # 2 steps an epoch


def test_best_metric_loss_keeps_the_lowest_validation_loss_and_accuracy_the_highest_accuracy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    tok = make_tokenizer(tmp_path / "tok")
    items = _items(tok, 16)

    def validate(*args, **kwargs):
        return next(metrics)

    monkeypatch.setattr(task, "validate", validate)
    kept = {}
    for key in ("loss", "accuracy", None):  # None: the task's own, accuracy for classification
        # accuracy peaks at the 2nd evaluation; the cross-entropy is lowest at the 4th, where accuracy ties
        metrics = iter([{"accuracy": a, "macro_f1": 0.0, "loss": l}
                        for a, l in ((0.5, 0.7), (0.75, 0.6), (0.5, 0.55), (0.75, 0.4), (0.25, 0.9))])
        result = fit(make_bert(layers=1, seed=0), items, items[:4], collate=task.make_collate(tok),
                     tc=TrainConfig(epochs=5, batch_size=8, lr=1e-2, best_metric=key),
                     weights=LossWeights(0.5, 0.5, 2.0), task=task, device=torch.device("cpu"))
        kept[key] = (result.best_key, result.best_step, result.best_metric)
    assert kept == {"loss": ("loss", 8, 0.4), "accuracy": ("accuracy", 4, 0.75), None: ("accuracy", 4, 0.75)}


def test_a_resumed_fit_goes_on_choosing_by_its_checkpoints_metric(tmp_path: Path, capsys):
    """A checkpoint whose best weights were chosen by accuracy (every checkpoint before best_metric existed) is not
    compared with a loss: the resumed fit keeps choosing by accuracy, and says so."""
    import shutil

    from hybridft.checkpoint import latest_checkpoint

    tok = make_tokenizer(tmp_path / "tok")
    items = _items(tok, 16)
    folder = tmp_path / "ckpt"
    common = dict(collate=task.make_collate(tok), weights=LossWeights(0.5, 0.5, 2.0), task=task,
                  device=torch.device("cpu"), checkpoint_dir=folder)
    fit(make_bert(layers=1, seed=0), items, items[:4], tc=TrainConfig(epochs=2, batch_size=8, best_metric="accuracy",
                                                                     keep_checkpoints=5), **common)
    shutil.rmtree(latest_checkpoint(folder))  # as if killed during the second epoch
    capsys.readouterr()
    result = fit(make_bert(layers=1, seed=0), items, items[:4], resume=True,
                 tc=TrainConfig(epochs=2, batch_size=8, best_metric="loss", keep_checkpoints=5), **common)
    assert result.resumed_step == 2 and result.best_key == "accuracy"
    assert "chose its best weights by validation accuracy" in capsys.readouterr().err


def test_classification_validation_reports_the_mean_cross_entropy(tmp_path: Path):
    tok = make_tokenizer(tmp_path / "tok")
    items = _items(tok, 12)
    model = make_bert(layers=1, seed=0)
    loader = length_sorted_loader(items, 4, task.make_collate(tok))
    logits, labels = task.predict_logits(model, loader, torch.device("cpu"))
    metrics = task.validate(model, loader, torch.device("cpu"))
    expected = -logits.log_softmax(-1).gather(1, labels[:, None]).mean()
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_gradient_accumulation_counts_steps_and_logs_each_term(tmp_path: Path):
    from hybridft.runlog import MetricsWriter, read_metrics

    tok = make_tokenizer(tmp_path / "tok")
    items = _items(tok, 20, unlabeled_every=4)
    writer = MetricsWriter(tmp_path / "m.jsonl")
    result = fit(make_bert(layers=1), items, items[:4], collate=task.make_collate(tok),
                 tc=TrainConfig(epochs=2, batch_size=4, grad_accum=2, log_every=1),
                 weights=LossWeights(0.5, 0.5, 2.0), task=task, device=torch.device("cpu"), writer=writer)
    assert result.steps == 6  # 5 micro-batches per epoch -> 3 optimizer steps per epoch
    rows = read_metrics(tmp_path / "m.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for r in train_rows:
        assert {"loss", "kd", "ce", "agreement", "lr"} <= set(r)
        assert r["loss"] == pytest.approx(0.5 * r["kd"] + 0.5 * r["ce"], rel=1e-5)
    assert [r["epoch"] for r in rows if r["split"] == "validation"] == [1.0, 2.0]


def _run(tmp_path: Path, teacher_dir: Path, data, name: str, *extra: str):
    cfg = load_config(None, tiny_overrides(teacher_dir, data, tmp_path / name) + list(extra))
    return pipeline.run(cfg)


def test_pipeline_end_to_end_learns_and_writes_hf_folders(tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    from transformers import AutoModelForSequenceClassification

    summary = _run(tmp_path, tiny_teacher_dir, tiny_data, "run")
    out = tmp_path / "run"
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "teacher_outputs.safetensors",
                 "teacher/model.safetensors", "student/model.safetensors", "student/tokenizer.json"):
        assert (out / name).exists(), name
    on_disk = json.loads((out / "summary.json").read_text())
    for who in ("teacher", "student"):
        for key in ("accuracy", "macro_f1", "params", "throughput_samples_per_s", "latency_ms_batch1"):
            assert key in on_disk[who], (who, key)
        model = AutoModelForSequenceClassification.from_pretrained(out / who)
        assert model.config.id2label == {0: "neg", 1: "pos"}
    assert summary["teacher"]["accuracy"] >= 0.9, "the tiny teacher should learn the word-sentiment task"
    assert summary["student"]["accuracy"] >= 0.8
    # 2 of 4 layers: a little over half of the non-embedding parameters (pooler and head are shared).
    assert summary["student"]["params_non_embedding"] < 0.6 * summary["teacher"]["params_non_embedding"]
    assert AutoModelForSequenceClassification.from_pretrained(out / "student").config.num_hidden_layers == 2
    assert len(summary["student"]["confusion_matrix"]) == 2
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"teacher", "student"}


def count_teacher_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of examples of each teacher-output computation (`pipeline.compute`), appended as they run."""
    calls: list[int] = []
    real = pipeline.compute

    def counting(teacher, items, *args, **kwargs):
        calls.append(len(items))
        return real(teacher, items, *args, **kwargs)

    monkeypatch.setattr(pipeline, "compute", counting)
    return calls


def test_teacher_outputs_are_reused_and_invalidated(tmp_path: Path, tiny_teacher_dir: Path, tiny_data,
                                                    monkeypatch: pytest.MonkeyPatch):
    calls = count_teacher_passes(monkeypatch)
    _run(tmp_path, tiny_teacher_dir, tiny_data, "a")
    # the store's pass over the 48 training rows, then the teacher's pass over the 16 validation rows that the
    # student's weights are chosen by (best_metric auto = kl), which is not stored
    assert calls == [48, 16]
    monkeypatch.setattr(pipeline, "student_best_metric", lambda *a: "loss")  # from here on, the store's passes only
    del calls[1:]
    _run(tmp_path, tiny_teacher_dir, tiny_data, "b")  # same teacher, data and tokenisation: reused
    assert calls == [48]
    a = (tmp_path / "a" / "teacher_outputs.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "teacher_outputs.safetensors").read_bytes()
    _run(tmp_path, tiny_teacher_dir, tiny_data, "c", "teacher.train.lr=2e-3")  # a different teacher
    assert calls == [48, 48]
    _run(tmp_path, tiny_teacher_dir, tiny_data, "d", "data.max_train_samples=40")  # different data
    assert calls == [48, 48, 40]
    _run(tmp_path, tiny_teacher_dir, tiny_data, "e", "data.max_length=12")  # different tokenisation
    assert len(calls) == 4


def test_distill_from_an_external_store_needs_no_teacher_weights(tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    """Logits computed elsewhere (here: a rule) are enough; the student comes from a config."""
    from hybridft.data import load_splits
    from hybridft.teacher_outputs import write_store

    cfg = load_config(None, tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / "x"))
    splits = load_splits(cfg.data, 0)
    logits = torch.tensor([[-3.0, 3.0] if y == 1 else [3.0, -3.0] for y in splits.train.labels])
    store = write_store(tmp_path / "ext.safetensors", splits.train.keys(), logits, splits.label_names)
    config_only = tmp_path / "student-config"
    make_tokenizer(config_only).save_pretrained(config_only)
    make_bert(layers=1).config.save_pretrained(config_only)
    summary = _run(tmp_path, tmp_path / "missing-teacher", tiny_data, "ext", f"distill.teacher_logits={store}",
                   f"student.model={config_only / 'config.json'}",
                   "student.num_layers=null")
    assert "teacher" not in summary
    assert summary["student"]["accuracy"] >= 0.8


def test_sequential_strategy_and_pseudo_labels_run(tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    unl = tmp_path / "unl.csv"
    unl.write_text("text\n" + "".join(f"{t}\n" for t, _ in sentiment_rows(24, seed=9)), encoding="utf-8")
    summary = _run(tmp_path, tiny_teacher_dir, tiny_data, "seq", "loss.strategy=sequential",
                   f"data.unlabeled={unl}", "loss.pseudo_label_threshold=0.6", "loss.sequential_ce_epochs=2")
    stages = {json.loads(x)["stage"] for x in (tmp_path / "seq" / "metrics.jsonl").read_text().splitlines()}
    assert {"student-kd", "student-ce"} <= stages
    assert summary["student"]["accuracy"] >= 0.8


def test_labels_alone_leave_unlabeled_rows_out_of_the_store_and_the_student_s_epochs(
        tmp_path: Path, tiny_teacher_dir: Path, tiny_data, monkeypatch: pytest.MonkeyPatch):
    """With loss.alpha=0 and no pseudo-labels an unlabeled row reaches no loss term: it would cost a teacher pass
    and a student pass every epoch for nothing (and shrink every batch's labelled share)."""
    calls = count_teacher_passes(monkeypatch)
    unl = tmp_path / "unl.csv"
    unl.write_text("text\n" + "".join(f"{t}\n" for t, _ in sentiment_rows(24, seed=9)), encoding="utf-8")
    alone = _run(tmp_path, tiny_teacher_dir, tiny_data, "alone", f"data.unlabeled={unl}", "loss.alpha=0",
                 "loss.beta=1", "augment.factor=auto")
    assert alone["transfer_set"]["unlabeled"] == 0 and alone["transfer_set"]["generated"] == 0
    # the teacher labelled the training rows only (and, the student learning from labels alone, its weights are
    # chosen by validation loss: no teacher pass over validation)
    assert calls == [alone["transfer_set"]["labeled"]]
    kd = _run(tmp_path, tiny_teacher_dir, tiny_data, "kd", f"data.unlabeled={unl}")
    # the store's pass, then the validation pass that the student's weights are chosen by (kl)
    assert kd["transfer_set"]["unlabeled"] == 24 and calls[1:] == [alone["transfer_set"]["labeled"] + 24, 16]
    steps = {name: max(json.loads(x).get("step", 0) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines())
             for name in ("alone", "kd")}
    assert steps["alone"] < steps["kd"]  # 8 epochs of the labelled rows, not of labelled + unlabeled


def test_student_with_a_different_tokenizer_learns_from_the_teachers_outputs(tmp_path: Path, tiny_teacher_dir: Path,
                                                                             tiny_data):
    """Stored logits are keyed by text, so a student with another vocabulary needs no shared token ids."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from conftest import WORDS

    other = tmp_path / "other-student"
    other.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "extra", "tokens", *reversed(WORDS)]
    (other / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(other))
    teacher_tok = BertTokenizerFast.from_pretrained(str(tiny_teacher_dir))
    assert tok("good film")["input_ids"] != teacher_tok("good film")["input_ids"]
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     max_position_embeddings=64))
    model.save_pretrained(other)
    tok.save_pretrained(other)
    summary = _run(tmp_path, tiny_teacher_dir, tiny_data, "other", f"student.model={other}",
                   "student.num_layers=null")
    assert summary["student"]["accuracy"] >= 0.8


def test_same_seed_and_config_give_identical_metrics_twice(tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    from hybridft.runlog import read_metrics

    runs = []
    for name in ("one", "two"):
        # separate teacher-output caches, so the second run recomputes rather than reuses
        _run(tmp_path, tiny_teacher_dir, tiny_data, name, f"distill.cache_dir={tmp_path / name / 'cache'}",
             "export.enabled=false")
        runs.append(read_metrics(tmp_path / name / "metrics.jsonl"))
    assert len(runs[0]) > 10
    assert runs[0] == runs[1]
    a = json.loads((tmp_path / "one" / "summary.json").read_text())
    b = json.loads((tmp_path / "two" / "summary.json").read_text())
    for who in ("teacher", "student", "hybrid"):
        assert a[who]["accuracy"] == b[who]["accuracy"] and a[who]["macro_f1"] == b[who]["macro_f1"]


def test_student_dropout_reaches_every_dropout_and_the_saved_config(tmp_path: Path):
    from hybridft.models import set_dropout

    model = make_bert(layers=2, dropout=0.3)
    model.train()
    ids = torch.tensor([[2, 5, 6, 7, 8, 3]])
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits), "dropout 0.3 should vary"
    changed = set_dropout(model, 0.0)
    assert changed > 0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    # no dropout left anywhere (attention included): training-mode forwards are deterministic
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_student_dropout_setting_is_applied_and_saved(tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    from transformers import AutoConfig

    from hybridft.errors import HybridFTError

    with pytest.raises(HybridFTError, match="student.dropout"):
        load_config(None, [*tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / "bad"), "student.dropout=1"])
    cfg = load_config(None, [*tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / "run"), "student.dropout=0.2",
                             "student.train.epochs=1", "teacher.train.epochs=1", "hybrid.enabled=false",
                             "export.enabled=false"])
    pipeline.run(cfg)
    saved = AutoConfig.from_pretrained(tmp_path / "run" / "student")
    assert saved.hidden_dropout_prob == 0.2 and saved.attention_probs_dropout_prob == 0.2
    assert AutoConfig.from_pretrained(tmp_path / "run" / "teacher").hidden_dropout_prob == 0.0  # the teacher's own


def test_auto_student_dropout_is_off_with_a_teacher_and_the_models_own_without(tmp_path: Path, tiny_teacher_dir: Path,
                                                                                tiny_data):
    base = tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / "run")
    assert load_config(None, base).student.dropout == "auto"
    assert pipeline.student_dropout(load_config(None, base)) == 0.0  # KD (alpha 0.5): no dropout
    assert pipeline.student_dropout(load_config(None, [*base, "loss.alpha=0", "loss.beta=1"])) is None  # labels alone
    assert pipeline.student_dropout(load_config(None, [*base, "student.dropout=0.3"])) == 0.3
    assert pipeline.student_dropout(load_config(None, [*base, "student.dropout=null"])) is None


def test_classification_validation_reports_the_kl_to_the_teacher_when_the_items_carry_its_logits(tmp_path: Path):
    tok = make_tokenizer(tmp_path / "tok")
    items = _items(tok, 12)  # each item carries a teacher_logits row
    model = make_bert(layers=1, seed=0)
    loader = length_sorted_loader(items, 4, task.make_collate(tok))  # batches in length order, not item order
    student, _ = task.predict_logits(model, loader, torch.device("cpu"))
    teacher = torch.stack([it["teacher_logits"] for it in items])
    # KL(teacher || student) per example, summed over classes, averaged over examples, at T=1
    expected = (teacher.softmax(-1) * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum(-1).mean()
    assert task.validate(model, loader, torch.device("cpu"))["kl"] == pytest.approx(float(expected), rel=1e-5)
    plain = [{k: v for k, v in it.items() if k != "teacher_logits"} for it in items]
    assert "kl" not in task.validate(model, length_sorted_loader(plain, 4, task.make_collate(tok)), torch.device("cpu"))


def test_best_metric_kl_keeps_the_lowest_kl_and_needs_the_teachers_validation_logits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from hybridft.errors import HybridFTError

    tok = make_tokenizer(tmp_path / "tok")
    items = _items(tok, 16)
    common = dict(collate=task.make_collate(tok), weights=LossWeights(0.5, 0.5, 2.0), task=task,
                  device=torch.device("cpu"))
    plain = [{k: v for k, v in it.items() if k != "teacher_logits"} for it in items[:4]]
    with pytest.raises(HybridFTError, match="best_metric=kl is not among the validation metrics"):
        fit(make_bert(layers=1, seed=0), items, plain, tc=TrainConfig(epochs=1, batch_size=8, best_metric="kl"),
            **common)
    # the loss is lowest at the 4th evaluation, the KL at the 3rd: kl chooses the 3rd
    metrics = iter([{"accuracy": 0.5, "macro_f1": 0.0, "loss": l, "kl": k}
                    for l, k in ((0.7, 0.3), (0.6, 0.2), (0.55, 0.1), (0.4, 0.25), (0.9, 0.5))])
    monkeypatch.setattr(task, "validate", lambda *a, **k: next(metrics))
    result = fit(make_bert(layers=1, seed=0), items, items[:4],
                 tc=TrainConfig(epochs=5, batch_size=8, best_metric="kl"), **common)
    assert (result.best_key, result.best_step, result.best_metric) == ("kl", 6, 0.1)


def test_a_run_with_best_metric_kl_keeps_the_student_closest_to_its_teacher_on_validation(
        tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hybridft.data import load_splits

    run = tmp_path / "run"
    cfg = load_config(None, [*tiny_overrides(tiny_teacher_dir, tiny_data, run), "student.train.best_metric=kl",
                             "teacher.train.epochs=2", "student.train.epochs=4", "hybrid.enabled=false",
                             "export.enabled=false"])
    pipeline.run(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in rows if r.get("split") == "validation"]
    student_kl = [r["kl"] for r in validation if r["stage"] == "student"]
    assert len(student_kl) == 4 and all(k >= 0 for k in student_kl)
    assert not any("kl" in r for r in validation if r["stage"] == "teacher")  # no teacher to compare the teacher to
    # the saved student is the evaluation with the lowest KL: scored again against the saved teacher, it gives it
    splits = load_splits(cfg.data, cfg.seed)
    tok = AutoTokenizer.from_pretrained(run / "student")
    teacher = AutoModelForSequenceClassification.from_pretrained(run / "teacher")
    student = AutoModelForSequenceClassification.from_pretrained(run / "student")
    collate = task.make_collate(tok)
    items = task.encode(splits.validation, tok, cfg.data.max_length)
    teacher_logits, _ = task.predict_logits(teacher, length_sorted_loader(items, 8, collate), torch.device("cpu"))
    items = task.encode(splits.validation, tok, cfg.data.max_length, teacher_logits)
    kl = task.validate(student, length_sorted_loader(items, 8, collate), torch.device("cpu"))["kl"]
    assert kl == pytest.approx(min(student_kl), rel=1e-4, abs=1e-6)
