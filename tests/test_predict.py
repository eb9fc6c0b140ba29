"""`hybridft.predict`: streamed batch prediction over CSV, TSV and JSONL with a fake model.

The fake `predict_batch` answers "pos" for texts containing "good", sends texts containing "maybe" to the
"teacher", and records every batch, so batching and bounded memory can be checked without any model.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import pytest

from hybridft.errors import HybridFTError
from hybridft.predict import PredictReport, predict_file, report_path


class FakeModel:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.pairs: list[Optional[list[str]]] = []

    def __call__(self, texts: list[str], pairs: Optional[list[str]]) -> list[dict[str, Any]]:
        self.batches.append(list(texts))
        self.pairs.append(None if pairs is None else list(pairs))
        return [{"label": "pos" if "good" in t else "neg", "probability": 0.9,
                 "answered_by": "teacher" if "maybe" in t else "student"} for t in texts]


def read_table(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def header_of(path: Path, delimiter: str = ",") -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return next(csv.reader(f, delimiter=delimiter))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


ROWS = [("1", "a good film"), ("2", "a dull film"), ("3", "maybe good"), ("4", "maybe not")]
EXPECTED = [("1", "pos", "student"), ("2", "neg", "student"), ("3", "pos", "teacher"), ("4", "neg", "teacher")]


def write_input(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"in.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in ROWS), encoding="utf-8")
    elif kind == "json":  # one JSON array, as pandas' to_json(orient="records") writes it
        path.write_text(json.dumps([{"id": i, "text": t} for i, t in ROWS]), encoding="utf-8")
    elif kind == "parquet":  # two row groups, so reading crosses a group boundary
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": [i for i, _ in ROWS], "text": [t for _, t in ROWS]}), path, row_group_size=3)
    else:
        sep = "," if kind == "csv" else "\t"
        path.write_text(f"id{sep}text\n" + "".join(f"{i}{sep}{t}\n" for i, t in ROWS), encoding="utf-8")
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    return read_table(path, "," if path.suffix == ".csv" else "\t")


# ---------------------------------------------------------------------------------------------------
# formats


@pytest.mark.parametrize("in_kind", ["csv", "tsv", "jsonl", "json", "parquet"])
@pytest.mark.parametrize("out_kind", ["csv", "tsv", "jsonl"])
def test_every_format_keeps_input_columns_and_adds_predictions(tmp_path: Path, in_kind: str, out_kind: str):
    src, dst = write_input(tmp_path, in_kind), tmp_path / f"out.{out_kind}"
    report = predict_file(FakeModel(), src, dst, progress=False)
    rows = read_output(dst)
    assert [list(r) for r in rows] == [["id", "text", "label", "probability", "answered_by"]] * len(ROWS)
    got = [(str(r["id"]), r["label"], r["answered_by"]) for r in rows]
    assert got == EXPECTED
    assert [r["text"] for r in rows] == [t for _, t in ROWS]
    assert all(float(r["probability"]) == 0.9 for r in rows)
    if in_kind in ("jsonl", "json", "parquet") and out_kind == "jsonl":
        assert rows[0]["id"] == "1" and isinstance(rows[0]["probability"], float)  # JSON types are kept
    assert (report.rows_in, report.rows_written, report.skipped) == (4, 4, 0)
    assert report.answered_by == {"student": 2, "teacher": 2}
    assert json.loads(report_path(dst).read_text()) == report.to_dict()
    assert not (tmp_path / f"out.{out_kind}.tmp").exists()


def test_a_tsv_output_with_quotes_or_line_breaks_says_how_to_read_it_back(tmp_path: Path):
    """A .tsv is read with literal quotes by default (GLUE's files hold unbalanced ones), but a cell with a tab or
    a line break can only be written in CSV quotes: the report says so, and reading the file back with
    quoting="csv" returns the texts as they were."""
    texts = ['he said "good"', "good\tfilm", "two\nlines good", "plain good"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    report = predict_file(FakeModel(), src, tmp_path / "out.tsv", progress=False)
    assert len(report.notes) == 1 and "3 cells hold a tab, line break or double quote" in report.notes[0]
    assert "--quoting csv" in report.summary()
    model = FakeModel()
    predict_file(model, tmp_path / "out.tsv", tmp_path / "again.jsonl", quoting="csv", progress=False)
    assert model.batches == [texts]
    # plain texts need no quotes and get no note
    assert predict_file(FakeModel(), write_input(tmp_path, "jsonl"), tmp_path / "plain.tsv", progress=False).notes == []


def test_a_header_that_repeats_a_column_name_is_refused_unnamed_columns_may_repeat(tmp_path: Path):
    src = tmp_path / "dup.csv"
    src.write_text("text,id,text\na good film,1,other\n", encoding="utf-8")
    with pytest.raises(HybridFTError, match=r"names the column 'text' more than once \(columns 1, 3\)"):
        predict_file(FakeModel(), src, tmp_path / "out.csv", progress=False)
    assert not (tmp_path / "out.csv").exists()
    with pytest.raises(HybridFTError, match="name 'a' more than once"):
        predict_file(FakeModel(), tmp_path / "dup.csv", tmp_path / "out.csv", column_names=["a", "text", "a"],
                     progress=False)
    src.write_text("text,,\na good film,,\n", encoding="utf-8")  # trailing delimiters: unnamed columns
    predict_file(FakeModel(), src, tmp_path / "out.csv", progress=False)
    assert read_table(tmp_path / "out.csv")[0]["label"] == "pos"


def test_text_pair_column_and_custom_delimiter(tmp_path: Path):
    src = tmp_path / "pairs.csv"
    src.write_text("premise;hypothesis\na good day;maybe rain\nbad;fine\n", encoding="utf-8")
    model = FakeModel()
    predict_file(model, src, tmp_path / "out.jsonl", text_column="premise", text_pair_column="hypothesis",
                 delimiter=";", progress=False)
    assert model.batches == [["a good day", "bad"]] and model.pairs == [["maybe rain", "fine"]]


def test_headerless_file_with_column_names(tmp_path: Path):
    src = tmp_path / "noheader.tsv"
    src.write_text("a good film\t1\nawful\t0\n", encoding="utf-8")
    predict_file(FakeModel(), src, tmp_path / "out.csv", column_names=["text", "gold"], progress=False)
    rows = read_table(tmp_path / "out.csv")
    assert [(r["text"], r["gold"], r["label"]) for r in rows] == [("a good film", "1", "pos"), ("awful", "0", "neg")]


def test_input_column_named_label_is_kept_as_input_label(tmp_path: Path):
    src = tmp_path / "labeled.csv"
    src.write_text("text,label\na good film,neg\n", encoding="utf-8")
    report = predict_file(FakeModel(), src, tmp_path / "out.csv", progress=False)
    assert header_of(tmp_path / "out.csv") == ["text", "input_label", "label", "probability", "answered_by"]
    assert read_table(tmp_path / "out.csv")[0]["input_label"] == "neg"
    assert report.renamed_columns == {"label": "input_label"}


# ---------------------------------------------------------------------------------------------------
# batching and bounded memory


def test_batches_are_bounded_and_cover_every_row_in_order(tmp_path: Path):
    src = tmp_path / "big.csv"
    src.write_text("id,text\n" + "".join(f"{i},text {i} {'good' if i % 3 else 'maybe'}\n" for i in range(1000)),
                   encoding="utf-8")
    model = FakeModel()
    report = predict_file(model, src, tmp_path / "out.csv", batch_size=64, progress=False)
    assert len(model.batches) == math.ceil(1000 / 64)
    # Bounded memory by construction: the model never sees more than batch_size rows at once.
    assert max(len(b) for b in model.batches) <= 64
    assert [len(b) for b in model.batches] == [64] * 15 + [1000 - 15 * 64]
    rows = read_table(tmp_path / "out.csv")
    assert [r["id"] for r in rows] == [str(i) for i in range(1000)]
    assert report.rows_written == 1000 and sum(report.answered_by.values()) == 1000


def test_output_is_written_as_batches_arrive(tmp_path: Path):
    """Rows reach the temporary file before the input is exhausted: nothing waits for the whole file."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)), encoding="utf-8")
    tmp = tmp_path / "out.jsonl.tmp"
    seen_on_disk = []

    def model(texts: list[str], pairs: Optional[list[str]]) -> list[dict[str, Any]]:
        seen_on_disk.append(tmp.read_text(encoding="utf-8").count("\n") if tmp.exists() else -1)
        return FakeModel()(texts, pairs)

    predict_file(model, src, tmp_path / "out.jsonl", batch_size=3, progress=False)
    assert seen_on_disk[:4] == [0, 3, 6, 9]


def test_progress_in_a_log_file_is_whole_lines_of_the_share_read(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch):
    from hybridft import progress

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # a line on every update (once a minute in real use)
    predict_file(FakeModel(), write_input(tmp_path, "csv"), tmp_path / "out.csv", batch_size=2, progress=True)
    err = capsys.readouterr().err  # captured: not a terminal, as in `hybridft predict ... 2> log`
    assert "\r" not in err and err.splitlines()[-1].startswith("[hybridft] predict: 100% of ")


# ---------------------------------------------------------------------------------------------------
# quoted CSV fields and line numbers


def test_quoted_field_with_newline_and_comma(tmp_path: Path):
    src = tmp_path / "quoted.csv"
    src.write_text('id,text\n1,"good, really\nmaybe ""fine"""\n2,bad\n', encoding="utf-8")
    model = FakeModel()
    predict_file(model, src, tmp_path / "out.csv", progress=False)
    assert model.batches == [['good, really\nmaybe "fine"', "bad"]]
    rows = read_table(tmp_path / "out.csv")
    assert [(r["id"], r["text"], r["label"], r["answered_by"]) for r in rows] == [
        ("1", 'good, really\nmaybe "fine"', "pos", "teacher"), ("2", "bad", "neg", "student")]


def test_line_numbers_count_physical_lines_of_multiline_rows(tmp_path: Path):
    src = tmp_path / "multi.csv"
    # line 1 header; row 1 spans lines 2-4; line 5 is an empty text.
    src.write_text('id,text\n1,"one\ntwo\nthree"\n2,\n3,ok\n', encoding="utf-8")
    with pytest.raises(HybridFTError, match=r"multi\.csv line 5: empty text in column 'text'; fix the row or "
                                            r"pass --skip-bad-rows"):
        predict_file(FakeModel(), src, tmp_path / "out.csv", progress=False)


def test_bad_encoding_inside_a_multiline_row_is_reported_at_the_row_start(tmp_path: Path):
    src = tmp_path / "multi.csv"
    src.write_bytes(b'id,text\n1,ok\n2,"first\nsecond \xff\n"\n3,good\n')
    with pytest.raises(HybridFTError, match=r"line 3: not valid UTF-8 \(byte 0xff at byte 8 of line 4, inside"):
        predict_file(FakeModel(), src, tmp_path / "out.csv", progress=False)
    report = predict_file(FakeModel(), src, tmp_path / "out.csv", skip_bad_rows=True, progress=False)
    assert report.skipped_lines == [3] and report.skipped_by_reason == {"bad_encoding": 1}
    assert [r["id"] for r in read_table(tmp_path / "out.csv")] == ["1", "3"]


def test_unclosed_quote_stops_even_when_skipping(tmp_path: Path):
    src = tmp_path / "unclosed.csv"
    src.write_text('id,text\n1,ok\n2,"never closed\n3,good\n4,good\n', encoding="utf-8")
    with pytest.raises(HybridFTError, match=r"line 3: malformed CSV .* runs to line 5"):
        predict_file(FakeModel(), src, tmp_path / "out.csv", skip_bad_rows=True, progress=False)


def test_single_line_quote_error_is_a_skippable_bad_row(tmp_path: Path):
    src = tmp_path / "quotes.csv"
    src.write_text('id,text\n1,"a"b\n2,good\n', encoding="utf-8")
    with pytest.raises(HybridFTError, match="line 2: malformed CSV"):
        predict_file(FakeModel(), src, tmp_path / "out.csv", progress=False)
    report = predict_file(FakeModel(), src, tmp_path / "out.csv", skip_bad_rows=True, progress=False)
    assert report.skipped_by_reason == {"bad_quoting": 1} and report.rows_written == 1


# ---------------------------------------------------------------------------------------------------
# bad rows: stop with the line by default, skip and count when asked


def bad_csv(tmp_path: Path) -> Path:
    """Header, good rows, empty text at line 5, bad UTF-8 at line 7, wrong column count at line 9."""
    src = tmp_path / "bad.csv"
    src.write_bytes(b"id,text\n"          # 1
                    b"1,good one\n"       # 2
                    b"2,bad one\n"        # 3
                    b"3,maybe good\n"     # 4
                    b"4,   \n"            # 5 empty text
                    b"5,fine\n"           # 6
                    b"6,caf\xe9 latin-1\n"  # 7 not UTF-8
                    b"\n"                 # 8 blank: ignored
                    b"7,too,many\n"       # 9 three fields
                    b"8,last good\n")     # 10
    return src


def test_bad_csv_row_stops_with_its_line_number(tmp_path: Path):
    src = bad_csv(tmp_path)
    with pytest.raises(HybridFTError) as e:
        predict_file(FakeModel(), src, tmp_path / "out.csv", progress=False)
    assert str(e.value) == f"{src} line 5: empty text in column 'text'; fix the row or pass --skip-bad-rows"
    assert "\n" not in str(e.value)
    src.write_bytes(src.read_bytes().replace(b"4,   \n", b"4,ok\n"))
    with pytest.raises(HybridFTError, match=r"bad\.csv line 7: not valid UTF-8 \(byte 0xe9 at byte 6 of the "
                                            r"line\); if the file is in another encoding, pass it with --encoding "
                                            r"\(Excel on Windows saves CSV as cp1252\); else fix the row"):
        predict_file(FakeModel(), src, tmp_path / "out.csv", progress=False)
    src.write_bytes(src.read_bytes().replace(b"caf\xe9", b"cafe"))
    with pytest.raises(HybridFTError, match=r"bad\.csv line 9: 3 fields where the header has 2"):
        predict_file(FakeModel(), src, tmp_path / "out.csv", progress=False)
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out.csv.tmp").exists()


def test_bad_csv_rows_are_skipped_and_counted(tmp_path: Path):
    src, dst = bad_csv(tmp_path), tmp_path / "out.csv"
    report = predict_file(FakeModel(), src, dst, skip_bad_rows=True, batch_size=2, progress=False)
    assert [r["id"] for r in read_table(dst)] == ["1", "2", "3", "5", "8"]
    assert report.skipped == 3 and report.skipped_lines == [5, 7, 9]
    assert report.skipped_by_reason == {"empty_text": 1, "bad_encoding": 1, "wrong_column_count": 1}
    assert (report.rows_in, report.rows_written, report.blank_lines) == (8, 5, 1)
    saved = json.loads(report_path(dst).read_text())
    assert saved["skipped_lines"] == [5, 7, 9] and saved["skipped_by_reason"]["bad_encoding"] == 1
    assert "skipped 3 bad rows" in report.summary() and "5, 7, 9" in report.summary()


def test_a_raw_control_character_in_a_json_line_is_named_once(tmp_path: Path):
    src = tmp_path / "ctl.jsonl"
    src.write_bytes(b'{"text": "tab\there"}\n')  # a raw tab inside a JSON string
    with pytest.raises(HybridFTError, match=r"ctl\.jsonl line 1: not valid JSON \(Invalid control character at "
                                            r"column \d+\)"):
        predict_file(FakeModel(), src, tmp_path / "out.jsonl", progress=False)


def bad_jsonl(tmp_path: Path) -> Path:
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"id": 1, "text": "good"}\n'        # 1
                    b'{"id": 2, "text": "maybe"\n'        # 2 malformed JSON
                    b'{"id": 3, "text": ""}\n'            # 3 empty text
                    b'{"id": 4, "text": "ok \xc3("}\n'     # 4 invalid UTF-8
                    b'{"id": 5}\n'                        # 5 no text key
                    b'[1, 2]\n'                           # 6 not an object
                    b'{"id": 7, "text": ["a"]}\n'         # 7 not a string
                    b'\n'                                 # 8 blank: ignored
                    b'{"id": 9, "text": "maybe good"}\n')  # 9
    return src


@pytest.mark.parametrize("line,problem", [(2, "not valid JSON"), (3, "empty text"), (4, "not valid UTF-8"),
                                          (5, "no value for column 'text'"), (6, r"not a JSON object \(a JSON list\)"),
                                          (7, "column 'text' holds a list, not text")])
def test_bad_jsonl_row_stops_with_its_line_number(tmp_path: Path, line: int, problem: str):
    src = bad_jsonl(tmp_path)
    lines = src.read_bytes().split(b"\n")
    # Keep only the first bad line under test: earlier bad lines become good rows.
    for i in range(1, line - 1):
        lines[i] = json.dumps({"id": i + 1, "text": "fine"}).encode()
    src.write_bytes(b"\n".join(lines))
    with pytest.raises(HybridFTError, match=rf"bad\.jsonl line {line}: {problem}"):
        predict_file(FakeModel(), src, tmp_path / "out.jsonl", progress=False)


def test_bad_jsonl_rows_are_skipped_and_counted(tmp_path: Path):
    dst = tmp_path / "out.jsonl"
    report = predict_file(FakeModel(), bad_jsonl(tmp_path), dst, skip_bad_rows=True, progress=False)
    assert [(r["id"], r["label"], r["answered_by"]) for r in read_jsonl(dst)] == [(1, "pos", "student"),
                                                                                (9, "pos", "teacher")]
    assert report.skipped_lines == [2, 3, 4, 5, 6, 7]
    assert report.skipped_by_reason == {"bad_json": 1, "empty_text": 1, "bad_encoding": 1, "missing_text": 1,
                                        "not_an_object": 1, "text_not_a_string": 1}
    assert (report.rows_in, report.rows_written, report.skipped) == (8, 2, 6)


def test_skipped_lines_keep_only_the_first_twenty(tmp_path: Path):
    src = tmp_path / "many.csv"
    src.write_text("id,text\n" + "".join(f"{i},\n" for i in range(30)) + "30,good\n", encoding="utf-8")
    report = predict_file(FakeModel(), src, tmp_path / "out.csv", skip_bad_rows=True, progress=False)
    assert report.skipped == 30 and report.skipped_lines == list(range(2, 22))


# ---------------------------------------------------------------------------------------------------
# failed runs leave nothing behind; whole-file problems are one clear error


def test_failed_run_keeps_existing_output_and_leaves_no_tmp(tmp_path: Path):
    dst = tmp_path / "out.csv"
    dst.write_bytes(b"previous,output\r\nkept,\xffbytes\n")
    report_path(dst).write_text('{"old": true}')
    before = dst.read_bytes()
    with pytest.raises(HybridFTError, match="line 5"):
        predict_file(FakeModel(), bad_csv(tmp_path), dst, batch_size=1, progress=False)  # rows 2-4 were written
    assert dst.read_bytes() == before
    assert report_path(dst).read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "out.csv", "out.csv.report.json"]


def test_model_failure_midway_keeps_existing_output(tmp_path: Path):
    dst = tmp_path / "out.jsonl"
    dst.write_text("old\n")

    def flaky(texts: list[str], pairs: Optional[list[str]]) -> list[dict[str, Any]]:
        if any("maybe" in t for t in texts):
            raise RuntimeError("out of memory")
        return FakeModel()(texts, pairs)

    with pytest.raises(RuntimeError):
        predict_file(flaky, write_input(tmp_path, "csv"), dst, batch_size=1, progress=False)
    assert dst.read_text() == "old\n" and not (tmp_path / "out.jsonl.tmp").exists()


def test_unsupported_output_suffix(tmp_path: Path):
    with pytest.raises(HybridFTError) as e:
        predict_file(FakeModel(), write_input(tmp_path, "csv"), tmp_path / "out.parquet", progress=False)
    assert str(e.value) == (f"output file {tmp_path / 'out.parquet'} has an unsupported format '.parquet'; "
                            f"name it .csv, .tsv or .jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_missing_text_column_names_the_columns_found(tmp_path: Path, kind: str):
    model = FakeModel()
    with pytest.raises(HybridFTError, match=r"has no column 'sentence' \(columns found: 'id', 'text'\)") as e:
        predict_file(model, write_input(tmp_path, kind), tmp_path / "out.csv", text_column="sentence",
                     skip_bad_rows=True, progress=False)
    assert "\n" not in str(e.value) and model.batches == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"in.{kind}"]


def test_wrong_delimiter_hint(tmp_path: Path):
    with pytest.raises(HybridFTError, match="the delimiter may be '.t', not ','"):
        predict_file(FakeModel(), write_input(tmp_path, "tsv"), tmp_path / "out.csv", delimiter=",",
                     progress=False)


def test_an_excel_semicolon_csv_is_read_by_its_header_and_a_wrong_delimiter_is_named(tmp_path: Path):
    """A training file from Excel (';', BOM, CRLF) with a comma in a text said only "2 fields where the header has 1";
    predict read the same file as one column."""
    from hybridft.config import DataConfig
    from hybridft.data import load_splits

    f = tmp_path / "excel.csv"
    f.write_bytes("\ufeffreview;sentiment\r\ngood film;pos\r\nbad, slow film;neg\r\n".encode("utf-8"))
    s = load_splits(DataConfig(train=str(f), validation=str(f), text_column="review", label_column="sentiment"), 0)
    assert s.train.texts == ["good film", "bad, slow film"] and s.label_names == ["neg", "pos"]
    assert any("read with ';' between fields, since its header has no ','" in n for n in s.notes)
    with pytest.raises(HybridFTError, match="line 3: 2 fields where the header has 1 .* the delimiter may be ';', "
                                            "not ','"):
        load_splits(DataConfig(train=str(f), validation=str(f), text_column="review", label_column="sentiment",
                               delimiter=","), 0)
    report = predict_file(FakeModel(), f, tmp_path / "out.jsonl", text_column="review", progress=False)
    assert report.rows_written == 2 and any("';'" in n for n in report.notes)
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["review"] for r in rows] == ["good film", "bad, slow film"]


def test_other_whole_file_problems(tmp_path: Path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "broken.json").write_text('[{"text": "a"},')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    for name, words in [("missing.csv", "input file not found"), ("empty.csv", "is empty"),
                        ("empty.jsonl", "is empty"), ("data.parquet", "not a readable Parquet file"),
                        ("data.xlsx", "unsupported format '.xlsx'"), ("empty.json", "is empty"),
                        ("broken.json", "is not valid JSON"), ("empty.parquet", "is empty; give a file with at least "
                                                                                "one row")]:
        with pytest.raises(HybridFTError, match=words):
            predict_file(FakeModel(), tmp_path / name, tmp_path / "out.csv", progress=False)
    src = write_input(tmp_path, "csv")
    with pytest.raises(HybridFTError, match="is the input file"):
        predict_file(FakeModel(), src, src, progress=False)
    with pytest.raises(HybridFTError, match="batch size"):
        predict_file(FakeModel(), src, tmp_path / "out.csv", batch_size=0, progress=False)
    assert not (tmp_path / "out.csv").exists()


def test_header_only_file_gives_header_only_output(tmp_path: Path):
    src = tmp_path / "header.csv"
    src.write_bytes(b"\xef\xbb\xbfid,text\n")  # with the BOM Excel writes
    report = predict_file(FakeModel(), src, tmp_path / "out.csv", progress=False)
    assert (tmp_path / "out.csv").read_text() == "id,text,label,probability,answered_by\n"
    assert isinstance(report, PredictReport) and report.rows_in == 0


def test_output_csv_round_trips_through_pandas(tmp_path: Path):
    import pandas as pd

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "good,\n\"quoted\"", "meta": {"a": 1}}) + "\n"
                   + json.dumps({"text": "plain", "extra": 1}) + "\n", encoding="utf-8")
    report = predict_file(FakeModel(), src, tmp_path / "out.tsv", progress=False)
    frame = pd.read_csv(tmp_path / "out.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["text", "meta", "label", "probability", "answered_by"]
    assert frame["text"].tolist() == ["good,\n\"quoted\"", "plain"]
    assert frame["meta"].tolist() == ['{"a": 1}', ""]
    assert report.dropped_columns == ["extra"]


@pytest.mark.parametrize("command", ["predict", "generate"])
@pytest.mark.parametrize("content, message", [
    ('{"id": 1, "words": "hello"}\n', "has no column '{column}' \\(columns found: 'id', 'words'\\)"),
    ("\n", "is empty"),
    ("id,words\n1,hello\n", "has no column '{column}'"),
])
def test_predict_and_generate_check_the_input_before_loading_a_model(tmp_path: Path, monkeypatch, capsys,
                                                                     command: str, content: str, message: str):
    """A wrong column or an empty file used to surface only after the models loaded (15 s for generate)."""
    from hybridft import hybrid, speculative
    from hybridft.cli import main
    from hybridft.tasks import causal_lm

    def loaded(*_a, **_k):
        raise AssertionError("a model was loaded before the input was checked")

    for module, name in ((hybrid, "load_predictor"), (causal_lm, "load_model"), (speculative, "load_hybrid")):
        monkeypatch.setattr(module, name, loaded)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    src = tmp_path / ("in.csv" if content.startswith("id,") else "in.jsonl")
    src.write_text(content)
    out = tmp_path / "out.jsonl"
    assert main([command, "--model", str(model), "--input", str(src), "--output", str(out), "--quiet"]) == 2
    column = "text" if command == "predict" else "prompt"
    err = capsys.readouterr().err
    assert re.search(message.format(column=column), err) and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_student_of_the_stage_commands_reads_the_text_column_of_its_stage_config(tmp_path: Path):
    from hybridft.hybrid import _run_text_columns

    (tmp_path / "student").mkdir()
    (tmp_path / "teacher").mkdir()
    assert _run_text_columns(tmp_path / "student") == ("text", None)
    (tmp_path / "config.distill.yaml").write_text("data:\n  text_column: review\n")
    (tmp_path / "config.teacher.yaml").write_text("data:\n  text_column: body\n  text_pair_column: title\n")
    assert _run_text_columns(tmp_path / "student") == ("review", None)
    assert _run_text_columns(tmp_path / "teacher") == ("body", "title")
    (tmp_path / "config.yaml").write_text("data:\n  text_column: sentence\n")  # a run's own config comes first
    assert _run_text_columns(tmp_path / "student") == ("sentence", None)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA device")
def test_device_cuda_without_a_gpu_names_the_option(tmp_path: Path, capsys):
    from hybridft.cli import main

    rows = tmp_path / "in.csv"
    rows.write_text("text,prompt\nhello,hello\n")
    (tmp_path / "model").mkdir()
    for command in (["predict", "--model", str(tmp_path / "model")], ["generate", "--model", str(tmp_path / "model")]):
        assert main([*command, "--input", str(rows), "--output", str(tmp_path / "out.csv"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "--device cuda" in err and "--device auto" in err and "device=auto" not in err


def test_a_parquet_or_json_array_row_that_is_bad_is_named_by_its_row(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a good film", None, "maybe"]}), src)
    with pytest.raises(HybridFTError, match=r"in.parquet row 2: .*--skip-bad-rows"):
        predict_file(FakeModel(), src, tmp_path / "out.csv", progress=False)
    report = predict_file(FakeModel(), src, tmp_path / "out.csv", skip_bad_rows=True, progress=False)
    assert (report.rows_written, report.skipped) == (2, 1) and "bad row (missing_text 1) at rows 2" in report.summary()
    # a pretty-printed array (pandas' to_json(orient="records", indent=2)): the bad item is named by its file line
    array = tmp_path / "in.json"
    array.write_text(json.dumps([{"text": "a good film"}, {"text": None}, {"text": "maybe"}], indent=2))
    with pytest.raises(HybridFTError, match=r"in.json line 5: "):
        predict_file(FakeModel(), array, tmp_path / "out.csv", progress=False)
    array.write_text(json.dumps([{"text": "a good film"}, "not an object", {"text": "maybe"}]))
    with pytest.raises(HybridFTError, match=r"in.json line 1: item 2 of the array is not a JSON object"):
        predict_file(FakeModel(), array, tmp_path / "out.csv", progress=False)
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name, as the training files accept it
    lines.write_text('{"text": "a good film"}\n{"text": "maybe"}\n')
    assert predict_file(FakeModel(), lines, tmp_path / "out.csv", progress=False).rows_written == 2


def test_a_whole_table_in_one_json_object_or_an_array_of_strings_is_refused_whole(tmp_path: Path):
    """pandas' df.to_json() default (orient="columns") is one object of columns: it was read as one bad row, and
    --skip-bad-rows then wrote an empty output and exited 0."""
    from hybridft.config import DataConfig
    from hybridft.data import load_splits

    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"text": {"0": "a good film", "1": "a dull film"}, "label": {"0": "pos", "1": "neg"}}))
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["a good film", "a dull film"]))
    for src, words in ((columns, r'is a whole table .* orient="records", lines=True'),
                       (strings, "is a JSON array of str values, not of objects")):
        for skip in (False, True):
            with pytest.raises(HybridFTError, match=words):
                predict_file(FakeModel(), src, tmp_path / "out.csv", skip_bad_rows=skip, progress=False)
        with pytest.raises(HybridFTError, match=words if src is columns else "item 1 of the array is not"):
            load_splits(DataConfig(train=str(src), validation=str(src)), 0)
    assert not (tmp_path / "out.csv").exists()


def test_skipping_every_row_is_an_error_and_dropped_keys_are_noted(tmp_path: Path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": {"en": "a good film"}}\n{"text": {"en": "a dull film"}}\n')  # nested: no text
    (tmp_path / "out.csv").write_text("earlier output\n")
    with pytest.raises(HybridFTError, match=r"every row of .* is bad \(text_not_a_string 2; the first at line 1\); "
                                            r"nothing was written: is --text-column the column of texts\?"):
        predict_file(FakeModel(), src, tmp_path / "out.csv", skip_bad_rows=True, progress=False)
    assert (tmp_path / "out.csv").read_text() == "earlier output\n"
    src.write_text('{"text": "a good film"}\n{"text": "maybe", "note": "x"}\n')
    report = predict_file(FakeModel(), src, tmp_path / "out.csv", progress=False)
    assert any("keys note are missing from the first row" in n for n in report.notes)
    assert "write .jsonl to keep them" in report.summary()
