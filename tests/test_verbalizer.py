"""Zero-shot class scores from a causal LM (issue 11, part 3a): the verbalizer scores equal the hand-computed
log-probabilities of the label words (multi-token verbalizers included), batching and padding change nothing,
and contextual calibration makes a content-free input uniform."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from hybridft import verbalizer as vb
from hybridft.errors import HybridFTError
from test_causal_lm import make_llama, make_lm_tokenizer

CPU = torch.device("cpu")
TEMPLATE = "Q: {text} A:"
VERBALIZERS = [["blue"], ["red green", "gold"], ["one two three"]]  # single, several, and multi-token words


@pytest.fixture
def lm(tmp_path: Path):
    tok = make_lm_tokenizer(tmp_path / "tok")
    model = make_llama(len(tok), layers=2, seed=4).eval()
    with torch.no_grad():  # larger weights: distinct log-probs rather than a near-uniform random model
        g = torch.Generator().manual_seed(4)
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, tok


@torch.no_grad()
def _hand_logprob(model, tok, text: str, words: str) -> float:
    """log P(words | prompt) from one unpadded forward pass, token by token."""
    prompt = tok(TEMPLATE.replace("{text}", text))["input_ids"]
    answer = tok(words, add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
    return sum(float(logits[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))


def test_scores_are_the_log_probabilities_of_the_label_words(lm):
    model, tok = lm
    texts = ["red", "pink white black brown", "one two"]  # different lengths: padded batches
    scores = vb.label_scores(model, tok, texts, TEMPLATE, VERBALIZERS, CPU, batch_size=4, chat_template=False)
    assert scores.shape == (3, 3)
    for i, text in enumerate(texts):
        assert scores[i, 0].item() == pytest.approx(_hand_logprob(model, tok, text, "blue"), abs=1e-5)
        both = torch.logaddexp(torch.tensor(_hand_logprob(model, tok, text, "red green")),
                               torch.tensor(_hand_logprob(model, tok, text, "gold")))
        assert scores[i, 1].item() == pytest.approx(float(both), abs=1e-5)
        assert scores[i, 2].item() == pytest.approx(_hand_logprob(model, tok, text, "one two three"), abs=1e-5)
    # a batch of one sequence (no padding) gives the same numbers
    single = vb.label_scores(model, tok, texts, TEMPLATE, VERBALIZERS, CPU, batch_size=1, chat_template=False)
    torch.testing.assert_close(scores, single, atol=1e-5, rtol=0)


def test_the_chat_template_wraps_the_prompt_when_asked(tmp_path: Path):
    tok = make_lm_tokenizer(tmp_path / "t", template=True)
    assert vb.prompt_ids(tok, TEMPLATE, "red", chat_template=True) != vb.prompt_ids(tok, TEMPLATE, "red", False)
    assert vb.prompt_ids(tok, TEMPLATE, "red", chat_template=False) == tok("Q: red A:")["input_ids"]


def test_contextual_calibration_makes_a_content_free_input_uniform(lm):
    model, tok = lm
    prior = vb.content_free_prior(model, tok, TEMPLATE, VERBALIZERS, CPU, inputs=("",), chat_template=False)
    assert prior.sum().item() == pytest.approx(1.0) and prior.max() > 0.4  # this model prefers a label
    cf = vb.label_scores(model, tok, [""], TEMPLATE, VERBALIZERS, CPU, chat_template=False)
    torch.testing.assert_close(vb.calibrate(cf, prior).exp(), torch.full((1, 3), 1 / 3), atol=1e-5, rtol=0)
    # the formula: q is proportional to p / p_cf
    scores = torch.tensor([[-1.0, -2.0, -3.0]])
    p, p_cf = scores.softmax(-1), torch.tensor([0.5, 0.3, 0.2])
    expected = (p / p_cf) / (p / p_cf).sum()
    torch.testing.assert_close(vb.calibrate(scores, p_cf).exp(), expected)
    torch.testing.assert_close(vb.calibrate(scores, None), scores.log_softmax(-1))


def test_unusable_prompts_and_verbalizers_are_refused(lm):
    model, tok = lm
    with pytest.raises(HybridFTError, match="placeholder"):
        vb.label_scores(model, tok, ["red"], "no text here", VERBALIZERS, CPU)
    with pytest.raises(HybridFTError, match="at least 2 labels"):
        vb.verbalizer_ids(tok, [["blue"]])
    with pytest.raises(HybridFTError, match="no verbalizer"):
        vb.verbalizer_ids(tok, [["blue"], []])
    with pytest.raises(HybridFTError, match="no tokens"):
        vb.verbalizer_ids(tok, [["blue"], [""]])
    with pytest.raises(HybridFTError, match="told apart"):
        vb.verbalizer_ids(tok, [["blue"], ["blue"]])


def test_a_long_shared_prefix_gives_the_same_scores_as_full_passes(tmp_path: Path):
    """The prompt's prefix (here a chat template's turn and a long instruction) runs once per batch and its keys and
    values are shared by every row: the scores still equal unpadded full forward passes."""
    tok = make_lm_tokenizer(tmp_path / "t", template=True)
    model = make_llama(len(tok), layers=2, seed=5).eval()
    template = "Q: red green blue Q: one two A: {text} A:"
    texts, words = ["red", "one two three gold", ""], ["blue", "one two three"]
    scores = vb.label_scores(model, tok, texts, template, [[w] for w in words], CPU, batch_size=2, chat_template=True)
    for i, text in enumerate(texts):
        prompt = vb.prompt_ids(tok, template, text, chat_template=True)
        for label, w in enumerate(words):
            answer = tok(w, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
            expected = sum(float(logits[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))
            assert scores[i, label].item() == pytest.approx(expected, abs=1e-5)


def test_the_prefix_runs_once_across_calls_and_again_after_the_weights_change(tmp_path: Path):
    """The hybrid calls the teacher one input at a time: the prompt prefix's keys and values are kept across
    calls, and recomputed when the weights change (a stale cache would score against the old weights)."""
    tok = make_lm_tokenizer(tmp_path / "t", template=True)
    model = make_llama(len(tok), layers=2, seed=5).eval()
    template = "Q: red green blue Q: one two A: {text} A:"
    zs = vb.build_zero_shot(model, tok, template, [["blue"], ["one two three"]], ["a", "b"], calibrated=False)
    fresh = vb.build_zero_shot(copy.deepcopy(model), tok, template, [["blue"], ["one two three"]], ["a", "b"],
                               calibrated=False)
    prefix_passes = []
    model.base_model.register_forward_pre_hook(
        lambda _m, _a, kw: prefix_passes.append(1) if kw["input_ids"].shape == (1, len(zs.prefix)) else None,
        with_kwargs=True)
    ids, mask = vb.encode_texts(tok, ["red", "one two three gold"])
    with torch.no_grad():
        first = zs.label_scores(ids, mask)
        for i in range(2):
            torch.testing.assert_close(zs.label_scores(ids[i:i + 1], mask[i:i + 1])[0], first[i], atol=1e-5, rtol=0)
    assert len(prefix_passes) == 1
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
        for p in fresh.lm.parameters():
            p.mul_(1.5)
        torch.testing.assert_close(zs.label_scores(ids, mask), fresh.label_scores(ids, mask), atol=1e-5, rtol=0)
    assert len(prefix_passes) == 2
