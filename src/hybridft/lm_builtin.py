"""Built-in demo data for causal-LM distillation: prompt -> response pairs, no download at run time.

``chatterbot_en`` is the English part of the ChatterBot dialog corpus, read from the YAML files
that ship inside the PyPI package ``chatterbot-corpus==1.3.3`` (``chatterbot_corpus/data/english``;
BSD licence per its PyPI classifier, user-contributed text, github.com/gunthercox/chatterbot-corpus). It
holds short assistant-style exchanges: tech support ("My mouse is not responding." -> "Try plugging
it into another USB port..."), trivia questions, coding questions, small talk, science, history...

Each conversation gives one row: its first line is the prompt and the second the response (the
later lines of a few long dialogues are dropped). Rows are stripped; a row whose prompt or response
is empty or longer than 400 characters is dropped (this drops the long code answers), and prompts
are deduplicated case- and punctuation-insensitively (first file in name order wins).

The split is fixed: rows are ordered by the SHA-256 of their normalised prompt, the first
min(200, n // 10) go to test, the next as many to validation, the rest to train. No seed is
involved, so every run, machine and caller sees the same split. With chatterbot-corpus 1.3.3:
2,025 conversations -> 733 rows (its tech-support file repeats ten prompts ~100 times each):
train 587, validation 73, test 73. SmolLM2 tokens: prompt 1-32 (mean 8), response 1-127 (mean 14).
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib import resources

import yaml

from hybridft.errors import HybridFTError

BUILTIN_LM_DATASETS = ("chatterbot_en",)

_PACKAGE, _PIN = "chatterbot_corpus", "chatterbot-corpus==1.3.3"
MAX_CHARS = 400
EVAL_CAP = 200


def _key(prompt: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", prompt.casefold()).split())


def _read_pairs() -> list[tuple[str, str]]:
    try:
        folder = resources.files(_PACKAGE) / "data" / "english"
    except ModuleNotFoundError:
        raise HybridFTError(
            f"the built-in dataset 'chatterbot_en' needs the {_PIN} package: "
            f"run `pip install --no-deps {_PIN}`") from None
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".yml")), key=lambda f: f.name)
    if not files:
        raise HybridFTError(f"no English data files in {folder}: reinstall with "
                            f"`pip install --no-deps --force-reinstall {_PIN}`")
    pairs = []
    for file in files:
        for conv in (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("conversations") or []:
            # a malformed entry parses as one string; YAML can turn an unquoted answer into a bool
            if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, str) for t in conv[:2]):
                pairs.append((conv[0].strip(), conv[1].strip()))
    return pairs


@lru_cache(maxsize=None)
def _splits() -> dict[str, tuple[tuple[str, str], ...]]:
    kept: dict[str, tuple[str, str]] = {}
    for prompt, response in _read_pairs():
        key = _key(prompt)
        if key and response and len(prompt) <= MAX_CHARS and len(response) <= MAX_CHARS:
            kept.setdefault(key, (prompt, response))
    order = sorted(kept, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())
    rows = [kept[k] for k in order]
    n_eval = min(EVAL_CAP, len(rows) // 10)
    return {"test": tuple(rows[:n_eval]), "validation": tuple(rows[n_eval:2 * n_eval]),
            "train": tuple(rows[2 * n_eval:])}


def builtin_lm_rows(name: str) -> dict[str, list[dict[str, str]]]:
    """{"train": [...], "validation": [...], "test": [...]} of rows {"prompt": ..., "response": ...}.

    The split is fixed (see the module docstring) and does not depend on any seed. Each call returns
    fresh lists, so callers may shuffle or edit them. Raises HybridFTError for an unknown name or
    when the package that ships the text is not installed.
    """
    if name not in BUILTIN_LM_DATASETS:
        raise HybridFTError(f"unknown built-in LM dataset {name!r}: "
                            f"choose one of {', '.join(BUILTIN_LM_DATASETS)}")
    splits = _splits()
    return {split: [{"prompt": p, "response": r} for p, r in splits[split]]
            for split in ("train", "validation", "test")}
