"""Configs: every shipped YAML loads, overrides apply, typos and bad values are refused by name."""

from pathlib import Path

import pytest

from hybridft.config import RunConfig, load_config
from hybridft.errors import HybridFTError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))  # configs/accelerate/: Accelerate's


def test_there_are_example_configs():
    names = {p.stem for p in CONFIGS}
    assert {"sst2", "ag_news", "emotion"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert path.read_text().startswith("# hybridft run --config"), "each config says how to run it"


def test_defaults_match_the_documentation():
    cfg = load_config()
    assert (cfg.loss.temperature, cfg.loss.alpha, cfg.loss.beta, cfg.loss.strategy) == (2.0, 0.5, 0.5, "joint")
    from hybridft.config import student_num_layers

    assert (student_num_layers(cfg), student_num_layers(load_config(overrides=["task=causal_lm"]))) == (2, 8)
    # the student trains twice the teacher's epochs (patient KD on stored outputs); causal_lm keeps its own 3
    assert (cfg.student.train.epochs, cfg.teacher.train.epochs) == (6.0, 3.0)
    assert load_config(overrides=["task=causal_lm"]).student.train.epochs == 3.0


def test_overrides_reach_nested_keys_and_keep_sibling_defaults(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  train: a.csv\n  text_column: sentence\nstudent:\n  train:\n    epochs: 1\n")
    cfg = load_config(f, ["student.layers=[0,5]", "loss.temperature=4", "output_dir=out", "teacher.train.lr=3e-5"])
    assert cfg.data.train == "a.csv" and cfg.data.text_column == "sentence"
    assert cfg.student.layers == [0, 5] and cfg.loss.temperature == 4.0 and cfg.output_dir == "out"
    assert cfg.student.train.epochs == 1.0
    assert cfg.student.train.lr == RunConfig().student.train.lr, "a nested override must keep the stage's defaults"
    assert cfg.teacher.train.lr == pytest.approx(3e-5)


@pytest.mark.parametrize("overrides, key", [
    (["loss.temprature=3"], "loss.temprature"),
    (["outptu_dir=x"], "outptu_dir"),
    (["student.train.epochs=abc"], "student.train.epochs"),
    (["loss.temperature=0"], "loss.temperature"),
    (["loss.alpha=0", "loss.beta=0"], "loss.alpha"),
    (["loss.strategy=both"], "loss.strategy"),
    (["data.label_fraction=0"], "data.label_fraction"),
    (["student.layers=[0,0]"], "student.layers"),
    (["teacher.train.grad_accum=0"], "teacher.train.grad_accum"),
    (["student.train.length_splits=0"], "student.train.length_splits"),
    (["precision=fp8"], "precision"),
    (["progress=maybe"], "progress"),
    (["hybrid.draft_vocabulary=-1"], "hybrid.draft_vocabulary"),
    (["hybrid.draft_confidence=1"], "hybrid.draft_confidence"),
    # one column in two roles: a classifier would learn its answer from its input
    (["data.text_column=sentiment", "data.label_column=sentiment"], "data.label_column"),
    (["data.text_pair_column=text"], "data.text_pair_column"),
    (["task=causal_lm", "data.response_column=prompt"], "data.response_column"),
    # kl is the student's distance to its teacher: not the teacher's, nor a causal LM's (validation measures loss)
    (["teacher.train.best_metric=kl"], "teacher.train.best_metric"),
    (["task=causal_lm", "student.train.best_metric=kl"], "student.train.best_metric"),
    # no teacher is loaded to score validation
    (["distill.teacher_logits=t.safetensors", "student.model=other/model", "student.train.best_metric=kl"],
     "student.train.best_metric"),
])
def test_bad_values_are_refused_by_name(overrides, key):
    with pytest.raises(HybridFTError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_a_text_setting_given_on_the_command_line_keeps_colons_and_braces():
    """YAML would read "Review: {text}" as a mapping; a string setting keeps the text as written, newline included."""
    from hybridft.config import load_config

    cfg = load_config(None, ["teacher.zero_shot.prompt=Review: {text}\nSentiment:", "data.labels=[a,b]",
                             "teacher.zero_shot.verbalizers=[[x],[y]]", "student.model=m", "data.train=t.csv"])
    assert cfg.teacher.zero_shot.prompt == "Review: {text}\nSentiment:"
    assert load_config(None, ["output_dir=a: b"]).output_dir == "a: b"
    with pytest.raises(HybridFTError, match="student.train.epochs"):  # other settings keep their type checks
        load_config(None, ["student.train.epochs={a: 1}"])


@pytest.mark.parametrize("key", ["student.num_layers=4", "student.layers=[0,2]"])
def test_teacher_layers_beside_a_named_student_model_are_refused(key: str):
    """student.model is used whole: a layer setting beside it used to be ignored without a word."""
    with pytest.raises(HybridFTError, match=f"config key '{key.split('=')[0]}'.*student.model=other/model is used whole"):
        load_config(overrides=["student.model=other/model", key])
    assert load_config(overrides=["student.model=other/model"]).student.num_layers is None


@pytest.mark.parametrize("text, message", [
    ("student:\n\tnum_layers: 2\n", r"not valid YAML at line 2, column 1: found character '\\t'.*YAML indents with spaces, not tabs"),
    ("student:\n  train:\n    epochs: 1\n    epochs: 5\n", "line 4, column 5: the key 'epochs' is given twice"),
    ("student:\n  layers: [1,\n", "line 3, column 1: expected the node content"),
])
def test_a_broken_config_file_names_the_line_and_the_cause(tmp_path: Path, text: str, message: str):
    """PyYAML's first line alone ("while scanning for the next token") named neither; a repeated key won silently."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(HybridFTError, match=message):
        load_config(f)


def test_the_students_weights_are_chosen_by_its_kl_to_the_teacher_when_it_learns_from_one():
    from hybridft.config import student_best_metric

    cfg = load_config()
    assert cfg.student.train.best_metric == "auto" and cfg.teacher.train.best_metric is None
    assert student_best_metric(cfg, teacher_loaded=True) == "kl"
    assert student_best_metric(cfg, teacher_loaded=False) == "loss"  # a store and a named student: no teacher
    assert student_best_metric(load_config(overrides=["loss.alpha=0", "loss.beta=1"]), True) == "loss"  # labels alone
    assert student_best_metric(load_config(overrides=["task=causal_lm"]), True) == "loss"
    assert student_best_metric(load_config(overrides=["student.train.best_metric=accuracy"]), True) == "accuracy"
