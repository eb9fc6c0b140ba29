"""Reading delimited and JSON Lines files one record at a time: the one reader of training files, unlabeled
files, `predict` and `generate`, so all of them see the same rows.

* Bytes are decoded as strict UTF-8 one physical line at a time, so a badly encoded row is caught at *its*
  line. Line numbers are physical, 1-based file lines counting the header as line 1; a record whose quoted
  field spans several lines is reported at the line where it starts.
* Quoting. `quoting="csv"` reads RFC 4180 quotes: a field in double quotes may hold the delimiter, newlines
  and doubled quotes. `quoting="none"` reads every quote as a literal character. The default follows the
  delimiter: CSV quoting for commas and other separators, none for tabs, because TSV files such as GLUE's
  and MNLI's hold texts that start with an unclosed `"` and are not written with CSV escaping (a CSV reader
  would merge the rows after such a text into it).
* Nothing is merged silently: a CSV-quoted record that spans several physical lines is counted
  (`TableReader.multiline_records`, `first_multiline_line`) for the caller to report.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Literal, Optional, Union

from hybridft.errors import HybridFTError

DELIMITERS = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
"""Default field separator per suffix."""
JSONL_SUFFIXES = (".jsonl",)
RECORD_FILE_SUFFIXES = (".parquet", ".json")
"""Files `predict` reads whole-record by whole-record without lines: Parquet (in record batches) and `.json` (one
JSON array of objects, or JSON Lines under a .json name), as the training files accept them."""
Quoting = Literal["csv", "none"]


def default_quoting(delimiter: str) -> Quoting:
    """CSV quoting for commas (and other separators), literal quotes for tabs."""
    return "none" if delimiter == "\t" else "csv"


@dataclass
class Item:
    """One input record: its start line, and either its fields or why it is bad."""

    line: int
    row: Optional[dict[str, Any]] = None
    reason: Optional[str] = None
    problem: str = ""
    unit: str = "line"
    """What `line` counts: file lines, or "row" in a Parquet file, which has none (`line_unit`)."""


def line_unit(path: Union[str, Path]) -> str:
    """What a record's number counts in the file at `path`: "row" in a Parquet file, which has no lines, else
    "line"."""
    return "row" if str(path).lower().endswith(".parquet") else "line"


def bom_free(encoding: str) -> str:
    """The codec that reads `encoding` without a leading byte-order mark (Excel writes one into UTF-8 files)."""
    return "utf-8-sig" if encoding.replace("-", "").lower() == "utf8" else encoding


class Lines:
    """Physical lines of a binary file, decoded one at a time as strict UTF-8.

    A line that does not decode is handed on decoded with replacement characters (so the CSV parser keeps
    its place in multi-line quoted fields) and remembered in `bad`, for the record that contains it.
    """

    def __init__(self, fh: IO[bytes], encoding: str = "utf-8"):
        self._fh = fh
        self.encoding = encoding
        self._latin1 = is_latin1(encoding)
        self.line_no = 0
        self.bytes_read = 0
        self.bad: list[tuple[int, UnicodeDecodeError]] = []

    def __iter__(self) -> "Lines":
        return self

    def __next__(self) -> str:
        raw = next(self._fh)  # splits on b"\n" only, so \r and U+2028 inside a row cannot shift line numbers
        self.line_no += 1
        self.bytes_read += len(raw)
        try:
            text = raw.decode(self.encoding)
            c1 = first_c1(text) if self._latin1 else None
            if c1 is not None:  # latin-1 decodes every byte: a cp1252 file's curly quotes become control characters
                raise UnicodeDecodeError(self.encoding, raw, c1, c1 + 1, "a C1 control character")
        except UnicodeDecodeError as e:
            self.bad.append((self.line_no, e))
            text = raw.decode(self.encoding, errors="replace")
        if self.line_no == 1 and text.startswith("\ufeff"):  # Excel writes a BOM; it is not part of the header
            text = text[1:]
        return text

    def take_bad(self) -> list[tuple[int, UnicodeDecodeError]]:
        bad, self.bad = self.bad, []
        return bad


def encoding_problem(start: int, bad: list[tuple[int, UnicodeDecodeError]]) -> str:
    line, e = bad[0]
    where = "the line" if line == start else f"line {line}, inside this row's quoted field"
    if e.reason == "a C1 control character":
        return (f"byte 0x{e.object[e.start]:02x} at byte {e.start + 1} of {where} is a control character in "
                f"{e.encoding}: the file is probably cp1252 (Excel on Windows), not latin-1")
    return f"not valid {e.encoding.upper()} (byte 0x{e.object[e.start]:02x} at byte {e.start + 1} of {where})"


def check_encoding(name: str) -> Optional[str]:
    """Why `name` cannot read a file line by line, or None. hybridft splits files at newline bytes, so an encoding
    must write a newline as the one byte 0x0A: UTF-8, cp1252, latin-1, Shift-JIS and GBK do; UTF-16 and UTF-32 do
    not."""
    import codecs

    try:
        info = codecs.lookup(name)
    except LookupError:
        return f"{name!r} is not an encoding Python knows (e.g. utf-8, cp1252, latin-1)"
    if "\n".encode(info.name) != b"\n":
        return f"{name!r} does not write a newline as one byte; re-save the file as UTF-8"
    return None


def is_latin1(encoding: str) -> bool:
    import codecs

    try:
        return codecs.lookup(encoding).name == "iso8859-1"
    except LookupError:
        return False


def first_c1(text: str) -> Optional[int]:
    """The index of the first C1 control character (U+0080-U+009F) in `text`, or None. Real text has none; a cp1252
    file read as latin-1 has one for each curly quote, dash or euro sign."""
    return next((i for i, ch in enumerate(text) if "\x80" <= ch <= "\x9f"), None)


def utf16_hint(head: bytes) -> str:
    """A hint for a file that starts with a UTF-16 or UTF-32 byte-order mark (Excel's "Unicode Text"), else ""."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "; it is UTF-16 (Excel's \"Unicode Text\" writes it): re-save it as UTF-8 (\"CSV UTF-8\")"
    return ""


def separator_in_header(columns: list[str], delimiter: Optional[str] = None) -> Optional[str]:
    """The separator a one-column header holds (",", tab, ";" or "|", other than `delimiter`), else None: the file
    was read with the wrong delimiter (an Excel CSV with ';' read with ',')."""
    if len(columns) != 1:
        return None
    return next((s for s in ",\t;|" if s != delimiter and s in columns[0]), None)


def delimiter_hint(columns: list[str], delimiter: Optional[str]) -> str:
    """A hint when a one-column header holds another separator (an Excel CSV with ';' read with ','), else ""."""
    other = separator_in_header(columns, delimiter) if delimiter is not None else None
    if other is None:
        return ""
    return (f"; the header is one column {columns[0][:60]!r}, so the delimiter may be {other!r}, not {delimiter!r} "
            f"(data.delimiter, or --delimiter for predict and generate)")


def _missing_column(path: Path, name: str, columns: list[str], key: str, delimiter: Optional[str]) -> HybridFTError:
    found = ", ".join(repr(c) for c in columns) or "none"
    hint = delimiter_hint(columns, delimiter)
    option = "--" + key.replace("_", "-")
    if key == "prompt_column" and "messages" in columns:  # generate: a file of chat messages
        hint += "; for the chat messages there: --prompt-column messages"
    return HybridFTError(f"{path} has no column '{name}' (columns found: {found}); rename the column or pass "
                         f"{option}{hint}")


def _require_columns(path: Path, columns: list[str], text_column: str, pair_column: Optional[str],
                     delimiter: Optional[str] = None, text_option: str = "text_column") -> None:
    """A missing text column is a whole-file problem, so it stops the run even with --skip-bad-rows."""
    if text_column not in columns:
        raise _missing_column(path, text_column, columns, text_option, delimiter)
    if pair_column is not None and pair_column not in columns:
        raise _missing_column(path, pair_column, columns, "text_pair_column", delimiter)


class JsonlReader:
    """One JSON object per line; blank lines are ignored."""

    def __init__(self, path: Path, lines: Lines, text_column: Optional[str], pair_column: Optional[str],
                 text_option: str = "text_column"):
        self.text_option = text_option
        self.path, self.lines = path, lines
        self.text_column, self.pair_column = text_column, pair_column
        self.blank_lines = 0

    def __iter__(self) -> Iterator[Item]:
        checked = self.text_column is None  # None: the caller checks the columns
        first_object = True
        for text in self.lines:
            line = self.lines.line_no
            bad = self.lines.take_bad()
            if bad:
                yield Item(line, reason="bad_encoding", problem=encoding_problem(line, bad))
                continue
            if not text.strip():
                self.blank_lines += 1
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield Item(line, reason="bad_json", problem=f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                yield Item(line, reason="not_an_object",
                           problem=f"not a JSON object (a JSON {type(row).__name__})")
                continue
            # pandas writes a whole table as one object on one line: an only object in that layout is the file's
            layout = pandas_layout_problem(row) if first_object else None
            first_object = False
            if layout and self._nothing_after_this_line():  # no row of it is usable, skipped or not
                raise HybridFTError(f"{self.path} {layout}")
            if not checked:
                # The first object stands in for a header: a wrong column name must not skip every row.
                assert self.text_column is not None
                _require_columns(self.path, list(row), self.text_column, self.pair_column,
                                 text_option=self.text_option)
                checked = True
            yield Item(line, row=row)

    @property
    def bytes_read(self) -> int:
        """How far into the file reading is, for a progress bar."""
        return self.lines.bytes_read

    def _nothing_after_this_line(self) -> bool:
        """Whether the file holds only blank space after the line just read."""
        with open(self.path, "rb") as f:
            f.seek(self.lines.bytes_read)
            return not f.read(1 << 16).strip() and not f.read(1)


class ParquetReader:
    """A Parquet file read one record batch at a time (pyarrow), so memory stays bounded. Parquet has no lines:
    an item's `line` is its 1-based row number (`unit` "row"). `bytes_read` advances
    by each row group's compressed size, for a progress bar over the file's bytes.

    Raises:
        HybridFTError: The file is not readable Parquet, or a named column is missing (in the constructor).
    """

    BATCH_ROWS = 1024

    def __init__(self, path: Path, text_column: Optional[str], pair_column: Optional[str],
                 text_option: str = "text_column"):
        import pyarrow.parquet as pq

        self.path = path
        try:
            self._file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several unrelated types for a broken file
            raise HybridFTError(f"{path} is not a readable Parquet file ({e}); give a Parquet file, or a .csv, "
                                f".tsv, .jsonl or .json") from None
        self.columns = list(self._file.schema_arrow.names)
        self.blank_lines = 0
        self.bytes_read = 0
        if text_column is not None:
            _require_columns(path, self.columns, text_column, pair_column, text_option=text_option)

    def __iter__(self) -> Iterator[Item]:
        row_no = 0
        meta = self._file.metadata
        for group in range(meta.num_row_groups):
            for batch in self._file.iter_batches(batch_size=self.BATCH_ROWS, row_groups=[group]):
                for row in batch.to_pylist():
                    row_no += 1
                    yield Item(row_no, row=row, unit=line_unit(self.path))
            self.bytes_read += meta.row_group(group).total_byte_size


def json_array_items(text: str) -> list[tuple[int, Any]]:
    """(file line where it starts, value) of each item of the JSON array `text`, so that a bad row of a
    pretty-printed array is named by its real line, as in any other file.

    Raises:
        json.JSONDecodeError: `text` is not one valid JSON array.
    """
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        raise json.JSONDecodeError("Expecting '['", text, i)
    i += 1
    items: list[tuple[int, Any]] = []

    def skip_space(k: int) -> int:
        while k < len(text) and text[k] in " \t\r\n":
            k += 1
        return k

    i = skip_space(i)
    if text.startswith("]", i):
        i += 1
    else:
        while True:
            value, end = decoder.raw_decode(text, i)
            items.append((text.count("\n", 0, i) + 1, value))
            i = skip_space(end)
            if text.startswith(",", i):
                i = skip_space(i + 1)
            elif text.startswith("]", i):
                i += 1
                break
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
    if text[i:].strip():
        raise json.JSONDecodeError("Extra data", text, skip_space(i))
    return items


def pandas_layout_problem(value: Any) -> Optional[str]:
    """Why a JSON object is not a row but a whole table in one of pandas' column layouts (DataFrame.to_json's
    default orient="columns", or "index" / "split"), or None."""
    if not isinstance(value, dict) or not value:
        return None
    inner = [set(v) for v in value.values() if isinstance(v, dict)]
    # orient="columns" / "index": every value is a dict over the same keys (the row index, or the columns)
    whole = len(inner) == len(value) and all(k == inner[0] for k in inner) and \
        (len(inner[0]) > 1 or all(str(k).isdigit() for k in inner[0]))
    if whole or {"columns", "data"} <= set(value):
        return ("holds one JSON object that is a whole table (pandas' DataFrame.to_json writes that by default), "
                "not one object per row; write it with df.to_json(path, orient=\"records\", lines=True)")
    return None


class JsonArrayReader:
    """A `.json` file holding one JSON array of objects, read whole (an array cannot be streamed with the
    standard library); an item's `line` is the file line where it starts."""

    def __init__(self, path: Path, text: str, text_column: Optional[str], pair_column: Optional[str],
                 text_option: str = "text_column"):
        self.path = path
        try:
            self.items = json_array_items(text)
        except json.JSONDecodeError as e:
            raise HybridFTError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); give one JSON array of "
                                f"objects, or one JSON object per line") from None
        self.blank_lines = 0
        self.bytes_read = len(text.encode("utf-8"))
        first = next((r for _, r in self.items if isinstance(r, dict)), None)
        if self.items and first is None:  # a whole-file problem, which skipping rows would turn into no output
            kind = type(self.items[0][1]).__name__
            raise HybridFTError(f"{path} is a JSON array of {kind} values, not of objects; give one object per row, "
                                f"e.g. [{{\"text\": \"...\"}}, ...]")
        if text_column is not None and first is not None:  # the first object stands in for a header
            _require_columns(path, list(first), text_column, pair_column, text_option=text_option)

    def __iter__(self) -> Iterator[Item]:
        for i, (line, row) in enumerate(self.items, start=1):
            if isinstance(row, dict):
                yield Item(line, row=row)
            else:
                yield Item(line, reason="not_an_object", problem=f"item {i} of the array is not a JSON object (a "
                                                                 f"JSON {type(row).__name__})")


class TableReader:
    """A delimited file read with the `csv` module, so quoted fields may hold delimiters and newlines.

    The header is read in the constructor, so a missing text column fails before any output is written.
    """

    def __init__(self, path: Path, lines: Lines, delimiter: str, column_names: Optional[list[str]],
                 text_column: Optional[str], pair_column: Optional[str], text_option: str = "text_column",
                 quoting: Optional[Quoting] = None):
        self.path, self.lines, self.delimiter = path, lines, delimiter
        self.sniffed = False
        """Whether `open_reader` chose the delimiter from the header (a `.csv` with ';', tab or '|')."""
        self.quoting = quoting or default_quoting(delimiter)
        # strict=True makes an unclosed quote at the end of the file, or text after a closing quote, an
        # error instead of a silently mangled row.
        self._reader = csv.reader(lines, delimiter=delimiter, strict=True,
                                  quoting=csv.QUOTE_NONE if self.quoting == "none" else csv.QUOTE_MINIMAL)
        self._end = 0  # last physical line consumed so far: the next record starts on the line after it
        self.blank_lines = 0
        self.multiline_records = 0
        """Records whose quoted field spans several physical lines (legitimate, or an unclosed quote)."""
        self.first_multiline_line: Optional[int] = None
        self.longest_record = (0, 0)
        """(physical lines, start line) of the record spanning the most lines."""
        self.quoted_looking_records = 0
        """quoting="none" only: records with a field wrapped in double quotes, as CSV quoting writes them."""
        self.first_quoted_looking_line: Optional[int] = None
        if column_names is not None:
            repeated = first_repeated_name(list(column_names))
            if repeated is not None:
                raise HybridFTError(f"the column names given for {path} name '{repeated}' more than once; give each "
                                    f"column its own name")
            self.columns = unique_names(list(column_names))
        else:
            self.columns = self._read_header()
        if text_column is not None:  # None: the caller checks the columns with its own message
            _require_columns(path, self.columns, text_column, pair_column, delimiter, text_option)

    @property
    def bytes_read(self) -> int:
        """How far into the file reading is, for a progress bar."""
        return self.lines.bytes_read

    def _read_header(self) -> list[str]:
        try:
            return self._first_record()
        except CsvProblem as p:
            raise HybridFTError(f"{self.path} line {p.start}: the header is malformed CSV ({p.message}); "
                                f"fix its quotes") from None

    def _first_record(self) -> list[str]:
        for start, fields in self._records():
            bad = self.lines.take_bad()
            if bad:
                raise HybridFTError(f"{self.path} line {start}: the header is {encoding_problem(start, bad)}; "
                                    f"re-save the file as UTF-8")
            if fields:
                names = [f.strip() for f in fields]
                repeated = first_repeated_name(names)
                if repeated is not None:
                    where = ", ".join(str(i + 1) for i, n in enumerate(names) if n == repeated)
                    raise HybridFTError(f"{self.path} line {start}: the header names the column '{repeated}' more "
                                        f"than once (columns {where}); give each column its own name")
                return unique_names(names)
            self.blank_lines += 1
        raise HybridFTError(f"{self.path} is empty; give a file with a header row and at least one row")

    def _records(self) -> Iterator[tuple[int, list[str]]]:
        """(start line, fields) per record; a malformed record is raised as `CsvProblem`."""
        while True:
            start = self._end + 1
            try:
                fields = next(self._reader)
            except StopIteration:
                return
            except csv.Error as e:
                end, self._end = self.lines.line_no, self.lines.line_no
                raise CsvProblem(start, end, str(e)) from None
            self._end = self.lines.line_no
            if self._end > start:
                self.multiline_records += 1
                if self.first_multiline_line is None:
                    self.first_multiline_line = start
                self.longest_record = max(self.longest_record, (self._end - start + 1, -start))
            yield start, fields

    def __iter__(self) -> Iterator[Item]:
        width = len(self.columns)
        while True:
            try:
                for start, fields in self._records():
                    bad = self.lines.take_bad()
                    if bad:
                        yield Item(start, reason="bad_encoding", problem=encoding_problem(start, bad))
                    elif not fields:
                        self.blank_lines += 1
                    elif len(fields) != width:
                        yield Item(start, reason="wrong_column_count",
                                    problem=f"{len(fields)} fields where the header has {width} (an unquoted "
                                            f"{self.delimiter!r} or quote in the text?)"
                                            f"{delimiter_hint(self.columns, self.delimiter)}")
                    else:
                        if self.quoting == "none" and any(len(f) > 1 and f[0] == f[-1] == '"' for f in fields):
                            self.quoted_looking_records += 1
                            if self.first_quoted_looking_line is None:
                                self.first_quoted_looking_line = start
                        yield Item(start, row=dict(zip(self.columns, fields)))
                return
            except CsvProblem as p:
                self.lines.take_bad()
                if p.end != p.start:
                    # The parser swallowed several lines; where the next row starts is a guess, so stop.
                    raise HybridFTError(f"{self.path} line {p.start}: malformed CSV ({p.message}) in a row that "
                                        f"runs to line {p.end}; close or escape its quotes (this cannot be "
                                        f"skipped: the rows after it cannot be located)") from None
                yield Item(p.start, reason="bad_quoting", problem=f"malformed CSV ({p.message})")


Reader = Union[JsonlReader, TableReader, ParquetReader, JsonArrayReader]
"""What `open_reader` returns: each yields `Item`s and counts `blank_lines`."""


class CsvProblem(Exception):
    def __init__(self, start: int, end: int, message: str):
        super().__init__(message)
        self.start, self.end, self.message = start, end, message


def first_repeated_name(names: list[str]) -> Optional[str]:
    """The first non-empty name that appears twice, or None. Which of two `text` columns holds the text is
    anyone's guess, so such a header is refused; unnamed columns (trailing delimiters) may repeat."""
    seen: set[str] = set()
    for name in names:
        if name and name in seen:
            return name
        seen.add(name)
    return None


def unique_names(names: list[str]) -> list[str]:
    """Repeat header names become `name.1`, `name.2` (as pandas does) so rows can be dicts: only unnamed columns
    repeat by now (`first_repeated_name`)."""
    seen: set[str] = set()
    out = []
    for name in names:
        new, k = name, 0
        while new in seen:
            k += 1
            new = f"{name}.{k}"
        seen.add(new)
        out.append(new)
    return out



def open_reader(src: Path, lines: Lines, text_column: Optional[str], pair_column: Optional[str],
                delimiter: Optional[str], column_names: Optional[list[str]], text_option: str = "text_column",
                quoting: Optional[Quoting] = None) -> Reader:
    """The reader for `src`'s suffix: `.jsonl`, delimited (`DELIMITERS`), `.parquet`, or `.json` (an array of
    objects, or JSON Lines). `text_column=None` skips the check that the text (and pair) columns exist, for
    callers that check with their own message.

    Raises:
        HybridFTError: A delimited file's header is malformed or badly encoded, a Parquet or JSON array file is
            unreadable, or a named column is missing.
    """
    suffix = src.suffix.lower()
    if suffix == ".parquet":
        return ParquetReader(src, text_column, pair_column, text_option)
    if suffix == ".json":
        with open(src, "rb") as f:
            head = f.read(1 << 12).decode(lines.encoding, errors="replace").lstrip("\ufeff \t\r\n")
        if head.startswith("["):
            return JsonArrayReader(src, _decode_whole(src, lines.encoding), text_column, pair_column, text_option)
    if suffix in JSONL_SUFFIXES or suffix == ".json":
        return JsonlReader(src, lines, text_column, pair_column, text_option)
    default = DELIMITERS[src.suffix.lower()]
    sep = delimiter or (sniff_delimiter(src, default) if column_names is None else default)
    reader = TableReader(src, lines, sep, column_names, text_column, pair_column, text_option, quoting)
    reader.sniffed = sep != (delimiter or default)
    return reader


def _decode_whole(src: Path, encoding: str) -> str:
    raw = src.read_bytes()
    try:  # a byte-order mark is not part of the array
        return raw.decode(bom_free(encoding))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise HybridFTError(f"{src} is not valid {encoding} (byte 0x{raw[e.start]:02x} on line {line}); re-save it "
                            f"as UTF-8 or give its encoding") from None


def sniff_delimiter(src: Path, default: str) -> str:
    """The field separator of a `.csv` given none: ';', tab or '|' when the header line holds exactly one of them
    and no ',' (Excel writes ';' where the decimal mark is a comma), else `default`. Other suffixes keep theirs."""
    if default != ",":
        return default
    try:
        with open(src, "rb") as f:
            head = f.readline(1 << 16).decode("utf-8-sig", errors="replace")
    except OSError:
        return default
    found = [s for s in (";", "\t", "|") if s in head]
    return found[0] if "," not in head and len(found) == 1 else default


SUSPECT_RECORD_LINES = 25
"""A quoted field over this many lines gets the unclosed-quote hint; shorter ones are multi-line texts."""


def quoting_notes(reader: Reader, what: str, setting: str) -> list[str]:
    """Lines that say where the quoting rule may have read a file other than its writer meant; `setting` is how
    the caller's user sets the rule (`data.quoting=` or `--quoting `)."""
    if not isinstance(reader, TableReader):
        return []
    notes = []
    if reader.sniffed:
        notes.append(f"{what}: read with {reader.delimiter!r} between fields, since its header has no ',' "
                     f"(set the delimiter to read it otherwise)")
    if reader.multiline_records:
        note = (f"{what}: {reader.multiline_records} rows have a quoted text that spans several lines (first at line "
                f"{reader.first_multiline_line}), each read as one text")
        spanned, start = reader.longest_record[0], -reader.longest_record[1]
        if spanned >= SUSPECT_RECORD_LINES:  # multi-line prompts are normal; a quote left open swallows many lines
            note += (f"; the row at line {start} spans {spanned} lines: if a quote was left open there, the rows "
                     f"after it were merged into it (close the quote, or read quotes literally with {setting}none "
                     f"if the file never uses CSV quoting)")
        notes.append(note)
    if reader.quoted_looking_records:
        notes.append(f"{what}: {reader.quoted_looking_records} rows have a field wrapped in double quotes (first at "
                     f"line {reader.first_quoted_looking_line}), read literally as tab-separated files are by "
                     f"default; if the file was written with CSV quoting, set {setting}csv")
    return notes


def malformed_row_message(path: Path, item: "Item", reader: Reader) -> str:
    """One line for a bad record of a training file, with the quoting hint where it may be the cause."""
    hint = "fix the row"
    if item.reason in ("bad_json", "not_an_object"):
        hint = "write one JSON object per line"
    if isinstance(reader, TableReader) and item.reason in ("wrong_column_count", "bad_quoting"):
        other = "none" if reader.quoting == "csv" else "csv"
        hint += f" (quotes are read as {'CSV quoting' if reader.quoting == 'csv' else 'literal characters'}; " \
                f"data.quoting={other} reads them the other way)"
    return f"{path} line {item.line}: {item.problem}; {hint}"


