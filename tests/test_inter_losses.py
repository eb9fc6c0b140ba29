"""Intermediate-layer distillation (issue 10): golden values of the two terms on hand-made tensors, the attention
recomputation against transformers' own attention weights, gradient accumulation, the learned width projection, an
end-to-end run that learns, and the config refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import WORDS, make_bert, make_tokenizer, sentiment_rows, tiny_overrides
from hybridft import inter_losses
from hybridft.config import TrainConfig, load_config
from hybridft.data import Examples
from hybridft.errors import HybridFTError
from hybridft.inter_losses import attention_kl_sum, hidden_mse_sum
from hybridft.models import student_from_teacher
from hybridft.tasks import classification as task
from hybridft.train import LossWeights, fit

LABELS = ["neg", "pos"]


# ---------------------------------------------------------------------------------------------------
# golden values


def test_hidden_mse_averages_real_tokens_units_and_pairs():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    teacher = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [99.0, 99.0]],
                            [[0.0, 3.0], [50.0, 50.0], [-7.0, 7.0]]])  # [B=2, T=3, d=2]; 99, 50, 7 are padding
    student = torch.zeros_like(teacher)
    # real tokens: mean over units (1 + 1) / 2 = 1, (4 + 0) / 2 = 2, (0 + 9) / 2 = 4.5 -> sum 7.5
    assert hidden_mse_sum([student], [teacher], mask).item() == pytest.approx(7.5)
    # a second pair that matches exactly halves the per-token mean over pairs
    assert hidden_mse_sum([student, teacher], [teacher, teacher], mask).item() == pytest.approx(3.75)
    assert hidden_mse_sum([teacher], [teacher], mask).item() == 0.0


def test_attention_kl_sums_over_real_keys_and_averages_heads():
    mask = torch.tensor([[1, 1, 0]])
    big = 10.0  # the padding key's score: it would take almost all the mass if it were not left out
    teacher = torch.tensor([0.5, 0.5]).log()
    student = torch.tensor([0.25, 0.75]).log()

    def scores(row0: torch.Tensor, row1: torch.Tensor) -> torch.Tensor:  # [1, H=2, T=3, T=3]
        out = torch.full((1, 2, 3, 3), 3.0)  # query 2 is padding: any values
        out[0, 0, :2, :2], out[0, 1, :2, :2] = row0, row1
        out[..., 2] = big
        return out

    t = scores(teacher, teacher)
    s = scores(student, teacher)  # head 0 differs, head 1 matches
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    # 2 real queries x mean over 2 heads of (kl, 0)
    assert attention_kl_sum(s, t, mask).item() == pytest.approx(2 * kl / 2, rel=1e-6)
    reference = torch.nn.functional.kl_div(student, teacher, reduction="sum", log_target=True)
    assert reference.item() == pytest.approx(kl, rel=1e-6)
    assert attention_kl_sum(t, t, mask).item() == pytest.approx(0.0, abs=1e-7)
    # gradients stay finite although the padding key gets no probability at all
    s.requires_grad_(True)
    attention_kl_sum(s, t, mask).backward()
    assert torch.isfinite(s.grad).all() and s.grad[..., 2].abs().max() == 0


def test_recomputed_attention_equals_transformers_attention_weights():
    model = make_bert(layers=3, dropout=0.1).eval()
    model.set_attn_implementation("eager")  # the only kernel that returns attention weights
    ids = torch.tensor([[2, 5, 6, 7, 3, 0, 0], [2, 8, 9, 10, 11, 12, 3]])
    mask = (ids != 0).long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        scores = inter_losses.attention_scores(inter_losses.last_self_attention(model, "teacher"), out.hidden_states[-2])
    probs = scores.masked_fill(~mask.bool()[:, None, None, :], -1e9).softmax(-1)
    real = mask.bool()
    torch.testing.assert_close(probs[real[:, None, :, None].expand_as(probs) & real[:, None, None, :].expand_as(probs)],
                               out.attentions[-1][real[:, None, :, None].expand_as(probs)
                                                  & real[:, None, None, :].expand_as(probs)], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# the training loop


def _items(tok, n: int):
    rows = sentiment_rows(n, seed=5)
    labels = [-100 if i % 3 == 0 else LABELS.index(y) for i, (_, y) in enumerate(rows)]
    texts = [t + " very" * (i % 4) for i, (t, _) in enumerate(rows)]  # lengths differ: so do micro-batch token counts
    ex = Examples(texts=texts, labels=labels, source="test")
    return task.encode(ex, tok, 16, teacher_logits=torch.randn(n, 2, generator=torch.Generator().manual_seed(1)))


def _fit_once(tok, items, batch_size: int, grad_accum: int):
    teacher = make_bert(layers=4, seed=1)
    student = student_from_teacher(teacher, [0, 3])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    inter = inter_losses.build(student, teacher, [0, 3], hidden_weight=1.0, attention_weight=1.0, same_tokenizer=True)
    tc = TrainConfig(epochs=1, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, warmup_ratio=0.0,
                     max_grad_norm=None, weight_decay=0.0)
    fit(student, items, items[:4], collate=task.make_collate(tok), tc=tc, weights=LossWeights(0.5, 0.5, 2.0),
        task=task, device=torch.device("cpu"), seed=7, inter=inter)
    assert not teacher.training and all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    return student, student_from_teacher(make_bert(layers=4, seed=1), [0, 3])


def test_accumulated_micro_batches_equal_one_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from hybridft import train

    # Plain SGD: the update is the gradient itself (AdamW's first step, g / (|g| + eps), turns float noise in a
    # near-zero gradient into a visible difference)
    monkeypatch.setattr(train, "make_optimizer", lambda model, lr, wd: torch.optim.SGD(model.parameters(), lr=lr))
    tok = make_tokenizer(tmp_path / "tok")
    items = _items(tok, 8)
    assert len({len(it["input_ids"]) for it in items}) > 1
    a, start = _fit_once(tok, items, batch_size=8, grad_accum=1)
    b, _ = _fit_once(tok, items, batch_size=4, grad_accum=2)
    a, b, start = a.state_dict(), b.state_dict(), start.state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a), "one optimizer step must change the weights"
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5, msg=k)


def test_micro_batch_sums_over_the_global_count_equal_the_batch_mean():
    torch.manual_seed(0)
    s, t = torch.randn(4, 2, 5, 5, requires_grad=True), torch.randn(4, 2, 5, 5)
    hs, ht = torch.randn(4, 5, 3, requires_grad=True), torch.randn(4, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    n = int(mask.sum())
    whole = (attention_kl_sum(s, t, mask) + hidden_mse_sum([hs], [ht], mask)) / n
    (g_whole_s, g_whole_h) = torch.autograd.grad(whole, [s, hs])
    parts = sum((attention_kl_sum(s[i:i + 2], t[i:i + 2], mask[i:i + 2])
                 + hidden_mse_sum([hs[i:i + 2]], [ht[i:i + 2]], mask[i:i + 2])) / n for i in (0, 2))
    (g_s, g_h) = torch.autograd.grad(parts, [s, hs])
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(g_s, g_whole_s)
    torch.testing.assert_close(g_h, g_whole_h)


def test_a_narrower_student_learns_a_projection_that_is_removed_afterwards(tmp_path: Path):
    from transformers import BertConfig, BertForSequenceClassification

    tok = make_tokenizer(tmp_path / "tok")
    teacher = make_bert(layers=4, seed=1)
    torch.manual_seed(2)
    student = BertForSequenceClassification(BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=32,
                                                       max_position_embeddings=64))
    inter = inter_losses.build(student, teacher, inter_losses.mapped_layers(None, 4, 2), hidden_weight=1.0,
                               attention_weight=1.0, same_tokenizer=True)
    assert inter.teacher_layers == [0, 3] and inter.projection is not None and len(inter.projection) == 3
    start = {k: v.clone() for k, v in inter.projection.state_dict().items()}
    items = _items(tok, 8)
    fit(student, items, items[:4], collate=task.make_collate(tok), tc=TrainConfig(epochs=1, batch_size=4, lr=1e-2),
        weights=LossWeights(0.5, 0.5, 2.0), task=task, device=torch.device("cpu"), inter=inter)
    assert any(not torch.equal(start[k], v) for k, v in inter.projection.state_dict().items()), "not trained"
    inter_losses.detach(student)
    assert not any(k.startswith(inter_losses.PROJECTION) for k in student.state_dict())


def test_models_that_cannot_be_compared_are_refused():
    teacher = make_bert(layers=4)
    student = student_from_teacher(teacher, [0, 3])
    with pytest.raises(HybridFTError, match="tokenizer differs"):
        inter_losses.build(student, teacher, [0, 3], hidden_weight=1.0, attention_weight=0.0, same_tokenizer=False)
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64))
    with pytest.raises(HybridFTError, match="attention heads"):
        inter_losses.build(other, teacher, [0, 3], hidden_weight=0.0, attention_weight=1.0, same_tokenizer=True)


# ---------------------------------------------------------------------------------------------------
# end to end


def _validation_mse(run: Path, teacher_dir: Path, data: dict[str, Path]) -> float:
    """Hidden-state MSE of the saved student to the saved teacher on the validation file, over the matched states."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    student = AutoModelForSequenceClassification.from_pretrained(run / "student").eval()
    tok = AutoTokenizer.from_pretrained(run / "student")
    lines = data["validation"].read_text().splitlines()[1:]
    batch = tok([line.rsplit(",", 1)[0] for line in lines], padding=True, return_tensors="pt")
    with torch.no_grad():
        t = teacher(**batch, output_hidden_states=True).hidden_states
        s = student(**batch, output_hidden_states=True).hidden_states
    mse = hidden_mse_sum([s[0], s[1], s[2]], [t[0], t[1], t[4]], batch["attention_mask"])
    return float(mse) / int(batch["attention_mask"].sum())


def test_run_with_both_terms_logs_them_and_brings_the_student_closer(tmp_path: Path, tiny_teacher_dir: Path,
                                                                     tiny_data):
    from hybridft.cli import main

    quick = ["export.enabled=false", "hybrid.enabled=false"]
    with_terms = tmp_path / "with"
    assert main(["run", *tiny_overrides(tiny_teacher_dir, tiny_data, with_terms), *quick,
                 "loss.hidden_weight=1", "loss.attention_weight=1"]) == 0
    rows = [json.loads(line) for line in (with_terms / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["stage"] == "student" and r["split"] == "train"]
    assert train_rows and all({"hidden", "attention", "kd", "ce"} <= set(r) for r in train_rows)
    for r in train_rows:  # alpha = beta = 0.5 by default
        assert r["loss"] == pytest.approx(0.5 * r["kd"] + 0.5 * r["ce"] + r["hidden"] + r["attention"], rel=1e-5)
    assert not any("hidden" in r for r in rows if r["stage"] == "teacher")
    # the same fine-tuned teacher, distilled without the terms
    teacher_dir = with_terms / "teacher"
    without = tmp_path / "without"
    assert main(["run", *tiny_overrides(teacher_dir, tiny_data, without), *quick, "teacher.finetune=never"]) == 0
    assert (_validation_mse(with_terms, teacher_dir, tiny_data)
            < _validation_mse(without, teacher_dir, tiny_data))


# ---------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("key", ["loss.hidden_weight", "loss.attention_weight"])
def test_config_refuses_the_terms_where_they_cannot_work(key: str):
    with pytest.raises(HybridFTError) as e:
        load_config(None, ["task=causal_lm", f"{key}=1"])
    assert key in str(e.value) and "classification" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(HybridFTError, match="distill.teacher_logits"):
        load_config(None, ["distill.teacher_logits=x.safetensors", f"{key}=0.5"])
    with pytest.raises(HybridFTError, match=">= 0"):
        load_config(None, [f"{key}=-1"])
    assert getattr(load_config(None, []).loss, key.split(".")[1]) == 0.0
