"""The task seam: every task module offers the same names, and the task-neutral modules import none of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hybridft.tasks import TASKS

SEAM = ("load_splits", "load_teacher", "teacher_path", "resolve_model_path", "load_model", "build_student", "augment", "transfer_set",
        "encode", "logits_and_hidden",
        "make_collate", "logits_for_loss", "teacher_targets", "validate", "BEST", "store_settings", "summarise",
        "write_outputs", "check_store", "training_examples", "report", "compare", "save_model", "count_params")
SRC = Path(__file__).resolve().parents[1] / "src" / "hybridft"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_offers_the_seam(name: str):
    task = TASKS[name]
    missing = [n for n in SEAM if not hasattr(task, n)]
    assert not missing, f"tasks.{name} lacks {missing}"
    key, mode = task.BEST
    assert isinstance(key, str) and mode in ("max", "min")


def test_the_seam_is_the_documented_one():
    docstring = (SRC / "tasks" / "__init__.py").read_text().split('"""')[1]
    documented = re.findall(r"[a-zA-Z_]+", docstring.split("\n\n", 1)[1])
    assert set(documented) == set(SEAM)


@pytest.mark.parametrize("module", ["train", "teacher_outputs", "evaluate", "losses", "batching", "lm_losses"])
def test_task_neutral_modules_import_no_task(module: str):
    text = (SRC / f"{module}.py").read_text()
    assert not re.search(r"^\s*(from|import) hybridft\.tasks", text, re.MULTILINE)


def test_saved_weights_and_stores_are_readable_like_the_files_beside_them(tmp_path):
    """safetensors writes 0600 whatever the umask; the config beside it follows the umask (another user or a
    serving account on a shared machine could read the folder but not the weights)."""
    import os

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from hybridft.data import example_key
    from hybridft.models import save_model
    from hybridft.teacher_outputs import write_store
    from test_causal_lm import make_lm_tokenizer

    old = os.umask(0o022)
    try:
        tok = make_lm_tokenizer(tmp_path / "tok")
        model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32))
        save_model(model, tok, tmp_path / "model")
        keys = [example_key("a"), example_key("b")]
        store = write_store(tmp_path / "store.safetensors", keys, torch.tensor([[1.0, -1.0], [0.0, 2.0]]), ["x", "y"])
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [*(tmp_path / "model").iterdir(), store]}
    finally:
        os.umask(old)
    assert modes["model.safetensors"] == modes["config.json"] == modes["store.safetensors"] == "0o644", modes
