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

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class LossParts(NamedTuple):
    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


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
    teacher_logits: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
    kd_mask: Optional[torch.Tensor] = None,
    kd_denominator: Optional[float] = None,
    ce_denominator: Optional[float] = None,
) -> LossParts:
    """alpha * KD + beta * CE, each averaged over the rows it applies to.

    Args:
        student_logits (Tensor): [N, C].
        teacher_logits (Tensor or None): [N, C]; None means no KD term (plain fine-tuning).
        labels (Tensor): [N] class ids, -100 where the row has no label (unlabeled rows: KD only).
        alpha (float): weight of KD. beta (float): weight of CE.
        temperature (float): T of the KD term.
        kd_mask (Tensor, optional): [N] bool, rows with teacher logits. Default: all rows.
        kd_denominator, ce_denominator (float, optional): row counts to average by. Default: the counts in
            this batch. Pass the counts over the accumulation window / all processes to normalise globally.

    Returns:
        LossParts(total, kd, ce): kd and ce are the unweighted means, for logging.
    """
    zero = student_logits.new_zeros((), dtype=torch.float32)
    if teacher_logits is not None and alpha > 0:
        n_kd = kd_denominator if kd_denominator is not None else (
            student_logits.shape[0] if kd_mask is None else int(kd_mask.sum())
        )
        kd = kd_loss_sum(student_logits, teacher_logits, temperature, kd_mask) / max(n_kd, 1)
    else:
        kd = zero
    if beta > 0:
        n_ce = ce_denominator if ce_denominator is not None else int((labels != IGNORE_INDEX).sum())
        # A batch with no labels gives CE = 0 (sum over no rows is 0), never 0/0 = NaN.
        ce = ce_loss_sum(student_logits, labels) / max(n_ce, 1)
    else:
        ce = zero
    return LossParts(total=alpha * kd + beta * ce, kd=kd, ce=ce)
