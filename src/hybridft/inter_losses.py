"""Intermediate-layer distillation (issue 10): the student also matches the teacher's hidden states and its last
layer's self-attention, beside the logit terms of `hybridft.losses`.

    L_total  = alpha * L_KD + beta * L_CE + hidden_weight * L_hidden + attention_weight * L_attn
    L_hidden = mean over matched hidden states, real tokens and hidden units of (W h_student - h_teacher)^2
    L_attn   = mean over heads and real query tokens of KL(A_teacher || A_student), summed over real key positions

L_hidden is TinyBERT's hidden-state and embedding loss (Jiao et al., Findings of EMNLP 2020, eqs. 7-9), averaged
over the matched pairs instead of summed, so the weight keeps its meaning whatever the number of layers. The pairs
are the embedding outputs, then each student layer and the teacher layer it was cut from (`student.layers`). W is
the identity when the widths are equal (always, for a layer cut), else a learned linear map per pair.

L_attn is MiniLM's self-attention distribution transfer (Wang et al., "MiniLM: Deep Self-Attention Distillation
for Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020, eq. 4, the attention-distribution part):
the last layer of the teacher against the last layer of the student, head by head. The distributions are recomputed
from the last layer's input and its query/key projections, softmax(Q K^T / sqrt(d_head)) over the real keys,
rather than read from `output_attentions`: transformers refuses that under the default SDPA kernel, and under the
eager one it returns the weights *after* attention dropout, whose zeros make the KL infinite in training mode.

As in `hybridft.losses`, the loss functions return *sums* over real tokens: divide by the real-token count of the
whole accumulated step (all processes) and the accumulated gradient is the gradient of one big batch's mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import nn

from hybridft.errors import HybridFTError
from hybridft.models import evenly_spaced_layers, layer_list

PROJECTION = "hybridft_hidden_projection"
"""The attribute under which the learned width projection hangs on the student while it trains (then removed)."""

_MASKED = -1e9  # a score no real key reaches: exp(-1e9 - max) is exactly 0 in float32


def hidden_mse_sum(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Squared error of matched hidden states, averaged over hidden units and pairs, summed over real tokens.

    Args:
        student (sequence of Tensor): P tensors [B, T, d], already projected to the teacher's width d.
        teacher (sequence of Tensor): P tensors [B, T, d], the matching teacher states (no gradient needed).
        mask (Tensor): [B, T], nonzero on real tokens, 0 on padding (the batch's `attention_mask`).

    Returns:
        Tensor: scalar, sum over real tokens of mean over pairs and units of (s - t)^2 (divide by the token count).
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need the same number (> 0) of student and teacher states, got {len(student)} and {len(teacher)}")
    per_token = sum(((s.float() - t.float()) ** 2).mean(-1) for s, t in zip(student, teacher)) / len(student)  # [B, T]
    return torch.where(mask.bool(), per_token, 0.0).sum()


def attention_kl_sum(student_scores: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM's attention-distribution loss: KL(teacher || student) per head and query, summed over real keys.

    Args:
        student_scores (Tensor): [B, H, T, T] attention scores before the softmax (Q K^T / sqrt(d_head)), queries on
            dim 2, keys on dim 3. Log-probabilities work as well (the softmax of log p is p).
        teacher_scores (Tensor): [B, H, T, T], the same heads (no gradient needed).
        mask (Tensor): [B, T], nonzero on real tokens. Padding keys are left out of both softmaxes (as the models
            leave them out) and padding queries out of the sum.

    Returns:
        Tensor: scalar, sum over real query tokens of (mean over heads of KL summed over keys); divide by the count.
    """
    real = mask.bool()
    keys = real[:, None, None, :]  # [B, 1, 1, T]
    log_s = student_scores.float().masked_fill(~keys, _MASKED).log_softmax(-1)
    log_t = teacher_scores.float().masked_fill(~keys, _MASKED).log_softmax(-1)
    per_key = torch.where(keys, log_t.exp() * (log_t - log_s), 0.0)  # [B, H, T, T]
    per_query = per_key.sum(-1).mean(1)  # [B, T]: summed over keys, averaged over heads
    return torch.where(real, per_query, 0.0).sum()


def attention_scores(attention: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[B, H, T, T] scores Q K^T / sqrt(d_head) of a BERT-style self-attention module (`query`, `key`,
    `num_attention_heads`, `attention_head_size`) on its input hidden states [B, T, d]."""
    b, t, _ = hidden.shape
    heads, size = attention.num_attention_heads, attention.attention_head_size
    q = attention.query(hidden).view(b, t, heads, size).transpose(1, 2)  # [B, H, T, d_head]
    k = attention.key(hidden).view(b, t, heads, size).transpose(1, 2)
    return q @ k.transpose(-1, -2) * getattr(attention, "scaling", size ** -0.5)


def last_self_attention(model: nn.Module, who: str) -> nn.Module:
    """The self-attention module of the model's last layer, whose input is the layer's input (post-LN BERT family:
    BERT, MiniLM, RoBERTa, ELECTRA). Refused in one line for other designs."""
    block = layer_list(model)[-1]
    for module in block.modules():
        if all(hasattr(module, a) for a in ("query", "key", "num_attention_heads", "attention_head_size")):
            return module
    raise HybridFTError(f"loss.attention_weight: the {who} ({type(model).__name__}) has no BERT-style self-attention "
                        f"(query and key projections) in its last layer; set loss.attention_weight=0")


class InterParts(NamedTuple):
    total: torch.Tensor
    """hidden_weight * hidden + attention_weight * attention."""
    hidden: torch.Tensor
    attention: torch.Tensor
    """Both unweighted means over the step's real tokens, for logging."""


class States(NamedTuple):
    """What one model contributes to the terms: its matched hidden states P x [B, T, d_teacher] (empty when the
    hidden term is off) and its last layer's attention scores [B, H, T, T] (None when the attention term is off)."""

    hidden: list[torch.Tensor]
    scores: Optional[torch.Tensor]


@dataclass
class LayerDistill:
    """The intermediate terms of one training stage: the frozen teacher, which teacher layer each student layer
    matches, the weights, and the learned projection when the widths differ (made by `build`)."""

    teacher: nn.Module
    teacher_layers: list[int]
    """The teacher layer (0-based) of each student layer, in order."""
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    projection: Optional[nn.ModuleList] = None
    """One linear map per matched state (student width -> teacher width), a submodule of the student while it
    trains (so it is in its optimizer, checkpoints and gradient synchronisation); None when the widths match."""
    student_attention: Optional[nn.Module] = None
    teacher_attention: Optional[nn.Module] = None

    def teacher_states(self, task: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, States]:
        """One pass of the frozen teacher (the caller disables gradients): its logits [N, C] (used for KD when
        distilling online) and its states. `task` is the task module (`logits_and_hidden`)."""
        logits, hidden = task.logits_and_hidden(self.teacher, batch)
        picks = [0] + [t + 1 for t in self.teacher_layers]  # hidden[0] is the embedding output
        return logits.float(), self._states(hidden, picks, self.teacher_attention, None)

    def student_states(self, hidden: Sequence[torch.Tensor]) -> States:
        """The student's side from its hidden states (L + 1) x [B, T, d_student] (under autocast, with gradients)."""
        return self._states(hidden, list(range(len(hidden))), self.student_attention, self.projection)

    def _states(self, hidden: Sequence[torch.Tensor], picks: list[int], attention: Optional[nn.Module],
                projection: Optional[nn.ModuleList]) -> States:
        kept: list[torch.Tensor] = []
        if self.hidden_weight > 0:
            kept = [hidden[i] for i in picks]
            if projection is not None:
                kept = [proj(h) for proj, h in zip(projection, kept)]
        # the last layer's input is the state before its output (the embedding output for a 1-layer model)
        scores = attention_scores(attention, hidden[-2]) if attention is not None else None
        return States(kept, scores)

    def terms(self, student: States, teacher: States, mask: torch.Tensor, n_tokens: float) -> InterParts:
        """The weighted terms for one micro-batch, each a sum over its real tokens divided by `n_tokens`, the real-token
        count of the whole accumulated step. mask [B, T] is the batch's `attention_mask`."""
        zero = mask.new_zeros((), dtype=torch.float32)
        n = max(n_tokens, 1)
        hidden = hidden_mse_sum(student.hidden, teacher.hidden, mask) / n if self.hidden_weight > 0 else zero
        attention = (attention_kl_sum(student.scores, teacher.scores, mask) / n
                     if student.scores is not None and teacher.scores is not None else zero)
        return InterParts(self.hidden_weight * hidden + self.attention_weight * attention, hidden, attention)


def mapped_layers(cut: Optional[list[int]], n_teacher: int, n_student: int) -> list[int]:
    """The teacher layer of each student layer: the layers it was cut from (`student.layers`, kept in order by the
    cut), else the evenly spaced ones (the default cut, and the map used for a `student.model` of another depth)."""
    return sorted(cut) if cut else evenly_spaced_layers(n_teacher, n_student)


def build(student: nn.Module, teacher: nn.Module, teacher_layers: list[int], *, hidden_weight: float,
          attention_weight: float, same_tokenizer: bool, seed: int = 0) -> LayerDistill:
    """Check that the two models can be compared layer by layer and make the terms; with `hidden_weight` and widths
    that differ, a learned projection is attached to the student as `PROJECTION` (remove it with `detach`)."""
    if not same_tokenizer:
        raise HybridFTError("loss.hidden_weight and loss.attention_weight compare the two models token by token, but "
                            "the student's tokenizer differs from the teacher's; use a student cut from the teacher "
                            "(student.model unset) or one with the teacher's tokenizer, or set both weights to 0")
    n_student = len(layer_list(student))
    if len(teacher_layers) != n_student:
        raise HybridFTError(f"intermediate-layer distillation: {len(teacher_layers)} teacher layers for a student of "
                            f"{n_student} layers")
    projection = None
    if hidden_weight > 0:
        d_student, d_teacher = _width(student, "student"), _width(teacher, "teacher")
        if d_student != d_teacher:
            if hasattr(student, PROJECTION):
                raise HybridFTError(f"loss.hidden_weight: the student's width {d_student} differs from the teacher's "
                                    f"{d_teacher}, and its {PROJECTION} is taken; set loss.hidden_weight=0")
            with torch.random.fork_rng(devices=[]):  # the same projection for the same seed, on resume too
                torch.manual_seed(seed)
                projection = nn.ModuleList(nn.Linear(d_student, d_teacher, bias=False) for _ in range(n_student + 1))
            student.add_module(PROJECTION, projection)
    student_attention = teacher_attention = None
    if attention_weight > 0:
        student_attention = last_self_attention(student, "student")
        teacher_attention = last_self_attention(teacher, "teacher")
        heads = (student_attention.num_attention_heads, teacher_attention.num_attention_heads)
        if heads[0] != heads[1]:
            raise HybridFTError(f"loss.attention_weight: the student has {heads[0]} attention heads and the teacher "
                                f"{heads[1]}; MiniLM's attention loss pairs heads one to one; set loss.attention_weight=0")
    return LayerDistill(teacher, list(teacher_layers), hidden_weight, attention_weight, projection,
                        student_attention, teacher_attention)


def detach(student: nn.Module) -> None:
    """Remove the training-only projection, so the saved student is a plain model of its class."""
    if hasattr(student, PROJECTION):
        delattr(student, PROJECTION)


def _width(model: nn.Module, who: str) -> int:
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(width, int):
        raise HybridFTError(f"loss.hidden_weight: cannot read the {who}'s hidden size (config.hidden_size); "
                            f"set loss.hidden_weight=0")
    return width
