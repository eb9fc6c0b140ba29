"""The built-in LM demo dataset: fixed, disjoint, clean splits of the documented sizes."""

from __future__ import annotations

import importlib.util

import pytest

from hybridft.errors import HybridFTError
from hybridft.lm_builtin import BUILTIN_LM_DATASETS, builtin_lm_rows

needs_corpus = pytest.mark.skipif(
    importlib.util.find_spec("chatterbot_corpus") is None,
    reason="chatterbot-corpus not installed (pip install --no-deps chatterbot-corpus==1.3.3)",
)


@needs_corpus
def test_split_is_fixed_and_fresh() -> None:
    first, second = builtin_lm_rows("chatterbot_en"), builtin_lm_rows("chatterbot_en")
    assert first == second
    first["train"].pop()
    assert len(builtin_lm_rows("chatterbot_en")["train"]) == len(second["train"])


@needs_corpus
def test_sizes_as_documented() -> None:
    sizes = {k: len(v) for k, v in builtin_lm_rows("chatterbot_en").items()}
    assert sizes == {"train": 587, "validation": 73, "test": 73}


@needs_corpus
def test_splits_disjoint_by_prompt_and_clean() -> None:
    splits = builtin_lm_rows("chatterbot_en")
    prompts = {name: {r["prompt"].casefold() for r in rows} for name, rows in splits.items()}
    for name, rows in splits.items():
        assert len(prompts[name]) == len(rows)  # no duplicate prompt inside a split
        for row in rows:
            assert set(row) == {"prompt", "response"}
            assert row["prompt"] and row["response"]
            assert row["prompt"] == row["prompt"].strip() and row["response"] == row["response"].strip()
            assert len(row["prompt"]) <= 400 and len(row["response"]) <= 400
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]


def test_unknown_name() -> None:
    assert BUILTIN_LM_DATASETS == ("chatterbot_en",)
    with pytest.raises(HybridFTError, match="chatterbot_en"):
        builtin_lm_rows("nope")


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridft import lm_builtin

    monkeypatch.setattr(lm_builtin, "_PACKAGE", "no_such_package_hybridft")
    lm_builtin._splits.cache_clear()
    try:
        with pytest.raises(HybridFTError, match=r"pip install --no-deps chatterbot-corpus==1\.3\.3"):
            builtin_lm_rows("chatterbot_en")
    finally:
        lm_builtin._splits.cache_clear()
