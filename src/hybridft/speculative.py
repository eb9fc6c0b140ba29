"""The hybrid model for generation: the distilled student as the teacher's draft model (speculative decoding).

Greedy draft-and-verify (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling"; with greedy decoding
both reduce to the loop below):

    1. the draft model proposes `draft_tokens` tokens greedily, one at a time (cheap: it is small);
    2. the teacher scores the last accepted token and all drafted ones in ONE forward pass;
    3. the longest prefix of drafted tokens that equals the teacher's own argmax is accepted, and the teacher's
       argmax after that prefix is appended too (a correction, or a bonus token when all drafts were accepted);
    4. both KV caches are cut back to the accepted tokens.

Every emitted token is the teacher's argmax given the tokens before it, so the output is the teacher's greedy
output, token for token (up to float rounding between a one-token and a many-token forward pass, which can flip
an exact tie). It is faster when the teacher's cost per forward pass barely grows with the tokens scored, as on
a memory-bound device at batch 1, and the draft agrees with the teacher often.

Batch size 1 only: the accepted length differs per sequence, and batch 1 is where decoding is latency-bound.
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn


@dataclass
class SpeculativeStats:
    """Counts over one or more generations."""

    drafted: int = 0
    """Tokens the draft model proposed."""
    accepted: int = 0
    """Drafted tokens the teacher accepted."""
    teacher_passes: int = 0
    """Forward passes of the teacher: the prompt's, which emits the first token, and one verification a round."""
    new_tokens: int = 0
    """Tokens emitted."""
    seconds: float = 0.0
    rounds: list[int] = field(default_factory=list)
    """Accepted drafts per drafting round (a histogram source)."""
    plain_rounds: int = 0
    """Rounds in which nothing was drafted because drafting did not pay (`DraftPolicy`): one teacher step each."""

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted: the share of drafted tokens the teacher kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_teacher_pass(self) -> float:
        return self.new_tokens / self.teacher_passes if self.teacher_passes else 0.0

    def add(self, other: "SpeculativeStats") -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.teacher_passes += other.teacher_passes
        self.new_tokens += other.new_tokens
        self.seconds += other.seconds
        self.rounds += other.rounds
        self.plain_rounds += other.plain_rounds

    def to_dict(self) -> dict[str, Any]:
        return {"drafted": self.drafted, "accepted": self.accepted, "acceptance_rate": round(self.acceptance_rate, 4),
                "teacher_passes": self.teacher_passes, "new_tokens": self.new_tokens,
                "tokens_per_teacher_pass": round(self.tokens_per_teacher_pass, 3),
                "drafting_rounds": len(self.rounds), "plain_rounds": self.plain_rounds}


def drafting_note(stats: dict[str, Any]) -> str:
    """", drafting in R of N rounds" for a `SpeculativeStats.to_dict()` with plain rounds; "" without any."""
    plain = stats.get("plain_rounds", 0)
    if not plain:
        return ""
    rounds = plain + stats.get("drafting_rounds", 0)
    return f", drafting in {stats.get('drafting_rounds', 0)} of {rounds} rounds (the others: plain teacher steps)"


class DraftPolicy:
    """Whether the next round drafts: drafting is chosen while it yields more tokens per second than the teacher's
    plain steps, both measured on this machine as generation goes.

    A drafting round costs the draft's tokens and one teacher pass over them and yields 1 + the accepted drafts; a
    plain round is one teacher step and yields 1 token. Where the draft is accepted too rarely for its cost (a draft
    serving prompts unlike those it was distilled on, or a slow draft), speculative decoding is slower than the
    teacher alone (0.75-0.80x measured on a 2-core CPU); with this policy the hybrid falls back to plain teacher
    steps there and drafts again where the draft proves useful. The output is the teacher's greedy output either
    way: only the speed depends on the choice. This is the dynamic draft length of transformers' assisted generation
    (`num_assistant_tokens_schedule`, which never drafts fewer than 1 token), extended to 0 drafts and driven by
    measured time instead of the acceptance count alone.

    Each rate is an exponentially weighted ratio (`decay` per observation of its own kind) of tokens to seconds.
    Drafting also needs recent drafting rounds to have yielded more than one token each: a round whose drafts are
    all rejected does a plain step's work and more, so where only timing noise makes drafting look faster (a
    loaded machine, few rounds), plain steps win.
    The first rounds draft, until `warmup` drafting and one plain round are measured; after that, every
    `explore_every`-th round takes the other choice, so that a rate no longer chosen is still refreshed (the draft
    may grow useful later in a text; the machine's speed drifts). One policy may serve many generations: what it
    learned carries from one prompt to the next.

    `clock` (seconds, monotonic) times the rounds; tests give one that counts model passes instead.

    Raises:
        ValueError: for decay outside (0, 1), warmup < 1 or explore_every < 2.
    """

    def __init__(self, decay: float = 0.9, warmup: int = 3, explore_every: int = 12,
                 clock: Any = time.perf_counter):
        if not 0 < decay < 1 or warmup < 1 or explore_every < 2:
            raise ValueError(f"DraftPolicy needs 0 < decay < 1, warmup >= 1 and explore_every >= 2; got decay={decay}, "
                             f"warmup={warmup}, explore_every={explore_every}")
        self.decay, self.warmup, self.explore_every, self.clock = decay, warmup, explore_every, clock
        # per choice (True: drafting, False: plain): weighted tokens, weighted seconds, rounds observed
        self._tokens = {True: 0.0, False: 0.0}
        self._seconds = {True: 0.0, False: 0.0}
        self._seen = {True: 0, False: 0}
        self._weight = {True: 0.0, False: 0.0}  # the weighted count of rounds, decayed like the sums
        self._rounds = 0

    def rate(self, drafting: bool) -> Optional[float]:
        """Tokens per second of drafting (True) or plain (False) rounds, weighted to the recent ones; None before
        any such round."""
        s = self._seconds[drafting]
        return self._tokens[drafting] / s if self._seen[drafting] and s > 0 else None

    def draft_next(self) -> bool:
        """True: draft in the next round; False: one plain teacher step."""
        self._rounds += 1
        if self._seen[True] < self.warmup:
            return True
        if not self._seen[False]:
            return False
        accepted_some = self._tokens[True] > self._weight[True] + 1e-9  # more than 1 token a round, weighted
        best = accepted_some and self.rate(True) >= self.rate(False)  # type: ignore[operator]
        return (not best) if self._rounds % self.explore_every == 0 else best

    def observe(self, drafting: bool, tokens: int, seconds: float) -> None:
        """One finished round: whether it drafted, the tokens it emitted, its seconds (draft tokens and the teacher's
        pass, or the teacher's step)."""
        self._tokens[drafting] = self._tokens[drafting] * self.decay + tokens
        self._seconds[drafting] = self._seconds[drafting] * self.decay + seconds
        self._weight[drafting] = self._weight[drafting] * self.decay + 1
        self._seen[drafting] += 1

    def to_dict(self) -> dict[str, Any]:
        rates = {k: self.rate(k) for k in (True, False)}
        return {"drafting_tokens_per_s": round(rates[True], 2) if rates[True] else None,
                "plain_tokens_per_s": round(rates[False], 2) if rates[False] else None}


def _forward(model: nn.Module, ids: torch.Tensor, cache: Any, keep: int = 0) -> torch.Tensor:
    """Logits [1, T', V] of `ids` [1, T] appended to what `cache` holds (the cache grows by T): T' = T, or the last
    `keep` positions only, where the output layer then runs on those alone (`logits_to_keep`; SmolLM2's 49,152-word
    output layer costs as much as 8 of its layers)."""
    from hybridft.models import cache_argument
    from hybridft.tasks.causal_lm import _takes_logits_to_keep

    kwargs = {cache_argument(model): cache}
    if keep and _takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=ids, use_cache=True, **kwargs).logits
    return logits[:, -keep:] if keep else logits


class DraftVocabulary:
    """The tokens a draft model may propose, with its output layer cut to them (frequency-ranked vocabulary
    pruning of the draft: Zhao et al. 2025, "FR-Spec", arXiv:2502.14856; Goel et al. 2025, "VocabTrim",
    arXiv:2506.22694). The teacher still scores its whole vocabulary, so the output stays the teacher's greedy
    output: a token outside the subset is never drafted, and the teacher emits it as its correction.

    Args:
        draft: the draft causal LM; its output layer (`get_output_embeddings`, [V, H]) is copied at `token_ids`.
        token_ids: the V' allowed token ids, each in [0, V).
    Raises:
        ValueError: for an empty subset, or an id outside the draft's vocabulary.
    """

    def __init__(self, draft: nn.Module, token_ids: list[int]):
        vocab = output_vocabulary_size(draft)
        if not token_ids:
            raise ValueError("a draft vocabulary needs at least one token")
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"draft vocabulary ids {bad[:5]} are outside the draft's vocabulary of {vocab}")
        whole = draft.get_output_embeddings()
        self.token_ids = torch.tensor(token_ids, dtype=torch.long, device=whole.weight.device)
        bias = getattr(whole, "bias", None)
        # a module of its own, so that it follows the draft's precision (cast to bf16 or quantized to int8)
        self.head = nn.Linear(whole.weight.shape[1], len(token_ids), bias=bias is not None,
                              device=whole.weight.device, dtype=whole.weight.dtype)
        with torch.no_grad():
            self.head.weight.copy_(whole.weight[self.token_ids])  # [V', H]
            if bias is not None:
                self.head.bias.copy_(bias[self.token_ids])
        self.head.requires_grad_(False)
        self.decoder = draft.get_decoder()

    def logits(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """[V'] logits of the allowed tokens after the last of `ids` [1, T] (the cache grows by T). A model that
        scales or soft-caps its logits after the output layer does so monotonically, so the argmax is the same."""
        from hybridft.models import cache_argument

        hidden = self.decoder(input_ids=ids, use_cache=True, **{cache_argument(self.decoder): cache})
        return self.head(hidden.last_hidden_state[0, -1:])[0]  # [1, H] in: an int8 layer takes no 1-D input


def choose_draft_vocabulary(sequences: list[list[int]], vocab_size: int, size: int,
                            always: set[int] = frozenset()) -> list[int]:
    """The `size` token ids a draft may propose: the tokens of `always` (end-of-sequence ids), then the most frequent
    tokens of `sequences` (the training responses, which the teacher's answers resemble), then, while room is left,
    the lowest ids (a BPE vocabulary lists its earliest, most frequent merges first). Ascending ids; all of
    [0, vocab_size) when size >= vocab_size."""
    from collections import Counter

    if size >= vocab_size:
        return list(range(vocab_size))
    counts = Counter(t for seq in sequences for t in seq if 0 <= t < vocab_size)
    chosen = {t for t in always if 0 <= t < vocab_size}
    for token, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(chosen) >= size:
            break
        chosen.add(token)
    next_id = 0
    while len(chosen) < size:
        chosen.add(next_id)
        next_id += 1
    return sorted(chosen)


def frequent_token_vocabulary(teacher: nn.Module, tokenizer: Any, responses: list[list[int]],
                              size: int) -> Optional[list[int]]:
    """`choose_draft_vocabulary` for `teacher`: its vocabulary, its end-of-sequence tokens always in; None for
    size 0 (the whole vocabulary)."""
    if not size:
        return None
    return choose_draft_vocabulary(responses, output_vocabulary_size(teacher), size, eos_ids(teacher, tokenizer))


def _cut(cache: Any, keep: int) -> None:
    """Drop the cache's entries after the first `keep` tokens (a negative `crop` works in every transformers 5)."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


def output_vocabulary_size(model: nn.Module) -> int:
    """Tokens the model's output layer scores. Read from the layer's `out_features` where it has one (nn.Linear,
    int8 and prepacked layers): rebuilding a packed or quantized weight to read its shape took 50-110 ms, paid on
    every generation."""
    head = model.get_output_embeddings()
    if isinstance(getattr(head, "out_features", None), int):
        return head.out_features
    weight = head.weight
    return (weight() if callable(weight) else weight).shape[0]


def vocabulary_mismatch(teacher: nn.Module, draft: nn.Module) -> Optional[str]:
    """Why `draft` cannot draft for `teacher` (their output layers score different vocabularies), or None."""
    t, d = output_vocabulary_size(teacher), output_vocabulary_size(draft)
    return None if t == d else f"the draft model's vocabulary ({d} tokens) differs from the teacher's ({t})"


def _check_vocabularies(teacher: nn.Module, draft: nn.Module) -> None:
    from hybridft.errors import HybridFTError

    problem = vocabulary_mismatch(teacher, draft)
    if problem:
        raise HybridFTError(f"{problem}; speculative decoding needs the same tokenizer: use a student distilled "
                            f"from this teacher")


def _draft_token(draft: nn.Module, vocabulary: Optional[DraftVocabulary], feed: torch.Tensor, cache: Any,
                 confidence: float) -> tuple[int, float]:
    """The draft's greedy next token after `feed` and its probability (1.0 when `confidence` is off: not computed)."""
    logits = vocabulary.logits(feed, cache) if vocabulary is not None else _forward(draft, feed, cache, keep=1)[0, -1]
    best = int(logits.argmax())
    prob = float(torch.softmax(logits.float(), -1)[best]) if confidence > 0 else 1.0
    return (int(vocabulary.token_ids[best]) if vocabulary is not None else best), prob


# ---------------------------------------------------------------------------------------------------
# what makes a round cheap: the draft's precision and the verification's width


DRAFT_PRECISIONS = ("auto", "fp32", "bf16", "int8")


def choose_draft_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(the draft model's precision, why) for `hybrid.draft_precision`.

    The draft's precision never changes the output: the teacher verifies every token in its own precision. It
    changes how fast the draft drafts (at batch 1 a draft token is bound by reading the weights, so half the bytes
    take about half the time) and, slightly, how often it agrees. On a 2-core AVX512-BF16 EPYC the 8-layer SmolLM2
    draft with 8,192 tokens generated alone about 51 tokens/s in fp32, 66-118 in bf16 and 155-194 in int8, at the
    same acceptance (BENCHMARKS.md). `int8` (CPU only) quantizes the draft's linear layers dynamically
    (`torch.ao.quantization.quantize_dynamic`). `auto`: on a CPU int8 where torch has the kernels, else bf16 where
    the CPU computes it natively (AVX512-BF16, AMX), else fp32; on a CUDA GPU bf16 where supported, else fp32.

    Raises:
        HybridFTError: for int8 on a GPU, or a value outside DRAFT_PRECISIONS.
    """
    from hybridft.errors import HybridFTError
    from hybridft.precision import cpu_flags

    if precision not in DRAFT_PRECISIONS:
        raise HybridFTError(f"hybrid.draft_precision must be one of {', '.join(DRAFT_PRECISIONS)}, got {precision!r}")
    if precision == "int8" and device.type != "cpu":
        raise HybridFTError("hybrid.draft_precision=int8 runs on a CPU only (torch's dynamic quantization); "
                            "use bf16 on a GPU")
    if precision != "auto":
        return precision, "set in the config"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "CUDA GPU with bf16 support"
        return "fp32", "CUDA GPU without bf16 support"
    if device.type == "cpu" and _int8_available():
        return "int8", "CPU: int8 weights are a quarter of the bytes to read per draft token"
    if device.type == "cpu" and cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return "bf16", "CPU with bf16 instructions: half the bytes to read per draft token"
    return "fp32", f"neither int8 kernels nor native bf16 on this {device.type}"


def _int8_available() -> bool:
    """torch can quantize linear layers dynamically here (the API exists and a quantized engine is built in)."""
    try:
        from torch.ao.quantization import quantize_dynamic  # noqa: F401
    except ImportError:
        return False
    return any(e != "none" for e in torch.backends.quantized.supported_engines)


def prepare_draft(draft: nn.Module, precision: str, token_ids: Optional[list[int]] = None, pack: bool = False
                  ) -> tuple[nn.Module, Optional[DraftVocabulary]]:
    """The draft model as it drafts: its weights in `precision` ("fp32", "bf16" or "int8"), with its output layer
    cut to `token_ids` (None: the whole vocabulary) and, with `pack` on a CPU, its fp32 or bf16 linear layers
    prepacked where that is faster (`hybridft.packed_linear.prepack_if_faster`). A copy when anything changes, so the model passed in (the saved student)
    stays as it is.

    Raises:
        HybridFTError: for int8 where this torch has no dynamic quantization.
    """
    import copy

    from hybridft.packed_linear import PackedLinear, is_packed, prepack_if_faster

    model = draft if precision == "fp32" and not pack else copy.deepcopy(draft)
    vocabulary = DraftVocabulary(model, token_ids) if token_ids else None  # cut from the fp32 rows
    if precision == "bf16":
        model.to(torch.bfloat16)
        if vocabulary is not None:
            vocabulary.head.to(torch.bfloat16)
    elif precision == "int8":
        _quantize_int8(model)
        if vocabulary is not None:
            vocabulary.head = _quantize_int8(nn.Sequential(vocabulary.head))  # only children are swapped
    if pack and precision != "int8":
        prepack_if_faster(model.eval())
        if vocabulary is not None and is_packed(model):
            vocabulary.head = PackedLinear(vocabulary.head)
    return model.eval(), vocabulary


def _quantize_int8(module: nn.Module) -> nn.Module:
    """`module`'s linear layers as int8 weights with activations quantized on the fly, in place."""
    import warnings

    from hybridft.errors import HybridFTError

    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise HybridFTError("hybrid.draft_precision=int8 needs torch.ao.quantization.quantize_dynamic, which this "
                            "torch lacks; use bf16 or fp32") from None
    with warnings.catch_warnings():  # torch 2.13 announces the API's future removal on every call
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)


GQA_VARIABLE = "TRANSFORMERS_SDPA_FORCE_GQA"


def cpu_grouped_query_attention(fn: Any) -> Any:
    """Run `fn` with transformers' SDPA attention doing grouped-query attention inside the kernel on a CPU.

    For a pass over 2 or more new tokens after a cache (every verification), transformers builds an attention mask
    and then, because CUDA's fast kernels take no mask with grouped heads, copies the cached keys and values once
    per query group (`repeat_kv`) in every layer, on every device. On a CPU the kernel handles both at once, and
    SmolLM2-135M (9 query heads, 3 key/value heads) verified 2 tokens in 20.7-21.0 ms instead of 23.9-26.0
    (`TRANSFORMERS_SDPA_FORCE_GQA=1`, which transformers reads on every call; versions without it ignore it). The
    device is that of the first tensor argument, else of the first model's weights; not on a GPU, where a mask with
    grouped heads falls back to the slow math kernel. The variable is left as the user set it, if set."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is None:
            model = next((a for a in args if isinstance(a, nn.Module)), None)
            device = next(model.parameters()).device if model is not None else None
        if device is None or device.type != "cpu" or GQA_VARIABLE in os.environ:
            return fn(*args, **kwargs)
        os.environ[GQA_VARIABLE] = "1"
        try:
            return fn(*args, **kwargs)
        finally:
            os.environ.pop(GQA_VARIABLE, None)

    return wrapper


@torch.no_grad()
@cpu_grouped_query_attention
def teacher_pass_ms(teacher: nn.Module, widths: int, context: int = 32, repeats: int = 3) -> list[float]:
    """[widths] median milliseconds of one forward pass of the teacher over w = 1..widths new tokens after
    `context` cached ones (index w - 1): what a verification of w tokens costs on this device. Widths are timed in
    turn within each repeat, so that a burst of other load hits them alike; the first repeat only warms up."""
    from transformers import DynamicCache

    device = next(teacher.parameters()).device
    vocab = output_vocabulary_size(teacher)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(vocab, (1, context), generator=g).to(device)
    cache = DynamicCache()
    _forward(teacher, prefix, cache, keep=1)
    times: list[list[float]] = [[] for _ in range(widths)]
    for rep in range(repeats + 1):
        for w in range(1, widths + 1):
            ids = torch.randint(vocab, (1, w), generator=g).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            _forward(teacher, ids, cache, keep=w)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times[w - 1].append(time.perf_counter() - start)
            _cut(cache, context)
    return [round(sorted(t)[len(t) // 2] * 1000, 2) for t in times]


PAD_GAIN = 0.95
"""A wider pass is chosen only when it costs less than this share of the narrower one: timing noise must not pad."""


def padded_widths(pass_ms: list[float]) -> list[int]:
    """`speculative_generate`'s pad_to from `teacher_pass_ms`: for r = 1..len(pass_ms) real tokens, the width that
    runs fastest among r..len(pass_ms) (a wider one only when clearly cheaper, PAD_GAIN)."""
    out = []
    for r in range(1, len(pass_ms) + 1):
        best = r
        for w in range(r + 1, len(pass_ms) + 1):
            if pass_ms[w - 1] < PAD_GAIN * pass_ms[best - 1]:
                best = w
        out.append(best)
    return out


MAX_PADDING = 4
"""`verify_padding` times passes up to draft_tokens + 1 + this many tokens."""


def verification_widths(teacher: nn.Module, draft_tokens: int) -> tuple[list[int], list[float]]:
    """(pad_to, the timed pass costs in ms) for a hybrid drafting `draft_tokens` tokens per round."""
    costs = teacher_pass_ms(teacher, draft_tokens + 1 + MAX_PADDING)
    return padded_widths(costs), costs


@torch.no_grad()
@cpu_grouped_query_attention
def speculative_generate(teacher: nn.Module, draft: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                         draft_tokens: int = 4, eos_token_ids: Optional[set[int]] = None,
                         vocabulary: Optional[DraftVocabulary] = None, confidence: float = 0.0,
                         pad_to: Optional[list[int]] = None, policy: Optional[DraftPolicy] = None
                         ) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy decoding of `teacher`, drafted by `draft`.

    Args:
        teacher, draft: causal LMs with the same vocabulary, in eval mode, on one device.
        input_ids: [1, P] prompt token ids (P >= 1), on that device.
        max_new_tokens: at most this many new tokens.
        draft_tokens: tokens drafted per round (k); each round costs k draft passes and one teacher pass.
        eos_token_ids: generation stops after emitting one of these.
        vocabulary: the draft proposes only these tokens, through its output layer cut to them (None: all).
        confidence: a round's drafting stops before a token the draft gives less than this probability (0: off).
            Such a token is usually rejected, and on a CPU each token the teacher verifies has a cost (the
            dynamic draft length of transformers' assisted generation, `assistant_confidence_threshold`).
        pad_to: a teacher pass over r real tokens runs at width pad_to[r - 1] >= r, padded with copies of its last
            token after the real ones (causal attention keeps the real positions' logits; the cache is cut back).
            On a CPU, torch runs a linear layer on 2 or 3 rows as 2 or 3 matrix-vector products but on 4 or more
            as one matrix product, so a pass over 4 tokens can cost less than one over 2 (`padded_widths` picks
            the widths from timings, `teacher_pass_ms`). None, or r past its end: no padding.
        policy: decides round by round whether to draft at all, from the measured speed of drafting and of plain
            teacher steps (`DraftPolicy`; it learns from every round). None: every round drafts.
    Returns:
        ([1, P + N] the prompt and the N <= max_new_tokens new tokens, the round's counts).
    Raises:
        ValueError: for a batch of more than one sequence, draft_tokens < 1, confidence outside [0, 1) or a
            pad_to width below its real length.
        HybridFTError: when the vocabularies differ.
    """
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one sequence ([1, P]), got shape {list(input_ids.shape)}")
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    if not 0 <= confidence < 1:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    if pad_to is not None and any(w < r for r, w in enumerate(pad_to, 1)):
        raise ValueError(f"pad_to[r - 1] must be >= r (a pass cannot be narrower than its real tokens), got {pad_to}")
    _check_vocabularies(teacher, draft)
    eos = eos_token_ids or set()
    stats = SpeculativeStats()
    start = time.perf_counter()
    tokens = input_ids[0].tolist()
    prompt_len = len(tokens)
    t_cache, d_cache = DynamicCache(), DynamicCache()
    device = input_ids.device
    # The teacher's pass over the prompt emits the first token itself, as in plain greedy decoding, rather than
    # leaving it to a first round (16 ChatterBot prompts, 8-layer draft, k = 1: 167 teacher passes instead of 173).
    # From then on the teacher's cache holds every token but the newest one, which starts its next pass; the draft's
    # may lag further behind (it is fed what it lacks: the whole prompt on its first pass).
    if max_new_tokens > 0:
        tokens.append(int(_forward(teacher, input_ids, t_cache, keep=1)[0, -1].argmax()))
        stats.teacher_passes += 1
    while len(tokens) - prompt_len < max_new_tokens and tokens[-1] not in eos:
        left = max_new_tokens - (len(tokens) - prompt_len)
        k = min(draft_tokens, left)  # never draft past the limit (the teacher's bonus token may still be dropped)
        drafting = policy is None or policy.draft_next()
        round_start = policy.clock() if policy is not None else 0.0
        # 1. draft up to k tokens; the draft cache may lag several tokens behind (all drafts accepted last round, or
        # plain rounds since its last draft)
        drafted: list[int] = []
        if drafting:
            feed = torch.tensor([tokens[d_cache.get_seq_length():]], device=device)
        for _ in range(k if drafting else 0):
            nxt, prob = _draft_token(draft, vocabulary, feed, d_cache, confidence)
            if prob < confidence:
                break  # the token stays in neither the draft nor its cache beyond the cut below
            drafted.append(nxt)
            if nxt in eos:
                break
            feed = torch.tensor([[nxt]], device=device)
        # 2. the teacher scores the newest accepted token and the drafts in one pass
        real = tokens[t_cache.get_seq_length():] + drafted
        width = pad_to[len(real) - 1] if pad_to is not None and len(real) <= len(pad_to) else len(real)
        padding = [real[-1]] * (width - len(real))
        candidate = torch.tensor([real + padding], device=device)
        logits = _forward(teacher, candidate, t_cache, keep=len(drafted) + 1 + len(padding))[0]
        choices = logits[:len(drafted) + 1].argmax(-1).tolist()
        # choices[i]: the teacher's token after the accepted tokens and drafted[:i]
        # 3. accept the agreeing prefix, then the teacher's own token
        n = 0
        while n < len(drafted) and drafted[n] == choices[n]:
            n += 1
        emitted = drafted[:n] + [choices[n]]
        stats.drafted += len(drafted)
        stats.accepted += n
        stats.teacher_passes += 1
        if drafting:
            stats.rounds.append(n)
        else:
            stats.plain_rounds += 1
        before = len(tokens)
        for tok in emitted[:left]:
            tokens.append(tok)
            if tok in eos:
                break
        if policy is not None:
            policy.observe(drafting, len(tokens) - before, policy.clock() - round_start)
        if tokens[-1] in eos:
            break
        # 4. cut both caches back to every token but the newest
        keep = len(tokens) - 1
        _cut(t_cache, keep)
        _cut(d_cache, keep)
    stats.new_tokens = len(tokens) - prompt_len
    stats.seconds = time.perf_counter() - start
    return torch.tensor([tokens], device=device), stats


@torch.no_grad()
@cpu_grouped_query_attention
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_ids: Optional[set[int]] = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Plain greedy decoding with a KV cache, one forward pass per token: the same machinery as
    `speculative_generate` (so their speeds compare the algorithms, not two code paths). [1, P] -> [1, P + N]."""
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one sequence ([1, P]), got shape {list(input_ids.shape)}")
    eos = eos_token_ids or set()
    start = time.perf_counter()
    tokens, cache = input_ids[0].tolist(), DynamicCache()
    feed = input_ids
    for _ in range(max_new_tokens):
        nxt = int(_forward(model, feed, cache, keep=1)[0, -1].argmax())
        tokens.append(nxt)
        if nxt in eos:
            break
        feed = torch.tensor([[nxt]], device=input_ids.device)
    stats = SpeculativeStats(new_tokens=len(tokens) - input_ids.shape[1], seconds=time.perf_counter() - start)
    stats.teacher_passes = stats.new_tokens
    return torch.tensor([tokens], device=input_ids.device), stats


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The tokens that end a generation (`causal_lm.stop_token_ids`: the tokenizer's EOS and the model's
    generation config's), the same set as the teacher's batched generations stop at."""
    from hybridft.tasks.causal_lm import stop_token_ids

    return stop_token_ids(model, tokenizer)


# ---------------------------------------------------------------------------------------------------
# the hybrid folder

FORMAT = "hybridft-speculative/1"


def save_hybrid(folder: Path, teacher_dir: Path, draft_dir: Path, draft_tokens: int,
                draft_vocabulary: Optional[list[int]] = None, draft_confidence: float = 0.0,
                draft_precision: str = "auto", verify_padding: bool = True, prepack_weights: bool = True,
                adaptive_drafting: bool = True) -> Path:
    """OUTPUT_DIR/hybrid of a causal_lm run: teacher/, draft/ (fp32, as trained), hybrid.json (the decoding settings,
    and the draft's token ids when its vocabulary is cut; `draft_precision` is resolved where the hybrid is loaded,
    as `auto` depends on the device) and manifest.json (checksums), written beside the target and renamed, so a
    failed save never leaves a half folder in its place."""
    import json
    import shutil

    from hybridft.checkpoint import link_or_copy
    from hybridft.hybrid import write_manifest

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copytree(teacher_dir, tmp / "teacher", copy_function=link_or_copy)
    shutil.copytree(draft_dir, tmp / "draft", copy_function=link_or_copy)
    settings = {"format": FORMAT, "kind": "speculative", "draft_tokens": draft_tokens,
                "draft_confidence": draft_confidence, "draft_vocabulary": draft_vocabulary,
                "draft_precision": draft_precision, "verify_padding": verify_padding,
                "prepack_weights": prepack_weights, "adaptive_drafting": adaptive_drafting}
    (tmp / "hybrid.json").write_text(json.dumps(settings), encoding="utf-8")
    write_manifest(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def is_speculative_folder(folder: Path) -> bool:
    import json

    path = folder / "hybrid.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("kind") == "speculative"
    except (ValueError, UnicodeDecodeError):
        return False


@dataclass
class SpeculativeHybrid:
    """A loaded OUTPUT_DIR/hybrid: the teacher, its draft model (fp32, as saved) and the decoding settings. The draft
    as it drafts (precision, cut output layer) and the verification widths are prepared on the first `generate`
    on the current device (timing the teacher's passes takes a second or two)."""

    teacher: nn.Module
    draft: nn.Module
    tokenizer: Any
    draft_tokens: int
    confidence: float = 0.0
    vocabulary_ids: Optional[list[int]] = None
    draft_precision: str = "fp32"
    """`hybrid.draft_precision`: auto, fp32, bf16 or int8."""
    verify_padding: bool = False
    widths: Optional[tuple[list[int], list[float]]] = field(default=None, repr=False)
    """With verify_padding, after the first `generate` (or given): `verification_widths` on this device."""
    prepack_weights: bool = True
    """`eval.prepack_weights`: on a CPU, the teacher's and the draft's fp32/bf16 linear layers run from weights
    prepacked once where that is faster (`hybridft.packed_linear`; the teacher is packed in place, for good)."""
    teacher_pack: Optional[dict[str, Any]] = field(default=None, repr=False)
    """The teacher's packing decision when made outside (`measure`); None: `prepare` makes it."""
    adaptive: bool = True
    """`hybrid.adaptive_drafting`: draft only while drafting is measured faster than plain teacher steps
    (`DraftPolicy`, one for all the generations on this device)."""
    prepared: Optional[dict[str, Any]] = field(default=None, repr=False)
    """After the first `generate`: draft (the model as it drafts), vocabulary, precision, precision_reason, packed
    (linear layers of the teacher and of the draft now prepacked), policy (a `DraftPolicy`, or None)."""

    def to(self, device: torch.device) -> "SpeculativeHybrid":
        """Move the hybrid; before its first `generate`, as a teacher prepacked for the CPU stays there.
        Raises HybridFTError for a prepacked teacher and a device that is not the CPU."""
        from hybridft.errors import HybridFTError
        from hybridft.packed_linear import is_packed

        if torch.device(device).type != "cpu" and is_packed(self.teacher):
            raise HybridFTError("this hybrid's teacher is prepacked for the CPU; load the hybrid again to run it on "
                                f"{device}")
        self.teacher.to(device), self.draft.to(device)
        self.prepared = self.widths = None  # the draft's precision and the timed widths depend on the device
        return self

    def prepare(self) -> dict[str, Any]:
        if self.prepared is None:
            device = next(self.teacher.parameters()).device
            from hybridft.packed_linear import is_packed, prepack_if_faster

            precision, reason = choose_draft_precision(self.draft_precision, device)
            pack = self.prepack_weights and device.type == "cpu"
            if pack and self.teacher_pack is None:  # before the widths are timed: packing changes what a pass costs
                self.teacher_pack = prepack_if_faster(self.teacher, device)
            draft, vocabulary = prepare_draft(self.draft, precision, self.vocabulary_ids, pack=pack)
            self.prepared = {"draft": draft, "vocabulary": vocabulary, "precision": precision,
                             "precision_reason": reason,
                             "packed": {"teacher": is_packed(self.teacher), "draft": is_packed(draft)},
                             "teacher_pack": self.teacher_pack,
                             "policy": DraftPolicy() if self.adaptive else None}
        if self.verify_padding and self.widths is None:
            self.widths = verification_widths(self.teacher, self.draft_tokens)
        return self.prepared

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, SpeculativeStats]:
        """The teacher's greedy output for `input_ids` [1, P]: see `speculative_generate`."""
        p = self.prepare()
        return speculative_generate(self.teacher, p["draft"], input_ids, max_new_tokens, self.draft_tokens,
                                    eos_ids(self.teacher, self.tokenizer), p["vocabulary"], self.confidence,
                                    self.widths[0] if self.widths else None, p["policy"])


def load_hybrid(folder: Path) -> SpeculativeHybrid:
    """The hybrid in a folder written by `save_hybrid`, checksums verified, in eval mode, on the CPU.
    Raises HybridFTError for a damaged or foreign folder."""
    import json

    from hybridft.errors import HybridFTError
    from hybridft.hybrid import verify_manifest
    from hybridft.tasks import causal_lm

    verify_manifest(folder)
    settings = json.loads((folder / "hybrid.json").read_text(encoding="utf-8"))
    if settings.get("format") != FORMAT:
        raise HybridFTError(f"{folder}/hybrid.json has format {settings.get('format')!r}, expected {FORMAT!r}")
    teacher, tokenizer = causal_lm.load_model(str(folder / "teacher"), None, "hybrid teacher")  # type: ignore[arg-type]
    draft, _ = causal_lm.load_model(str(folder / "draft"), None, "hybrid draft")  # type: ignore[arg-type]
    _check_vocabularies(teacher, draft)
    teacher.eval(), draft.eval()
    ids = settings.get("draft_vocabulary")
    precision = settings.get("draft_precision", "fp32")  # folders saved before the setting drafted in fp32
    try:
        if ids:
            DraftVocabulary(draft, ids)  # checks the ids now, with one clear line, not at the first generation
        if precision not in DRAFT_PRECISIONS:
            raise ValueError(f"draft_precision {precision!r} is not one of {', '.join(DRAFT_PRECISIONS)}")
    except ValueError as e:
        raise HybridFTError(f"{folder}/hybrid.json: {e}") from None
    return SpeculativeHybrid(teacher, draft, tokenizer, int(settings["draft_tokens"]),
                             float(settings.get("draft_confidence", 0.0)), ids or None, precision,
                             bool(settings.get("verify_padding", False)),
                             prepack_weights=bool(settings.get("prepack_weights", True)),
                             adaptive=bool(settings.get("adaptive_drafting", True)))


# ---------------------------------------------------------------------------------------------------
# measurement


def prompt_tensor(tokenizer: Any, prompt: str, device: torch.device) -> torch.Tensor:
    from hybridft.tasks import causal_lm

    ids = causal_lm._prompt_ids(tokenizer, prompt, causal_lm.uses_template(tokenizer))
    return torch.tensor([ids], device=device)


@torch.no_grad()
def draft_top_k_agreement(teacher: nn.Module, draft: nn.Module, tokenizer: Any, prompts: list[str],
                          max_new_tokens: int, device: torch.device, ks: tuple[int, ...] = (1, 2, 3, 4)
                          ) -> dict[str, Any]:
    """How often the teacher's greedy token is among the draft's k most likely next tokens, for k in `ks`, on the
    teacher's own greedy outputs for `prompts` (the prefix is always the teacher's, as in verification).

    Top-1 is the rate a linear draft is accepted at (before its drafts diverge); top-2 to top-4 bound what verifying
    a tree of the draft's candidates in one teacher pass could add (SpecInfer, Miao et al. 2024, ASPLOS; Medusa,
    Cai et al. 2024, ICML). Returns {"tokens": N, "top_1": share, ...}; N counts the new tokens of every prompt."""
    eos = eos_ids(teacher, tokenizer)
    hits, total = [0] * len(ks), 0
    for prompt in prompts:
        ids = prompt_tensor(tokenizer, prompt, device)
        out, _ = greedy_generate(teacher, ids, max_new_tokens, eos)
        target = out[0, ids.shape[1]:]
        if not len(target):
            continue
        logits = draft(input_ids=out).logits[0, ids.shape[1] - 1:-1]  # the draft's guess for each new token
        ranked = logits.topk(max(ks), -1).indices
        for j, k in enumerate(ks):
            hits[j] += int((ranked[:, :k] == target[:, None]).any(-1).sum())
        total += len(target)
    return {"tokens": total, **{f"top_{k}": round(h / total, 4) if total else 0.0 for k, h in zip(ks, hits)}}


def measure(teacher: nn.Module, draft: nn.Module, undistilled: Optional[nn.Module], tokenizer: Any,
            prompts: list[str], max_new_tokens: int, draft_tokens: int, device: torch.device,
            draft_vocabulary: Optional[list[int]] = None, draft_confidence: float = 0.0,
            draft_precision: str = "fp32", verify_padding: bool = False, prepack_weights: bool = False,
            adaptive_drafting: bool = False) -> dict[str, Any]:
    """Speculative decoding against its parts, at batch 1, greedy, on `prompts`; the teacher in fp32, the drafts in
    `draft_precision` (resolved by `choose_draft_precision`); with `prepack_weights` on a CPU, the teacher (alone
    and in the hybrid) and the drafts run from prepacked weights (`hybridft.packed_linear`; the teacher's layers
    come back on return).

    Reported: tokens/s of the teacher alone, the hybrid (the teacher drafted by the distilled student), the
    student alone (in the draft's precision) and, with `undistilled`, the same draft model before distillation, as
    a draft (with the same settings) and alone; the acceptance rates; with `adaptive_drafting`, the rounds each
    hybrid drafted in and those it left to plain teacher steps (`DraftPolicy`); how many hybrid outputs equal the
    teacher's own greedy output token for token; the draft's precision and why; with `verify_padding`, the timed
    cost of a teacher pass per width and the widths chosen (timed once, before the generations, untimed); and,
    with `draft_vocabulary`, its size and the share of the teacher's greedy tokens inside it. Every timing runs
    after one untimed warm-up generation of that configuration, and the configurations take turns prompt by prompt.
    """
    from hybridft.packed_linear import packed_if_faster

    teacher.to(device).eval()
    with packed_if_faster(teacher, device) if prepack_weights else nullcontext() as decision:
        return _measure(teacher, draft, undistilled, tokenizer, prompts, max_new_tokens, draft_tokens, device,
                        draft_vocabulary, draft_confidence, draft_precision, verify_padding, prepack_weights,
                        decision, adaptive_drafting)


def _measure(teacher: nn.Module, draft: nn.Module, undistilled: Optional[nn.Module], tokenizer: Any,
             prompts: list[str], max_new_tokens: int, draft_tokens: int, device: torch.device,
             draft_vocabulary: Optional[list[int]], draft_confidence: float, draft_precision: str,
             verify_padding: bool, prepack_weights: bool, teacher_pack: Optional[dict[str, Any]],
             adaptive_drafting: bool) -> dict[str, Any]:
    eos = eos_ids(teacher, tokenizer)
    inputs = [prompt_tensor(tokenizer, p, device) for p in prompts]
    for m in (teacher, draft, undistilled):
        if m is not None:
            m.to(device).eval()
    distilled = SpeculativeHybrid(teacher, draft, tokenizer, draft_tokens, draft_confidence, draft_vocabulary,
                                  draft_precision, verify_padding, prepack_weights=prepack_weights,
                                  teacher_pack=teacher_pack, adaptive=adaptive_drafting)
    first = distilled.prepare()
    hybrids = {"distilled": distilled}
    if undistilled is not None:  # the same settings; one timing of the teacher's passes serves both drafts
        hybrids["undistilled"] = replace(distilled, draft=undistilled, prepared=None)
        hybrids["undistilled"].prepare()

    def timed(fns: dict[str, Any]) -> dict[str, tuple[list[list[int]], SpeculativeStats]]:
        """Each generation of `fns` on every prompt, taking turns prompt by prompt: a machine whose speed drifts
        during the measurement then slows them alike (on a 2-core VM the teacher alone ran 16.1 and 12.7 tokens/s
        in two rows of one run when each configuration ran all its prompts in one go)."""
        for fn in fns.values():
            fn(inputs[0])  # warm-up
        results = {name: ([], SpeculativeStats()) for name in fns}
        for ids in inputs:
            for name, fn in fns.items():
                out, st = fn(ids)
                results[name][0].append(out[0, ids.shape[1]:].tolist())
                results[name][1].add(st)
        return results

    def rate(st: SpeculativeStats) -> float:
        return round(st.new_tokens / st.seconds, 2) if st.seconds else 0.0

    def alone(h: SpeculativeHybrid) -> Any:
        return lambda ids: greedy_generate(h.prepared["draft"], ids, max_new_tokens, eos)

    fns = {"teacher": lambda ids: greedy_generate(teacher, ids, max_new_tokens, eos),
           "hybrid": lambda ids: hybrids["distilled"].generate(ids, max_new_tokens),
           "student": alone(hybrids["distilled"])}
    if undistilled is not None:
        fns["undistilled_hybrid"] = lambda ids: hybrids["undistilled"].generate(ids, max_new_tokens)
        fns["undistilled_student"] = alone(hybrids["undistilled"])
    runs = timed(fns)
    (t_out, t_st), (h_out, h_st), (_, s_st) = runs["teacher"], runs["hybrid"], runs["student"]
    # the prompt's own pass emits the first token: answers of one token leave no round to measure
    unmeasured = all(len(out) <= 1 for out in t_out)

    def speedup(st: SpeculativeStats) -> Optional[float]:
        return round(rate(st) / rate(t_st), 3) if rate(t_st) and not unmeasured else None

    result: dict[str, Any] = {
        "prompts": len(prompts), "max_new_tokens": max_new_tokens, "draft_tokens": draft_tokens, "batch_size": 1,
        "draft_confidence": draft_confidence, "adaptive_drafting": adaptive_drafting,
        "draft_precision": {"chosen": first["precision"], "reason": first["precision_reason"]},
        "prepacked": {**first["packed"], **({"teacher_timing": teacher_pack} if teacher_pack else {})},
        "matches_teacher": sum(a == b for a, b in zip(h_out, t_out)),
        "teacher": {"tokens_per_s": rate(t_st), "new_tokens": t_st.new_tokens},
        "hybrid": {"tokens_per_s": rate(h_st), **h_st.to_dict(),
                   "speedup_vs_teacher": speedup(h_st)},
        "student": {"tokens_per_s": rate(s_st), "new_tokens": s_st.new_tokens},
    }
    if verify_padding:
        result["verify_padding"] = {"teacher_pass_ms": distilled.widths[1], "pad_to": distilled.widths[0]}
    if draft_vocabulary:
        allowed = set(draft_vocabulary)
        teacher_tokens = [t for out in t_out for t in out if t not in eos]  # the answers' words, not their ends
        result["draft_vocabulary"] = {
            "size": len(allowed),
            "teacher_token_coverage": round(sum(t in allowed for t in teacher_tokens) / len(teacher_tokens), 4)
            if teacher_tokens else None}
    if undistilled is not None:
        (u_out, u_st), (_, ua_st) = runs["undistilled_hybrid"], runs["undistilled_student"]
        result["undistilled_hybrid"] = {"tokens_per_s": rate(u_st), **u_st.to_dict(),
                                        "speedup_vs_teacher": speedup(u_st),
                                        "matches_teacher": sum(a == b for a, b in zip(u_out, t_out))}
        result["undistilled_student"] = {"tokens_per_s": rate(ua_st), "new_tokens": ua_st.new_tokens}
    for name, key in (("distilled", "hybrid"), ("undistilled", "undistilled_hybrid")):
        policy = hybrids[name].prepared["policy"] if name in hybrids else None
        if policy is not None and key in result:  # the rates it chose by, at the end of the measurement
            result[key]["policy"] = policy.to_dict()
    if unmeasured:
        result["unmeasured"] = (f"the teacher's greedy answers to the {len(prompts)} prompts end at their first token "
                                f"(max_new_tokens={max_new_tokens}, or it ends them at once), so nothing is drafted: "
                                f"acceptance and speed-up need answers of several tokens")
    return result
