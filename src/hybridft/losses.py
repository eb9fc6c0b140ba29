"""The hybrid fine-tuning loss, as pure functions of tensors.

    L_total = alpha * L_KD + beta * L_CE
    L_KD    = T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))
    L_CE    = cross-entropy of the student on the true labels

Conventions (the ones peers get wrong, see FIELD.md):
- KL is *summed over classes* and *averaged over rows* (examples, or real tokens for LMs). Never
  `nn.KLDivLoss()` with its default `'mean'`, which also divides by the number of classes.
- The T^2 factor (Hinton et al. 2015) keeps the KD gradients at the same scale as T changes, so alpha and
  beta keep their meaning across temperatures.
- Labels equal to -100 are ignored by CE. Rows without teacher logits (mask False) are ignored by KD.
- Under gradient accumulation (and across processes) pass the *global* row counts as `kd_denominator` and
  `ce_denominator`: each micro-batch then contributes sum/global_count, and the accumulated gradient equals
  the gradient of the mean over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE_INDEX = -100


class LossParts(NamedTuple):
    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


@dataclass
class LossWeights:
    """The loss settings one training stage uses (from `LossConfig`; the teacher stage uses alpha=0, beta=1)."""

    alpha: float
    beta: float
    temperature: float = 1.0
    divergence: str = "forward_kl"
    """`forward_kl`, `reverse_kl` or `jsd` (see `hybridft.lm_losses`)."""
    jsd_beta: float = 0.5
    chunk_rows: Optional[int] = None
    """Rows (token positions) per loss chunk; None computes the loss in one piece (classification)."""
    tail: bool = True
    """Stored top-k targets: keep the teacher's remaining mass as one extra bucket."""


class SparseTargets(NamedTuple):
    """Stored teacher outputs of a causal LM, one row per target token (see `hybridft.teacher_outputs`).

    `ids` [N, k] int64 (-1 = padding), `logprobs` [N, k] float (the teacher's log-probabilities at `ids`, at
    the capture temperature), `counts` [N, k] (random-sampling stores only: how often each id was drawn).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    counts: Optional[torch.Tensor] = None


Targets = Union[torch.Tensor, SparseTargets]


def stored_targets(batch: dict[str, Any]) -> Optional[Targets]:
    """The teacher outputs a batch carries, flattened to one row per loss row: dense `teacher_logits`
    [B, C] (classification), sparse `teacher_ids`/`teacher_logprobs`(/`teacher_counts`) [B, K, k] (causal
    LMs), or None."""
    if "teacher_logits" in batch:
        logits: torch.Tensor = batch["teacher_logits"]
        return logits
    if "teacher_ids" in batch:
        k = batch["teacher_ids"].shape[-1]
        counts = batch.get("teacher_counts")
        return SparseTargets(batch["teacher_ids"].reshape(-1, k), batch["teacher_logprobs"].reshape(-1, k),
                             None if counts is None else counts.reshape(-1, k))
    return None


def teacher_top1(targets: Targets) -> torch.Tensor:
    """The teacher's most likely class per row [N] (for the logged student-teacher agreement)."""
    if isinstance(targets, torch.Tensor):
        return targets.argmax(-1)
    if targets.counts is not None:  # sampled: the id drawn most often
        return targets.ids.gather(-1, targets.counts.argmax(-1, keepdim=True)).squeeze(-1)
    return targets.ids.gather(-1, targets.logprobs.argmax(-1, keepdim=True)).squeeze(-1)


def kd_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """T^2 * sum over rows of KL(teacher_T || student_T), each KL summed over classes.

    Args:
        student_logits (Tensor): [N, C].
        teacher_logits (Tensor): [N, C], no gradient needed.
        temperature (float): T > 0.
        mask (Tensor, optional): [N] bool, rows that take part.

    Returns:
        Tensor: scalar, the *sum* over rows (divide by the row count for the mean).
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)  # [N, C]
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)  # [N, C]
    p_teacher = log_p_teacher.exp()
    # Classes the teacher gives zero mass (e.g. -inf logits) contribute exactly 0, not 0 * (-inf - -inf) = NaN.
    per_class = torch.where(p_teacher == 0, 0.0, p_teacher * (log_p_teacher - log_p_student))  # [N, C]
    per_row = per_class.sum(dim=-1)  # [N]: summed over classes, never averaged over them
    if mask is not None:
        per_row = per_row * mask.to(per_row.dtype)
    return per_row.sum() * (t * t)


def ce_loss_sum(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over rows with a label (labels != -100) of the cross-entropy. Args: logits [N, C], labels [N]."""
    return F.cross_entropy(student_logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of T^2 * KL(teacher_T || student_T) (sum over classes). Logits: [N, C]."""
    return kd_loss_sum(student_logits, teacher_logits, temperature) / max(student_logits.shape[0], 1)


def hybrid_loss(
    student_logits: torch.Tensor,
    teacher_logits: Optional[Targets],
    labels: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
    kd_mask: Optional[torch.Tensor] = None,
    kd_denominator: Optional[float] = None,
    ce_denominator: Optional[float] = None,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    chunk_rows: Optional[int] = None,
    tail: bool = True,
) -> LossParts:
    """alpha * KD + beta * CE, each averaged over the rows it applies to.

    Args:
        student_logits (Tensor): [N, C] (C = classes, or the vocabulary for token rows).
        teacher_logits (Tensor, SparseTargets or None): dense [N, C] logits, a stored top-k or sampled summary
            with [N, k] rows, or None for no KD term (plain fine-tuning).
        labels (Tensor): [N] class ids, -100 where the row has no label (unlabeled rows, prompt and padding
            tokens).
        alpha (float): weight of KD. beta (float): weight of CE.
        temperature (float): T of the KD term (T^2 is applied).
        kd_mask (Tensor, optional): [N] bool, rows that take part in KD. Default: all rows.
        kd_denominator, ce_denominator (float, optional): row counts to average by. Default: the counts in
            this batch. Pass the counts over the accumulation window / all processes to normalise globally.
        divergence, jsd_beta, chunk_rows, tail: see `LossWeights`. Dense forward KL with no chunking is the
            classification path; everything else goes through `hybridft.lm_losses`, one chunk of rows at a time.

    Returns:
        LossParts(total, kd, ce): kd and ce are the unweighted means, for logging.
    """
    zero = student_logits.new_zeros((), dtype=torch.float32)
    if teacher_logits is not None and alpha > 0:
        n_kd = kd_denominator if kd_denominator is not None else (
            student_logits.shape[0] if kd_mask is None else int(kd_mask.sum())
        )
        kd = kd_sum(student_logits, teacher_logits, temperature, kd_mask, divergence=divergence,
                    jsd_beta=jsd_beta, chunk_rows=chunk_rows, tail=tail) / max(n_kd, 1)
    else:
        kd = zero
    if beta > 0:
        n_ce = ce_denominator if ce_denominator is not None else int((labels != IGNORE_INDEX).sum())
        # A batch with no labels gives CE = 0 (sum over no rows is 0), never 0/0 = NaN.
        ce = ce_sum(student_logits, labels, chunk_rows) / max(n_ce, 1)
    else:
        ce = zero
    return LossParts(total=alpha * kd + beta * ce, kd=kd, ce=ce)


def kd_sum(student_logits: torch.Tensor, targets: Targets, temperature: float,
           mask: Optional[torch.Tensor] = None, *, divergence: str = "forward_kl", jsd_beta: float = 0.5,
           chunk_rows: Optional[int] = None, tail: bool = True) -> torch.Tensor:
    """T^2 * the divergence summed over rows, for dense or stored sparse targets. Scalar."""
    if isinstance(targets, torch.Tensor) and divergence == "forward_kl" and chunk_rows is None:
        return kd_loss_sum(student_logits, targets, temperature, mask)
    from hybridft import lm_losses

    if mask is not None:  # only the rows that count are ever softmaxed (prompt and padding rows are not)
        rows = mask.nonzero().squeeze(-1)
        student_logits = student_logits.index_select(0, rows)
        targets = (targets.index_select(0, rows) if isinstance(targets, torch.Tensor)
                   else SparseTargets(*(None if t is None else t.index_select(0, rows) for t in targets)))
    if isinstance(targets, torch.Tensor):
        return lm_losses.divergence_sum(student_logits, targets, temperature=temperature, divergence=divergence,
                                        jsd_beta=jsd_beta, chunk_rows=chunk_rows)
    if targets.counts is not None:
        if divergence != "forward_kl":
            raise ValueError(f"a random-sampling store estimates forward KL only, not {divergence}")
        return lm_losses.sampled_divergence_sum(student_logits, targets.ids, targets.counts, targets.logprobs,
                                                temperature=temperature, chunk_rows=chunk_rows)
    return lm_losses.topk_divergence_sum(student_logits, targets.logprobs, targets.ids, temperature=temperature,
                                         divergence=divergence, jsd_beta=jsd_beta, tail=tail, chunk_rows=chunk_rows)


def ce_sum(student_logits: torch.Tensor, labels: torch.Tensor, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy summed over labelled rows; with `chunk_rows`, in checkpointed chunks of labelled rows so
    that the float32 [N, V] log-probabilities never exist at once (a 49,152-token vocabulary)."""
    if chunk_rows is None:
        return ce_loss_sum(student_logits, labels)
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
    logits, targets = student_logits.index_select(0, rows), labels.index_select(0, rows)
    total = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, len(rows), chunk_rows):
        chunk, y = logits[start:start + chunk_rows], targets[start:start + chunk_rows]
        total = total + torch.utils.checkpoint.checkpoint(ce_loss_sum, chunk, y, use_reentrant=False)
    return total
