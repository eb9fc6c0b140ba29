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
