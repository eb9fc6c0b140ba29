"""Token-level knowledge-distillation losses for causal LMs, as pure functions of tensors.

Every function takes rows that are real target-token positions, already shifted and flattened by the caller:
N rows over a vocabulary of V classes. With T > 0 the temperature,

    p = softmax(student_logits / T)      (the student, which gets the gradient)
    q = softmax(teacher_logits / T)      (the teacher, fixed)

and every loss is

    T^2 * sum over rows of D(q, p),     D summed over the vocabulary (or over the stored entries)

in nats. The caller divides by the *global* number of real tokens (as `hybridft.losses` does for
classification), so gradient accumulation and several processes give the gradient of the mean. The T^2
factor (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531) keeps the
gradient scale the same across temperatures; it is applied to all three divergences (TRL's GKD loss has no
T^2, so divide by T^2 to compare with it).

Divergences (``DIVERGENCES``):

- ``"forward_kl"``: KL(q || p) = sum q (log q - log p), the classic KD loss (mass-covering).
- ``"reverse_kl"``: KL(p || q) = sum p (log p - log q) (mode-seeking).
- ``"jsd"``: the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation
  of Language Models: Learning from Self-Generated Mistakes", arXiv:2306.13649, Eq. 1), exactly as TRL's
  ``GKDTrainer.generalized_jsd_loss`` (huggingface/trl, trl/experimental/gkd/gkd_trainer.py) computes it:
  m = beta q + (1 - beta) p, JSD_beta = beta KL(q || m) + (1 - beta) KL(p || m). As in TRL, beta = 0 is
  forward KL and beta = 1 is reverse KL (the mixture formula itself is 0 at both ends).

All arithmetic is float32 whatever the input dtype (bf16 logits are common). Classes with zero probability
(``-inf`` logits, or exp underflow) contribute exactly 0: 0 log 0 = 0, in values and in gradients.

Three ways to give the teacher:

1. dense logits, ``divergence_sum``;
2. its top-k log-probs, ``topk_summary`` then ``topk_divergence_sum`` (biased: the tail is lost or lumped);
3. a random sample of its ids, ``sample_summary`` then ``sampled_divergence_sum``: Random-Sampling KD
   (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs", ACL 2025,
   arXiv:2503.16870), an unbiased estimate of forward KL and of its gradient.

Memory: the [N, V] logits of an LM batch are large (4 x 256 x 49152 = 50M entries), and a naive loss holds
several float32 [N, V] tensors of both models at once (log-softmaxes, probabilities, products) and saves
some of them for backward. With ``chunk_rows=c`` each loss processes c rows at a time inside
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the forward frees each chunk's float32
intermediates before the next, and the backward recomputes one chunk at a time, so the extra memory is
O(c x V) instead of O(N x V). The result and the gradients are those of the unchunked computation (up to
float32 summation order). What remains N x V is the gradient of ``student_logits`` in its own dtype (made of
per-chunk pieces that are concatenated, so briefly twice its size) and, when a mask drops rows, a copy of the
kept rows. The cost is a second forward pass per chunk in backward. TRL's SFTTrainer computes its chunked
cross-entropy the same way, 256 rows per checkpointed chunk (``_CHUNKED_LM_HEAD_CHUNK_SIZE`` in
trl/trainer/sft_trainer.py); a chunked JSD for its DistillationTrainer was, at the time of writing, on a
branch only.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

_NEG_INF = float("-inf")
# Rows per block when a capture function (topk_summary, sample_summary) makes float32 copies of teacher
# logits: bounds that transient memory without changing the result.
_CAPTURE_BLOCK_ROWS = 1024


# ---------------------------------------------------------------------------------------------------
# argument checks


def _check_divergence(divergence: str, jsd_beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")
    if divergence == "jsd" and not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


def _check_chunk_rows(chunk_rows: Optional[int]) -> None:
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or an int >= 1, got {chunk_rows!r}")


def _check_rows(name: str, tensor: torch.Tensor, n_rows: int, width: Optional[int] = None) -> None:
    if tensor.dim() != 2 or tensor.shape[0] != n_rows or (width is not None and tensor.shape[1] != width):
        want = f"[{n_rows}, {width if width is not None else '*'}]"
        raise ValueError(f"{name} must have shape {want}, got {list(tensor.shape)}")


def _check_logits(student_logits: torch.Tensor) -> tuple[int, int]:
    if student_logits.dim() != 2:
        raise ValueError("student_logits must be 2-D [N, V] (flatten batch and time), "
                         f"got {list(student_logits.shape)}")
    return student_logits.shape[0], student_logits.shape[1]


def _check_mask(mask: Optional[torch.Tensor], n_rows: int) -> None:
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (n_rows,)):
        raise ValueError(f"mask must be a bool tensor of shape [{n_rows}], got {mask.dtype} {list(mask.shape)}")


# ---------------------------------------------------------------------------------------------------
# divergences on log-probabilities, with 0 log 0 = 0 in values *and* gradients


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities [R, C] -> [R], summed over C; 0 where a = 0.

    The difference is masked *before* the product: where log_a = -inf, log_a - log_b may be nan (-inf - -inf)
    or -inf, and a plain `a * diff` would then be nan in the value (0 * -inf) or in the gradient (the upstream
    0 times an infinite partial). With the mask the masked entries get an exact 0 gradient on both inputs.
    """
    support = log_a > _NEG_INF
    diff = torch.where(support, log_a - log_b, 0.0)
    return (log_a.exp() * diff).sum(dim=-1)


def _mixture_log(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta q + (1 - beta) p) from log-probabilities, for 0 < beta < 1.

    Where both are -inf the inputs are replaced by 0 first: logaddexp(-inf, -inf) is -inf in value but nan in
    gradient. Those entries only ever meet the support mask of `_kl_rows` (q = p = 0), so their value is unused.
    """
    both_zero = (log_q == _NEG_INF) & (log_p == _NEG_INF)
    a = torch.where(both_zero, 0.0, log_q + math.log(beta))
    b = torch.where(both_zero, 0.0, log_p + math.log1p(-beta))
    return torch.logaddexp(a, b)


def _divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, jsd_beta: float) -> torch.Tensor:
    """D(q, p) per row [R] from student log-probs log_p and teacher log-probs log_q, both [R, C] float32."""
    if divergence == "forward_kl" or (divergence == "jsd" and jsd_beta == 0.0):
        return _kl_rows(log_q, log_p)
    if divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1.0):
        return _kl_rows(log_p, log_q)
    log_m = _mixture_log(log_q, log_p, jsd_beta)
    return jsd_beta * _kl_rows(log_q, log_m) + (1.0 - jsd_beta) * _kl_rows(log_p, log_m)


def _safe_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, -inf for an all -inf row with a zero (not nan) gradient there.

    torch.logsumexp's backward is exp(x - out) = exp(-inf - (-inf)) = nan on such a row; here the log's input is
    replaced by 1 where the sum is 0 (the "double where"), so no nan reaches the gradient.
    """
    top = x.amax(dim=-1, keepdim=True)
    top = torch.where(top > _NEG_INF, top, 0.0).detach()  # a shift only; any finite value gives the same result
    total = (x - top).exp().sum(dim=-1)
    positive = total > 0
    return torch.where(positive, total.where(positive, 1.0).log() + top.squeeze(-1), _NEG_INF)


# ---------------------------------------------------------------------------------------------------
# row selection and chunking


def _select_rows(mask: Optional[torch.Tensor], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows where mask is True. Indexing (not multiplying by the mask) keeps nan/inf in ignored rows,
    e.g. padding positions with garbage teacher logits, out of the loss and out of the gradient; the ignored
    rows of student_logits get an exact 0 gradient. It costs a copy of the kept rows, in the inputs' dtypes."""
    if mask is None or bool(mask.all()):
        return tensors
    return tuple(t[mask] for t in tensors)


def _sum_over_row_chunks(fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...],
                         chunk_rows: Optional[int]) -> torch.Tensor:
    """sum of fn(rows) over row chunks, each chunk checkpointed; fn(*tensors) when not chunking.

    fn maps row-aligned tensors to a float32 scalar that is a sum over their rows. `split` gives views and a
    single backward node for the whole student tensor, which concatenates the per-chunk gradients once (slicing
    instead would allocate a zero-filled [N, V] gradient per chunk).
    """
    n_rows = tensors[0].shape[0]
    if n_rows == 0:
        # Connected to the graph, so backward() works on an all-masked micro-batch; the gradient is 0.
        return tensors[0].float().sum()
    if chunk_rows is None or n_rows <= chunk_rows:
        return fn(*tensors)
    total = None
    for chunk in zip(*(t.split(chunk_rows) for t in tensors)):
        # Non-reentrant checkpointing: nothing inside fn is kept for backward, only the chunk views (inputs),
        # and fn is rerun chunk by chunk in backward. fn draws no random numbers, so no RNG state is saved.
        part = checkpoint(fn, *chunk, use_reentrant=False, preserve_rng_state=False)
        total = part if total is None else total + part
    return total


# ---------------------------------------------------------------------------------------------------
# 1. dense teacher logits


def _dense_chunk(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float, divergence: str,
                 jsd_beta: float) -> torch.Tensor:
    log_p = F.log_softmax(student.float() / temperature, dim=-1)  # [c, V]
    log_q = F.log_softmax(teacher.float() / temperature, dim=-1)  # [c, V]
    return _divergence_rows(log_p, log_q, divergence, jsd_beta).sum()


def divergence_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    mask: Optional[torch.Tensor] = None,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """T^2 * sum over rows of D(q, p), each D summed over the vocabulary, from dense logits of both models.

    Args:
        student_logits (Tensor): [N, V], any float dtype, requires grad.
        teacher_logits (Tensor): [N, V], any float dtype, no grad needed (it is not differentiated).
        temperature (float): T > 0; both models are tempered by it.
        divergence (str): one of ``DIVERGENCES``; see the module docstring.
        jsd_beta (float): beta in [0, 1] for ``"jsd"`` (TRL's definition; 0 = forward KL, 1 = reverse KL).
        mask (Tensor, optional): [N] bool, the rows that count. Other rows add nothing and their gradient is 0.
        chunk_rows (int, optional): process this many rows at a time under activation checkpointing: extra
            memory O(chunk_rows x V) instead of several float32 [N, V] tensors; same result and gradient.

    Returns:
        Tensor: float32 scalar in nats, the *sum* over rows (divide by the global real-token count). 0 with a
        zero gradient when no row counts. +inf where the divergence is infinite (e.g. forward KL with a teacher
        class the student gives -inf).

    Raises:
        ValueError: unknown divergence, jsd_beta outside [0, 1], T <= 0, bad chunk_rows, or mismatched shapes.
    """
    _check_divergence(divergence, jsd_beta)
    _check_temperature(temperature)
    _check_chunk_rows(chunk_rows)
    n_rows, vocab = _check_logits(student_logits)
    _check_rows("teacher_logits", teacher_logits, n_rows, vocab)
    _check_mask(mask, n_rows)
    rows = _select_rows(mask, student_logits, teacher_logits.detach())
    fn = functools.partial(_dense_chunk, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta)
    return _sum_over_row_chunks(fn, rows, chunk_rows) * (temperature * temperature)


# ---------------------------------------------------------------------------------------------------
# 2. top-k teacher log-probs


def _capture_blocks(teacher_logits: torch.Tensor):
    """Row blocks of the teacher logits, detached, for the capture functions."""
    return teacher_logits.detach().split(_CAPTURE_BLOCK_ROWS)


@torch.no_grad()
def topk_summary(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most probable ids per row and its tempered log-probs there.

    Args:
        teacher_logits (Tensor): [N, V], any float dtype.
        k (int): 1 <= k <= V entries per row.
        temperature (float): T > 0; store at the temperature the loss will use (``topk_divergence_sum`` does
            not re-temper the teacher).

    Returns:
        tuple[Tensor, Tensor]: ``(logprobs, ids)``: logprobs float32 [N, k] = log softmax(z / T) at ids, sorted
        descending; ids int64 [N, k]. The tail mass 1 - sum exp(logprobs) is ``tail_logmass(logprobs)``.

    Raises:
        ValueError: k outside [1, V], T <= 0, or logits not 2-D.
    """
    _check_temperature(temperature)
    _, vocab = _check_logits(teacher_logits)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, {vocab}], got {k!r}")
    logprobs, ids = [], []
    for block in _capture_blocks(teacher_logits):
        scaled = block.float() / temperature  # [b, V]
        # top-k of z/T is the top-k of z (T > 0); take values from the float32 tensor the normaliser uses.
        values, index = scaled.topk(k, dim=-1, sorted=True)
        logprobs.append(values - torch.logsumexp(scaled, dim=-1, keepdim=True))
        ids.append(index)
    if not logprobs:
        return teacher_logits.new_zeros((0, k), dtype=torch.float32), torch.zeros((0, k), dtype=torch.int64,
                                                                                   device=teacher_logits.device)
    return torch.cat(logprobs), torch.cat(ids)


def tail_logmass(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_j exp(logprobs_j)) per row: the log of the mass outside the stored entries.

    Args:
        logprobs (Tensor): [N, k] log-probabilities of k distinct classes (e.g. from ``topk_summary``).

    Returns:
        Tensor: float32 [N]. The sum is clamped at 1, so rounding never gives a negative tail: -inf when the
        entries hold all the mass (or, after rounding, more). Computed as log(-expm1(s)) for s = logsumexp near 0
        and log1p(-exp(s)) below -log 2, the stable "log1mexp" (Maechler 2012, "Accurately Computing
        log(1 - exp(-|a|))").
    """
    s = torch.logsumexp(logprobs.float(), dim=-1).clamp(max=0.0)
    return torch.where(s > -math.log(2.0), torch.log(-torch.expm1(s)), torch.log1p(-torch.exp(s)))


TAIL_FLOOR = 1e-6
"""The smallest teacher tail `topk_divergence_sum` uses. A softmax never gives an id exactly 0, so a tail that
rounds to 0 (a peaked teacher, log-probs stored in fp16) is a small unknown mass, not an impossible event:
without the floor, reverse KL and the JSD's student side would be +inf on such rows and stop training."""


def _topk_chunk(student: torch.Tensor, teacher_logprobs: torch.Tensor, ids: torch.Tensor, *, temperature: float,
                divergence: str, jsd_beta: float, tail: bool) -> torch.Tensor:
    z = student.float() / temperature  # [c, V]
    log_norm = torch.logsumexp(z, dim=-1, keepdim=True)  # [c, 1]
    log_p = z.gather(1, ids) - log_norm  # [c, k]: full-vocabulary log-probs at the stored ids
    log_q = teacher_logprobs.float()  # [c, k]
    if tail:
        log_q_tail = tail_logmass(log_q).clamp(min=math.log(TAIL_FLOOR))
    else:
        # DistillKit's "zero" handling: the teacher is its k entries, renormalised; nothing elsewhere.
        log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
        log_q_tail = torch.full_like(log_q[:, 0], _NEG_INF)
    # The tail bucket is empty when the ids cover the vocabulary (then both tails are exactly 0, instead of a
    # rounding-sized teacher tail against an exactly-0 student tail, which would be an infinite forward KL).
    # With tail=False, forward KL weights every entry by q, which is 0 on the tail: skip it too.
    if ids.shape[1] < z.shape[1] and (tail or divergence != "forward_kl"):
        # Exact student tail: logsumexp over the ids *not* stored, not log(1 - sum p), which cancels
        # catastrophically (and has an infinite gradient) when the stored ids hold nearly all the mass.
        log_p_tail = _safe_logsumexp(z.scatter(1, ids, _NEG_INF)) - log_norm.squeeze(-1)
        log_p = torch.cat([log_p, log_p_tail.unsqueeze(-1)], dim=-1)
        log_q = torch.cat([log_q, log_q_tail.unsqueeze(-1)], dim=-1)
    return _divergence_rows(log_p, log_q, divergence, jsd_beta).sum()


def topk_divergence_sum(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    tail: bool = True,
    mask: Optional[torch.Tensor] = None,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """T^2 * sum over rows of D(q, p) with the teacher known only at its top-k ids.

    ``tail=True`` coarse-grains both distributions to k + 1 buckets, the k ids and "everything else", and takes
    D on those: the teacher's tail is 1 - sum of its k probabilities (``tail_logmass``), the student's the mass of
    its softmax outside the k ids. Coarse-graining can only lose information, so for every divergence here
    (all f-divergences) the value is <= the dense one (data-processing inequality); it is equal when k = V.

    ``tail=False`` is DistillKit's "zero" handling (arcee-ai/DistillKit, distillkit/lossfuncs/common.py,
    ``MissingProbabilityHandling.ZERO``): the teacher's k probabilities are renormalised to sum to 1 and the
    student keeps its full-vocabulary log-probs at the ids, plus a student-only tail bucket (where the teacher
    has 0; forward KL ignores it, JSD does not). This overweights the top-k and is biased (Anshumann et al. 2025).

    Args:
        student_logits (Tensor): [N, V], any float dtype, requires grad; tempered here by ``temperature``.
        teacher_logprobs (Tensor): [N, k] teacher log-probs *already tempered at* ``temperature`` (as
            ``topk_summary(..., temperature)`` stores them), any float dtype.
        teacher_ids (Tensor): [N, k] distinct vocabulary ids, any integer dtype (int32 is enough to store).
        temperature (float): T > 0.
        divergence (str): one of ``DIVERGENCES``.
        jsd_beta (float): beta in [0, 1] for ``"jsd"``.
        tail (bool): keep the "everything else" bucket (see above).
        mask (Tensor, optional): [N] bool, rows that count.
        chunk_rows (int, optional): as in ``divergence_sum``.

    Returns:
        Tensor: float32 scalar in nats, summed over rows. With ``tail=True``, reverse KL is +inf on a row whose
        stored teacher log-probs sum to 1 or more (e.g. after fp16 rounding) while the student's tail is not 0:
        store log-probs in float32, or use forward KL or JSD, which stay finite.

    Raises:
        ValueError: unknown divergence, bad shapes/arguments, or reverse KL (``"reverse_kl"``, or ``"jsd"`` with
        jsd_beta = 1) with ``tail=False``: the student's mass outside the k ids then faces a teacher 0, and
        KL(p || q) is infinite.
    """
    _check_divergence(divergence, jsd_beta)
    _check_temperature(temperature)
    _check_chunk_rows(chunk_rows)
    if not tail and (divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1.0)):
        raise ValueError("reverse_kl needs the tail bucket (tail=True): with the teacher renormalised to its top-k, "
                         "the student's mass outside them faces a teacher probability of 0 and KL(p || q) is infinite")
    n_rows, vocab = _check_logits(student_logits)
    _check_rows("teacher_logprobs", teacher_logprobs, n_rows)
    _check_rows("teacher_ids", teacher_ids, n_rows, teacher_logprobs.shape[1])
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype == torch.bool:
        raise ValueError(f"teacher_ids must be an integer tensor, got {teacher_ids.dtype}")
    if not 1 <= teacher_ids.shape[1] <= vocab:
        raise ValueError(f"need 1 <= k <= V={vocab} stored entries per row, got k={teacher_ids.shape[1]}")
    _check_mask(mask, n_rows)
    # gather needs int64; a store may keep int32 ids (half the bytes)
    rows = _select_rows(mask, student_logits, teacher_logprobs.detach(), teacher_ids.long())
    fn = functools.partial(_topk_chunk, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta, tail=tail)
    return _sum_over_row_chunks(fn, rows, chunk_rows) * (temperature * temperature)


# ---------------------------------------------------------------------------------------------------
# 3. a random sample of teacher ids (Random-Sampling KD)


@torch.no_grad()
def sample_summary(
    teacher_logits: torch.Tensor,
    draws: int,
    temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random-Sampling KD's teacher summary (Anshumann et al., ACL 2025, arXiv:2503.16870): ``draws`` ids per
    row drawn *with replacement* from the tempered teacher q = softmax(z / T), kept as unique ids with counts.

    Args:
        teacher_logits (Tensor): [N, V], any float dtype.
        draws (int): n >= 1 draws per row.
        temperature (float): T > 0; sample and store at the loss temperature.
        generator (torch.Generator, optional): on the logits' device, for reproducible draws.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``(ids, counts, logprobs)``, each [N, draws], unique ids per row in
        ascending order then padding: ids int64 (-1 = padding), counts int32 (0 for padding; a row sums to
        ``draws``), logprobs float32 = log softmax(z / T) at the ids (0 for padding).

    Raises:
        ValueError: draws < 1, T <= 0, logits not 2-D.
    """
    _check_temperature(temperature)
    _check_logits(teacher_logits)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    out_ids, out_counts, out_logprobs = [], [], []
    for block in _capture_blocks(teacher_logits):
        log_q = F.log_softmax(block.float() / temperature, dim=-1)  # [b, V]
        sampled = torch.multinomial(log_q.exp(), draws, replacement=True, generator=generator)  # [b, draws]
        sampled, _ = sampled.sort(dim=-1)
        first = torch.ones_like(sampled, dtype=torch.bool)
        first[:, 1:] = sampled[:, 1:] != sampled[:, :-1]
        slot = first.cumsum(dim=-1) - 1  # [b, draws]: the column of each draw's unique id
        ids = torch.full_like(sampled, -1).scatter_(1, slot, sampled)  # duplicates write the same value
        ones = torch.ones_like(slot, dtype=torch.int32)
        counts = torch.zeros_like(sampled, dtype=torch.int32).scatter_add_(1, slot, ones)
        valid = ids >= 0
        logprobs = torch.where(valid, log_q.gather(1, ids.clamp(min=0)), 0.0)
        out_ids.append(ids)
        out_counts.append(counts)
        out_logprobs.append(logprobs)
    if not out_ids:
        device = teacher_logits.device
        return (torch.zeros((0, draws), dtype=torch.int64, device=device),
                torch.zeros((0, draws), dtype=torch.int32, device=device),
                torch.zeros((0, draws), dtype=torch.float32, device=device))
    return torch.cat(out_ids), torch.cat(out_counts), torch.cat(out_logprobs)


def _sampled_chunk(student: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, teacher_logprobs: torch.Tensor,
                   *, temperature: float) -> torch.Tensor:
    z = student.float() / temperature  # [c, V]
    log_p = z.gather(1, ids.clamp(min=0)) - torch.logsumexp(z, dim=-1, keepdim=True)  # [c, d]
    # Padding has weight 0; mask the difference too so a -inf student log-prob there cannot give 0 * inf.
    diff = torch.where(weights > 0, teacher_logprobs.float() - log_p, 0.0)
    return (weights * diff).sum()


def sampled_divergence_sum(
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_counts: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    draws: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Unbiased Monte-Carlo estimate of T^2 * sum over rows of forward KL(q || p) from sampled teacher ids.

    Per row, with n draws from q and count c_j of id j: sum_j (c_j / n) (log q_j - log p_j), p the student's
    full-vocabulary softmax at temperature T. E[c_j / n] = q_j, so the expectation over draws is exactly
    sum_v q_v (log q_v - log p_v) = KL(q || p), and, being linear in the counts, so is the expectation of the
    gradient w.r.t. the student logits: T (p - c / n) per row, whose mean is T (p - q) (Anshumann et al., ACL
    2025, arXiv:2503.16870, "Random-Sampling KD").

    Only forward KL: reverse KL and JSD weight log-ratios by the *student's* probabilities over the whole
    vocabulary (sum_v p_v log(p_v / q_v)), and need log q_v wherever p_v > 0; a sample from the teacher gives
    neither an unbiased estimate of that sum nor q outside the sampled ids.

    Args:
        student_logits (Tensor): [N, V], any float dtype, requires grad; tempered here.
        sample_ids (Tensor): [N, d] ids, any integer dtype, -1 = padding (``sample_summary``'s layout).
        sample_counts (Tensor): [N, d] integer counts, 0 for padding.
        teacher_logprobs (Tensor): [N, d] teacher log-probs at the ids, tempered at ``temperature``.
        temperature (float): T > 0, the temperature the sample was drawn at.
        draws (int, optional): n, the draws per row; default: each row's sum of counts. A row whose counts sum
            to more raises; one that sums to less is scaled down (its missing draws count as 0).
        mask (Tensor, optional): [N] bool, rows that count.
        chunk_rows (int, optional): as in ``divergence_sum``.

    Returns:
        Tensor: float32 scalar in nats, summed over rows. A single estimate can be negative (it is a noisy
        estimate of a non-negative quantity). Rows with no draws contribute 0.

    Raises:
        ValueError: mismatched shapes, non-integer ids or counts, counts above ``draws``, or bad arguments.
    """
    _check_temperature(temperature)
    _check_chunk_rows(chunk_rows)
    n_rows, _ = _check_logits(student_logits)
    _check_rows("sample_ids", sample_ids, n_rows)
    width = sample_ids.shape[1]
    _check_rows("sample_counts", sample_counts, n_rows, width)
    _check_rows("teacher_logprobs", teacher_logprobs, n_rows, width)
    if sample_ids.dtype.is_floating_point or sample_ids.dtype == torch.bool:
        raise ValueError(f"sample_ids must be an integer tensor, got {sample_ids.dtype}")
    if sample_counts.dtype.is_floating_point or sample_counts.dtype == torch.bool:
        raise ValueError(f"sample_counts must be an integer tensor, got {sample_counts.dtype}")
    _check_mask(mask, n_rows)
    counts = sample_counts.to(torch.float32)
    row_draws = counts.sum(dim=-1, keepdim=True)  # [N, 1]
    if draws is not None:
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"draws must be None or an int >= 1, got {draws!r}")
        if bool((row_draws > draws).any()):
            raise ValueError(f"a row's counts sum to more than draws={draws}")
        row_draws = torch.full_like(row_draws, float(draws))
    weights = counts / row_draws.clamp(min=1.0)  # [N, d]: c_j / n, 0 on padding and on rows without draws
    rows = _select_rows(mask, student_logits, sample_ids.long(), weights, teacher_logprobs.detach())
    fn = functools.partial(_sampled_chunk, temperature=temperature)
    return _sum_over_row_chunks(fn, rows, chunk_rows) * (temperature * temperature)
