"""Training only the embedding rows of the training tokens (`compact_embeddings`, on by default) gives dense
training's weights: the same trained rows, the untrained rows decayed as AdamW decays them, the same validation
numbers, the same result after an interrupted run is resumed; and it steps aside where it would not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import NEGATIVE, POSITIVE, WORDS, make_tokenizer
from hybridft.checkpoint import latest_checkpoint, load_checkpoint
from hybridft.compact_embedding import CompactEmbedding, compact_embedding
from hybridft.config import TrainConfig
from hybridft.data import Examples
from hybridft.tasks import classification as task
from hybridft.train import LossWeights, fit

VOCAB = 200  # the tokenizer uses 35 ids; the rest of the rows are like the tokens a small dataset never uses


def _bert(seed: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return BertForSequenceClassification(config)


def _items(tok, words_pos, words_neg, n: int, seed: int):
    import random

    rng = random.Random(seed)
    rows = [(" ".join(rng.sample(words_pos if i % 2 else words_neg, 3)), i % 2) for i in range(n)]
    ex = Examples(texts=[t for t, _ in rows], labels=[y for _, y in rows], source="test")
    return task.encode(ex, tok, 16, teacher_logits=torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)))


def _fit(tok, train_items, val_items, compact: bool, steps_dir=None, resume=False):
    model = _bert()
    tc = TrainConfig(epochs=4, batch_size=8, lr=5e-3, warmup_ratio=0.25, weight_decay=0.3, eval_every=3,
                     checkpoint_every=3, keep_checkpoints=100, compact_embeddings=compact)
    result = fit(model, train_items, val_items, collate=task.make_collate(tok), tc=tc,
                 weights=LossWeights(0.5, 0.5, 2.0), task=task, device=torch.device("cpu"), seed=7,
                 checkpoint_dir=steps_dir, resume=resume)
    return model, result


@pytest.fixture
def data(tmp_path: Path):
    tok = make_tokenizer(tmp_path / "tok")
    # training text uses half the sentiment words; validation text all of them, so it reads untrained rows too
    train_items = _items(tok, POSITIVE[:5], NEGATIVE[:5], 32, seed=1)
    val_items = _items(tok, POSITIVE, NEGATIVE, 16, seed=2)
    return tok, train_items, val_items


def test_compact_training_ends_with_dense_trainings_weights_and_validation(tmp_path: Path, data):
    tok, train_items, val_items = data
    dense, dense_result = _fit(tok, train_items, val_items, compact=False, steps_dir=tmp_path / "dense")
    compact, result = _fit(tok, train_items, val_items, compact=True, steps_dir=tmp_path / "compact")
    assert type(compact.get_input_embeddings()) is nn.Embedding, "the model gets its own embedding back"
    assert result.embedding_rows == (12, VOCAB) and dense_result.embedding_rows is None  # [CLS], [SEP], 10 words
    assert result.describe().endswith("; 12 of 200 embedding rows trained")
    a, b = dense.state_dict(), compact.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
    assert len(result.history) == len(dense_result.history) == 6
    for r, d in zip(result.history, dense_result.history):  # validation reads untrained rows too
        assert r.keys() == d.keys() and r["step"] == d["step"] and r["accuracy"] == d["accuracy"]
        for k in r:
            if isinstance(r[k], float):
                assert r[k] == pytest.approx(d[k], abs=1e-6), k
    # the checkpoints hold the model's own (dense) format too, raw weights and all
    for run_a, run_b in (("dense", "compact"),):
        wa, _, _ = load_checkpoint(latest_checkpoint(tmp_path / run_a))
        wb, _, _ = load_checkpoint(latest_checkpoint(tmp_path / run_b))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5, msg=k)
    # the rows of tokens never trained on were only decayed, and not left as they were
    start = _bert().bert.embeddings.word_embeddings.weight.detach()
    end = compact.bert.embeddings.word_embeddings.weight.detach()
    unused = torch.arange(len(WORDS) + 5, VOCAB)
    ratio = end[unused] / start[unused]
    assert float(ratio.std()) < 1e-5 and 0.5 < float(ratio.mean()) < 1 - 1e-3


def test_resumed_compact_training_ends_like_an_uninterrupted_run(tmp_path: Path, data):
    tok, train_items, val_items = data
    whole, whole_result = _fit(tok, train_items, val_items, compact=True, steps_dir=tmp_path / "whole")
    (tmp_path / "part").mkdir()  # as if killed after step 6: only that checkpoint is on disk
    shutil.copytree(tmp_path / "whole" / "step-000006", tmp_path / "part" / "step-000006")
    resumed, result = _fit(tok, train_items, val_items, compact=True, steps_dir=tmp_path / "part", resume=True)
    assert result.best_step == whole_result.best_step
    assert result.describe().endswith("; resumed at step 6 of 16; 12 of 200 embedding rows trained")
    assert whole_result.resumed_step is None
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_it_steps_aside_where_every_row_trains_or_the_embedding_is_not_plain(data):
    tok, train_items, _ = data
    assert compact_embedding(_bert(), train_items, enabled=False) is None
    small = _bert()
    small.bert.embeddings.word_embeddings = nn.Embedding(20, 32, padding_idx=0)  # 12 training tokens: over half of it
    assert compact_embedding(small, train_items, enabled=True) is None
    capped = _bert()
    capped.bert.embeddings.word_embeddings.max_norm = 1.0
    assert compact_embedding(capped, train_items, enabled=True) is None

    class Tied(nn.Module):  # a language model whose output layer is its input embedding: every row has a gradient
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8)
            self.head = nn.Linear(8, VOCAB, bias=False)
            self.head.weight = self.embed.weight

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.head

    assert compact_embedding(Tied(), train_items, enabled=True) is None
    model = _bert()
    installed, prefix = compact_embedding(model, train_items, enabled=True)
    assert isinstance(model.get_input_embeddings(), CompactEmbedding) and prefix == "bert.embeddings.word_embeddings."
    assert 0 not in installed.token_ids.tolist(), "the padding row gets no gradient in dense training either"
