"""Bad input of every kind ends in ONE line `hybridft: error: ...` on stderr, exit status 2, and no change
to anything that existed before the command ran.

Each row of `CASES` builds one kind of bad input (data file, config, model folder, output folder or
teacher-output store) on top of a good tiny setup, runs `hybridft.cli.main(argv)` in-process and checks:

* the return value is 2 and stdout holds no traceback;
* stderr is exactly one line, starting with `hybridft: error:`, that contains the row's expected words;
* every file that existed before (the output folder's sentinel or previous run, the data files, the tiny
  teacher folders) still exists with identical bytes;
* for rows that must fail before any work starts (`fast=True`), the output folder gained no new files.

`test_good_input_runs` is the positive control: the same setup with good data finishes with status 0.
The teacher is a 2-layer BERT with hidden size 32 built in-process, so nothing loads the real MiniLM.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from hybridft.cli import main  # noqa: E402

WORDS = ("good great fine happy love nice best fun superb lovely bad awful poor sad hate ugly worst dull boring "
         "terrible the a movie film plot acting was is very really quite story this that one it and so "
         "but").split()
POSITIVE, NEGATIVE, FILLER = WORDS[:10], WORDS[10:20], WORDS[20:]
ZERO_WIDTH = "\u200b"  # a zero-width space: not whitespace to str.strip(), but BERT's normaliser drops it


# ---------------------------------------------------------------------------------------------------
# the tiny, good setup shared by every row (built once per module)


def _rows(n: int, seed: int) -> list[tuple[str, str]]:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 2) + rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
        rows.append((" ".join(words), label))
    return rows


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    return path


def _tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))


def _bert(labels: Optional[list[str]] = None):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    extra = {} if labels is None else {"id2label": dict(enumerate(labels)),
                                       "label2id": {n: i for i, n in enumerate(labels)}}
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2, **extra)
    return BertForSequenceClassification(config)


def _model_folder(folder: Path, labels: Optional[list[str]] = None, safe: bool = True) -> Path:
    tok = _tokenizer(folder)
    model = _bert(labels)
    if safe:
        model.save_pretrained(folder)
    else:  # a legacy checkpoint: recent transformers always write safetensors, so pickle it by hand
        import torch

        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tok.save_pretrained(folder)
    return folder


@dataclass
class Env:
    root: Path
    teacher: Path  # an untrained 2-layer BERT classifier (labels LABEL_0/LABEL_1): it will be fine-tuned
    train: Path
    validation: Path
    test: Path
    other_labels_teacher: Path  # a classifier already fine-tuned for labels [sports, tech]
    pickle_teacher: Path  # config.json + pytorch_model.bin only
    no_config_teacher: Path  # weights and tokenizer, no config.json
    no_weights_teacher: Path  # config.json and tokenizer, no weights at all


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("bad-input-env")
    teacher = _model_folder(root / "teacher")
    no_config = root / "no-config"
    shutil.copytree(teacher, no_config)
    (no_config / "config.json").unlink()
    no_weights = root / "no-weights"
    shutil.copytree(teacher, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    pickle_teacher = _model_folder(root / "pickle", safe=False)
    assert not list(pickle_teacher.glob("*.safetensors")) and list(pickle_teacher.glob("*.bin"))
    return Env(
        root=root, teacher=teacher,
        train=_csv(root / "train.csv", _rows(20, seed=1)),
        validation=_csv(root / "val.csv", _rows(8, seed=2)),
        test=_csv(root / "test.csv", _rows(8, seed=3)),
        other_labels_teacher=_model_folder(root / "other-labels", labels=["sports", "tech"]),
        pickle_teacher=pickle_teacher, no_config_teacher=no_config, no_weights_teacher=no_weights,
    )


def good_overrides(env: Env, out: Path, cache: Path, **changes: Optional[str]) -> list[str]:
    """The tiny run's overrides; `changes` (keys with `__` for `.`) replace or, with None, drop entries."""
    settings = {
        "teacher.model": str(env.teacher), "output_dir": str(out),
        "data.train": str(env.train), "data.validation": str(env.validation), "data.test": str(env.test),
        "data.max_length": "16", "progress": "false", "student.num_layers": "1",
        "teacher.train.epochs": "1", "teacher.train.batch_size": "8",
        "student.train.epochs": "1", "student.train.batch_size": "8",
        "eval.speed_batches": "1", "eval.latency_samples": "2", "distill.cache_dir": str(cache),
    }
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    return [f"{k}={v}" for k, v in settings.items()]


# ---------------------------------------------------------------------------------------------------
# the table


@dataclass
class Row:
    """What one case runs in: `out` is the output folder (prepared with a sentinel or a previous run) and `work`
    a scratch folder for the bad files."""

    env: Env
    work: Path
    out: Path
    cache: Path

    def argv(self, *extra: str, command: str = "run", **changes: Optional[str]) -> list[str]:
        return [command, *good_overrides(self.env, self.out, self.cache, **changes), *extra]

    def with_file(self, key: str, name: str, content: str | bytes, *extra: str) -> list[str]:
        """The good argv with config key `key` (`__` for `.`) pointing at a new file `name`."""
        return self.argv(*extra, **{key: str(self.file(name, content))})

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.work / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path


@dataclass
class Case:
    id: str
    argv: Callable[[Row], list[str]]
    expect: tuple[str, ...]
    """Words the error line must contain (case-insensitive)."""
    prior: str = "sentinel"
    """What the output folder holds beforehand: `sentinel` (keep.txt), `run` (a finished run) or `none`."""
    fast: bool = True
    """The command must fail before writing anything into the output folder. Errors found after
    `pipeline.prepare` (model folders, teacher-output stores, tokenisation) come after prepare has written
    config.yaml (or config.<stage>.yaml) there, so those rows are `fast=False`: existing files are still checked."""
    setup: Optional[Callable[[Row], None]] = None
    root_skip: bool = False
    """Skip when running as root (root ignores permission bits)."""
    environ: Optional[dict[str, str]] = None
    """Environment variables set for the command (what `accelerate launch` passes on)."""


def _csv_text(rows: list[tuple[str, str]]) -> str:
    return "text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)


GOOD = _rows(20, seed=1)


def _store(r: Row, labels: list[str]) -> Path:
    import torch

    from hybridft.data import example_key
    from hybridft.teacher_outputs import write_store

    keys = [example_key(t) for t, _ in GOOD]  # the rows of env.train
    return write_store(r.work / "store.safetensors", keys, torch.zeros(len(keys), len(labels)), labels)


def _read_only(r: Row) -> None:
    r.out.chmod(0o555)


CASES = [
    # --- data files ---------------------------------------------------------------------------------
    Case("missing-train-file", lambda r: r.argv(data__train=str(r.work / "nope.csv")),
         ("data.train", "not found", "nope.csv")),
    Case("empty-file", lambda r: r.with_file("data__train", "empty.csv", ""), ("data.train", "empty")),
    Case("header-only-file", lambda r: r.with_file("data__train", "header.csv", "text,label\n"),
         ("data.train", "no rows")),
    Case("wrong-text-column", lambda r: r.argv(data__text_column="sentence"),
         ("no column 'sentence'", "data.text_column")),
    Case("wrong-label-column", lambda r: r.argv(data__label_column="y"),
         ("no column 'y'", "data.label_column")),
    # the emotion dataset as shipped: a .txt (read as tab-separated) whose header is "text;label"
    Case("semicolon-txt-read-with-tabs",
         lambda r: r.with_file("data__train", "emotion.txt", "text;label\ni feel great;joy\ni am sad;sadness\n"),
         ("no column 'text'", "one column", "data.delimiter=';'")),
    Case("bad-utf8", lambda r: r.with_file("data__train", "latin.csv", b"text,label\n\xff\xfe bad,1\n"),
         ("not valid utf-8", "line 2")),
    Case("empty-text-in-row",
         lambda r: r.with_file("data__train", "emptytext.csv", _csv_text([*GOOD[:5], ("", "neg"), *GOOD[5:]])),
         ("line 7", "empty text")),
    Case("whitespace-text-in-row",
         lambda r: r.with_file("data__train", "blank.csv", _csv_text([*GOOD[:2], ("   ", "neg"), *GOOD[2:]])),
         ("line 4", "empty text")),
    Case("missing-label-in-row",
         lambda r: r.with_file("data__train", "nolabel.csv", _csv_text([*GOOD[:3], ("good movie", "")])),
         ("line 5", "missing label")),
    Case("validation-label-not-in-train",
         lambda r: r.with_file("data__validation", "val.csv", _csv_text([*GOOD[:4], ("the plot", "neutral")])),
         ("line 6", "label 'neutral'", "neg", "pos")),
    Case("test-label-not-in-train",
         lambda r: r.with_file("data__test", "test.csv", _csv_text([("the plot", "mixed"), *GOOD[:4]])),
         ("line 2", "label 'mixed'")),
    Case("only-one-label",
         lambda r: r.with_file("data__train", "one.csv", _csv_text([(t, "pos") for t, _ in GOOD])),
         ("only one label", "at least 2")),
    Case("unsupported-extension-xlsx",
         lambda r: r.with_file("data__train", "train.xlsx", b"PK\x03\x04 not really a workbook"),
         ("unsupported format", ".xlsx")),
    Case("malformed-jsonl-line",
         lambda r: r.with_file("data__train", "train.jsonl",
                               '{"text": "good movie", "label": "pos"}\n{"text": "bad movie", "label": \n'),
         ("line 2", "not valid json")),
    Case("jsonl-line-not-an-object",
         lambda r: r.with_file("data__train", "list.jsonl",
                               '{"text": "good movie", "label": "pos"}\n["bad movie", "neg"]\n'),
         ("line 2", "not a json object")),
    Case("text-tokenises-to-nothing",
         lambda r: r.with_file("data__train", "zw.csv", _csv_text([*GOOD, (ZERO_WIDTH, "neg")])),
         ("line 22", "tokenises to nothing"), fast=False),
    # --- configs ------------------------------------------------------------------------------------
    Case("unknown-top-level-key", lambda r: r.argv("outptu_dir=x"), ("unknown config key 'outptu_dir'",)),
    Case("unknown-nested-key", lambda r: r.argv("loss.temprature=2"),
         ("unknown config key 'loss.temprature'", "loss.temperature")),
    Case("wrong-type-epochs", lambda r: r.argv(student__train__epochs="abc"),
         ("student.train.epochs", "expected a number", "abc")),
    Case("temperature-zero", lambda r: r.argv("loss.temperature=0"), ("loss.temperature", "> 0")),
    Case("alpha-negative", lambda r: r.argv("loss.alpha=-1"), ("loss.alpha", ">= 0")),
    Case("alpha-and-beta-zero", lambda r: r.argv("loss.alpha=0", "loss.beta=0"), ("alpha and beta are both 0",)),
    Case("label-fraction-above-one", lambda r: r.argv("data.label_fraction=1.5"),
         ("data.label_fraction", "(0, 1]", "1.5")),
    Case("batch-size-zero", lambda r: r.argv(student__train__batch_size="0"),
         ("student.train.batch_size", ">= 1")),
    Case("config-yaml-not-a-mapping",
         lambda r: ["run", "--config", str(r.file("list.yaml", "- teacher\n- student\n")), *r.argv()[1:]],
         ("must be a mapping", "list")),
    Case("config-yaml-invalid",
         lambda r: ["run", "--config", str(r.file("bad.yaml", "loss: {alpha: [1\n")), *r.argv()[1:]],
         ("not valid yaml",)),
    Case("missing-config-file", lambda r: ["run", "--config", str(r.work / "nope.yaml"), *r.argv()[1:]],
         ("config file not found", "nope.yaml")),
    Case("fp16-without-a-gpu", lambda r: r.argv("device=cpu", "precision=fp16"), ("precision=fp16", "cuda", "bf16")),
    Case("accelerate-mixed-precision-fp8", lambda r: r.argv(), ("mixed_precision=fp8", "bf16"),
         environ={"ACCELERATE_MIXED_PRECISION": "fp8"}),
    Case("accelerate-accumulation-not-a-number", lambda r: r.argv(), ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "'two'"),
         environ={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "two"}),
    Case("accelerate-deepspeed", lambda r: r.argv(), ("DeepSpeed", "not support", "fsdp.yaml"),
         environ={"ACCELERATE_USE_DEEPSPEED": "true"}),
    Case("text-column-is-the-label-column", lambda r: r.argv(data__label_column="text"),
         ("data.label_column", "'text'", "data.text_column")),
    Case("override-without-equals", lambda r: r.argv("student.train.epochs"),
         ("'student.train.epochs' is not key=value",)),
    # --- model folders ------------------------------------------------------------------------------
    Case("teacher-folder-missing", lambda r: r.argv(teacher__model=str(r.work / "no-such-model")),
         ("teacher.model", "model folder not found"), fast=False),
    Case("teacher-folder-without-config-json", lambda r: r.argv(teacher__model=str(r.env.no_config_teacher)),
         ("teacher.model", "no config.json"), fast=False),
    Case("teacher-folder-pickle-weights-only", lambda r: r.argv(teacher__model=str(r.env.pickle_teacher)),
         ("teacher.model", "pickle", "safetensors"), fast=False),
    Case("teacher-folder-without-weights", lambda r: r.argv(teacher__model=str(r.env.no_weights_teacher)),
         ("teacher.model", "no model weights"), fast=False),
    Case("teacher-model-is-a-file", lambda r: r.argv(teacher__model=str(r.env.train)),
         ("teacher.model", "is a file"), fast=False),
    Case("teacher-other-labels-finetune-never",
         lambda r: r.argv(teacher__model=str(r.env.other_labels_teacher), teacher__finetune="never"),
         ("fine-tuned for labels", "sports", "tech", "neg", "pos"), fast=False),
    Case("distill-teacher-not-finetuned",
         lambda r: r.argv(command="distill"), ("not a classifier for labels", "hybridft teacher"), fast=False),
    # --- output folders -----------------------------------------------------------------------------
    Case("output-dir-read-only", lambda r: r.argv(), ("not writable",), setup=_read_only, root_skip=True),
    Case("output-dir-is-a-file", lambda r: r.argv(output_dir=str(r.file("out.txt", "I am a file\n"))),
         ("is a file",), prior="none"),
    Case("output-dir-under-a-file", lambda r: r.argv(output_dir=str(r.file("plain", "x\n") / "run")),
         ("not writable",), prior="none"),
    Case("existing-run-without-overwrite", lambda r: r.argv(), ("already holds a run", "--overwrite"), prior="run"),
    Case("existing-run-overwrite-bad-data",
         lambda r: r.with_file("data__train", "empty.csv", "", "--overwrite"), ("empty",), prior="run"),
    Case("teacher-command-existing-run", lambda r: r.argv(command="teacher"), ("already holds a run",), prior="run"),
    Case("evaluate-not-a-run-folder", lambda r: ["evaluate", "--run", str(r.out)], ("not a run folder",)),
    # --- teacher-output stores ----------------------------------------------------------------------
    Case("store-labels-disagree",
         lambda r: r.argv(distill__teacher_logits=str(_store(r, ["negative", "positive"]))),
         ("teacher outputs are for labels", "negative", "neg", "pos"), fast=False),
    Case("store-not-safetensors",
         lambda r: r.argv(distill__teacher_logits=str(r.file("store.safetensors", "just text, not tensors\n"))),
         ("not a teacher-output store",), fast=False),
    Case("store-missing", lambda r: r.argv(distill__teacher_logits=str(r.work / "none.safetensors")),
         ("teacher-output store not found",), fast=False),
]


# ---------------------------------------------------------------------------------------------------
# the checks


def snapshot(*roots: Path) -> dict[Path, bytes]:
    """Every file under the roots (or the root itself, if it is a file) with its bytes."""
    files: dict[Path, bytes] = {}
    for root in roots:
        if root.is_file():
            files[root] = root.read_bytes()
        elif root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    files[p] = p.read_bytes()
    return files


def fake_previous_run(out: Path) -> None:
    out.mkdir(parents=True)
    (out / "config.yaml").write_text("output_dir: previous\nseed: 7\n", encoding="utf-8")
    (out / "summary.json").write_text('{"split": "test", "examples": 3}\n', encoding="utf-8")
    (out / "metrics.jsonl").write_text('{"stage": "teacher", "step": 1}\n', encoding="utf-8")
    for name in ("teacher", "student"):
        (out / name).mkdir()
        (out / name / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}\n')
        (out / name / "model.safetensors").write_bytes(b"previous weights " + name.encode())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    if case.root_skip and os.geteuid() == 0:
        pytest.skip("running as root, which ignores permission bits (see output-dir-is-a-file/-under-a-file)")
    for name, value in (case.environ or {}).items():
        monkeypatch.setenv(name, value)
    work = tmp_path / "work"
    work.mkdir()
    row = Row(env=env, work=work, out=tmp_path / "out", cache=tmp_path / "teacher-outputs")
    if case.prior == "sentinel":
        row.out.mkdir()
        (row.out / "keep.txt").write_text("a file the user had here\n", encoding="utf-8")
    elif case.prior == "run":
        fake_previous_run(row.out)
    argv = case.argv(row)
    if case.setup:
        case.setup(row)
    before = snapshot(tmp_path, env.root)
    out_before = set(snapshot(row.out))
    capsys.readouterr()

    try:
        code = main(argv)
    finally:
        if case.setup is _read_only:
            row.out.chmod(0o755)
    captured = capsys.readouterr()

    lines = captured.err.strip().splitlines()
    assert code == 2, f"exit status {code}, stderr: {captured.err!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {captured.err!r}"
    assert lines[0].startswith("hybridft: error: "), lines[0]
    assert "Traceback" not in captured.out + captured.err
    for word in case.expect:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"

    after = snapshot(tmp_path, env.root)
    changed = [str(p) for p, data in before.items() if after.get(p) != data]
    assert not changed, f"existing files changed or removed: {changed}"
    if case.fast and row.out.is_dir():
        new = sorted(str(p.relative_to(row.out)) for p in set(snapshot(row.out)) - out_before)
        assert not new, f"the command wrote {new} into the output folder before failing"


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


def test_good_input_runs(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Positive control: the setup every row starts from is itself good and runs end to end."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a file the user had here\n", encoding="utf-8")
    before = snapshot(env.root)
    code = main(["run", *good_overrides(env, out, tmp_path / "teacher-outputs")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "hybridft: error" not in captured.err
    assert (out / "summary.json").is_file()
    assert (out / "teacher" / "config.json").is_file() and list((out / "teacher").glob("*.safetensors"))
    assert (out / "student" / "config.json").is_file() and list((out / "student").glob("*.safetensors"))
    assert (out / "keep.txt").read_text(encoding="utf-8") == "a file the user had here\n"
    assert snapshot(env.root) == before
