"""Tiny models, tokenizer and data built in-process: no network, seconds on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

WORDS = ("good great fine happy love nice best fun superb lovely bad awful poor sad hate ugly worst dull boring "
         "terrible the a movie film plot acting was is very really quite story").split()
POSITIVE, NEGATIVE = WORDS[:10], WORDS[10:20]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRIDFT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)


def make_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(str(folder))


def make_bert(num_labels: int = 2, layers: int = 4, dropout: float = 0.0, seed: int = 0, vocab_size: int = 0):
    """`vocab_size` above the tokenizer's 35 ids adds rows no text uses, like the most of a real vocabulary that a
    small dataset never reaches (training then trains only the used rows: hybridft.compact_embedding)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=max(vocab_size, 5 + len(WORDS)), hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config)


@pytest.fixture
def tiny_teacher_dir(tmp_path: Path) -> Path:
    """A saved, untrained 4-layer BERT (hidden 32) with its tokenizer: a stand-in for MiniLM, whose 30,522-row
    embedding small data uses a fraction of (here 35 of 96 rows)."""
    folder = tmp_path / "tiny-teacher"
    tok = make_tokenizer(folder)
    make_bert(vocab_size=96).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Sentences whose label is decided by their sentiment words: learnable by a tiny model."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = POSITIVE if label == "pos" else NEGATIVE
        filler = rng.sample(WORDS[20:], 3)
        rows.append((" ".join(filler[:2] + rng.sample(words, 2) + filler[2:]), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    return path


@pytest.fixture
def tiny_data(tmp_path: Path) -> dict[str, Path]:
    return {
        "train": write_csv(tmp_path / "train.csv", sentiment_rows(48, seed=1)),
        "validation": write_csv(tmp_path / "val.csv", sentiment_rows(16, seed=2)),
        "test": write_csv(tmp_path / "test.csv", sentiment_rows(16, seed=3)),
    }


def tiny_overrides(teacher_dir: Path, data: dict[str, Path], out: Path) -> list[str]:
    return [
        f"teacher.model={teacher_dir}", f"output_dir={out}",
        f"data.train={data['train']}", f"data.validation={data['validation']}", f"data.test={data['test']}",
        "data.max_length=16", "progress=false", "student.num_layers=2",
        # fp32: tests compare runs bit for bit, and `precision: auto` may pick bf16 (tests/test_precision.py)
        "precision=fp32",
        # no generated transfer set: tests compare rows and step counts; tests/test_augment.py covers it
        "augment.factor=0",
        "teacher.train.epochs=8", "teacher.train.batch_size=8", "teacher.train.lr=3e-3",
        "student.train.epochs=8", "student.train.batch_size=8", "student.train.lr=3e-3",
        "eval.speed_batches=1", "eval.latency_samples=2",
    ]


def checkpoint_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in a stage's checkpoint folder."""
    return [int(p.name.split("-")[1]) for p in folder.glob("step-*") if not p.name.endswith(".tmp")] \
        if folder.is_dir() else []


def kill_when_checkpointed(proc, folder: Path, step: int, kill) -> None:
    """Call `kill(proc)` as soon as `folder` holds a checkpoint at `step` or later, then wait for the exit."""
    import time

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if max(checkpoint_steps(folder), default=0) >= step:
            kill(proc)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
