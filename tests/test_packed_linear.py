"""Linear layers prepacked for oneDNN (hybridft.packed_linear): the same products as nn.Linear, the same greedy
tokens, the originals back after a `with` block, and nothing packed where the kernels are missing."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from hybridft import packed_linear
from hybridft.packed_linear import PackedLinear, is_packed, packed_for_inference, prepack_linears
from test_causal_lm import make_gpt2, make_llama

pytestmark = pytest.mark.skipif(not packed_linear.packing_available()[0], reason="no oneDNN packed linear here")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (3, 5, 24), (2, 0, 24)])
def test_a_packed_layer_computes_what_the_linear_layer_computes(bias: bool, shape: tuple[int, ...]):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(shape)
    torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    assert packed(x).shape == (*shape[:-1], 40)
    # it saves as the layer it replaced, and refuses to load
    state = packed.state_dict()
    assert set(state) == ({"weight", "bias"} if bias else {"weight"})
    torch.testing.assert_close(state["weight"], linear.weight.detach())
    with pytest.raises(RuntimeError, match="inference only"):
        packed.load_state_dict(linear.state_dict())


def test_a_packed_llama_scores_and_generates_as_before():
    model = make_llama(40, layers=2, seed=3).eval()
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                do_sample=False, pad_token_id=0)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert prepack_linears(model) == linears == 2 * 7 + 1  # q k v o gate up down per layer, and the output layer
    assert is_packed(model) and prepack_linears(model) == 0  # packing twice packs nothing more
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        again = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(again, greedy)


def test_packed_for_inference_gives_the_original_layers_back():
    model = make_llama(40, layers=2, seed=3)
    before = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    with packed_for_inference(model) as n:
        assert n == len(before) and is_packed(model)
    after = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    loss = model(input_ids=torch.tensor([[4, 5, 6]]), labels=torch.tensor([[4, 5, 6]])).loss
    loss.backward()  # and it trains again
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_nothing_is_packed_where_it_cannot_be(monkeypatch: pytest.MonkeyPatch):
    from hybridft import precision

    gpt2 = make_gpt2(40)  # its projections are Conv1D, not nn.Linear: only its output layer is packed
    assert prepack_linears(gpt2) == 1 and isinstance(gpt2.lm_head, PackedLinear)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    assert packing_reason(torch.bfloat16) == "this CPU has no native bf16"
    assert prepack_linears(make_llama(40, layers=1).to(torch.bfloat16)) == 0

    def broken(self, linear, batch_hint=8):
        raise RuntimeError("no such op")

    monkeypatch.setattr(PackedLinear, "__init__", broken)
    ok, why = packed_linear.packing_available(torch.float32)
    assert not ok and "unavailable" in why
    assert prepack_linears(make_llama(40, layers=1)) == 0


def packing_reason(dtype: torch.dtype) -> str:
    return packed_linear.packing_available(dtype)[1]


@pytest.mark.parametrize("faster", [True, False])
def test_packing_is_kept_only_where_it_is_faster(monkeypatch: pytest.MonkeyPatch, faster: bool):
    model = make_llama(40, layers=2, seed=3).eval()
    before = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    cost = {True: 10.0, False: 20.0} if faster else {True: 19.0, False: 20.0}  # 19 is within timing noise of 20
    monkeypatch.setattr(packed_linear, "decoding_pass_ms", lambda m: cost[is_packed(m)])
    decision = packed_linear.prepack_if_faster(model)
    assert decision["packed"] is faster and is_packed(model) is faster
    assert (decision["plain_ms"], decision["packed_ms"]) == (cost[False], cost[True])
    if faster:
        assert decision["layers"] == len(before) == sum(isinstance(m, PackedLinear) for m in model.modules())
    else:
        assert all(dict(model.named_modules())[k] is m for k, m in before.items())  # the same layers, untouched
    with packed_linear.packed_if_faster(make_llama(40, layers=1)) as inner:
        assert inner["packed"] is faster


def test_a_speculative_hybrid_with_a_packed_teacher_and_draft_keeps_the_teachers_output(monkeypatch):
    from hybridft import speculative
    from test_speculative import _half_agreeing_draft, _hf_greedy, _prompts, _teacher

    monkeypatch.setattr(packed_linear, "decoding_pass_ms", lambda m: 1.0 if is_packed(m) else 2.0)
    teacher = _teacher()
    teacher.generation_config.eos_token_id = None  # no end token: 12 tokens from each prompt
    want = [_hf_greedy(teacher, ids, 12) for ids in _prompts(4)]
    no_eos = types.SimpleNamespace(eos_token_id=None)
    hybrid = speculative.SpeculativeHybrid(teacher, _half_agreeing_draft(teacher), no_eos, 3,
                                           vocabulary_ids=list(range(0, 40, 2)), draft_precision="fp32")
    got = [hybrid.generate(ids, 12)[0][0, ids.shape[1]:].tolist() for ids in _prompts(4)]
    assert got == want
    assert hybrid.prepared["packed"] == {"teacher": True, "draft": True}
    assert isinstance(hybrid.prepared["vocabulary"].head, PackedLinear)
    assert not is_packed(hybrid.draft)  # the saved draft is not touched
    from hybridft.errors import HybridFTError

    with pytest.raises(HybridFTError, match="prepacked for the CPU"):
        hybrid.to(torch.device("cuda"))


def test_bench_packed_linear_quick(tmp_path):
    """bench/packed_linear.py --quick: both kernels on a tiny Llama, same greedy tokens, the report written."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "packed_linear.py"
    spec = importlib.util.spec_from_file_location("bench_packed_linear", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "packed.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["packed_layers"] == 2 * 7 + 1 and report["same_greedy_outputs"] == report["prompts"] == 2
    assert report["max_logit_difference"] < 1e-4
    assert len(report["plain"]["pass_ms"]) == len(report["packed"]["pass_ms"]) == 8
    assert report["plain"]["tokens_per_s_batch1"] > 0 and report["packed"]["tokens_per_s_batch8"] > 0


def test_a_prepacked_cascade_predicts_what_the_plain_one_does(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """`HybridModel.prepack` (what `hybridft predict` does unless --no-prepack): same labels, probabilities to
    rounding and routing, with the timed choice forced to pack; the real timer drives a BERT classifier."""
    from hybridft import hybrid as hy
    from conftest import make_bert, make_tokenizer, sentiment_rows

    tok = make_tokenizer(tmp_path / "tok")
    student, teacher = make_bert(layers=1, seed=1), make_bert(layers=2, seed=2)
    labels = ["neg", "pos"]
    texts = [t for t, _ in sentiment_rows(24, seed=4)]
    model = hy.HybridModel(student, tok, teacher, tok, labels, threshold=0.9, student_temperature=0.05, max_length=16)
    want = model.predict(texts)
    assert packed_linear.encoder_pass_ms(student) > 0  # the real timer runs a classifier
    monkeypatch.setattr(packed_linear, "encoder_pass_ms", lambda m: 1.0 if is_packed(m) else 2.0)
    decisions = model.prepack()
    assert decisions["student"]["packed"] and decisions["teacher"]["packed"]
    assert is_packed(student) and is_packed(teacher)
    again = model.prepack()  # a second call keeps the packing and says so
    assert all(d["packed"] and d["layers"] == 0 and d["reason"] == "already prepacked" for d in again.values())
    assert "student prepacked" in model.prepack_summary(decisions)
    alone = hy.HybridModel(student, tok, student, tok, labels, threshold=float("-inf"))  # a single classifier
    assert set(alone.prepack()) == {"student"}
    # the Python API refuses a bare string with one clear line, and answers an empty list with nothing
    from hybridft.errors import HybridFTError

    with pytest.raises(HybridFTError, match="sequence of texts, got one str; wrap one text as"):
        model.predict("great movie")
    with pytest.raises(HybridFTError, match="got dict"):
        model.predict({"a": 1})
    with pytest.raises(HybridFTError, match="pairs"):
        model.predict(["a", "b"], ["x"])
    empty = model.predict([])
    assert empty.label_ids.shape == (0,) and empty.probs.shape == (0, 2) and empty.answered_by == []
    import numpy as np
    import pandas as pd

    for form in (list, np.array, pd.Series):  # an array or Series of texts reads like the list (it was refused)
        model.reset_budget()
        got = model.predict(form(texts))
        assert torch.equal(got.label_ids, want.label_ids) and got.answered_by == want.answered_by
        torch.testing.assert_close(got.probs, want.probs, rtol=1e-4, atol=1e-5)


def test_a_model_the_timer_cannot_drive_is_left_plain():
    model = make_llama(40, layers=1)

    def refuses(m):
        raise TypeError("forward() got an unexpected keyword argument 'input_ids'")

    decision = packed_linear.prepack_if_faster(model, None, refuses)
    assert not decision["packed"] and "not timed" in decision["reason"] and not is_packed(model)


@pytest.mark.parametrize("task_name", ["classification", "causal_lm"])
def test_the_fp32_teacher_store_pass_packed_equals_the_plain_one(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                                 task_name: str):
    """teacher_outputs.compute in fp32 on a CPU packs the teacher where faster (forced here both ways): the same
    stored outputs to rounding, and the teacher's own layers afterwards."""
    from conftest import make_bert, make_tokenizer, sentiment_rows
    from hybridft.config import load_config
    from hybridft.data import Examples
    from hybridft.tasks import causal_lm, classification
    from hybridft.teacher_outputs import compute
    from test_causal_lm import lm_rows, make_lm_tokenizer

    cpu = torch.device("cpu")
    if task_name == "classification":
        task, tok, teacher = classification, make_tokenizer(tmp_path / "tok"), make_bert(layers=2, seed=2)
        rows = sentiment_rows(10)
        exs = Examples(texts=[t for t, _ in rows], labels=[0] * len(rows), source="t")
        cfg = load_config(None, ["data.train=unused"])
    else:
        task, tok = causal_lm, make_lm_tokenizer(tmp_path / "tok")
        tok.pad_token = tok.eos_token
        teacher = make_llama(len(tok), layers=2, seed=3)
        rows = lm_rows(6)
        exs = Examples(texts=[r["prompt"] for r in rows], labels=[0] * len(rows), source="t",
                       pairs=[r["response"] for r in rows])
        cfg = load_config(None, ["task=causal_lm", "data.train=unused"])
    items = task.encode(exs, tok, 32)
    layers = [m for m in teacher.modules() if type(m) is nn.Linear]
    from hybridft import teacher_outputs

    seen = []  # a few batches are never timed: the timing would cost more than packing could save
    compute(teacher, items, task.make_collate(tok), cpu, "fp32", lambda m, b: seen.append(is_packed(m)) or [None] * len(
        b["input_ids"]), batch_size=4)
    assert seen == [False] * -(-len(items) // 4)
    monkeypatch.setattr(teacher_outputs, "MIN_BATCHES_TO_TIME", 1)
    results = {}
    for gain in (0.0, 1e9):  # never faster enough / always
        monkeypatch.setattr(packed_linear, "PACK_GAIN", gain)
        packed_seen = []
        summarise = task.summarise(cfg)
        results[gain] = compute(teacher, items, task.make_collate(tok), cpu, "fp32",
                                lambda m, b: packed_seen.append(is_packed(m)) or summarise(m, b), batch_size=4)
        batches = -(-len(items) // 4)  # the calls after the timing ones are the pass itself
        assert set(packed_seen[-batches:]) == {gain > 1}, gain  # packed exactly when the timing said so
        assert [m for m in teacher.modules() if type(m) is nn.Linear] == layers and not is_packed(teacher)
    for plain, packed in zip(results[0.0], results[1e9]):
        if isinstance(plain, torch.Tensor):
            torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)
        else:  # a causal LM's token summary: top-k ids and log-probs, compared as dense rows (ties may reorder)
            def dense(t):
                out = torch.full((t.ids.shape[0], int(t.ids.max()) + 2), float("nan"))
                return out.scatter_(1, t.ids.clamp(min=0), t.logprobs.float())
            torch.testing.assert_close(dense(packed), dense(plain), rtol=1e-4, atol=1e-4, equal_nan=True)
