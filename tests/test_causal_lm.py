"""task: causal_lm on tiny Llama and GPT-2 models (hidden 32) over a word vocabulary: the shift and the masks,
the stored top-k and sampled targets against the dense loss, gradient accumulation, the vocabulary check,
the whole pipeline, `hybridft generate` and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from hybridft.config import TrainConfig, load_config
from hybridft.data import Examples
from hybridft.errors import HybridFTError
from hybridft.losses import IGNORE_INDEX, LossWeights, hybrid_loss, stored_targets
from hybridft.tasks import causal_lm as task
from hybridft.teacher_outputs import compute, read_store, write_token_store
from hybridft.train import fit

LM_WORDS = "red green blue cyan pink gold gray white black brown one two three four five six".split()
CPU = torch.device("cpu")


def make_lm_tokenizer(folder: Path, pad: bool = False, template: bool = False):
    """A word-level fast tokenizer with an end-of-sequence token and, like GPT-2's, no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "<pad>", "Q:", "A:", *LM_WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>",
                                  pad_token="<pad>" if pad else None)
    if template:
        tok.chat_template = "{% for m in messages %}Q: {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return tok


def make_llama(vocab: int, layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=128, tie_word_embeddings=True))


def make_gpt2(vocab: int, layers: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=2, n_positions=128))


def lm_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """The response repeats the prompt's colours in reverse: learnable, with prompts of different lengths."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(LM_WORDS[:10], rng.randint(2, 5))
        rows.append({"prompt": " ".join(words), "response": " ".join(reversed(words))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tiny_lm_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-lm"
    tok = make_lm_tokenizer(folder)
    make_llama(len(tok)).save_pretrained(folder)
    return folder


@pytest.fixture
def lm_data(tmp_path: Path) -> dict[str, Path]:
    return {"train": write_jsonl(tmp_path / "train.jsonl", lm_rows(48, seed=1)),
            "validation": write_jsonl(tmp_path / "val.jsonl", lm_rows(12, seed=2)),
            "test": write_jsonl(tmp_path / "test.jsonl", lm_rows(12, seed=3))}


def examples(rows: list[dict[str, str]], source: str = "rows") -> Examples:
    return Examples(texts=[r["prompt"] for r in rows], labels=[0] * len(rows),
                    pairs=[r["response"] for r in rows], source=source)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------------
# the batch contract


def test_labels_are_the_next_response_token_and_prompt_and_padding_are_masked(tmp_path: Path):
    tok = make_lm_tokenizer(tmp_path / "tok")
    tok.pad_token = tok.eos_token
    items = task.encode(examples([{"prompt": "red green", "response": "green red"},
                                  {"prompt": "one", "response": "two three four"}]), tok, 32)
    batch = task.make_collate(tok)(items)
    ids = batch["input_ids"]
    assert ids.shape == (2, 5) and batch["labels"].shape == (2, 4) and batch["logit_positions"].tolist() == [0, 1, 2, 3]
    v = tok.convert_tokens_to_ids
    eos = tok.eos_token_id
    # row 0: red green | green red </s>: positions 1..3 predict green, red, </s>; position 0 predicts a prompt token
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, v("green"), v("red"), eos]
    # row 1: one | two three four </s>: every position predicts a response token; no padding in it
    assert batch["labels"][1].tolist() == [v("two"), v("three"), v("four"), eos]
    assert torch.equal(batch["kd_mask"], batch["labels"] != IGNORE_INDEX)
    short = task.make_collate(tok)(task.encode(examples([{"prompt": "red", "response": "blue"}]), tok, 32) + items[:1])
    assert short["labels"][0].tolist() == [v("blue"), eos, IGNORE_INDEX, IGNORE_INDEX]  # padding: no loss
    assert short["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    # position 0 predicts a prompt token in every row: it never reaches the output layer
    two = task.make_collate(tok)(task.encode(examples([{"prompt": "red green", "response": "blue"},
                                                       {"prompt": "red green pink", "response": "blue red"}]), tok, 32))
    assert two["logit_positions"].tolist() == [1, 2, 3, 4]
    assert two["labels"].tolist() == [[v("blue"), eos, IGNORE_INDEX, IGNORE_INDEX],
                                      [IGNORE_INDEX, v("blue"), v("red"), eos]]


def test_prompt_and_padding_rows_take_no_loss(tmp_path: Path):
    tok = make_lm_tokenizer(tmp_path / "tok")
    tok.pad_token = tok.eos_token
    batch = task.make_collate(tok)(task.encode(examples(lm_rows(4)), tok, 32))
    student, teacher = make_llama(len(tok), seed=1), make_llama(len(tok), seed=2)
    s_logits, t_logits = task.logits_for_loss(student, batch), task.logits_for_loss(teacher, batch).detach()
    labels, mask = batch["labels"].reshape(-1), batch["kd_mask"].reshape(-1)
    kw = dict(alpha=0.5, beta=0.5, temperature=2.0, kd_mask=mask, divergence="jsd", chunk_rows=5)
    base = hybrid_loss(s_logits, t_logits, labels, **kw).total
    scrambled = s_logits.detach().clone()
    scrambled[~mask] = torch.randn_like(scrambled[~mask]) * 10
    assert torch.allclose(hybrid_loss(scrambled, t_logits, labels, **kw).total, base, atol=1e-6)
    leaf = s_logits.detach().clone().requires_grad_(True)
    hybrid_loss(leaf, t_logits, labels, **kw).total.backward()
    assert leaf.grad[~mask].abs().max() == 0 and leaf.grad[mask].abs().max() > 0


def test_logits_are_shifted_against_the_labels(tmp_path: Path):
    """A model that always predicts the input's own next token scores perfectly: position t sees t + 1."""
    tok = make_lm_tokenizer(tmp_path / "tok")
    tok.pad_token = tok.eos_token
    batch = task.make_collate(tok)(task.encode(examples(lm_rows(3)), tok, 32))
    full = torch.nn.functional.one_hot(batch["input_ids"], len(tok)).float() * 20  # logits "knowing" each token

    class Oracle(torch.nn.Module):
        def forward(self, input_ids, attention_mask):  # the logits at t put their mass on the token at t + 1
            return type("Out", (), {"logits": torch.cat([full[:, 1:], full[:, :1]], 1)})

    class KeepingOracle(torch.nn.Module):  # the same through transformers' `logits_to_keep`
        def forward(self, input_ids, attention_mask, logits_to_keep=0):
            return type("Out", (), {"logits": torch.cat([full[:, 1:], full[:, :1]], 1)[:, logits_to_keep]})

    logits = task.logits_for_loss(Oracle(), batch)
    assert torch.equal(logits, task.logits_for_loss(KeepingOracle(), batch))
    labels = batch["labels"].reshape(-1)
    keep = labels != IGNORE_INDEX
    assert torch.equal(logits[keep].argmax(-1), labels[keep])


# ---------------------------------------------------------------------------------------------------
# stored teacher outputs through the batch


def _store_rows(teacher, tok, exs: Examples, cfg_overrides: list[str], path: Path):
    cfg = load_config(None, ["task=causal_lm", "data.train=unused", *cfg_overrides])
    items = task.encode(exs, tok, 64)
    rows = compute(teacher, items, task.make_collate(tok), CPU, "fp32", task.summarise(cfg), batch_size=3)
    write_token_store(path, exs.keys(), rows, cfg.distill.store, cfg.loss.temperature)
    store = read_store(path)
    return task.encode(exs, tok, 64, store.lookup(exs.keys(), "rows")), cfg


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_store_with_k_equal_to_the_vocabulary_gives_the_dense_loss(tmp_path: Path, divergence: str):
    tok = make_lm_tokenizer(tmp_path / "tok")
    tok.pad_token = tok.eos_token
    teacher, student = make_llama(len(tok), seed=3), make_llama(len(tok), seed=4)
    with torch.no_grad():  # a confident teacher: a KL far from 0, so the comparison is not all rounding
        teacher.get_output_embeddings().weight.mul_(30)
    exs = examples(lm_rows(6))
    items, _ = _store_rows(teacher, tok, exs, [f"distill.top_k={len(tok)}", "loss.temperature=2"],
                           tmp_path / "s.safetensors")
    batch = task.make_collate(tok)(items)
    s_logits = task.logits_for_loss(student, batch)
    with torch.no_grad():
        dense = task.teacher_targets(teacher, batch)
    labels, mask = batch["labels"].reshape(-1), batch["kd_mask"].reshape(-1)
    kw = dict(alpha=1.0, beta=0.0, temperature=2.0, kd_mask=mask, divergence=divergence, chunk_rows=7)
    sparse = hybrid_loss(s_logits, stored_targets(batch), labels, **kw).kd.detach()
    exact = hybrid_loss(s_logits, dense, labels, **kw).kd.detach()
    # the store keeps fp16 log-probabilities: equal to fp16 resolution
    assert float(exact) > 0.1
    assert torch.allclose(sparse, exact, rtol=5e-3), (float(sparse), float(exact))


def test_sampled_store_rows_follow_the_teacher(tmp_path: Path):
    tok = make_lm_tokenizer(tmp_path / "tok")
    tok.pad_token = tok.eos_token
    teacher = make_llama(len(tok), seed=3)
    exs = examples(lm_rows(4))
    items, _ = _store_rows(teacher, tok, exs, ["distill.store=sampled", "distill.draws=32"], tmp_path / "s.safetensors")
    batch = task.make_collate(tok)(items)
    counts = batch["teacher_counts"][batch["kd_mask"]]
    assert torch.equal(counts.sum(-1), torch.full((len(counts),), 32))
    again, _ = _store_rows(teacher, tok, exs, ["distill.store=sampled", "distill.draws=32"], tmp_path / "t.safetensors")
    assert torch.equal(task.make_collate(tok)(again)["teacher_ids"], batch["teacher_ids"])  # seeded draws


def test_batch_4_equals_batch_2_with_accumulation_2_on_uneven_sequences(tmp_path: Path):
    tok = make_lm_tokenizer(tmp_path / "tok")
    tok.pad_token = tok.eos_token
    teacher = make_llama(len(tok), seed=3)
    items, _ = _store_rows(teacher, tok, examples(lm_rows(16, seed=5)), ["distill.top_k=8"], tmp_path / "s.safetensors")
    lengths = {len(it["input_ids"]) for it in items}
    assert len(lengths) > 3  # sequences of different lengths, and different response lengths per micro-batch
    weights = LossWeights(0.5, 0.5, 1.0, divergence="forward_kl", chunk_rows=5)
    finals = []
    # ... and a batch of 4 run as 4 length-sorted passes (`length_splits`): every step's gradient is the same
    for batch_size, accum, splits in ((4, 1, 1), (2, 2, 1), (4, 1, 4)):
        tc = TrainConfig(epochs=2, batch_size=batch_size, grad_accum=accum, lr=1e-2, warmup_ratio=0.0,
                         group_by_length=False, length_splits=splits)
        result = fit(make_llama(len(tok), layers=2, seed=9), items, items[:4], task=task,
                     collate=task.make_collate(tok), tc=tc, weights=weights, device=CPU, seed=3)
        finals.append({k: v.clone() for k, v in result.model.state_dict().items()})
    worst = max(float((finals[0][k] - other[k]).abs().max()) for other in finals[1:] for k in finals[0])
    assert worst < 2e-5, worst


# ---------------------------------------------------------------------------------------------------
# vocabularies


def test_padded_teacher_vocabulary_is_cut_with_a_warning_and_other_tokenizers_are_refused(tmp_path: Path, capsys):
    tok = make_lm_tokenizer(tmp_path / "a")
    assert task.check_vocabularies(tok, len(tok), tok, len(tok)) is None
    assert task.check_vocabularies(tok, len(tok) + 11, tok, len(tok)) == len(tok)
    assert "padded" in capsys.readouterr().err
    other = make_lm_tokenizer(tmp_path / "b")
    other.add_tokens(["extra"])
    with pytest.raises(HybridFTError, match="tokenizers differ"):
        task.check_vocabularies(tok, len(tok), other, len(other))
    with pytest.raises(HybridFTError, match="resize"):
        task.check_vocabularies(tok, len(tok), tok, len(tok) + 5)


def test_a_student_with_another_tokenizer_is_refused_before_step_0(tmp_path: Path, tiny_lm_dir: Path, lm_data):
    from hybridft.cli import main

    other = tmp_path / "other"
    tok = make_lm_tokenizer(other)
    tok.add_tokens(["extra", "words"])
    tok.save_pretrained(other)
    make_llama(len(tok), layers=1).save_pretrained(other)
    out = tmp_path / "run"
    code = main(["run", "task=causal_lm", f"data.train={lm_data['train']}", f"teacher.model={tiny_lm_dir}",
                 f"student.model={other}", f"output_dir={out}", "progress=false"])
    assert code == 2 and not (out / "config.yaml").exists()


# ---------------------------------------------------------------------------------------------------
# the pipeline, generate, bad input


def _run_args(tmp_path: Path, teacher: Path, data: dict[str, Path], name: str, *extra: str) -> list[str]:
    return ["run", "task=causal_lm", f"data.train={data['train']}", f"data.validation={data['validation']}",
            f"data.test={data['test']}", f"teacher.model={teacher}", "student.num_layers=2", "data.max_length=32",
            "student.train.epochs=6", "student.train.batch_size=8", "student.train.lr=3e-3", "distill.top_k=8",
            "eval.max_new_tokens=4", "eval.generate_examples=2", f"output_dir={tmp_path / name}", "progress=false",
            "precision=fp32", *extra]


def test_causal_lm_run_end_to_end_and_generate(tmp_path: Path, tiny_lm_dir: Path, lm_data, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hybridft.cli import main

    assert main(_run_args(tmp_path, tiny_lm_dir, lm_data, "a", "teacher.finetune=always",
                          "teacher.train.epochs=6", "teacher.train.lr=3e-3")) == 0
    run = tmp_path / "a"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "causal_lm"
    t, s = summary["teacher"], summary["student"]
    assert t["tokens"] == s["tokens"] > 0 and s["perplexity"] < len(LM_WORDS) + 5  # learned: far below uniform
    c = summary["comparison"]
    assert 0 <= c["next_token_agreement"] <= 1 and len(c["generations"]) == 2
    assert s["generate_tokens_per_s_batch8"] > 0 and s["params_non_embedding"] < t["params_non_embedding"]
    stages = {json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"teacher", "student"}
    for folder in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(run / folder)
        assert model.generate(torch.tensor([[5, 6]]), max_new_tokens=3, do_sample=False).shape == (1, 5)
    assert read_store(run / "teacher_outputs.safetensors").kind == "topk"

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": i, "prompt": r["prompt"]} for i, r in enumerate(lm_rows(5))])
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(run / "student"), "--input", str(prompts), "--output", str(out),
                 "--batch-size", "2", "--max-new-tokens", "3", "--quiet"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == list(range(5)) and all(isinstance(x["generation"], str) for x in lines)
    report = json.loads((tmp_path / "gen.jsonl.report.json").read_text())
    assert report["rows_written"] == 5 and "answered_by" not in report  # a classifier's count, not a generator's
    # the same student generates the same text as the task's generate (greedy, batch-independent)
    expected = task.generate(*task.load_model(str(run / "student"), None, "m"), [lm_rows(5)[0]["prompt"]], 3, CPU)
    assert lines[0]["generation"] == expected[0]

    # the setup is timed (prepacked weights) only where the prompts' work can pay the timing back
    from hybridft import cli, packed_linear

    decided = []
    real = packed_linear.prepack_if_faster
    monkeypatch.setattr(packed_linear, "prepack_if_faster", lambda *a, **k: decided.append(1) or real(*a, **k))
    assert main(["generate", "--model", str(run / "student"), "--input", str(prompts), "--output", str(out),
                 "--max-new-tokens", "3"]) == 0
    assert decided == [] and "setup: not timed (under 400 teacher passes" in capsys.readouterr().err
    monkeypatch.setattr(cli, "GENERATE_TIMING_MIN_PASSES", 3)  # 5 prompts x 3 tokens at batch 8: 3 passes
    assert main(["generate", "--model", str(run / "student"), "--input", str(prompts), "--output", str(out),
                 "--max-new-tokens", "3"]) == 0
    assert decided == [1] and "linear weights:" in capsys.readouterr().err
    assert [json.loads(x)["generation"] for x in out.read_text().splitlines()][0] == expected[0]
    # 5 prompts of 1 token: 3 passes at batch 2 (3 batches), 2 at batch 3
    assert cli.worth_timing_setup(str(prompts), 1, 2) and not cli.worth_timing_setup(str(prompts), 1, 3)


def test_stored_outputs_are_reused_and_a_gpt2_without_pad_token_distils(tmp_path: Path, lm_data, monkeypatch):
    from hybridft import pipeline
    from hybridft.cli import main

    folder = tmp_path / "gpt2"
    tok = make_lm_tokenizer(folder)
    assert tok.pad_token is None
    make_gpt2(len(tok)).save_pretrained(folder)
    calls = []
    real = pipeline.compute
    monkeypatch.setattr(pipeline, "compute", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = _run_args(tmp_path, folder, lm_data, "g1", "student.num_layers=1", "student.train.epochs=1")
    assert main(args) == 0 and calls == [1]
    assert main(_run_args(tmp_path, folder, lm_data, "g2", "student.num_layers=1", "student.train.epochs=1")) == 0
    assert calls == [1]  # same teacher files, data and settings: reused
    assert main(_run_args(tmp_path, folder, lm_data, "g3", "student.num_layers=1", "student.train.epochs=1",
                          "distill.top_k=4")) == 0
    assert calls == [1, 1]
    assert main(_run_args(tmp_path, folder, lm_data, "g4", "student.num_layers=1", "student.train.epochs=1",
                          "distill.store=sampled", "distill.draws=16")) == 0
    assert calls == [1, 1, 1] and read_store(tmp_path / "g4" / "teacher_outputs.safetensors").kind == "sampled"


@pytest.mark.parametrize("case", ["no_response_column", "empty_response", "long_prompt", "repeated_column", "gguf",
                                  "pickle_only"])
def test_bad_causal_lm_input_is_one_line_and_exit_2(tmp_path: Path, tiny_lm_dir: Path, lm_data, capsys, case: str):
    from hybridft.cli import main

    teacher, data = tiny_lm_dir, dict(lm_data)
    if case == "no_response_column":
        data["train"] = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "red", "answer": "blue"}] * 4)
        needle = "no response column"
    elif case == "empty_response":
        data["train"] = write_jsonl(tmp_path / "bad.jsonl", lm_rows(4) + [{"prompt": "red", "response": " "}])
        needle = "line 5: the response is empty"
    elif case == "long_prompt":
        data["train"] = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": " ".join(LM_WORDS * 3), "response": "red"}])
        needle = "leaves no room for a response"
    elif case == "repeated_column":  # which `prompt` is the prompt? (a CSV export that repeats a header name)
        data["train"] = str(tmp_path / "bad.csv")
        Path(data["train"]).write_text("prompt,response,prompt\nred,blue,green\n", encoding="utf-8")
        needle = "names the column 'prompt' more than once (columns 1, 3)"
    elif case == "gguf":
        teacher = tmp_path / "gguf"
        teacher.mkdir()
        (teacher / "model.Q4_0.gguf").write_bytes(b"GGUF")
        needle = "GGUF"
    else:
        teacher = tmp_path / "pickle"
        make_lm_tokenizer(teacher)
        model = make_llama(30)
        model.config.save_pretrained(teacher)
        torch.save(model.state_dict(), teacher / "pytorch_model.bin")
        needle = "pickle"
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(_run_args(tmp_path, teacher, data, "run"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    if case in ("gguf", "pickle_only"):  # the same folder check guards `hybridft generate`
        prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "red"}])
        assert main(["generate", "--model", str(teacher), "--input", str(prompts), "--output",
                     str(tmp_path / "o.jsonl")]) == 2
        assert not (tmp_path / "o.jsonl").exists()


def test_plain_texts_train_on_every_token_and_long_ones_are_cut_into_chunks(tmp_path: Path, tiny_lm_dir: Path, capsys):
    from hybridft.cli import main

    rng = random.Random(0)
    texts = [" ".join(rng.choices(LM_WORDS, k=n)) for n in [5, 9, 70, 12, 8, 6, 40, 7] * 3]
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in texts])
    cfg = load_config(None, ["task=causal_lm", f"data.train={train}", f"teacher.model={tiny_lm_dir}",
                             "data.max_length=16", "data.validation_fraction=0.25"])
    splits = task.load_splits(cfg, 0)
    tok = _tokenizer(tiny_lm_dir)
    chunks = splits.train.texts + splits.validation.texts
    # every chunk fits in max_length, and together they hold every word of every text, in order
    assert all(len(tok(c)["input_ids"]) <= 16 for c in chunks) and len(chunks) > len(texts)
    assert sorted(" ".join(chunks).split()) == sorted(" ".join(texts).split())
    batch = task.make_collate(tok)(task.encode(splits.train, tok, 16)[:4])
    lengths = batch["attention_mask"].sum(-1)
    assert torch.equal(batch["kd_mask"].sum(-1), lengths - 1)  # every token after the first is a target
    assert main(["run", "task=causal_lm", f"data.train={train}", f"teacher.model={tiny_lm_dir}", "data.max_length=16",
                 "student.num_layers=1", "student.train.epochs=1", "eval.max_new_tokens=2",
                 f"output_dir={tmp_path / 'run'}", "progress=false"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["split"] == "validation"


def test_version_1_classification_stores_still_read(tmp_path: Path):
    from safetensors.torch import save_file

    from hybridft.data import example_key

    keys = [example_key("a good film"), example_key("a dull film")]
    logits = torch.tensor([[-1.0, 2.0], [1.5, -0.5]])
    save_file({"logits": logits, "keys": torch.tensor([list(bytes.fromhex(k)) for k in keys], dtype=torch.uint8)},
              str(tmp_path / "v1.safetensors"),
              metadata={"format": "hybridft.teacher_outputs/1", "label_names": '["neg", "pos"]', "fingerprint": "x"})
    store = read_store(tmp_path / "v1.safetensors")
    assert store.kind == "dense" and store.label_names == ["neg", "pos"]
    assert torch.equal(store.lookup(keys[::-1], "rows"), logits.flip(0))


# ---------------------------------------------------------------------------------------------------
# cases a new user hit (each kind, where it enters)


def test_a_folder_that_is_not_a_causal_lm_is_refused_as_teacher_and_by_generate(tmp_path: Path, lm_data, capsys):
    from conftest import make_bert, make_tokenizer

    from hybridft.cli import main

    folder = tmp_path / "classifier"
    make_tokenizer(folder)
    make_bert().save_pretrained(folder)
    out = tmp_path / "run"
    assert main(_run_args(tmp_path, folder, lm_data, "run")) == 2
    assert "not a causal language model" in capsys.readouterr().err and not out.exists()  # not even empty
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "red"}])
    assert main(["generate", "--model", str(folder), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "not a causal language model" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()
    missing = main(["generate", "--model", str(tmp_path / "models" / "nope"), "--input", str(prompts),
                    "--output", str(tmp_path / "o.jsonl")])
    assert missing == 2 and "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["student.layers=[0,35]", "student.num_layers=9", "student.model=MISSING"])
def test_bad_student_settings_stop_before_an_overwritten_run_is_touched(tmp_path: Path, tiny_lm_dir: Path, lm_data,
                                                                        capsys, bad: str):
    from hybridft.cli import main

    assert main(_run_args(tmp_path, tiny_lm_dir, lm_data, "run", "student.train.epochs=1")) == 0
    run = tmp_path / "run"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    bad = bad.replace("MISSING", str(tmp_path / "no-such-student"))
    assert main(_run_args(tmp_path, tiny_lm_dir, lm_data, "run", bad, "--overwrite")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "student." in err[0], err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_jsonl_with_unescaped_line_separators_and_a_byte_order_mark_reads(tmp_path: Path, tiny_lm_dir: Path):
    rows = [{"prompt": "red\u2028green", "response": "blue\u0085pink"}, {"prompt": "one", "response": "two"}]
    path = tmp_path / "train.jsonl"
    path.write_text("\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(None, ["task=causal_lm", f"data.train={path}", f"data.validation={path}",
                             f"teacher.model={tiny_lm_dir}"])
    train = task.load_splits(cfg, 0).train
    assert train.texts == ["red\u2028green", "one"] and train.pairs == ["blue\u0085pink", "two"]
    assert train.lines == [1, 2]


def test_a_named_student_formats_prompts_with_the_teachers_tokenizer(tmp_path: Path, lm_data):
    """Same vocabulary, but only the teacher's tokenizer has a chat template: the student trains on the
    teacher's format (the stored rows match), and its saved folder keeps it."""
    from transformers import AutoTokenizer

    from hybridft.cli import main

    teacher, student = tmp_path / "t", tmp_path / "s"
    tok = make_lm_tokenizer(teacher, template=True)
    make_llama(len(tok)).save_pretrained(teacher)
    make_lm_tokenizer(student)
    make_llama(len(tok), layers=1, seed=3).save_pretrained(student)
    assert main(_run_args(tmp_path, teacher, lm_data, "run", f"student.model={student}",
                          "student.num_layers=null", "student.train.epochs=1")) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "student").chat_template == tok.chat_template


def test_an_external_store_made_with_other_settings_is_refused(tmp_path: Path, tiny_lm_dir: Path, lm_data, capsys):
    from hybridft.cli import main

    assert main(_run_args(tmp_path, tiny_lm_dir, lm_data, "a", "student.train.epochs=1")) == 0
    store = tmp_path / "a" / "teacher_outputs.safetensors"
    for extra, needle in (("data.max_length=24", "data.max_length=32"), ("distill.store=sampled", "topk store")):
        code = main(_run_args(tmp_path, tiny_lm_dir, lm_data, "b", f"distill.teacher_logits={store}", extra,
                              "--overwrite"))
        assert code == 2 and needle in capsys.readouterr().err


def test_responses_cut_at_max_length_are_counted(tmp_path: Path, capsys):
    tok = make_lm_tokenizer(tmp_path / "tok")
    items = task.encode(examples([{"prompt": "red", "response": " ".join(LM_WORDS)},
                                  {"prompt": "red", "response": "blue"}], source=str(tmp_path / "two")), tok, 8)
    assert [len(it["input_ids"]) for it in items] == [8, 3]
    assert "1 of 2 responses are cut at data.max_length=8" in capsys.readouterr().err
    rows = examples([{"prompt": "red", "response": " ".join(LM_WORDS)}], source=str(tmp_path / "once.jsonl"))
    for _ in range(3):  # a run encodes a split for training, the teacher's store and the report: one note
        task.encode(rows, tok, 8)
    assert capsys.readouterr().err.count("responses are cut") == 1
