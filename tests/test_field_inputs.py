"""Inputs from the field (issue 9): each case made small, checked where its kind can enter (training files,
the unlabeled file, `predict`, the Python API). Every case of the issue has a test here: 1 (TSV quotes), 2 (lone
UTF-16 surrogates), 3 (multi-label rows), 4 (ClassLabel folders with -1 rows), 5 (max_length), 6 (no pad
token), 7 (unnamed teacher labels), 8 (resume after the data changed), 9 (one row per class), 10 (a store of
probabilities), 11 (the unlabeled file's own text column), 12 and 13 (the hybrid's budget, with the hybrid
tests' fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import sentiment_rows, tiny_overrides, write_csv
from hybridft.cli import main
from hybridft.config import DataConfig
from hybridft.data import load_splits
from hybridft.errors import HybridFTError
from hybridft.predict import predict_file


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # ensure_ascii: "\ud83d" stays
    return path


def _rows(n: int = 24) -> list[dict]:
    return [{"text": t, "label": y} for t, y in sentiment_rows(n, seed=4)]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# case 2: a lone surrogate ("... \ud83d", a cut emoji in scraped tweets)


@pytest.mark.parametrize("role", ["train", "unlabeled"])
def test_a_lone_surrogate_in_a_training_or_unlabeled_file_is_one_line_with_file_and_line(
        tmp_path: Path, tiny_teacher_dir: Path, tiny_data, capsys, role: str):
    rows = _rows()
    rows[4]["text"] = "great movie \ud83d"
    bad = _jsonl(tmp_path / f"{role}.jsonl", rows)
    data = dict(tiny_data, **({"train": bad} if role == "train" else {}))
    extra = [f"data.unlabeled={bad}"] if role == "unlabeled" else []
    out = tmp_path / "run"
    assert main(["run", *tiny_overrides(tiny_teacher_dir, data, out), *extra]) == 2
    line = _one_error_line(capsys)
    assert f"{bad} line 5" in line and "surrogate" in line
    assert not (out / "config.yaml").exists()


def test_a_lone_surrogate_in_predict_stops_at_its_line_or_is_skipped_and_counted(tmp_path: Path):
    rows = [{"text": "fine"}, {"text": "broken \ud83d"}, {"text": "good"}]
    src = _jsonl(tmp_path / "in.jsonl", rows)

    def predict_batch(texts, pairs):
        for t in texts:
            t.encode("utf-8")  # a real model's tokenizer fails the same way on a surrogate
        return [{"label": "pos", "probability": 0.9, "answered_by": "student"} for _ in texts]

    with pytest.raises(HybridFTError, match="line 2: .*surrogate"):
        predict_file(predict_batch, src, tmp_path / "out.jsonl", progress=False)
    report = predict_file(predict_batch, src, tmp_path / "out.jsonl", skip_bad_rows=True, progress=False)
    assert report.rows_written == 2 and report.skipped_by_reason == {"bad_encoding": 1}
    assert report.skipped_lines == [2]


# case 3: multi-label rows


@pytest.mark.parametrize("label", [["sports", "politics"], [1, 0, 1]])
def test_a_list_label_is_refused_as_multi_label(tmp_path: Path, tiny_teacher_dir: Path, tiny_data, capsys, label):
    rows = _rows()
    rows[2]["label"] = label
    data = dict(tiny_data, train=_jsonl(tmp_path / "train.jsonl", rows))
    assert main(["run", *tiny_overrides(tiny_teacher_dir, data, tmp_path / "run")]) == 2
    line = _one_error_line(capsys)
    assert "line 3" in line and "single-label" in line


@pytest.mark.parametrize("role", ["train", "unlabeled"])
def test_a_list_as_the_text_is_refused(tmp_path: Path, tiny_teacher_dir: Path, tiny_data, capsys, role: str):
    rows = _rows()
    rows[0]["text"] = ["a good film", "a bad one"]
    bad = _jsonl(tmp_path / f"{role}.jsonl", rows)
    data = dict(tiny_data, **({"train": bad} if role == "train" else {}))
    extra = [f"data.unlabeled={bad}"] if role == "unlabeled" else []
    assert main(["run", *tiny_overrides(tiny_teacher_dir, data, tmp_path / "run"), *extra]) == 2
    line = _one_error_line(capsys)
    assert "line 1" in line and "one text per row" in line


def test_the_python_api_raises_the_same_for_a_list_label(tmp_path: Path):
    rows = _rows()
    rows[1]["label"] = ["pos", "neg"]
    with pytest.raises(HybridFTError, match="line 2: the label is a list"):
        load_splits(DataConfig(train=str(_jsonl(tmp_path / "t.jsonl", rows))), seed=0)


# case 9: one training row per class, no validation file


def test_one_row_per_class_without_a_validation_file_names_data_validation(tmp_path: Path, tiny_teacher_dir: Path,
                                                                          tiny_data, capsys):
    train = write_csv(tmp_path / "tiny.csv", [("a great film", "pos"), ("a dull film", "neg")])
    overrides = [o for o in tiny_overrides(tiny_teacher_dir, dict(tiny_data, train=train), tmp_path / "run")
                 if not o.startswith("data.validation=")]
    assert main(["run", *overrides]) == 2
    line = _one_error_line(capsys)
    assert "one row per label" in line and "data.validation" in line


# case 11: the unlabeled file names its text column differently


def test_the_unlabeled_file_may_name_its_own_text_column(tmp_path: Path, tiny_teacher_dir: Path, tiny_data, capsys):
    unlabeled = _jsonl(tmp_path / "unlabeled.jsonl", [{"review": t} for t, _ in sentiment_rows(8, seed=9)])
    base = tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / "a") + [f"data.unlabeled={unlabeled}"]
    assert main(["run", *base, "hybrid.enabled=false", "export.enabled=false"]) == 2
    assert "data.unlabeled_text_column" in _one_error_line(capsys)
    cfg = DataConfig(train=str(tiny_data["train"]), unlabeled=str(unlabeled), unlabeled_text_column="review")
    splits = load_splits(cfg, seed=0)
    assert len(splits.unlabeled) == 8 and splits.unlabeled.texts[0] == sentiment_rows(8, seed=9)[0][0]
    assert len(splits.train) + len(splits.validation) == 48  # the training file still reads its own column


# case 5: data.max_length above the model's position table


def test_max_length_above_the_position_table_stops_before_the_run_folder(tmp_path: Path, tiny_teacher_dir: Path,
                                                                         tiny_data, capsys):
    out = tmp_path / "run"
    assert main(["run", *tiny_overrides(tiny_teacher_dir, tiny_data, out), "data.max_length=128"]) == 2
    line = _one_error_line(capsys)
    assert "data.max_length=128" in line and "64 positions" in line
    assert not (out / "config.yaml").exists()


# case 6: a GPT-2-style teacher whose tokenizer has no pad token


def test_a_gpt2_classifier_whose_tokenizer_has_no_pad_token_trains(tmp_path: Path, tiny_data):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    from conftest import WORDS

    folder = tmp_path / "gpt2"
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<|endoftext|>", *WORDS])},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|endoftext|>")
    assert tok.pad_token is None
    tok.save_pretrained(folder)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                             num_labels=2)).save_pretrained(folder)
    out = tmp_path / "run"
    assert main(["run", *tiny_overrides(folder, tiny_data, out), "student.num_layers=1", "export.enabled=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["accuracy"] > 0.8  # batches of several rows: the padded rows were read right
    saved = json.loads((out / "student" / "config.json").read_text())
    assert saved["pad_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>")


# case 10: a teacher-output store holding probabilities instead of logits


def test_a_store_of_probabilities_is_refused(tmp_path: Path, tiny_teacher_dir: Path, tiny_data, capsys):
    import torch
    from safetensors.torch import save_file

    from hybridft.data import load_splits as read_splits
    from hybridft.teacher_outputs import write_store

    splits = read_splits(DataConfig(train=str(tiny_data["train"]), validation=str(tiny_data["validation"])), seed=0)
    probs = torch.tensor([[0.1, 0.9] if y == 1 else [0.8, 0.2] for y in splits.train.labels])
    with pytest.raises(HybridFTError, match="probabilities, not logits"):
        write_store(tmp_path / "p.safetensors", splits.train.keys(), probs, splits.label_names)
    keys = torch.tensor([list(bytes.fromhex(k)) for k in splits.train.keys()], dtype=torch.uint8)
    save_file({"logits": probs, "keys": keys}, str(tmp_path / "p.safetensors"),  # written by other code
              metadata={"format": "hybridft.teacher_outputs/2", "kind": "dense", "fingerprint": "external",
                        "label_names": json.dumps(splits.label_names)})
    out = tmp_path / "run"
    assert main(["run", *tiny_overrides(tiny_teacher_dir, tiny_data, out),
                 f"distill.teacher_logits={tmp_path / 'p.safetensors'}"]) == 2
    assert "probabilities, not logits" in _one_error_line(capsys)
    assert torch.log(probs).shape == probs.shape  # the fix the message names is accepted
    write_store(tmp_path / "ok.safetensors", splits.train.keys(), torch.log(probs), splits.label_names)


# case 7: a teacher fine-tuned elsewhere with default label names (LABEL_0/LABEL_1, or no id2label at all)


@pytest.mark.parametrize("names", ["LABEL_i", "none"])
def test_a_teacher_with_unnamed_labels_maps_output_i_to_label_i(tmp_path: Path, tiny_data, capsys, names: str):
    from conftest import make_bert, make_tokenizer

    folder = tmp_path / "elsewhere"
    make_tokenizer(folder)
    make_bert().save_pretrained(folder)  # id2label {0: LABEL_0, 1: LABEL_1}, as transformers names them
    if names == "none":
        config = json.loads((folder / "config.json").read_text())
        config.pop("id2label", None), config.pop("label2id", None)
        (folder / "config.json").write_text(json.dumps(config))
    data = {k: write_csv(tmp_path / f"{k}.csv", [(t, "1" if y == "pos" else "0") for t, y in sentiment_rows(24, seed)])
            for k, seed in (("train", 1), ("validation", 2), ("test", 3))}
    out = tmp_path / "run"
    assert main(["distill", *tiny_overrides(folder, data, tmp_path / "auto")]) == 2  # unnamed may mean untrained
    assert "teacher.finetune=never" in _one_error_line(capsys)
    args = ["distill", *tiny_overrides(folder, data, out), "teacher.finetune=never"]
    assert main(args) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "LABEL_0=0, LABEL_1=1" in err
    assert json.loads((out / "student" / "config.json").read_text())["id2label"] == {"0": "0", "1": "1"}


# case 8: --resume after the training file changed (a class added)


def test_resume_after_the_training_file_gained_a_class_names_what_changed(tmp_path: Path, tiny_teacher_dir: Path,
                                                                        tiny_data, capsys):
    base = tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / "r") + ["hybrid.enabled=false",
                                                                         "export.enabled=false"]
    assert main(["run", *base]) == 0
    capsys.readouterr()
    summary = (tmp_path / "r" / "summary.json").read_bytes()
    with tiny_data["train"].open("a", encoding="utf-8") as f:
        f.write("a plot that was the story,meh\nthe story of a plot,meh\n")  # two rows: not noted as a typo
    assert main(["run", *base, "--resume"]) == 2
    assert "labels are now ['meh', 'neg', 'pos']" in _one_error_line(capsys)
    rows = tiny_data["train"].read_text().splitlines()
    tiny_data["train"].write_text("\n".join(rows[:-3]) + "\n")  # same labels, fewer rows
    assert main(["run", *base, "--resume"]) == 2
    assert "data.train (" in _one_error_line(capsys)
    assert (tmp_path / "r" / "summary.json").read_bytes() == summary


# case 1: a TSV text with an unclosed double quote (GLUE and MNLI files have them)


def _tsv_with_an_open_quote(path: Path, n: int = 40) -> tuple[Path, list[str]]:
    texts = [t for t, _ in sentiment_rows(n, seed=5)]
    texts[4] = '"' + texts[4]  # row 5 starts with a quote that never closes
    labels = ["pos" if i % 2 == 0 else "neg" for i in range(n)]
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)), encoding="utf-8")
    return path, texts


def _echo(texts, pairs):
    return [{"label": t, "probability": 1.0, "answered_by": "student"} for t in texts]


def test_a_tsv_quote_is_a_literal_character_in_training_unlabeled_and_predict(tmp_path: Path):
    tsv, texts = _tsv_with_an_open_quote(tmp_path / "glue.tsv")
    cfg = DataConfig(train=str(tsv), validation=str(tsv), unlabeled=str(tsv))
    splits = load_splits(cfg, seed=0)
    assert len(splits.validation) == 40 and splits.validation.texts == texts  # nothing merged
    assert splits.unlabeled.texts == texts and len(splits.train) == 40
    assert splits.validation.texts[4].startswith('"')
    report = predict_file(_echo, tsv, tmp_path / "out.jsonl", progress=False)
    written = [json.loads(line)["label"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert report.rows_written == 40 and written == texts  # predict reads exactly what training read


def test_csv_quoting_of_a_tsv_is_asked_for_and_an_unclosed_quote_is_then_an_error_not_a_merge(tmp_path: Path):
    tsv, _ = _tsv_with_an_open_quote(tmp_path / "glue.tsv")
    with pytest.raises(HybridFTError, match=r"glue\.tsv line 6: malformed CSV .*runs to line 41"):
        load_splits(DataConfig(train=str(tsv), quoting="csv"), seed=0)
    with pytest.raises(HybridFTError, match="line 6: malformed CSV"):
        predict_file(_echo, tsv, tmp_path / "out.jsonl", progress=False, quoting="csv")


def test_a_tsv_written_with_csv_quoting_is_read_literally_with_a_note_or_unquoted_when_asked(tmp_path: Path):
    import csv

    rows = [(t, y) for t, y in sentiment_rows(12, seed=6)]
    rows[3] = ('she said "wow" twice', rows[3][1])
    path = tmp_path / "pandas.tsv"
    with path.open("w", encoding="utf-8", newline="") as f:  # what pandas.to_csv(sep="\t") writes
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["text", "label"])
        w.writerows(rows)
    literal = load_splits(DataConfig(train=str(path), validation=str(path)), seed=0)
    assert literal.validation.texts[3] == '"she said ""wow"" twice"'
    assert any("line 5" in n and "data.quoting=csv" in n for n in literal.notes)
    quoted = load_splits(DataConfig(train=str(path), validation=str(path), quoting="csv"), seed=0)
    assert quoted.validation.texts[3] == 'she said "wow" twice' and not quoted.notes
    report = predict_file(_echo, path, tmp_path / "out.csv", progress=False)
    assert any("--quoting csv" in n for n in report.notes) and "--quoting csv" in report.summary()


def test_a_csv_row_spanning_several_lines_is_read_whole_and_reported(tmp_path: Path):
    path = tmp_path / "multi.csv"
    path.write_text('text,label\n"a great\nfilm",pos\na dull film,neg\n"fine",pos\nbad one,neg\n', encoding="utf-8")
    splits = load_splits(DataConfig(train=str(path), validation=str(path)), seed=0)
    assert splits.validation.texts == ["a great\nfilm", "a dull film", "fine", "bad one"]
    assert splits.validation.lines == [2, 4, 5, 6]
    assert any("1 rows have a quoted text that spans several lines (first at line 2)" in n for n in splits.notes)
    report = predict_file(_echo, path, tmp_path / "out.jsonl", progress=False)
    assert report.rows_written == 4 and any("line 2" in n for n in report.notes)
    # a multi-line prompt is normal: no advice to change the quoting rule, which would break such a file
    assert not any("none" in n for n in splits.notes + report.notes)


def test_a_quote_left_open_over_many_lines_is_pointed_at(tmp_path: Path):
    from hybridft.rowfiles import SUSPECT_RECORD_LINES

    path = tmp_path / "open.csv"
    rows = "".join(f"film {i},pos\n" for i in range(SUSPECT_RECORD_LINES + 5))
    path.write_text(f'text,label\nfine,neg\n"a great film,pos\n{rows}the end",neg\n', encoding="utf-8")
    report = predict_file(_echo, path, tmp_path / "out.jsonl", progress=False)
    assert report.rows_written == 2  # the open quote swallowed every row after it, and the file still parses
    note = next(n for n in report.notes if "spans several lines" in n)
    assert f"the row at line 3 spans {SUSPECT_RECORD_LINES + 7} lines" in note and "--quoting none" in note


def test_the_run_says_the_data_notes_and_keeps_them_in_the_summary(tmp_path: Path, tiny_teacher_dir: Path,
                                                                   tiny_data, capsys):
    rows = sentiment_rows(48, seed=1)
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f'"{t}\nmore",{y}\n' if i == 0 else f"{t},{y}\n"
                                              for i, (t, y) in enumerate(rows)), encoding="utf-8")
    out = tmp_path / "run"
    args = ["run", *tiny_overrides(tiny_teacher_dir, dict(tiny_data, train=train), out), "hybrid.enabled=false",
            "export.enabled=false", "teacher.train.epochs=1", "student.train.epochs=1"]
    assert main(args) == 0
    assert "spans several lines (first at line 2)" in capsys.readouterr().err
    assert "first at line 2" in json.loads((out / "summary.json").read_text())["data_notes"][0]


# case 4: a `datasets` folder whose label is a ClassLabel, with -1 rows (no gold label)

NLI = ["entailment", "neutral", "contradiction"]


def _nli_dataset(tmp_path: Path, train_labels: list[int], validation_labels: list[int]):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=NLI)})

    def split(labels: list[int], seed: int):
        texts = [t for t, _ in sentiment_rows(len(labels), seed=seed)]
        return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)

    return datasets.DatasetDict(train=split(train_labels, 7), validation=split(validation_labels, 8))


def test_class_label_names_and_ids_are_kept_and_minus_one_rows_are_unlabeled(tmp_path: Path):
    train_labels = [0, 1, 2, -1, 2, 0, -1, 1, 0, 2]
    folder = tmp_path / "nli"
    ds = _nli_dataset(tmp_path, train_labels, [2, -1, 0, 1])
    ds.save_to_disk(str(folder))
    splits = load_splits(DataConfig(train=f"{folder}:train", validation=f"{folder}:validation"), seed=0)
    assert splits.label_names == NLI
    assert splits.train.labels == [y for y in train_labels if y != -1]  # ids kept, nothing shifted
    assert splits.train.texts == [t for t, y in zip(ds["train"]["text"], train_labels) if y != -1]
    assert splits.unlabeled.texts == [t for t, y in zip(ds["train"]["text"], train_labels) if y == -1]
    assert splits.unlabeled.labels == [-100, -100]
    assert splits.validation.labels == [2, 0, 1]
    notes = " | ".join(splits.notes)
    assert "2 rows have label -1" in notes and "KD only" in notes and "1 rows have label -1" in notes
    assert "0=entailment, 1=neutral, 2=contradiction" in notes


def test_class_label_names_are_kept_without_minus_one_rows_and_from_parquet(tmp_path: Path):
    ds = _nli_dataset(tmp_path, [0, 2, 0, 2], [2, 0])  # "neutral" never occurs: its id stays 1
    folder = tmp_path / "nli"
    ds.save_to_disk(str(folder))
    splits = load_splits(DataConfig(train=f"{folder}:train", validation=f"{folder}:validation"), seed=0)
    assert splits.label_names == NLI and splits.train.labels == [0, 2, 0, 2] and splits.unlabeled is None
    ds["train"].to_parquet(str(tmp_path / "train.parquet"))
    ds["validation"].to_parquet(str(tmp_path / "val.parquet"))
    from_parquet = load_splits(DataConfig(train=str(tmp_path / "train.parquet"),
                                          validation=str(tmp_path / "val.parquet")), seed=0)
    assert from_parquet.label_names == NLI and from_parquet.train.labels == [0, 2, 0, 2]


def test_a_class_label_id_outside_its_names_is_one_line(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=NLI)})
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}, features=features)
    table = ds.data.table.set_column(1, "label", __import__("pyarrow").array([0, 7], type="int64"))
    import pyarrow.parquet as pq

    pq.write_table(table.replace_schema_metadata(ds.data.table.schema.metadata), tmp_path / "t.parquet")
    with pytest.raises(HybridFTError, match="line 2: label id 7 is outside"):
        load_splits(DataConfig(train=str(tmp_path / "t.parquet")), seed=0)


# cases 12 and 13: the hybrid's teacher budget (the fixtures live with the other hybrid tests)

from test_hybrid import TEXTS, RowCounter, _model, pair  # noqa: E402,F401  (pair is a fixture)
import torch  # noqa: E402

from hybridft import hybrid as hy  # noqa: E402


def test_teacher_budget_is_a_running_quota_over_the_stream_whatever_the_call_size(pair):  # noqa: F811
    """Issue 9, case 12: calls of one input each get the same answers as one call, and the budget holds."""
    student, teacher, tok = pair
    model = _model(pair, threshold=2.0)  # the threshold alone would send every row
    model.teacher_budget = 0.25
    counter = RowCounter(teacher)
    whole = model.predict(TEXTS)
    assert whole.answered_by.count("teacher") == counter.rows == int(0.25 * len(TEXTS))
    model.reset_budget()
    one_by_one = [model.predict([t]) for t in TEXTS]
    assert [p.answered_by[0] for p in one_by_one] == whole.answered_by
    assert torch.equal(torch.cat([p.label_ids for p in one_by_one]), whole.label_ids)
    # at every point of the stream the teacher has answered at most a quarter of the rows so far
    sent = [who == "teacher" for who in whole.answered_by]
    assert all(sum(sent[:n]) <= 0.25 * n + 1e-9 for n in range(1, len(sent) + 1))
    assert model.rows_seen == len(TEXTS) and model.teacher_rows == sum(sent)
    model.teacher_budget = 0.0
    model.reset_budget()
    assert model.predict(TEXTS).answered_by.count("teacher") == 0


def test_the_budget_does_not_pay_for_teacher_calls_that_buy_nothing_on_validation():
    """Issue 9, case 13: a student that matches the teacher on validation sends nothing to the teacher."""
    labels = torch.tensor([0, 1] * 50)
    conf = torch.linspace(0.5, 1.0, 100)
    same = hy.cascade_curve(conf, labels, labels, labels)  # both always right
    assert hy.choose_threshold(same, teacher_budget=0.3)["teacher_fraction"] == 0.0
    assert hy.choose_threshold(same, teacher_budget=0.3, spend_whole_budget=True)["teacher_fraction"] == 0.3
    student = labels.clone()
    student[[0, 3, 7]] = 1 - student[[0, 3, 7]]  # wrong on three of the 8 least confident rows, the teacher right
    gain = hy.cascade_curve(conf, student, labels, labels)
    chosen = hy.choose_threshold(gain, teacher_budget=0.3)
    assert chosen["teacher_fraction"] == 0.08 and chosen["accuracy"] == 1.0  # up to the last row it fixes, no more


def test_a_cp1252_csv_is_read_with_its_encoding_and_refused_without_it(tmp_path: Path, capsys):
    """Excel on Windows saves "CSV" (not "CSV UTF-8") in cp1252: é is one byte, 0xe9, and ’ is 0x92."""
    rows = [("café au lait", "pos"), ("it’s dull", "neg"), ("naïve but fine", "pos"), ("bad", "neg")]
    path = tmp_path / "excel.csv"
    path.write_bytes(("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)).encode("cp1252"))
    with pytest.raises(HybridFTError, match=r"not valid UTF-8 \(byte 0xe9 at byte 4 of line 2\).*data\.encoding "
                                            r"\(Excel on Windows saves CSV as cp1252\)"):
        load_splits(DataConfig(train=str(path), validation=str(path)), seed=0)
    splits = load_splits(DataConfig(train=str(path), validation=str(path), encoding="cp1252"), seed=0)
    assert splits.validation.texts == [t for t, _ in rows]
    out = tmp_path / "out.jsonl"
    report = predict_file(_echo, path, out, progress=False, encoding="cp1252")
    assert report.rows_written == 4 and [json.loads(x)["text"] for x in out.read_text().splitlines()][1] == "it’s dull"
    with pytest.raises(HybridFTError, match=r"line 2: not valid UTF-8 \(byte 0xe9 at byte 4 of the line\); if the "
                                            r"file is in another encoding, pass it with --encoding"):
        predict_file(_echo, path, out, progress=False)
    # latin-1 reads every byte: the curly apostrophe (0x92) would become a control character, so it is refused
    with pytest.raises(HybridFTError, match=r"line 3 holds a control character \(byte 0x92\) when read as latin-1: "
                                            r"the file is probably cp1252"):
        load_splits(DataConfig(train=str(path), validation=str(path), encoding="latin-1"), seed=0)
    with pytest.raises(HybridFTError, match=r"line 3: byte 0x92 at byte 3 of the line is a control character in "
                                            r"latin-1: the file is probably cp1252"):
        predict_file(_echo, path, out, progress=False, encoding="latin-1")
    # the option is checked before anything runs
    assert main(["predict", "--model", str(tmp_path), "--input", str(path), "--output", str(out),
                 "--encoding", "klingon"]) == 2
    assert "--encoding: 'klingon' is not an encoding Python knows" in capsys.readouterr().err
    assert main(["run", "data.encoding=utf-16"]) == 2
    assert "does not write a newline as one byte" in capsys.readouterr().err


def test_a_utf16_file_is_named_as_such(tmp_path: Path):
    path = tmp_path / "unicode.txt"
    path.write_bytes("text\tlabel\ngood\tpos\n".encode("utf-16"))
    for encoding in ("utf-8", "cp1252"):  # a one-byte encoding would read it as text full of NULs
        with pytest.raises(HybridFTError, match=r"cannot be read; it is UTF-16 \(Excel's \"Unicode Text\""):
            load_splits(DataConfig(train=str(path), validation=str(path), encoding=encoding), seed=0)
    with pytest.raises(HybridFTError, match=r"cannot be read; it is UTF-16"):
        predict_file(_echo, path, tmp_path / "o.jsonl", progress=False)
