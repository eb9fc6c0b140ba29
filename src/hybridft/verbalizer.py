"""Zero-shot class scores from a causal LM (issue 11, part 3a): how likely the LM finds each label's words after a
prompt that holds the text, as soft labels for a classification student.

For a text x, a prompt template (e.g. "Review: {text}\\nSentiment:") and, per label y, one or more verbalizers
v (e.g. " negative" / " positive"; a verbalizer may be several tokens):

    log P(v | x)  = sum_j log p_LM(v_j | prompt(x), v_<j)          the verbalizer's tokens, in order
    score(y | x)  = logsumexp over the verbalizers v of y          the label's probability is the sum of its words'

`label_scores` returns those scores [N, L]; `log_softmax` of them is the LM's distribution over the labels, and
they serve as the teacher logits of a classification store (softmax(score / T) at temperature T).

**Contextual calibration** (Zhao et al. 2021, "Calibrate Before Use: Improving Few-Shot Performance of Language
Models", ICML): an LM prefers some label words whatever the text (" positive" is more frequent than
" negative"). Scoring content-free inputs ("N/A", "", "[MASK]") measures that prior, p_cf = the mean over them of
softmax(score); the calibrated distribution is softmax(log softmax(score) - log p_cf), which is uniform on a
content-free input. `calibrate` applies it.

The prompt goes through the tokenizer's chat template when it has one and `chat_template` is set (an instruct
model answers after its assistant header); the verbalizer's tokens follow the prompt's tokens directly, tokenized
on their own (so " positive" with its leading space is one word for a BPE tokenizer).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from hybridft.errors import HybridFTError

CONTENT_FREE = ("N/A", "", "[MASK]")
"""Zhao et al.'s content-free inputs."""


def verbalizer_ids(tokenizer: Any, verbalizers: list[list[str]]) -> list[list[list[int]]]:
    """Token ids of each label's verbalizers, [label][verbalizer][token]. Raises HybridFTError for an empty
    verbalizer list, a verbalizer with no tokens, or two labels that share a verbalizer."""
    if len(verbalizers) < 2:
        raise HybridFTError("a classifier needs verbalizers for at least 2 labels")
    out, seen = [], {}
    for label, words in enumerate(verbalizers):
        if not words:
            raise HybridFTError(f"label {label} has no verbalizer; give at least one word per label")
        ids = []
        for w in words:
            toks = tokenizer(w, add_special_tokens=False)["input_ids"]
            if not toks:
                raise HybridFTError(f"verbalizer {w!r} (label {label}) has no tokens; give a non-empty word")
            if tuple(toks) in seen and seen[tuple(toks)] != label:
                raise HybridFTError(f"verbalizer {w!r} tokenizes like one of label {seen[tuple(toks)]}'s; the labels "
                                    f"could not be told apart")
            seen[tuple(toks)] = label
            ids.append(toks)
        out.append(ids)
    return out


def prompt_ids(tokenizer: Any, template: str, text: str, chat_template: bool) -> list[int]:
    """The prompt's token ids: `template` with `{text}` filled in, through the chat template when asked and the
    tokenizer has one."""
    from hybridft.tasks import causal_lm

    if "{text}" not in template:
        raise HybridFTError(f"the prompt template {template!r} has no {{text}} placeholder")
    prompt = template.replace("{text}", text)
    return causal_lm._prompt_ids(tokenizer, prompt, chat_template and causal_lm.uses_template(tokenizer))


@torch.no_grad()
def label_scores(model: nn.Module, tokenizer: Any, texts: list[str], template: str, verbalizers: list[list[str]],
                 device: torch.device, batch_size: int = 16, chat_template: bool = True) -> torch.Tensor:
    """Per text and label, the log-probability of the label's verbalizers after the prompt (logsumexp over a
    label's verbalizers).

    Args:
        model: a causal LM (eval mode is set here); tokenizer: its tokenizer.
        texts: N texts; template: the prompt, with a `{text}` placeholder.
        verbalizers: per label, one or more words (each one or more tokens), e.g. [[" negative"], [" positive"]].
    Returns:
        [N, L] float32 log-probabilities (natural log), on the CPU.
    Raises:
        HybridFTError: for a template without `{text}` or unusable verbalizers.
    """
    label_ids = verbalizer_ids(tokenizer, verbalizers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = [(i, label, v) for i in range(len(texts)) for label, vs in enumerate(label_ids) for v in vs]
    prompts = [prompt_ids(tokenizer, template, t, chat_template) for t in texts]
    logp = torch.empty(len(pairs))
    model.to(device).eval()
    # One sequence per (text, verbalizer): right-padded, so positions need no shift; longest first pads least.
    order = sorted(range(len(pairs)), key=lambda k: -(len(prompts[pairs[k][0]]) + len(pairs[k][2])))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs = [prompts[pairs[k][0]] + pairs[k][2] for k in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # [B, W, V]
        for row, k in enumerate(chunk):
            p_len, v = len(prompts[pairs[k][0]]), pairs[k][2]
            # token v_j sits at position p_len + j and is predicted from position p_len + j - 1
            positions = torch.arange(p_len - 1, p_len - 1 + len(v), device=device)
            logp[k] = logits[row, positions, torch.tensor(v, device=device)].sum().cpu()
    scores = torch.full((len(texts), len(label_ids)), float("-inf"))
    for k, (i, label, _) in enumerate(pairs):
        scores[i, label] = torch.logaddexp(scores[i, label], logp[k])
    return scores


def content_free_prior(model: nn.Module, tokenizer: Any, template: str, verbalizers: list[list[str]],
                       device: torch.device, inputs: tuple[str, ...] = CONTENT_FREE,
                       chat_template: bool = True) -> torch.Tensor:
    """p_cf [L]: the mean over content-free inputs of the LM's label distribution, softmax(score)."""
    scores = label_scores(model, tokenizer, list(inputs), template, verbalizers, device, chat_template=chat_template)
    return scores.softmax(-1).mean(0)


def calibrate(scores: torch.Tensor, prior: Optional[torch.Tensor]) -> torch.Tensor:
    """Contextual calibration: log softmax(log softmax(scores) - log prior), [N, L] -> [N, L]; the identity up to
    normalisation when `prior` is None or uniform."""
    logp = scores.log_softmax(-1)
    if prior is None:
        return logp
    return (logp - prior.clamp_min(1e-12).log()).log_softmax(-1)
