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

import copy

import json
from pathlib import Path
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


def prompt_parts(tokenizer: Any, template: str, chat_template: bool) -> tuple[list[int], list[int]]:
    """The prompt's token ids before and after `{text}`: `template` rendered through the chat template when asked
    and the tokenizer has one, split at the placeholder, each side tokenized on its own (the text is spliced in
    between as the classification task tokenizes any text). Raises HybridFTError unless `{text}` occurs once."""
    from hybridft.tasks import causal_lm

    if template.count("{text}") != 1:
        raise HybridFTError(f"the prompt template {template!r} must hold the {{text}} placeholder exactly once")
    if chat_template and causal_lm.uses_template(tokenizer):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": template}], add_generation_prompt=True,
                                                 tokenize=False)
        head: list[int] = []  # the template writes any beginning-of-sequence token itself
    else:
        rendered, head = template, special_counts(tokenizer)[2]
    before, after = rendered.split("{text}")
    encode = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []  # noqa: E731
    return head + encode(before), encode(after)


def special_counts(tokenizer: Any) -> tuple[int, int, list[int]]:
    """How many special tokens the tokenizer adds before and after a text, and the leading ones' ids (a Llama
    tokenizer's BOS): the text's ids are taken without them when spliced into a prompt."""
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("x")["input_ids"])
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return at, len(full) - len(plain) - at, full[:at]


def prompt_ids(tokenizer: Any, template: str, text: str, chat_template: bool) -> list[int]:
    """The whole prompt's token ids for one text: prefix + the text's own tokens + suffix (`prompt_parts`)."""
    before, after = prompt_parts(tokenizer, template, chat_template)
    return before + list(tokenizer(text, add_special_tokens=False)["input_ids"]) + after


ZERO_SHOT_FILE = "zero_shot.json"
ZERO_SHOT_FORMAT = "hybridft.zero_shot/1"


class ZeroShotClassifier(nn.Module):
    """A causal LM read as a sequence classifier through verbalizers: the zero-shot LLM teacher of issue 11, part 3a.

    `forward(input_ids [B, W], attention_mask [B, W])` takes the *text's* token ids as the classification task
    encodes any text (the LM's tokenizer, truncated to data.max_length, right-padded), puts each row between the
    prompt's prefix and suffix ids, and returns `.logits` [B, L] float32: per label, the log-probability of its
    verbalizers (`label_scores`), log-softmaxed over the labels and, when a prior is set, contextually
    calibrated (`calibrate`). Log-probabilities are logits, so the store, the loss (softmax(logits / T)), the
    hybrid cascade and `hybridft predict` use this model as they use any classifier.

    The LM's output layer runs only at the positions that predict a verbalizer token, never over [B, W, V].
    Verbalizers of one token cost nothing beyond the prompt's pass; each longer verbalizer costs one more pass.
    Saved as the LM's own folder plus `zero_shot.json` (prompt, verbalizers, prior); `load_zero_shot` reads it back.
    """

    def __init__(self, lm: nn.Module, prefix: list[int], suffix: list[int], label_ids: list[list[list[int]]],
                 label_names: list[str], settings: dict[str, Any], log_prior: Optional[torch.Tensor] = None,
                 skip: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        self.lm = lm
        self.prefix, self.suffix, self.label_ids = list(prefix), list(suffix), label_ids
        self.label_names, self.settings, self.skip = list(label_names), dict(settings), skip
        self.register_buffer("log_prior", log_prior if log_prior is not None else torch.zeros(len(label_ids)),
                             persistent=False)
        self.calibrated = log_prior is not None
        self._prefix_cache: Optional[tuple[tuple[Any, ...], Any]] = None  # (what it was computed under, KV cache)

    @property
    def config(self) -> Any:  # the LM's config: pad token, dtype and size checks read it as any model's
        return self.lm.config

    def get_input_embeddings(self) -> nn.Module:  # the transfer-set generator's word neighbours
        return self.lm.get_input_embeddings()

    def _rows(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> list[list[int]]:
        """Each row's prompt: prefix + the text's real tokens (without the tokenizer's own special ones) + suffix."""
        head, tail = self.skip
        rows = []
        for i, ids in enumerate(input_ids.tolist()):
            n = int(attention_mask[i].sum()) if attention_mask is not None else len(ids)
            rows.append(self.prefix + ids[head:max(n - tail, head)] + self.suffix)
        return rows

    def _next_token_logprobs(self, seqs: list[list[int]], picks: list[tuple[int, int]]) -> torch.Tensor:
        """log p(next token | seqs[r][:position + 1]) for each (r, position) of `picks`: [len(picks), V] float32.

        Every sequence starts with the prompt's prefix (a chat template's system turn and the instruction: often
        more tokens than the text). Its keys and values are computed once per call and shared by the batch, so a
        row costs only its own tokens. One right-padded pass of the LM's body follows; its output layer runs at
        the picked positions only."""
        device, body = self.log_prior.device, self.lm.base_model
        pad = self.lm.config.pad_token_id if self.lm.config.pad_token_id is not None else 0
        shared = len(self.prefix) if len(self.prefix) < min(map(len, seqs)) else 0
        rests = [s[shared:] for s in seqs]
        width = max(map(len, rests))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rests], device=device)
        mask = torch.tensor([[1] * (shared + len(r)) + [0] * (width - len(r)) for r in rests], device=device)
        kwargs: dict[str, Any] = {}
        if shared:
            from hybridft.models import cache_argument

            cache = copy.deepcopy(self._prefix_kv(body, device))  # the batch's pass appends to it
            cache.batch_repeat_interleave(len(seqs))
            kwargs = {cache_argument(body): cache, "use_cache": True}
        hidden = body(input_ids=ids, attention_mask=mask, **kwargs)[0]  # [B, W - shared, d]
        rows, positions = (torch.tensor(x, device=device) for x in zip(*picks))
        return self.lm.get_output_embeddings()(hidden[rows, positions - shared]).float().log_softmax(-1)

    def _prefix_kv(self, body: nn.Module, device: torch.device) -> Any:
        """The prompt prefix's KV cache, computed once and kept across calls (the hybrid's calls of one input would
        otherwise pay for the prefix, often longer than the text, every time). Recomputed when the device, the
        weights' dtype, autocast or the weights' version counter change; the LM is frozen, so they do not while
        it teaches."""
        from transformers import DynamicCache

        from hybridft.models import cache_argument

        weight = self.lm.get_output_embeddings().weight
        autocast = torch.is_autocast_enabled(device.type)
        state = (device, weight.dtype, autocast, torch.get_autocast_dtype(device.type) if autocast else None,
                 tuple(p._version for p in self.lm.parameters()))
        if self._prefix_cache is None or self._prefix_cache[0] != state:
            cache = DynamicCache()
            with torch.no_grad():
                body(input_ids=torch.tensor([self.prefix], device=device), use_cache=True,
                     **{cache_argument(body): cache})
            self._prefix_cache = (state, cache)
        return self._prefix_cache[1]

    def label_scores(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Uncalibrated scores [B, L]: per label, logsumexp over its verbalizers of log P(verbalizer | prompt)."""
        prompts = self._rows(input_ids, attention_mask)
        scores = torch.full((len(prompts), len(self.label_ids)), float("-inf"), device=self.log_prior.device)
        flat = [(label, v) for label, vs in enumerate(self.label_ids) for v in vs]
        if any(len(v) == 1 for _, v in flat):  # every one-token verbalizer is read off one pass over the prompts
            logp = self._next_token_logprobs(prompts, [(r, len(p) - 1) for r, p in enumerate(prompts)])  # [B, V]
            for label, v in flat:
                if len(v) == 1:
                    scores[:, label] = torch.logaddexp(scores[:, label], logp[:, v[0]])
        for label, v in flat:
            if len(v) > 1:  # token v_j follows the prompt at len(p) + j and is predicted from len(p) + j - 1
                picks = [(r, len(p) + j - 1) for r, p in enumerate(prompts) for j in range(len(v))]
                logp = self._next_token_logprobs([p + v[:-1] for p in prompts], picks)  # [B * len(v), V]
                picked = logp[torch.arange(len(picks)), torch.tensor(v * len(prompts))].view(len(prompts), len(v))
                scores[:, label] = torch.logaddexp(scores[:, label], picked.sum(-1))
        return scores

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **_: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logp = self.label_scores(input_ids, attention_mask).log_softmax(-1)
        if self.calibrated:
            logp = (logp - self.log_prior).log_softmax(-1)
        return SequenceClassifierOutput(logits=logp)

    # -----------------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, **kwargs: Any) -> None:
        """The LM's folder (save_pretrained) plus zero_shot.json."""
        self.lm.save_pretrained(folder, **kwargs)
        meta = {"format": ZERO_SHOT_FORMAT, "label_names": self.label_names, "prefix_ids": self.prefix,
                "suffix_ids": self.suffix, "verbalizer_ids": self.label_ids, "skip": list(self.skip),
                "prior": self.log_prior.exp().tolist() if self.calibrated else None, **self.settings}
        (Path(folder) / ZERO_SHOT_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def read_zero_shot(folder: str | Path) -> Optional[dict[str, Any]]:
    """zero_shot.json of a saved zero-shot teacher, or None if the folder is not one."""
    f = Path(folder) / ZERO_SHOT_FILE
    if not f.is_file():
        return None
    try:
        meta: dict[str, Any] = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HybridFTError(f"{f} is not valid JSON; restore the folder or re-run the teacher stage") from None
    if meta.get("format") != ZERO_SHOT_FORMAT:
        raise HybridFTError(f"{f} has format {meta.get('format')!r}, expected {ZERO_SHOT_FORMAT!r}")
    return meta


def load_zero_shot(folder: str | Path, key: str) -> ZeroShotClassifier:
    """A zero-shot teacher saved by `ZeroShotClassifier.save_pretrained`."""
    from hybridft.tasks import causal_lm

    meta = read_zero_shot(folder)
    if meta is None:
        raise HybridFTError(f"{key}: {folder} has no {ZERO_SHOT_FILE}; it is not a zero-shot teacher")
    lm = causal_lm._load_lm(str(folder), key).eval()
    prior = torch.tensor(meta["prior"]).log() if meta.get("prior") is not None else None
    settings = {k: meta[k] for k in ("prompt", "verbalizers", "chat_template") if k in meta}
    return ZeroShotClassifier(lm, meta["prefix_ids"], meta["suffix_ids"], meta["verbalizer_ids"], meta["label_names"],
                              settings, prior, tuple(meta.get("skip", (0, 0))))


def build_zero_shot(lm: nn.Module, tokenizer: Any, template: str, verbalizers: list[list[str]],
                    label_names: list[str], chat_template: bool = True, calibrated: bool = True,
                    content_free: tuple[str, ...] = CONTENT_FREE) -> ZeroShotClassifier:
    """A `ZeroShotClassifier` for `label_names`, with the contextual-calibration prior measured on `content_free`
    inputs (Zhao et al. 2021) when `calibrated`. Raises HybridFTError for a bad template or verbalizers, or
    verbalizers that do not match the labels one to one."""
    if len(verbalizers) != len(label_names):
        raise HybridFTError(f"teacher.zero_shot.verbalizers has {len(verbalizers)} entries but the data has "
                            f"{len(label_names)} labels ({', '.join(label_names)}); give one list of words per label, "
                            f"in data.labels order")
    label_ids = verbalizer_ids(tokenizer, verbalizers)
    prefix, suffix = prompt_parts(tokenizer, template, chat_template)
    head, tail, _ = special_counts(tokenizer)
    settings = {"prompt": template, "verbalizers": verbalizers, "chat_template": chat_template}
    model = ZeroShotClassifier(lm.eval(), prefix, suffix, label_ids, label_names, settings, None, (head, tail))
    if calibrated:
        model.to(next(lm.parameters()).device)
        with torch.no_grad():
            ids, mask = encode_texts(tokenizer, list(content_free))
            scores = model.label_scores(ids.to(model.log_prior.device), mask.to(model.log_prior.device))
        model.log_prior = scores.softmax(-1).mean(0).clamp_min(1e-12).log()
        model.calibrated = True
    return model


def encode_texts(tokenizer: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts as the classification task encodes them (special tokens included), right-padded by hand (the mask
    says what is real, so a tokenizer without a pad token works): input_ids and attention_mask, [N, W]."""
    ids = [list(tokenizer(t)["input_ids"]) for t in texts]
    width = max(map(len, ids), default=0) or 1
    return (torch.tensor([i + [0] * (width - len(i)) for i in ids]),
            torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]))


@torch.no_grad()
def label_scores(model: nn.Module, tokenizer: Any, texts: list[str], template: str, verbalizers: list[list[str]],
                 device: torch.device, batch_size: int = 16, chat_template: bool = True) -> torch.Tensor:
    """Per text and label, the log-probability of the label's verbalizers after the prompt (logsumexp over a
    label's verbalizers), uncalibrated.

    Args:
        model: a causal LM (eval mode is set here); tokenizer: its tokenizer.
        texts: N texts; template: the prompt, with a `{text}` placeholder.
        verbalizers: per label, one or more words (each one or more tokens), e.g. [[" negative"], [" positive"]].
    Returns:
        [N, L] float32 log-probabilities (natural log), on the CPU.
    Raises:
        HybridFTError: for a template without `{text}` or unusable verbalizers.
    """
    zs = build_zero_shot(model, tokenizer, template, verbalizers, [str(i) for i in range(len(verbalizers))],
                         chat_template=chat_template, calibrated=False).to(device)
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = encode_texts(tokenizer, texts[start:start + batch_size])
        out.append(zs.label_scores(ids.to(device), mask.to(device)).cpu())
    return torch.cat(out) if out else torch.empty(0, len(verbalizers))


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
