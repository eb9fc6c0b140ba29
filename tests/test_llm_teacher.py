"""A causal LM as the teacher of a small classifier (issue 11, part 3).

(a) Zero-shot: the LM's calibrated verbalizer scores become a classification store, a student with its own
tokenizer learns from them on unlabeled text alone, the hybrid cascade runs with the LM as its teacher, and
everything survives a save and a second run. (b) Fine-tuned: the LM with a sequence-classification head is the
teacher stage, distilled into a student with another tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import NEGATIVE, POSITIVE, WORDS, sentiment_rows, write_csv
from hybridft import verbalizer as vb
from hybridft.errors import HybridFTError

PROMPT = "Review: {text} Answer:"
VERBALIZERS = "[[negative],[positive, positive good]]"  # "positive good" is two tokens: the multi-token path runs


def make_word_tokenizer(folder: Path, bos: bool = False):
    """A word-level tokenizer over the sentiment words, the prompt's words and the answers; no pad token. With
    `bos`, it adds <s> before every text, as a Llama tokenizer does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "<s>", "Review:", "Answer:", "negative", "positive", "N/A", "[MASK]", *WORDS]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>",
                                  bos_token="<s>" if bos else None)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return tok


def train_sentiment_lm(folder: Path, steps: int = 150) -> Path:
    """A tiny Llama that learned to answer "negative" or "positive" after `PROMPT`: a zero-shot teacher that knows
    the task, trained in-process on the final answer token of 64 reviews."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_word_tokenizer(folder)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True))
    rows = sentiment_rows(64, seed=11)
    ids = [tok(PROMPT.replace("{text}", t))["input_ids"] for t, _ in rows]
    answers = torch.tensor([tok.convert_tokens_to_ids("positive" if y == "pos" else "negative") for _, y in rows])
    x = torch.tensor(ids)  # every review has 5 words: no padding
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lm(x).logits[:, -1], answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sentiment_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentiment_lm(tmp_path_factory.mktemp("lm") / "sentiment-lm")


def zero_shot_overrides(lm_dir: Path, student_dir: Path, tmp_path: Path, out: Path) -> list[str]:
    unlabeled = tmp_path / "unlabeled.csv"
    unlabeled.write_text("text\n" + "".join(f"{t}\n" for t, _ in sentiment_rows(96, seed=21)), encoding="utf-8")
    return [
        f"teacher.model={lm_dir}", f"teacher.zero_shot.prompt={PROMPT}", f"teacher.zero_shot.verbalizers={VERBALIZERS}",
        "teacher.zero_shot.chat_template=false", f"student.model={student_dir}", f"output_dir={out}",
        f"data.unlabeled={unlabeled}", "data.labels=[neg,pos]",
        f"data.validation={write_csv(tmp_path / 'val.csv', sentiment_rows(16, seed=2))}",
        f"data.test={write_csv(tmp_path / 'test.csv', sentiment_rows(24, seed=3))}",
        "data.max_length=16", "progress=false", "precision=fp32", "augment.factor=0", "export.enabled=false",
        "student.train.epochs=8", "student.train.batch_size=8", "student.train.lr=3e-3",
        "eval.speed_batches=1", "eval.latency_samples=2",
    ]


def test_the_student_learns_the_zero_shot_teachers_labels_from_unlabeled_text_alone(
        sentiment_lm: Path, tiny_teacher_dir: Path, tmp_path: Path, capsys):
    from hybridft import pipeline
    from hybridft.config import load_config
    from hybridft.hybrid import HybridModel

    out = tmp_path / "run"
    cfg = load_config(None, zero_shot_overrides(sentiment_lm, tiny_teacher_dir, tmp_path, out))
    summary = pipeline.run(cfg)
    assert summary["transfer_set"]["labeled"] == 0 and summary["transfer_set"]["unlabeled"] == 96
    assert summary["teacher"]["accuracy"] >= 0.9  # the LM answers the prompt
    assert summary["student"]["accuracy"] >= 0.85  # learned from the LM's soft labels, with no gold label at all
    assert summary["hybrid"]["accuracy"] >= summary["student"]["accuracy"] - 0.05
    meta = json.loads((out / "teacher" / vb.ZERO_SHOT_FILE).read_text())
    assert meta["label_names"] == ["neg", "pos"] and meta["prior"] is not None

    # the store holds the calibrated verbalizer scores: softmax over labels of log P(word | prompt) / prior
    from hybridft.teacher_outputs import read_store
    from hybridft.data import example_key

    store = read_store(out / "teacher_outputs.safetensors")
    texts = [t for t, _ in sentiment_rows(96, seed=21)][:5]
    lm, tok = pipeline.TASKS["classification"].load_model(str(out / "teacher"), pipeline.TASKS[
        "classification"].load_splits(cfg, cfg.seed), "teacher")
    raw = vb.label_scores(lm.lm, tok, texts, PROMPT, [["negative"], ["positive", "positive good"]],
                          torch.device("cpu"), chat_template=False)
    torch.testing.assert_close(store.lookup([example_key(t) for t in texts], "test"),
                               vb.calibrate(raw, lm.log_prior.exp()), atol=1e-5, rtol=0)

    # the saved hybrid answers with the LM as its teacher
    hybrid = HybridModel.load(out / "hybrid")
    pred = hybrid.predict([" ".join(POSITIVE[:3]), " ".join(NEGATIVE[:3])])
    assert hybrid.label_names == ["neg", "pos"] and pred.label_ids.tolist() == [1, 0]

    # a second run reuses the stored teacher outputs
    capsys.readouterr()
    pipeline.run(load_config(None, zero_shot_overrides(sentiment_lm, tiny_teacher_dir, tmp_path, tmp_path / "run2")
                             + ["progress=true"]))
    assert "reusing stored teacher outputs" in capsys.readouterr().out


def test_save_and_load_keep_the_scores_and_a_bos_token_is_not_spliced_into_the_prompt(tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridft.tasks import classification

    tok = make_word_tokenizer(tmp_path / "tok", bos=True)
    torch.manual_seed(1)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    tok.pad_token = tok.eos_token
    model = vb.build_zero_shot(lm, tok, PROMPT, [["negative"], ["positive"]], ["neg", "pos"], chat_template=False)
    texts = ["good movie", "awful plot"]
    enc = tok(texts, padding=True, return_tensors="pt")
    # the prompt is <s> Review: <text> Answer: with one <s>: the text's own <s> is dropped when spliced in
    assert model._rows(enc["input_ids"], enc["attention_mask"])[0] == tok("Review: good movie Answer:")["input_ids"]
    logits = model(**enc).logits
    assert logits.shape == (2, 2) and torch.allclose(logits.exp().sum(-1), torch.ones(2))
    folder = tmp_path / "saved"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    assert classification.classifier_labels(str(folder)) == ["neg", "pos"]
    loaded = classification.load_classifier(str(folder), ["neg", "pos"], "teacher")
    torch.testing.assert_close(loaded(**enc).logits, logits)
    with pytest.raises(HybridFTError, match="scores labels"):
        classification.load_classifier(str(folder), ["a", "b"], "teacher")


@pytest.mark.parametrize("override, message", [
    ("teacher.zero_shot.verbalizers=[[negative]]", "one list of words per label"),
    ("student.model=null", "student.model"),
    ("teacher.finetune=always", "used as it is"),
    ("teacher.zero_shot.prompt=no placeholder", "exactly once"),
    ("data.labels=null", "data.labels"),
    ("distill.online=true", "distill.online"),
])
def test_unusable_zero_shot_settings_are_refused_in_one_line(override: str, message: str, tmp_path: Path):
    from hybridft.config import load_config

    base = zero_shot_overrides(tmp_path / "lm", tmp_path / "student", tmp_path, tmp_path / "run")
    with pytest.raises(HybridFTError, match=message):
        load_config(None, base + [override])


def test_verbalizers_without_a_prompt_are_refused(tmp_path: Path):
    from hybridft.config import load_config

    with pytest.raises(HybridFTError, match="needs teacher.zero_shot.prompt"):
        load_config(None, ["teacher.zero_shot.verbalizers=[[a],[b]]"])


def test_a_causal_lm_fine_tuned_with_a_classification_head_teaches_a_student_with_its_own_tokenizer(
        tiny_teacher_dir: Path, tiny_data, tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridft import pipeline
    from hybridft.config import load_config
    from hybridft.hybrid import HybridModel
    from conftest import tiny_overrides

    lm_dir = tmp_path / "lm"
    tok = make_word_tokenizer(lm_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(lm_dir)
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_teacher_dir, tiny_data, out) + [
        f"teacher.model={lm_dir}", f"student.model={tiny_teacher_dir}", "student.num_layers=null", "export.enabled=false"]
    summary = pipeline.run(load_config(None, overrides))
    saved = json.loads((out / "teacher" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"]  # the LM got a classification head
    assert summary["teacher"]["accuracy"] >= 0.9 and summary["student"]["accuracy"] >= 0.85
    hybrid = HybridModel.load(out / "hybrid")
    assert hybrid.predict([" ".join(POSITIVE[:3]), " ".join(NEGATIVE[:3])]).label_ids.tolist() == [1, 0]


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2").is_dir(),
                    reason="needs ../shared/data/sst2 (the SST-2 files are not part of the repository)")
@pytest.mark.parametrize("mode", ["zero_shot", "finetuned"])
def test_llm_teacher_bench_quick_mode_reports_teacher_student_and_baseline(mode: str, sentiment_lm: Path,
                                                                           tiny_teacher_dir: Path, tmp_path: Path):
    import importlib.util

    bench = Path(__file__).resolve().parents[1] / "bench" / "llm_teacher.py"
    spec = importlib.util.spec_from_file_location("bench_llm_teacher", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "result.json"
    assert module.main(["--quick", "--mode", mode, "--teacher", str(sentiment_lm), "--student", str(tiny_teacher_dir),
                        "--workdir", str(tmp_path / "work"), "--out", str(out), "--set=progress=false",
                        "--set=precision=fp32", "--set=data.max_length=32"]) == 0
    result = json.loads(out.read_text())
    rows = [result["zero_shot"]] if mode == "zero_shot" else [result["kd"], result["ce_only"]]
    for r in rows:
        assert 0 <= r["student_accuracy"] <= 1 and 0 <= r["teacher_accuracy"] <= 1 and r["speedup"] > 0
    if mode == "zero_shot":
        assert result["zero_shot"]["transfer_set"]["labeled"] == 0 and "hybrid_accuracy" in result["zero_shot"]
    else:
        assert result["kd_minus_ce"] == round(result["kd"]["student_accuracy"] - result["ce_only"]["student_accuracy"], 4)
