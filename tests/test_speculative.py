"""The speculative hybrid for causal LMs (issue 11): the draft-and-verify loop emits exactly the teacher's greedy
tokens whatever the draft, counts what it accepted, and a causal_lm run saves and measures it; `hybridft generate
--model RUN/hybrid` writes the teacher's greedy output."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from hybridft import packed_linear, speculative
from hybridft.errors import HybridFTError
from test_causal_lm import _run_args, lm_data, lm_rows, make_llama, make_lm_tokenizer, tiny_lm_dir, write_jsonl  # noqa: F401

VOCAB = 40


def _teacher(seed: int = 1):
    """A random Llama with weights large enough that its greedy choices are not near-ties (the default init's
    logits are nearly flat), so float rounding between pass shapes cannot flip them."""
    model = make_llama(VOCAB, layers=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _half_agreeing_draft(teacher):
    """The teacher with two of its layers damped: it agrees with the teacher on some tokens, not all."""
    draft = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in draft.model.layers[1:3].parameters():
            p.mul_(0.5)
    return draft.eval()


def _prompts(n: int) -> list[torch.Tensor]:
    out = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        length = int(torch.randint(1, 8, (1,), generator=g))
        out.append(torch.randint(3, VOCAB, (1, length), generator=g))
    return out


def _hf_greedy(model, ids: torch.Tensor, n: int, eos: int | None = None) -> list[int]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=eos)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("k", [1, 3, 6])
def test_output_is_the_teachers_greedy_output_token_for_token(k: int):
    teacher = _teacher()
    draft = _half_agreeing_draft(teacher)
    total = speculative.SpeculativeStats()
    for ids in _prompts(8):
        expected = _hf_greedy(teacher, ids, 24)
        out, stats = speculative.speculative_generate(teacher, draft, ids, 24, draft_tokens=k)
        assert out[0, :ids.shape[1]].tolist() == ids[0].tolist()
        assert out[0, ids.shape[1]:].tolist() == expected
        total.add(stats)
    # the draft was right sometimes and wrong sometimes: both branches of the verification ran
    assert 0 < total.accepted < total.drafted
    assert total.new_tokens == 8 * 24
    # each teacher pass emits the accepted drafts plus one token of its own (the last may be cut at the limit)
    assert total.accepted + total.teacher_passes >= total.new_tokens
    assert total.teacher_passes < total.new_tokens


@pytest.mark.parametrize("k", [1, 4])
def test_a_cut_draft_vocabulary_and_a_confidence_threshold_keep_the_teachers_output(k: int):
    teacher = _teacher()
    draft = _half_agreeing_draft(teacher)
    allowed = list(range(0, VOCAB, 2))  # half the tokens: the teacher emits the other half as its corrections
    vocabulary = speculative.DraftVocabulary(draft, allowed)
    totals = {c: speculative.SpeculativeStats() for c in (0.0, 0.6)}
    for ids in _prompts(8):
        expected = _hf_greedy(teacher, ids, 20)
        for c, total in totals.items():
            out, stats = speculative.speculative_generate(teacher, draft, ids, 20, k, vocabulary=vocabulary,
                                                          confidence=c)
            assert out[0, ids.shape[1]:].tolist() == expected
            padded, _ = speculative.speculative_generate(teacher, draft, ids, 20, k, vocabulary=vocabulary,
                                                         confidence=c, pad_to=[6] * 6)
            assert padded[0, ids.shape[1]:].tolist() == expected  # padding after the real tokens changes nothing
            total.add(stats)
    assert totals[0.0].accepted > 0
    # the threshold drafts fewer tokens, and a larger share of them is accepted
    assert totals[0.6].drafted < totals[0.0].drafted
    assert totals[0.6].acceptance_rate > totals[0.0].acceptance_rate


def test_the_cut_output_layer_scores_the_chosen_tokens_as_the_whole_one_does():
    from transformers import DynamicCache

    draft = _half_agreeing_draft(_teacher())
    ids = _prompts(3)[2]
    chosen = [3, 7, 8, 20, 39]
    full = draft(input_ids=ids).logits[0, -1]
    cut = speculative.DraftVocabulary(draft, chosen).logits(ids, DynamicCache())
    torch.testing.assert_close(cut, full[chosen], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        speculative.DraftVocabulary(draft, [0, VOCAB])
    with pytest.raises(ValueError, match="at least one"):
        speculative.DraftVocabulary(draft, [])


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_draft_in_lower_precision_keeps_the_teachers_output_and_mostly_its_agreement(precision: str):
    teacher = _teacher()
    draft = _half_agreeing_draft(teacher)
    before = [p.clone() for p in draft.parameters()]
    allowed = list(range(0, VOCAB, 2))
    totals = {}
    for name, prec in (("fp32", "fp32"), (precision, precision)):
        model, vocabulary = speculative.prepare_draft(draft, prec, allowed)
        totals[name] = speculative.SpeculativeStats()
        for ids in _prompts(6):
            out, stats = speculative.speculative_generate(teacher, model, ids, 16, 3, vocabulary=vocabulary)
            assert out[0, ids.shape[1]:].tolist() == _hf_greedy(teacher, ids, 16)
            totals[name].add(stats)
    assert all(torch.equal(a, b) for a, b in zip(before, draft.parameters()))  # the saved draft is not touched
    assert totals[precision].accepted > 0
    # the same draft, rounded: it proposes nearly the same tokens (it is the teacher's verification that is exact)
    assert abs(totals[precision].acceptance_rate - totals["fp32"].acceptance_rate) < 0.25
    if precision == "int8":
        assert model.model.layers[0].mlp.down_proj.weight().dtype == torch.qint8
        assert vocabulary.head[0].weight().dtype == torch.qint8  # the cut output layer too
        assert speculative.output_vocabulary_size(model) == VOCAB
    else:
        assert next(model.parameters()).dtype == torch.bfloat16


def test_draft_precision_auto_follows_the_device(monkeypatch: pytest.MonkeyPatch):
    from hybridft import precision

    cpu = torch.device("cpu")
    assert speculative.choose_draft_precision("auto", cpu)[0] == "int8"  # this torch has the int8 kernels
    monkeypatch.setattr(speculative, "_int8_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert speculative.choose_draft_precision("auto", cpu)[0] == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    assert speculative.choose_draft_precision("auto", cpu)[0] == "fp32"
    assert speculative.choose_draft_precision("int8", cpu)[0] == "int8"
    with pytest.raises(HybridFTError, match="CPU only"):
        speculative.choose_draft_precision("int8", torch.device("cuda"))
    with pytest.raises(HybridFTError, match="draft_precision"):
        speculative.choose_draft_precision("fp8", cpu)


def test_padded_widths_pick_the_cheapest_pass_at_least_as_wide():
    # a CPU where 2 and 3 rows run as matrix-vector products and 4+ as one matrix product
    costs = [44.0, 69.0, 86.0, 50.0, 55.0, 60.0]
    assert speculative.padded_widths(costs) == [1, 4, 4, 4, 5, 6]
    assert speculative.padded_widths([10.0, 10.2, 9.9, 12.0]) == [1, 2, 3, 4]  # noise within 5% never pads
    measured = speculative.teacher_pass_ms(_teacher(), 3, context=4, repeats=1)
    assert len(measured) == 3 and all(ms > 0 for ms in measured)


def test_the_draft_vocabulary_is_the_most_frequent_response_tokens_then_the_lowest_ids():
    choose = speculative.choose_draft_vocabulary
    sequences = [[9, 9, 9, 5, 5, 7], [5, 9, 12]]
    assert choose(sequences, 20, 2) == [5, 9]  # 9 four times, 5 three times
    assert choose(sequences, 20, 3, always={19}) == [5, 9, 19]  # the end-of-sequence token always stays
    assert choose(sequences, 20, 6) == [0, 1, 5, 7, 9, 12]  # four seen tokens, then the lowest ids
    assert choose(sequences, 20, 25) == list(range(20))
    assert choose([[4, 6], [6, 4]], 20, 1) == [4]  # a tie goes to the lower id


def test_grouped_query_attention_in_the_kernel_keeps_the_teachers_greedy_output(monkeypatch):
    """On a CPU, generation runs with TRANSFORMERS_SDPA_FORCE_GQA=1 (no copies of the cached key/value heads in a
    verification); a teacher with grouped heads still gives its greedy output, and the variable is set only inside
    a call on a CPU and never overrides the user's own setting."""
    import os

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=1,
                                           max_position_embeddings=128)).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            if p.dim() > 1:
                p.mul_(15)  # away from near-ties (see _teacher)
    draft = _half_agreeing_draft(teacher)
    monkeypatch.delenv(speculative.GQA_VARIABLE, raising=False)
    for ids in _prompts(6):
        out, _ = speculative.speculative_generate(teacher, draft, ids, 16, draft_tokens=3)
        assert out[0, ids.shape[1]:].tolist() == _hf_greedy(teacher, ids, 16)

    seen = []
    probe = speculative.cpu_grouped_query_attention(lambda x: seen.append(os.environ.get(speculative.GQA_VARIABLE)))
    probe(torch.zeros(1))
    probe(torch.zeros(1, device="meta"))  # not a CPU
    monkeypatch.setenv(speculative.GQA_VARIABLE, "0")
    probe(torch.zeros(1))
    assert seen == ["1", None, "0"] and os.environ[speculative.GQA_VARIABLE] == "0"


def test_a_draft_equal_to_the_teacher_is_always_accepted():
    teacher = _teacher()
    ids = _prompts(1)[0]
    out, stats = speculative.speculative_generate(teacher, teacher, ids, 20, draft_tokens=4)
    assert out[0, ids.shape[1]:].tolist() == _hf_greedy(teacher, ids, 20)
    assert stats.acceptance_rate == 1.0
    # the prompt's pass emits token 1; then 5 tokens a pass (4 drafts + the teacher's bonus token) for tokens 2-16,
    # and a last round drafts the 4 left (its bonus token is past the limit)
    assert stats.teacher_passes == 5


def test_top_k_agreement_counts_the_teachers_greedy_tokens_among_the_drafts_top_k(tmp_path: Path):
    tok = make_lm_tokenizer(tmp_path / "tok")
    teacher, other = make_llama(len(tok), layers=2, seed=1).eval(), make_llama(len(tok), layers=1, seed=7).eval()
    prompts = [r["prompt"] for r in lm_rows(3, seed=4)]
    cpu = torch.device("cpu")
    itself = speculative.draft_top_k_agreement(teacher, teacher, tok, prompts, 6, cpu, ks=(1, 2))
    assert itself == {"tokens": itself["tokens"], "top_1": 1.0, "top_2": 1.0} and itself["tokens"] > 0
    a = speculative.draft_top_k_agreement(teacher, other, tok, prompts, 6, cpu, ks=(1, 3, len(tok)))
    assert a["tokens"] == itself["tokens"] and 0 <= a["top_1"] <= a["top_3"] <= a[f"top_{len(tok)}"] == 1.0
    # by hand: the teacher's greedy tokens and the other model's ranking of them
    hits = total = 0
    for p in prompts:
        ids = speculative.prompt_tensor(tok, p, cpu)
        out, _ = speculative.greedy_generate(teacher, ids, 6, speculative.eos_ids(teacher, tok))
        with torch.no_grad():
            guess = other(input_ids=out).logits[0, ids.shape[1] - 1:-1].argmax(-1)
        hits += int((guess == out[0, ids.shape[1]:]).sum())
        total += out.shape[1] - ids.shape[1]
    assert a["top_1"] == round(hits / total, 4)


def test_generation_stops_at_eos_like_the_teacher():
    teacher = _teacher()
    draft = _half_agreeing_draft(teacher)
    stopped = 0
    for ids in _prompts(8):
        free = _hf_greedy(teacher, ids, 24)
        eos = free[len(free) // 2]  # a token the teacher emits mid-way: treat it as end-of-sequence
        expected = _hf_greedy(teacher, ids, 24, eos=eos)
        out, _ = speculative.speculative_generate(teacher, draft, ids, 24, 3, eos_token_ids={eos})
        assert out[0, ids.shape[1]:].tolist() == expected
        stopped += len(expected) < 24
    assert stopped > 0


def test_greedy_generate_equals_transformers_generate():
    teacher = _teacher()
    for ids in _prompts(4):
        out, stats = speculative.greedy_generate(teacher, ids, 16)
        assert out[0, ids.shape[1]:].tolist() == _hf_greedy(teacher, ids, 16) and stats.new_tokens == 16


def test_bad_inputs_are_refused():
    teacher = _teacher()
    with pytest.raises(ValueError, match="one sequence"):
        speculative.speculative_generate(teacher, teacher, torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="draft_tokens"):
        speculative.speculative_generate(teacher, teacher, torch.zeros(1, 3, dtype=torch.long), 4, draft_tokens=0)
    other = make_llama(VOCAB + 5, layers=1)
    with pytest.raises(HybridFTError, match="vocabulary"):
        speculative.speculative_generate(teacher, other, torch.zeros(1, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="pad_to"):
        speculative.speculative_generate(teacher, teacher, torch.zeros(1, 3, dtype=torch.long), 4, pad_to=[1, 1])
    with pytest.raises(ValueError, match="confidence"):
        speculative.speculative_generate(teacher, teacher, torch.zeros(1, 3, dtype=torch.long), 4, confidence=1.0)


def test_a_causal_lm_run_saves_and_measures_the_speculative_hybrid(tmp_path: Path, tiny_lm_dir: Path, lm_data, capsys):
    from hybridft.cli import main

    assert main(_run_args(tmp_path, tiny_lm_dir, lm_data, "a", "hybrid.speculative_prompts=3",
                          "hybrid.draft_tokens=3", "eval.max_new_tokens=6", "hybrid.draft_vocabulary=12",
                          "hybrid.draft_confidence=0.05", "hybrid.draft_precision=int8")) == 0
    run = tmp_path / "a"
    h = json.loads((run / "summary.json").read_text())["hybrid"]
    assert h["prompts"] == 3 and h["draft_tokens"] == 3
    assert h["matches_teacher"] == 3 and h["undistilled_hybrid"]["matches_teacher"] == 3
    for key in ("teacher", "hybrid", "student", "undistilled_hybrid", "undistilled_student"):
        assert h[key]["tokens_per_s"] > 0, key
    assert 0 <= h["hybrid"]["acceptance_rate"] <= 1 and 0 <= h["undistilled_hybrid"]["acceptance_rate"] <= 1
    assert h["hybrid"]["drafted"] > 0
    assert "speculative hybrid" in capsys.readouterr().out
    folder = run / "hybrid"
    settings = json.loads((folder / "hybrid.json").read_text())
    assert settings["kind"] == "speculative" and settings["draft_confidence"] == 0.05
    assert len(settings["draft_vocabulary"]) == h["draft_vocabulary"]["size"] == 12
    assert 0 < h["draft_vocabulary"]["teacher_token_coverage"] <= 1
    assert settings["draft_precision"] == "int8" and settings["verify_padding"] is True
    assert h["draft_precision"]["chosen"] == "int8"
    # prepacked weights are timed against plain ones, and kept only where faster (these tiny models: rarely)
    timing = h["prepacked"]["teacher_timing"]
    assert h["prepacked"]["teacher"] == (timing["packed_ms"] < packed_linear.PACK_GAIN * timing["plain_ms"])
    assert h["prepacked"]["draft"] is False  # an int8 draft has its own packed kernels
    assert settings["prepack_weights"] is True and settings["adaptive_drafting"] is True
    assert h["adaptive_drafting"] is True and h["hybrid"]["drafting_rounds"] >= 1  # the policy's warm-up drafts
    summary = json.loads((run / "summary.json").read_text())
    assert isinstance(summary["teacher"]["generate_prepacked"], bool)
    pad_to, costs = h["verify_padding"]["pad_to"], h["verify_padding"]["teacher_pass_ms"]
    assert len(pad_to) == len(costs) == 3 + 1 + speculative.MAX_PADDING and all(w >= r for r, w in enumerate(pad_to, 1))
    loaded = speculative.load_hybrid(folder)
    assert loaded.vocabulary_ids == settings["draft_vocabulary"] and loaded.confidence == 0.05
    assert loaded.draft_precision == "int8" and loaded.prepared is None and loaded.adaptive is True

    # `generate` on the hybrid writes what the teacher alone writes
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"]} for r in lm_rows(4, seed=9)])
    outs = {}
    for name in ("hybrid", "teacher"):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", "--model", str(run / name), "--input", str(prompts), "--output", str(out),
                     "--max-new-tokens", "5", "--batch-size", "3"]) == 0
        outs[name] = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["generation"] for r in outs["hybrid"]] == [r["generation"] for r in outs["teacher"]]
    assert all(0 <= r["acceptance_rate"] <= 1 for r in outs["hybrid"])
    captured = capsys.readouterr()
    assert "speculative decoding:" in captured.out and "tokens/s while generating (after" in captured.out
    assert captured.err.count("the speculative hybrid generates one prompt at a time") == 1  # not the teacher

    # a causal-LM hybrid given to predict, which labels texts, says to generate
    assert main(["predict", "--model", str(folder), "--input", str(prompts), "--output", str(tmp_path / "l.csv")]) == 2
    assert f"use `hybridft generate --model {folder}`" in capsys.readouterr().err

    # bench/speculative.py --quick on this run: both drafts per draft length, outputs equal to the teacher's
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_speculative",
                                                  Path(__file__).resolve().parents[1] / "bench" / "speculative.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = tmp_path / "spec.json"
    assert bench.main(["--run", str(run), "--quick", "--out", str(report)]) == 0
    written = json.loads(report.read_text())
    agreement, rows = written["draft_top_k_agreement"], written["rows"]
    for a in agreement.values():  # a share of the same tokens, growing with k
        assert a["tokens"] > 0 and 0 <= a["top_1"] <= a["top_2"] <= a["top_3"] <= a["top_4"] <= 1
    assert len(rows) == 16  # draft lengths 1 and 3, the whole vocabulary and 12 tokens, confidence 0 and 0.3,
    # the draft in fp32 and int8, prepacked
    assert all(set(r["prepacked"]) == {"teacher", "draft", "teacher_timing"} for r in rows.values())
    assert not any(r["prepacked"]["draft"] for key, r in rows.items() if "draft=int8" in key)
    assert all(r["draft_vocabulary"]["size"] == 12 for key, r in rows.items() if "vocabulary=12 " in key)
    for r in rows.values():
        assert r["matches_teacher"] == r["prompts"] == r["undistilled_hybrid"]["matches_teacher"] == 2
        assert r["hybrid"]["tokens_per_s"] > 0 and r["undistilled_hybrid"]["tokens_per_s"] > 0
    assert bench.main(["--run", str(tmp_path), "--quick", "--out", str(report)]) == 2
    # prompts from a file instead of the run's test split (held-out prompts like those the draft learned from)
    # and adaptive drafting off and on: the same outputs, the rounds it drafted in counted
    assert bench.main(["--run", str(run), "--prompt-file", str(prompts), "--prompts", "3", "--max-new-tokens", "3",
                       "--draft-tokens", "1", "--draft-precisions", "fp32", "--adaptive", "off,on",
                       "--out", str(report)]) == 0
    written = json.loads(report.read_text())
    assert written["prompt_file"] == str(prompts) and written["prompts"] == 3
    assert [r["matches_teacher"] for r in written["rows"].values()] == [3, 3]
    always, adaptive = written["rows"].values()
    assert always["adaptive_drafting"] is False and always["hybrid"]["plain_rounds"] == 0
    assert adaptive["adaptive_drafting"] is True and adaptive["hybrid"]["drafting_rounds"] >= 1
    assert adaptive["hybrid"]["policy"]["drafting_tokens_per_s"] > 0 and "policy" not in always["hybrid"]
    assert "policy" in adaptive["undistilled_hybrid"]

    # bench/speculative_profile.py --quick: the same tokens timed in parts, the parts within the total
    spec = importlib.util.spec_from_file_location("bench_profile",
                                                  Path(__file__).resolve().parents[1] / "bench" / "speculative_profile.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    assert profile.main(["--run", str(run), "--quick", "--device", "cpu", "--out", str(tmp_path / "prof.json")]) == 0
    prof = json.loads((tmp_path / "prof.json").read_text())
    for who in ("teacher_alone", "hybrid"):
        r = prof[who]
        assert r["new_tokens"] > 0 and sum(v["ms"] for v in r["parts"].values()) <= r["seconds"] * 1000 + 1
        assert r["rest_ms"] >= -1
    assert prof["hybrid"]["new_tokens"] == prof["teacher_alone"]["new_tokens"]  # the teacher's own output
    assert "draft token" in prof["hybrid"]["parts"] and "draft token" not in prof["teacher_alone"]["parts"]
    assert prof["torch_profile_top15"]

    # a damaged hybrid folder is refused with one line, exit 2, and the output is not written
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    (damaged / "draft" / "config.json").write_text("{}", encoding="utf-8")
    out = tmp_path / "never.jsonl"
    assert main(["generate", "--model", str(damaged), "--input", str(prompts), "--output", str(out)]) == 2
    assert "draft/config.json" in capsys.readouterr().err and not out.exists()


def test_a_teacher_that_ends_every_answer_at_once_leaves_the_hybrid_unmeasured(tmp_path: Path, tiny_lm_dir: Path,
                                                                              lm_data, capsys):
    """No round of drafting, so no acceptance rate or speed-up: the summary says why instead of printing 0% and a
    speed-up of one prompt pass against another (or failing on a missing one)."""
    from transformers import GenerationConfig

    from hybridft.cli import main

    teacher = tmp_path / "stops"
    shutil.copytree(tiny_lm_dir, teacher)
    tok = make_lm_tokenizer(tmp_path / "tok")
    GenerationConfig(eos_token_id=list(range(len(tok)))).save_pretrained(teacher)  # every token ends an answer
    assert main(_run_args(tmp_path, teacher, lm_data, "a", "hybrid.speculative_prompts=2", "student.train.epochs=1",
                          "hybrid.draft_vocabulary=12")) == 0
    h = json.loads((tmp_path / "a" / "summary.json").read_text())["hybrid"]
    assert "end at their first token" in h["unmeasured"] and h["hybrid"]["drafted"] == 0
    assert h["hybrid"]["speedup_vs_teacher"] is None and h["undistilled_hybrid"]["speedup_vs_teacher"] is None
    assert h["draft_vocabulary"]["teacher_token_coverage"] is None  # over no answer token
    printed = " ".join(capsys.readouterr().out.split())  # the table's console wraps lines
    assert "speculative hybrid: saved to" in printed and "not measured" in printed
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "red"}])
    assert main(["generate", "--model", str(tmp_path / "a" / "hybrid"), "--input", str(prompts), "--output",
                 str(tmp_path / "o.jsonl"), "--quiet"]) == 0
    assert "nothing was drafted" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# adaptive drafting: draft only while it pays (DraftPolicy)


def test_the_draft_policy_warms_up_drafting_then_takes_the_faster_choice_and_explores_the_other():
    policy = speculative.DraftPolicy(decay=0.5, warmup=2, explore_every=5)
    assert policy.rate(True) is None and policy.rate(False) is None
    choices = []
    for _ in range(12):
        drafting = policy.draft_next()
        choices.append(drafting)
        # drafting rounds yield 1 token in 30 ms, plain steps 1 token in 20 ms: drafting does not pay
        policy.observe(drafting, 1, 0.030 if drafting else 0.020)
    # two drafting rounds to warm up, one plain round to measure it, then plain except every 5th round overall
    assert choices == [True, True, False, False, True, False, False, False, False, True, False, False]
    assert policy.rate(True) == pytest.approx(1 / 0.030) and policy.rate(False) == pytest.approx(1 / 0.020)
    # the draft turns useful (3 tokens a drafting round): recent rounds outweigh old ones, and drafting wins
    policy.observe(True, 3, 0.030)
    policy.observe(True, 3, 0.030)
    assert policy.rate(True) > policy.rate(False)
    assert [policy.draft_next() for _ in range(3)] == [True, True, False]  # round 15 explores plain steps
    with pytest.raises(ValueError, match="decay"):
        speculative.DraftPolicy(decay=1.0)
    # drafts never accepted: drafting cannot pay, however its rounds were timed (noise on a loaded machine)
    noisy = speculative.DraftPolicy(warmup=2, explore_every=100)
    for drafting in (True, True, False):
        assert noisy.draft_next() == drafting
        noisy.observe(drafting, 1, 0.010 if drafting else 0.020)
    assert noisy.rate(True) > noisy.rate(False) and not noisy.draft_next()


class _Scripted(speculative.DraftPolicy):
    """Decides from a fixed list (cycled) and records what the loop reports."""

    def __init__(self, script: list[bool]):
        super().__init__()
        self.script, self.calls, self.seen = script, 0, []

    def draft_next(self) -> bool:
        self.calls += 1
        return self.script[(self.calls - 1) % len(self.script)]

    def observe(self, drafting: bool, tokens: int, seconds: float) -> None:
        self.seen.append((drafting, tokens, seconds))


@pytest.mark.parametrize("k", [1, 3])
def test_rounds_without_a_draft_keep_the_teachers_output_and_are_counted(k: int):
    teacher = _teacher()
    draft = _half_agreeing_draft(teacher)
    for ids in _prompts(4):
        policy = _Scripted([True, False, False, True, False, True, True])
        out, stats = speculative.speculative_generate(teacher, draft, ids, 24, draft_tokens=k, policy=policy)
        assert out[0, ids.shape[1]:].tolist() == _hf_greedy(teacher, ids, 24)
        drafting = [d for d, _, _ in policy.seen]
        assert stats.plain_rounds == drafting.count(False) > 0 and len(stats.rounds) == drafting.count(True) > 0
        assert stats.teacher_passes == 1 + len(policy.seen)  # the prompt's pass, then one per round
        # a plain round emits the teacher's one token; a drafting round its accepted drafts and one more
        assert all(tokens == 1 for d, tokens, _ in policy.seen if not d)
        assert sum(tokens for _, tokens, _ in policy.seen) == stats.new_tokens - 1
        assert all(seconds > 0 for _, _, seconds in policy.seen)
        assert stats.to_dict()["plain_rounds"] == stats.plain_rounds


class _PassClock:
    """A clock that advances by a set cost whenever a model runs a forward pass, so that which of two models is
    dearer does not depend on this machine's speed or load."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def charge(self, model, cost: float):
        import functools

        inner = model.forward

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            self.now += cost
            return inner(*args, **kwargs)

        model.forward = forward
        return model


def _adaptive_generations(teacher, draft, clock: _PassClock, prompts: int, new_tokens: int, k: int):
    """Every prompt through one DraftPolicy (warm-up 3, exploring 1 round in 12); each output checked against the
    teacher's greedy one. Returns the summed stats."""
    policy = speculative.DraftPolicy(warmup=3, explore_every=12, clock=clock)
    total = speculative.SpeculativeStats()
    for ids in _prompts(prompts):
        out, stats = speculative.speculative_generate(teacher, draft, ids, new_tokens, draft_tokens=k, policy=policy)
        assert out[0, ids.shape[1]:].tolist() == _hf_greedy(teacher, ids, new_tokens)
        total.add(stats)
    return total


def test_adaptive_drafting_falls_back_to_teacher_steps_where_the_draft_does_not_pay():
    clock = _PassClock()
    teacher = clock.charge(_teacher(), 1.0)
    useless = clock.charge(_teacher(seed=7), 0.3)  # another random model: its drafts are rarely the teacher's tokens
    total = _adaptive_generations(teacher, useless, clock, prompts=4, new_tokens=24, k=2)
    rounds = len(total.rounds) + total.plain_rounds
    # the warm-up, one exploring round in 12, and the rare round where an accepted draft made drafting look faster
    assert len(total.rounds) <= 3 + rounds // 12 + 3, (len(total.rounds), total.plain_rounds)
    assert total.plain_rounds > 0.7 * rounds


def test_adaptive_drafting_keeps_drafting_where_the_draft_pays():
    clock = _PassClock()
    draft = _teacher()
    teacher = clock.charge(copy.deepcopy(draft), 1.0)  # the same model: every draft is accepted
    clock.charge(draft, 0.2)
    total = _adaptive_generations(teacher, draft, clock, prompts=3, new_tokens=30, k=4)
    assert total.acceptance_rate == 1.0
    # one plain round to measure plain steps, and at most one exploring round in 12 after it
    rounds = len(total.rounds) + total.plain_rounds
    assert 1 <= total.plain_rounds <= 1 + rounds // 12, total
