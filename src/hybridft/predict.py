"""Batch prediction over CSV, TSV, JSONL, JSON and Parquet files, streamed in batches so memory stays bounded
(a JSON array is read whole).

`predict_file` is model-agnostic: the caller passes `predict_batch(texts, pairs) -> list[dict]` (the hybrid
model supplies one) and this module does the file work:

* The input is read one record at a time and never held whole. Bytes are decoded as strict UTF-8 one
  physical line at a time, so a badly encoded row is caught at *its* line, not as "the file is not UTF-8".
* Each output row is the input row's columns (kept, so users can join on their ids) followed by `label`,
  `probability` and `answered_by`. The output format follows the output file's suffix (.csv, .tsv, .jsonl).
* The output is written batch by batch to `<output>.tmp` and renamed over `<output>` only when the whole
  input has been read, so a failed or interrupted run never replaces an existing output with half of one.
* A bad row (empty or missing text, bad UTF-8, malformed JSON, wrong number of CSV fields) stops the run
  with a `HybridFTError` naming the file and line; with `skip_bad_rows=True` it is skipped and counted in
  the `PredictReport` (also written as `<output>.report.json`).

Files are read by `hybridft.rowfiles`, the same reader as the training files, with the same quoting rule
(a TSV's quotes are literal unless `quoting="csv"`). Line numbers are physical, 1-based file lines, counting
the header as line 1; a CSV row whose quoted field spans several lines is reported at the line where the row
starts, and such rows are counted in the report's `notes`.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Optional, Sequence, Union

from hybridft.data import text_problem
from hybridft.errors import HybridFTError
from hybridft.rowfiles import (DELIMITERS, JSONL_SUFFIXES, RECORD_FILE_SUFFIXES, Item, Lines, ParquetReader, Quoting,
                               TableReader, line_unit, open_reader, quoting_notes, utf16_hint)

PREDICTION_COLUMNS = ("label", "probability", "answered_by")
OUTPUT_FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}
"""Output suffix -> field separator; None means one JSON object per line."""
MAX_SKIPPED_LINES = 20
"""How many skipped line numbers the report keeps (the counts cover all of them)."""
MAX_DROPPED_COLUMNS = 20
SKIP_HINT = "fix the row or pass --skip-bad-rows"

PathLike = Union[str, "os.PathLike[str]"]
PredictBatch = Callable[[list[str], Optional[list[str]]], list[dict[str, Any]]]
"""`predict_batch(texts, pairs)`: one dict per text with at least `label`, `probability` and `answered_by`
(`"student"` or `"teacher"`); `pairs` is None unless a text-pair column is read."""


@dataclass
class PredictReport:
    """What one `predict_file` run read, wrote and skipped.

    `rows_in == rows_written + skipped`; blank lines are not rows and are only counted in `blank_lines`.
    """

    input: str
    output: str
    rows_in: int = 0
    rows_written: int = 0
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    """Reason -> count: `empty_text`, `missing_text`, `text_not_a_string`, the same with `text_pair`,
    `bad_encoding`, `bad_json`, `not_an_object`, `wrong_column_count`, `bad_quoting`; `generate`: `bad_messages`."""
    skipped_lines: list[int] = field(default_factory=list)
    """The first `MAX_SKIPPED_LINES` skipped rows' line numbers, in file order."""
    answered_by: dict[str, int] = field(default_factory=lambda: {"student": 0, "teacher": 0})
    seconds: float = 0.0
    blank_lines: int = 0
    renamed_columns: dict[str, str] = field(default_factory=dict)
    """Input columns renamed because their name is a prediction column, e.g. `label` -> `input_label`."""
    dropped_columns: list[str] = field(default_factory=list)
    """JSONL -> CSV/TSV only: keys absent from the first row, so without a column in the output."""
    columns: list[str] = field(default_factory=lambda: list(PREDICTION_COLUMNS))
    """The output columns added to each row."""
    notes: list[str] = field(default_factory=list)
    """Where the quoting rule may have read the file other than its writer meant: rows whose quoted text spans
    several lines (an unclosed quote merges rows this way), or, with quotes read literally, fields wrapped in
    quotes as CSV quoting writes them."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if "answered_by" not in self.columns:  # `generate` writes generations: no model choice to count
            del out["answered_by"]
        return out

    def write_json(self, path: Optional[PathLike] = None) -> Path:
        """Write the report as JSON, by default to `<output>.report.json`; returns the path written."""
        target = Path(path) if path is not None else report_path(self.output)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, target)
        return target

    def summary(self, with_teacher: bool = True) -> str:
        """One line for the CLI, e.g. `wrote 998 rows to out.csv (teacher 12%); skipped 2 bad rows: ...`; without
        the teacher's share when the model has no teacher (`with_teacher=False`)."""
        answered = sum(self.answered_by.values()) if with_teacher else 0
        teacher = self.answered_by.get("teacher", 0) / answered if answered else 0.0
        line = f"wrote {self.rows_written} rows to {self.output} in {self.seconds:.1f}s"
        if answered:
            line += f" (teacher answered {teacher:.0%})"
        if self.skipped:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped_by_reason.items()))
            more = ", ..." if self.skipped > len(self.skipped_lines) else ""
            lines = ", ".join(map(str, self.skipped_lines)) + more
            line += (f"; skipped {self.skipped} bad row{'s' if self.skipped != 1 else ''} ({reasons}) at "
                     f"{line_unit(self.input)}s {lines}")
        for note in self.notes:
            line += f"; {note.split(': ', 1)[-1]}"
        return line


def report_path(output_path: PathLike) -> Path:
    """Where `predict_file` writes its report: next to the output, as `<output>.report.json`."""
    out = Path(output_path)
    return out.with_name(out.name + ".report.json")


def data_options(data: Any) -> dict[str, Any]:
    """`predict_file` keyword arguments from a `DataConfig`, so prediction reads files the way training did."""
    return {"text_column": data.text_column, "text_pair_column": data.text_pair_column,
            "delimiter": data.delimiter, "column_names": data.column_names, "quoting": data.quoting,
            "encoding": data.encoding}


# ---------------------------------------------------------------------------------------------------
# rows -> texts, and rows + predictions -> output rows


def _text_value(row: dict[str, Any], column: str, what: str,
                chat_messages: bool = False) -> tuple[Optional[str], Optional[str], str]:
    """(text, None, "") for a usable value, else (None, reason, problem). With `chat_messages` (generate's
    prompts), a list of chat messages is a prompt too (`hybridft.conversations`)."""
    value = row.get(column)
    if value is None:
        return None, f"missing_{what}", f"no value for column '{column}'"
    if chat_messages and (isinstance(value, (list, tuple)) or (isinstance(value, str) and value.startswith("[{"))):
        from hybridft import conversations

        try:
            messages = conversations.parse(value)
        except ValueError as e:
            if isinstance(value, (list, tuple)):
                return None, "bad_messages", f"column '{column}' {e}"
            messages = None  # text that only starts like JSON (a prompt about code): a prompt as it is
        if messages is not None:
            try:
                conversations.check_prompt(messages)
            except ValueError as e:
                return None, "bad_messages", f"column '{column}' {e}"
            value = conversations.as_prompt(messages)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None, f"{what}_not_a_string", f"column '{column}' holds a {type(value).__name__}, not text"
    problem = text_problem(value)
    if problem:  # a lone surrogate: the same check as the training files
        return None, "bad_encoding", f"column '{column}' {problem}"
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        return None, f"empty_{what}", f"empty text in column '{column}'"
    return text, None, ""


def _clash_renames(names: list[str], columns: Sequence[str] = PREDICTION_COLUMNS) -> dict[str, str]:
    """Input columns named like a prediction column become `input_<name>`, so neither is lost."""
    clashes = [n for n in names if n in columns]
    if not clashes:
        return {}
    taken = set(names) | set(columns)
    renames = {}
    for name in clashes:
        new = f"input_{name}"
        while new in taken:
            new = f"input_{new}"
        taken.add(new)
        renames[name] = new
    return renames


def _output_row(row: dict[str, Any], prediction: dict[str, Any], report: PredictReport) -> dict[str, Any]:
    renames = _clash_renames(list(row), report.columns)
    report.renamed_columns.update(renames)
    out = {renames.get(k, k): v for k, v in row.items()}
    for name in report.columns:
        if name not in prediction:
            raise ValueError(f"predict_batch returned a row without '{name}': {prediction!r}")
        out[name] = float(prediction[name]) if name == "probability" else prediction[name]
    return out


# ---------------------------------------------------------------------------------------------------
# writing: `<output>.tmp`, renamed over `<output>` only on success


def _cell(value: Any) -> str:
    """CSV cells are text: strings as they are, nothing as empty, anything else as JSON (true, 1.5, [..])."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


class _OutputWriter:
    """Appends rows to `<output>.tmp`; `commit()` renames it over the output, leaving the context without
    committing deletes it, so the previous output (if any) is untouched by a failed run."""

    def __init__(self, path: Path, delimiter: Optional[str], report: PredictReport):
        self.path, self.delimiter, self.report = path, delimiter, report
        self.tmp = path.with_name(path.name + ".tmp")
        self.fieldnames: Optional[list[str]] = None
        self._fh: Optional[IO[str]] = None
        self._csv: Any = None
        self._committed = False
        self.quoted_cells = 0
        """Cells of a tab-separated output written in CSV quotes (they hold a tab, line break or double quote)."""

    def __enter__(self) -> "_OutputWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.tmp, "w", encoding="utf-8", newline="")
        if self.delimiter is not None:
            self._csv = csv.writer(self._fh, delimiter=self.delimiter, lineterminator="\n")
        return self

    def set_columns(self, input_columns: list[str]) -> None:
        """Fix the CSV/TSV header (the input's columns, renamed where they clash, then the predictions)."""
        renames = _clash_renames(input_columns, self.report.columns)
        self.fieldnames = [renames.get(c, c) for c in input_columns] + list(self.report.columns)
        if self._csv is not None:
            self._csv.writerow(self.fieldnames)

    def write(self, rows: list[dict[str, Any]]) -> None:
        assert self._fh is not None
        if self._csv is None:
            self._fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            if self.fieldnames is None and rows:  # JSONL input: the first row's keys are the columns
                self.set_columns([k for k in rows[0] if k not in self.report.columns])
            assert self.fieldnames is not None
            known = set(self.fieldnames)
            for r in rows:
                self._note_dropped(r, known)
                cells = [_cell(r.get(name)) for name in self.fieldnames]
                if self.delimiter == "\t":
                    self.quoted_cells += sum(1 for c in cells if any(ch in c for ch in '\t\n\r"'))
                self._csv.writerow(cells)
        self._fh.flush()  # each batch reaches the disk as it is done; nothing accumulates in memory

    def _note_dropped(self, row: dict[str, Any], known: set[str]) -> None:
        dropped = self.report.dropped_columns
        if len(dropped) < MAX_DROPPED_COLUMNS:
            for key in row:
                if key not in known and key not in dropped:
                    dropped.append(key)

    def commit(self) -> None:
        assert self._fh is not None
        if self._csv is not None and self.fieldnames is None:  # no good rows from a JSONL input
            self.set_columns([])
        self._fh.close()
        os.replace(self.tmp, self.path)
        self._committed = True

    def __exit__(self, *exc: Any) -> None:
        if not self._committed:
            if self._fh is not None:
                self._fh.close()
            self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------


def _check_paths(src: Path, dst: Path) -> Optional[str]:
    """Refuse what would fail later, before any work; returns the output field separator."""
    out_suffix = dst.suffix.lower()
    if out_suffix not in OUTPUT_FORMATS:
        raise HybridFTError(f"output file {dst} has an unsupported format '{out_suffix}'; name it .csv, .tsv "
                            f"or .jsonl")
    if not src.is_file():
        raise HybridFTError(f"input file not found: {src}; check the path (relative paths start at the "
                            f"current directory)")
    in_suffix = src.suffix.lower()
    if in_suffix not in DELIMITERS and in_suffix not in JSONL_SUFFIXES and in_suffix not in RECORD_FILE_SUFFIXES:
        raise HybridFTError(f"input file {src} has an unsupported format '{in_suffix}'; use .csv, .tsv, .txt "
                            f"(delimited), .jsonl (one JSON object per line), .json or .parquet")
    with open(src, "rb") as fh:
        hint = utf16_hint(fh.read(2)) if in_suffix != ".parquet" else ""
    if hint:
        raise HybridFTError(f"input file {src} cannot be read{hint}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise HybridFTError(f"output file {dst} is the input file; write the output to another file")
    return OUTPUT_FORMATS[out_suffix]


def _progress_bar(path: Path, enabled: bool, desc: str = "predict") -> Any:
    """Progress in bytes of input read: the row count is unknown up front, the file size is not."""
    from hybridft.progress import progress_bar

    return progress_bar(path.stat().st_size, desc, enabled, unit="B")


def _skip_or_stop(item: Item, src: Path, skip: bool, report: PredictReport) -> None:
    if not skip:
        hint = SKIP_HINT
        if item.reason == "bad_encoding" and "surrogate" not in item.problem:  # the file's encoding, not one row
            hint = ("if the file is in another encoding, pass it with --encoding (Excel on Windows saves CSV as "
                    "cp1252); else " + SKIP_HINT)
        raise HybridFTError(f"{src} {item.unit} {item.line}: {item.problem}; {hint}")
    assert item.reason is not None
    report.skipped += 1
    report.skipped_by_reason[item.reason] = report.skipped_by_reason.get(item.reason, 0) + 1
    if len(report.skipped_lines) < MAX_SKIPPED_LINES:
        report.skipped_lines.append(item.line)


def _with_texts(item: Item, text_column: str, pair_column: Optional[str],
                chat_messages: bool = False) -> tuple[Item, str, Optional[str]]:
    """The item's text and pair, or the item turned bad when either is unusable."""
    assert item.row is not None
    text, reason, problem = _text_value(item.row, text_column, "text", chat_messages)
    pair = None
    if reason is None and pair_column is not None:
        pair, reason, problem = _text_value(item.row, pair_column, "text_pair")
    if reason is not None:
        return Item(item.line, reason=reason, problem=problem, unit=item.unit), "", None
    assert text is not None
    return item, text, pair


def _run_batch(predict_batch: PredictBatch, batch: list[tuple[dict[str, Any], str, Optional[str]]],
               with_pairs: bool, writer: _OutputWriter, report: PredictReport) -> None:
    texts = [text for _, text, _ in batch]
    pairs = [pair or "" for _, _, pair in batch] if with_pairs else None
    predictions = predict_batch(texts, pairs)
    if len(predictions) != len(batch):
        raise ValueError(f"predict_batch returned {len(predictions)} predictions for {len(batch)} texts")
    rows = [_output_row(row, p, report) for (row, _, _), p in zip(batch, predictions)]
    writer.write(rows)
    for p in predictions:
        if "answered_by" in p:
            report.answered_by[p["answered_by"]] = report.answered_by.get(p["answered_by"], 0) + 1
    report.rows_written += len(rows)


def _empty_jsonl(src: Path) -> HybridFTError:
    """A file without rows (JSON Lines, a JSON array or Parquet: a delimited file has its header at least)."""
    what = {".parquet": "at least one row", ".json": "at least one JSON object"}.get(src.suffix.lower(),
                                                                                  "at least one JSON object per line")
    return HybridFTError(f"{src} is empty; give a file with {what}")


def check_input(input_path: PathLike, output_path: PathLike, *, text_column: str = "text",
                text_pair_column: Optional[str] = None, delimiter: Optional[str] = None,
                column_names: Optional[list[str]] = None, skip_bad_rows: bool = False,
                text_option: str = "text_column", quoting: Optional[Quoting] = None,
                chat_messages: bool = False, encoding: str = "utf-8") -> None:
    """The checks `predict_file` makes before its first batch, without a model: the paths and formats, a delimited
    file's header, and the first row (its text columns; for JSONL, that there is one). The commands run it before
    loading models, which takes seconds to minutes, so a wrong column or an empty file fails at once.

    Raises:
        HybridFTError: what `predict_file` would raise for the same file and options, before any output exists.
    """
    src = Path(input_path)
    _check_paths(src, Path(output_path))
    with open(src, "rb") as fh:
        reader = open_reader(src, Lines(fh, encoding), text_column, text_pair_column, delimiter, column_names,
                             text_option, quoting)
        for item in reader:
            if item.row is not None:
                item, _, _ = _with_texts(item, text_column, text_pair_column, chat_messages)
            if item.row is None and not skip_bad_rows:
                _skip_or_stop(item, src, False, PredictReport(input=str(src), output=str(output_path)))
            return
        if not isinstance(reader, TableReader):
            raise _empty_jsonl(src)


def predict_file(predict_batch: PredictBatch, input_path: PathLike, output_path: PathLike, *,
                 text_column: str = "text", text_pair_column: Optional[str] = None,
                 delimiter: Optional[str] = None, column_names: Optional[list[str]] = None,
                 batch_size: int = 256, skip_bad_rows: bool = False, progress: bool = True,
                 write_report: bool = True, columns: tuple[str, ...] = PREDICTION_COLUMNS,
                 text_option: str = "text_column", quoting: Optional[Quoting] = None,
                 chat_messages: bool = False, encoding: str = "utf-8") -> PredictReport:
    """Predict every row of a CSV, TSV, JSONL, JSON or Parquet file and write the rows with their predictions.

    At most `batch_size` rows are held (and passed to `predict_batch`) at a time, whatever the file size.

    Args:
        predict_batch: `(texts, pairs) -> [{"label", "probability", "answered_by"}, ...]`, one per text.
        input_path: .csv, .tsv/.txt (delimited, with a header row unless `column_names`), .jsonl, .json (an array
            of objects, or JSON Lines) or .parquet (read in record batches; a row's "line" is its row number).
        output_path: .csv, .tsv or .jsonl; replaced only if the run succeeds.
        text_column: The column (or JSON key) holding the text.
        text_pair_column: A second text column for sentence-pair tasks; None for single texts.
        delimiter: Input field separator; default comma for .csv, tab for .tsv/.txt.
        column_names: Names for a delimited file without a header row (its first line is then a row).
        quoting: "csv" (quoted fields) or "none" (quotes are literal); default "none" for tab-separated
            files and "csv" otherwise, as for training files.
        batch_size: Rows per `predict_batch` call.
        skip_bad_rows: Skip and count bad rows instead of stopping at the first one.
        progress: Show a progress bar (in bytes of input read) on stderr.
        write_report: Also write the report as `<output>.report.json`.
        columns: The output columns `predict_batch` fills (`hybridft generate` writes `("generation",)`).
        text_option: The command-line option naming the text column, for messages (`--text-column`).
        chat_messages: A text cell may hold chat messages (a list of {"role", "content"}, or its JSON), passed
            on as a prompt string of `hybridft.conversations` (`hybridft generate`).
        encoding: The input's text encoding (`data.encoding`); the output is written in UTF-8.

    Returns:
        The `PredictReport` of the run.

    Raises:
        HybridFTError: Unsupported suffix, missing file or text column, or (without `skip_bad_rows`) the
            first bad row, as "FILE line N: problem; fix the row or pass --skip-bad-rows".
        ValueError: `predict_batch` returned a different number of predictions than texts, or a prediction
            without `label`, `probability` or `answered_by` (a bug in the caller, not in the user's file).
    """
    started = time.perf_counter()
    src, dst = Path(input_path), Path(output_path)
    out_delimiter = _check_paths(src, dst)
    if batch_size < 1:
        raise HybridFTError(f"batch size must be at least 1, got {batch_size}")
    report = PredictReport(input=str(src), output=str(dst), columns=list(columns))
    with open(src, "rb") as fh:
        lines = Lines(fh, encoding)
        # The reader comes first: a delimited file's header is checked before anything is created.
        reader = open_reader(src, lines, text_column, text_pair_column, delimiter, column_names, text_option,
                             quoting)
        desc = "generate" if "generation" in columns else "predict"
        with _OutputWriter(dst, out_delimiter, report) as writer, _progress_bar(src, progress, desc) as bar:
            if isinstance(reader, (TableReader, ParquetReader)):
                writer.set_columns(reader.columns)
            batch: list[tuple[dict[str, Any], str, Optional[str]]] = []

            def flush() -> None:
                if batch:
                    _run_batch(predict_batch, batch, text_pair_column is not None, writer, report)
                    batch.clear()
                bar.update(reader.bytes_read - bar.n)
                bar.set_postfix(rows=report.rows_written, skipped=report.skipped, refresh=False)

            for item in reader:
                report.rows_in += 1
                text, pair = "", None
                if item.row is not None:
                    item, text, pair = _with_texts(item, text_column, text_pair_column, chat_messages)
                if item.row is None:
                    _skip_or_stop(item, src, skip_bad_rows, report)
                    continue
                batch.append((item.row, text, pair))
                if len(batch) >= batch_size:
                    flush()
            flush()
            report.blank_lines = reader.blank_lines
            report.notes = quoting_notes(reader, str(src), "--quoting ")
            if writer.quoted_cells:  # pandas and spreadsheets read these quotes; hybridft's .tsv default does not
                report.notes.append(f"{dst}: {writer.quoted_cells} cells hold a tab, line break or double quote and "
                                    f"are written in CSV quotes, as pandas and spreadsheets read them; a .tsv is read "
                                    f"with literal quotes by default, so read this one back with --quoting csv "
                                    f"(data.quoting=csv), or write .jsonl")
            if not isinstance(reader, TableReader) and report.rows_in == 0:
                raise _empty_jsonl(src)
            if report.skipped and not report.rows_written:  # skipping rows must not turn a wrong file into no output
                reasons = ", ".join(f"{k} {v}" for k, v in report.skipped_by_reason.items())
                raise HybridFTError(f"every row of {src} is bad ({reasons}; the first at {line_unit(src)} "
                                    f"{report.skipped_lines[0]}); nothing was written: is --{text_option.replace('_', '-')} "
                                    f"the column of texts?")
            if report.dropped_columns:
                report.notes.append(f"{dst}: the keys {', '.join(report.dropped_columns)} are missing from the first "
                                    f"row, so they have no column in this CSV/TSV output; write .jsonl to keep them")
            writer.commit()
    report.seconds = round(time.perf_counter() - started, 3)
    if write_report:
        report.write_json()
    return report
