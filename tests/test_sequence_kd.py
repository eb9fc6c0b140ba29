"""Sequence-level KD (issue 11, part 1): the student trains on the teacher's generated responses, which are
stored, reused on a second run and recomputed when the decoding settings change; a fraction mixes them with the
true responses; unlabeled prompts get the teacher's answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hybridft import sequence_kd
from hybridft.errors import HybridFTError
from hybridft.tasks import causal_lm as task
from test_causal_lm import lm_rows, make_llama, make_lm_tokenizer, write_jsonl

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama trained a little on the task (its greedy answers are words, not end-of-sequence at once)."""
    folder = tmp_path_factory.mktemp("seq") / "teacher"
    tok = make_lm_tokenizer(folder)
    model = make_llama(len(tok), layers=2, seed=3)
    rows = [tok(f"{r['prompt']} {r['response']}")["input_ids"] + [tok.eos_token_id] for r in lm_rows(64, seed=5)]
    fit(model, rows, tok.eos_token_id, steps=60)
    model.save_pretrained(folder)
    return folder


def fit(model: torch.nn.Module, rows: list[list[int]], eos: int, steps: int) -> None:
    """A few full-batch Adam steps on token rows (padded with EOS, which takes no loss)."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def run_args(tmp_path: Path, teacher: Path, name: str, *extra: str) -> list[str]:
    data = {"train": write_jsonl(tmp_path / "train.jsonl", lm_rows(24, seed=1)),
            "validation": write_jsonl(tmp_path / "val.jsonl", lm_rows(8, seed=2)),
            "test": write_jsonl(tmp_path / "test.jsonl", lm_rows(8, seed=3))}
    return ["run", "task=causal_lm", f"teacher.model={teacher}", f"output_dir={tmp_path / name}",
            f"data.train={data['train']}", f"data.validation={data['validation']}", f"data.test={data['test']}",
            "data.max_length=32", "progress=true", "precision=fp32", "student.num_layers=1", "student.train.epochs=1",
            "student.train.batch_size=8", "distill.top_k=8", "distill.sequence.max_new_tokens=5",
            "distill.sequence.batch_size=5", "eval.generate_examples=1", "eval.max_new_tokens=2",
            "eval.speed_batches=1", "hybrid.enabled=false", *extra]


def test_the_student_trains_on_the_teachers_greedy_responses_and_they_are_reused(tmp_path: Path, teacher_dir: Path,
                                                                                capsys):
    from hybridft import pipeline
    from hybridft.cli import main

    seen = []
    real = pipeline.distill
    pipeline.distill = lambda ctx, *a, **k: seen.append(ctx.splits.train) or real(ctx, *a, **k)  # type: ignore
    try:
        assert main(run_args(tmp_path, teacher_dir, "a", "distill.sequence.fraction=1")) == 0
    finally:
        pipeline.distill = real  # type: ignore
    out = capsys.readouterr().out
    assert "the teacher generates responses for 24 prompts" in out
    train, true = seen[0], [r["response"] for r in lm_rows(24, seed=1)]
    model, tok = task.load_model(str(teacher_dir), None, "t")  # type: ignore[arg-type]
    expected = task.generate(model, tok, train.texts, 5, CPU, batch_size=5)  # the run's batches: the same text
    assert train.pairs == [g if g else t for g, t in zip(expected, true)]  # an empty generation keeps the truth
    assert sum(1 for g in expected if g) >= 12
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    record = summary["transfer_set"]["augment"]["sequence_kd"]
    assert record["replaced"] == sum(1 for g in expected if g) and record["decoding"].startswith("generations;greedy")

    # a second run with the same teacher, prompts and settings reads the stored generations
    assert main(run_args(tmp_path, teacher_dir, "b", "distill.sequence.fraction=1")) == 0
    assert "reusing 24 stored teacher generations" in capsys.readouterr().out
    # other decoding settings: generated anew, and sampling draws other responses than greedy
    assert main(run_args(tmp_path, teacher_dir, "c", "distill.sequence.fraction=1", "distill.sequence.do_sample=true",
                         "distill.sequence.temperature=2.0")) == 0
    assert "the teacher generates responses for 24 prompts" in capsys.readouterr().out
    stores = sorted((tmp_path / "cache").rglob("*.generations.json"))
    assert len(stores) == 2
    greedy, sampled = (json.loads(p.read_text()) for p in sorted(stores, key=lambda p: "sample" in p.read_text()))
    assert greedy["keys"] == sampled["keys"] and greedy["responses"] != sampled["responses"]


def test_a_fraction_mixes_generated_and_true_responses_and_unlabeled_prompts_are_answered(tmp_path: Path,
                                                                                         teacher_dir: Path):
    from hybridft import pipeline
    from hybridft.config import load_config

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in lm_rows(6, seed=9)])
    cfg = load_config(None, run_args(tmp_path, teacher_dir, "m", "distill.sequence.fraction=0.5",
                                     f"data.unlabeled={prompts}", "progress=false")[1:])
    ctx = pipeline.prepare(cfg)
    teacher, tok = pipeline.train_teacher(ctx)
    true = list(ctx.splits.train.pairs)
    pipeline.augment(ctx, teacher, tok)
    train = ctx.splits.train
    chosen = sequence_kd.chosen_rows(len(true), 0.5, cfg.seed)
    assert len(chosen) == len(true) // 2
    for i in range(len(true)):  # the other half keeps its true response
        if i not in chosen:
            assert train.pairs[i] == true[i]
    record = ctx.splits.augmented["sequence_kd"]
    assert len(train) == len(true) + record["from_unlabeled_prompts"] and record["from_unlabeled_prompts"] >= 3
    assert train.texts[len(true):] == [r["prompt"] for r in lm_rows(6, seed=9)][:record["from_unlabeled_prompts"]] \
        or record["empty_generations_skipped"] > 0


@pytest.mark.parametrize("override, message", [
    ("distill.sequence.fraction=1.5", "must be in \\[0, 1\\]"),
    ("distill.sequence.top_p=0", "top_p"),
    ("distill.sequence.max_new_tokens=0", "max_new_tokens"),
])
def test_bad_sequence_settings_are_refused(override: str, message: str, tmp_path: Path):
    from hybridft.config import load_config

    with pytest.raises(HybridFTError, match=message):
        load_config(None, ["task=causal_lm", override])
    with pytest.raises(HybridFTError, match="sequence-level KD trains a causal LM"):
        load_config(None, ["distill.sequence.fraction=0.5"])


def test_unlabeled_prompts_need_a_prompt_column(tmp_path: Path, teacher_dir: Path, capsys):
    from hybridft.cli import main

    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "red blue"}])
    assert main(run_args(tmp_path, teacher_dir, "x", f"data.unlabeled={texts}")) == 2
    assert "no prompt column 'prompt'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # not even the empty output folder is left behind


def test_generations_stop_at_the_tokenizers_eos_when_the_generation_config_names_another(tmp_path: Path):
    """transformers' generate stops at the generation config's EOS alone; the responses hybridft trains on end with
    the tokenizer's. A model whose config names another token (transformers 5.17's conversion of the SmolLM2 GGUF
    left out <|im_end|>, and its generations ran on through the next turns) must still stop where it was taught
    to, in batched generation (reports, sequence KD, `hybridft generate`) as in the speculative hybrid, and its
    stored generations must not be mistaken for ones made with other stop tokens."""
    from hybridft import speculative
    from hybridft.config import load_config

    # a tiny teacher that, like a chat model, goes on to another exchange after the end of its answer
    tok = make_lm_tokenizer(tmp_path / "t")
    model = make_llama(len(tok), layers=2, seed=3)
    first, second = lm_rows(64, seed=5), lm_rows(64, seed=6)
    rows = [tok(f"{a['prompt']} {a['response']}")["input_ids"] + [tok.eos_token_id]
            + tok(f"{b['prompt']} {b['response']}")["input_ids"] + [tok.eos_token_id] for a, b in zip(first, second)]
    fit(model, rows, tok.eos_token_id, steps=80)
    model.eval()
    prompts = [r["prompt"] for r in lm_rows(6, seed=11)]
    model.generation_config.eos_token_id = None
    assert task.stop_token_ids(model, tok) == {tok.eos_token_id}
    expected = task.generate(model, tok, prompts, 16, CPU, batch_size=3)
    assert sum(0 < len(g.split()) < 8 for g in expected) >= 3  # answers of a few words, ended by EOS

    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("Q:")  # a token it never answers with
    assert task.stop_token_ids(model, tok) == {tok.eos_token_id, tok.convert_tokens_to_ids("Q:")}
    assert task.generate(model, tok, prompts, 16, CPU, batch_size=3) == expected
    # the speculative hybrid's greedy loop stops at the same tokens, so its outputs equal these
    for prompt, text in zip(prompts, expected):
        ids = speculative.prompt_tensor(tok, prompt, CPU)
        out, _ = speculative.greedy_generate(model, ids, 16, speculative.eos_ids(model, tok))
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == text

    cfg = load_config(None, ["task=causal_lm"])
    assert sequence_kd.decoding_settings(cfg, {1}) != sequence_kd.decoding_settings(cfg, {1, 3})


def test_the_prompt_file_for_sequence_kd_reads_as_unlabeled_prompts(tmp_path: Path):
    """bench/lm_prompts.py: a seeded mix of emotion and SST-2 training sentences, each a prompt hybridft reads."""
    import subprocess
    import sys

    from conftest import SHARED_DATA

    if not (SHARED_DATA / "emotion" / "train.txt").is_file():
        pytest.skip(f"no emotion data under {SHARED_DATA}")
    from hybridft.config import load_config

    out = tmp_path / "p.jsonl"
    bench = Path(__file__).resolve().parents[1] / "bench" / "lm_prompts.py"
    runs = [subprocess.run([sys.executable, str(bench), "--emotion", "30", "--sst2", "20", "--data", str(SHARED_DATA),
                            "--out", str(o)], capture_output=True, text=True, timeout=120) for o in (out, tmp_path / "q")]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    assert out.read_text() == (tmp_path / "q").read_text()  # seeded
    cfg = load_config(None, ["task=causal_lm", f"data.unlabeled={out}"])
    prompts = task._read_prompts(str(out), cfg).texts
    assert len(prompts) == 50 and all(p.strip() and ";" not in p[-8:] for p in prompts)


def test_a_generation_cut_at_max_new_tokens_trains_without_an_end_of_sequence_token(tmp_path: Path,
                                                                                    teacher_dir: Path):
    """A cut answer with EOS appended would teach the student to stop mid-sentence: it keeps the teacher's words
    and no end; a whole answer keeps its end. The store records which is which, and the summary counts them."""
    from hybridft import pipeline
    from hybridft.config import load_config

    model, tok = task.load_model(str(teacher_dir), None, "t")  # type: ignore[arg-type]
    prompts = [r["prompt"] for r in lm_rows(24, seed=1)]
    long, ended = task.generate_with_ends(model, tok, prompts, 12, CPU, batch_size=5)
    short, short_ended = task.generate_with_ends(model, tok, prompts, 2, CPU, batch_size=5)
    lengths = [len(tok(g, add_special_tokens=False)["input_ids"]) for g in long]
    assert any(ended) and not all(short_ended)  # the tiny teacher finishes some answers, and 2 tokens cut some
    assert all(e for e, n in zip(short_ended, lengths) if n == 0)  # an answer that is EOS at once ended

    cfg = load_config(None, run_args(tmp_path, teacher_dir, "cut", "distill.sequence.fraction=1",
                                     "distill.sequence.max_new_tokens=2", "progress=false")[1:])
    ctx = pipeline.prepare(cfg)
    teacher, tok = pipeline.train_teacher(ctx)
    pipeline.augment(ctx, teacher, tok)
    train, record = ctx.splits.train, ctx.splits.augmented["sequence_kd"]
    replaced = [i for i, g in enumerate(short) if g]
    assert record["cut_at_max_new_tokens"] == sum(1 for i in replaced if not short_ended[i]) > 0
    assert train.cut == [bool(short[i]) and not short_ended[i] for i in range(len(short))]
    items = task.encode(train, tok, cfg.data.max_length)
    for i, item in enumerate(items):
        assert (item["input_ids"][-1] == tok.eos_token_id) == (not train.cut[i])
    keys = train.keys()  # a cut row trains on one token fewer: its stored teacher outputs are looked up apart
    uncut = sequence_kd.Examples(texts=train.texts, labels=train.labels, pairs=train.pairs).keys()
    assert [k != u for k, u in zip(keys, uncut)] == train.cut
    stored = json.loads(Path(record["store"]).read_text())
    assert stored["format"] == "hybridft.generations/2" and stored["ended"] == short_ended


def test_unlabeled_prompts_are_read_from_data_unlabeled_text_column(tmp_path: Path, teacher_dir: Path, capsys):
    """The setting was ignored for causal LMs: a prompt file with its own column name was refused."""
    from hybridft.config import load_config
    from hybridft.tasks.causal_lm import load_splits

    asked = [r["prompt"] for r in lm_rows(3, seed=9)]
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": q} for q in asked])
    cfg = load_config(None, run_args(tmp_path, teacher_dir, "q", f"data.unlabeled={questions}",
                                     "data.unlabeled_text_column=question")[1:])
    assert load_splits(cfg, cfg.seed).unlabeled.texts == asked
    from hybridft.cli import main

    assert main(run_args(tmp_path, teacher_dir, "x", f"data.unlabeled={questions}",
                         "data.unlabeled_text_column=query")) == 2
    err = capsys.readouterr().err
    assert "no prompt column 'query'" in err and "in data.unlabeled_text_column" in err
    half = tmp_path / "half.jsonl"
    half.write_text('{"prompt": "red \\ud83d"}\n', encoding="utf-8")
    assert main(run_args(tmp_path, teacher_dir, "y", f"data.unlabeled={half}")) == 2
    assert "line 1: the prompt column holds a lone UTF-16 surrogate" in capsys.readouterr().err
    # a whole run: the prompts the teacher answered count as unlabeled text in the summary, not as labelled rows
    assert main(run_args(tmp_path, teacher_dir, "z", f"data.unlabeled={questions}",
                         "data.unlabeled_text_column=question")) == 0
    summary = json.loads((tmp_path / "z" / "summary.json").read_text())
    answered = summary["transfer_set"]["augment"]["sequence_kd"]["from_unlabeled_prompts"]
    assert answered >= 1
    assert summary["transfer_set"]["labeled"] == 24 and summary["transfer_set"]["unlabeled"] == answered
