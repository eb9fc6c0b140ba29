"""Token-level KD losses for causal LMs (hybridft.lm_losses): values, gradients, chunking, estimators."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybridft.lm_losses import (
    DIVERGENCES,
    divergence_sum,
    sample_summary,
    sampled_divergence_sum,
    tail_logmass,
    topk_divergence_sum,
    topk_summary,
)

# A hand-written 2-row x 4-class example; the golden numbers below are for T = 2.
STUDENT = [[1.0, 2.0, 0.5, -1.0], [0.0, -0.5, 3.0, 1.0]]
TEACHER = [[2.0, 1.0, 0.0, -2.0], [1.0, 0.0, 2.5, -1.0]]
# T^2 * sum over rows, computed once with plain Python floats and written down (see _reference below).
GOLDEN_T2 = {
    ("forward_kl", 0.5): 0.8157681494819798,
    ("reverse_kl", 0.5): 0.804579799697541,
    ("jsd", 0.5): 0.19922825756110804,
    ("jsd", 0.9): 0.0720596325245517,
}
SETTINGS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.9)]


def _softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in row]
    return [x / sum(e) for x in e]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _reference(divergence: str, beta: float, t: float) -> float:
    """T^2 * sum over rows of D(q, p) in plain Python `math`, independent of torch."""
    total = 0.0
    for s_row, t_row in zip(STUDENT, TEACHER):
        p, q = _softmax(s_row, t), _softmax(t_row, t)
        if divergence == "forward_kl":
            total += _kl(q, p)
        elif divergence == "reverse_kl":
            total += _kl(p, q)
        else:
            m = [beta * x + (1 - beta) * y for x, y in zip(q, p)]
            total += beta * _kl(q, m) + (1 - beta) * _kl(p, m)
    return t * t * total


def _logits(n: int, v: int, scale: float = 2.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


def _value_and_grad(loss_fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = student.detach().clone().requires_grad_(True)
    value = loss_fn(leaf)
    value.backward()
    return value.detach(), leaf.grad


# ---------------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("divergence,beta", SETTINGS)
def test_golden_values_at_t2(divergence: str, beta: float) -> None:
    value = divergence_sum(torch.tensor(STUDENT), torch.tensor(TEACHER), temperature=2.0, divergence=divergence,
                           jsd_beta=beta).item()
    # float32 against float64: JSD subtracts nearby logs (KL to the mixture), so allow a few 1e-6
    assert value == pytest.approx(_reference(divergence, beta, 2.0), rel=1e-5)
    assert value == pytest.approx(GOLDEN_T2[(divergence, beta)], rel=1e-5)
    assert _reference(divergence, beta, 2.0) == pytest.approx(GOLDEN_T2[(divergence, beta)], rel=1e-12)


def test_jsd_endpoints_and_symmetry() -> None:
    s, t = _logits(6, 11)
    fkl = divergence_sum(s, t, temperature=1.5, divergence="forward_kl")
    rkl = divergence_sum(s, t, temperature=1.5, divergence="reverse_kl")
    jsd_0 = divergence_sum(s, t, temperature=1.5, divergence="jsd", jsd_beta=0.0)
    jsd_1 = divergence_sum(s, t, temperature=1.5, divergence="jsd", jsd_beta=1.0)
    assert jsd_0.item() == pytest.approx(fkl.item(), rel=1e-6)
    assert jsd_1.item() == pytest.approx(rkl.item(), rel=1e-6)
    assert fkl.item() != pytest.approx(rkl.item(), rel=1e-3)  # the two ends really differ on this example
    jsd_st = divergence_sum(s, t, divergence="jsd", jsd_beta=0.5)
    jsd_ts = divergence_sum(t, s, divergence="jsd", jsd_beta=0.5)
    assert jsd_st.item() == pytest.approx(jsd_ts.item(), rel=1e-6)
    # JSD_0.5 <= log 2 per row (in units of T^2 = 1)
    assert 0 < jsd_st.item() <= 6 * math.log(2)
    # beta = 0.9 is not symmetric
    assert divergence_sum(s, t, divergence="jsd", jsd_beta=0.9).item() != pytest.approx(
        divergence_sum(t, s, divergence="jsd", jsd_beta=0.9).item(), rel=1e-3)


@pytest.mark.parametrize("divergence,beta", SETTINGS)
def test_zero_on_equal_inputs_nonnegative_and_t2_scaling(divergence: str, beta: float) -> None:
    s, t = _logits(8, 13, scale=3.0)
    same = divergence_sum(s, s.clone(), temperature=2.0, divergence=divergence, jsd_beta=beta)
    assert same.item() == pytest.approx(0.0, abs=1e-5)
    per_row = [divergence_sum(s[i:i + 1], t[i:i + 1], divergence=divergence, jsd_beta=beta).item() for i in range(8)]
    assert min(per_row) > 0
    for temperature in (0.5, 2.0, 4.0):
        at_t = divergence_sum(s, t, temperature=temperature, divergence=divergence, jsd_beta=beta)
        at_1 = divergence_sum(s / temperature, t / temperature, temperature=1.0, divergence=divergence, jsd_beta=beta)
        assert at_t.item() == pytest.approx(temperature ** 2 * at_1.item(), rel=1e-5)


def test_bf16_inputs_are_computed_in_float32() -> None:
    s, t = _logits(5, 17)
    s16, t16 = s.bfloat16(), t.bfloat16()
    value = divergence_sum(s16, t16, temperature=2.0)
    assert value.dtype == torch.float32
    # the same as float32 arithmetic on the (already rounded) bf16 values
    assert value.item() == pytest.approx(divergence_sum(s16.float(), t16.float(), temperature=2.0).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# mask and zero-probability classes


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_rows_contribute_nothing(divergence: str) -> None:
    s, t = _logits(7, 9)
    mask = torch.tensor([True, False, True, True, False, False, True])
    t_garbage = t.clone()
    t_garbage[~mask] = float("nan")  # e.g. padding positions: must not leak into the value or the gradient
    value, grad = _value_and_grad(lambda x: divergence_sum(x, t_garbage, temperature=2.0, divergence=divergence,
                                                           mask=mask, chunk_rows=2), s)
    kept_value, kept_grad = _value_and_grad(lambda x: divergence_sum(x, t[mask], temperature=2.0,
                                                                     divergence=divergence), s[mask])
    assert value.item() == pytest.approx(kept_value.item(), rel=1e-6)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    torch.testing.assert_close(grad[mask], kept_grad, rtol=1e-5, atol=1e-7)


def test_all_rows_masked_gives_zero_and_backward_works() -> None:
    s, t = _logits(4, 6)
    for loss_fn in (
        lambda x: divergence_sum(x, t, mask=torch.zeros(4, dtype=torch.bool)),
        lambda x: topk_divergence_sum(x, *topk_summary(t, 3), mask=torch.zeros(4, dtype=torch.bool), chunk_rows=2),
        lambda x: sampled_divergence_sum(x, *sample_summary(t, 4), mask=torch.zeros(4, dtype=torch.bool)),
    ):
        value, grad = _value_and_grad(loss_fn, s)
        assert value.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))


def test_zero_probability_classes_give_finite_values_and_gradients() -> None:
    s, t = _logits(4, 8)
    t[:, :3] = float("-inf")  # classes the teacher rules out
    s[0, 0] = float("-inf")  # and one the student rules out as well (0 vs 0)
    for divergence in ("forward_kl", "jsd"):
        value, grad = _value_and_grad(lambda x: divergence_sum(x, t, temperature=2.0, divergence=divergence), s)
        assert math.isfinite(value.item()) and value.item() > 0
        assert torch.isfinite(grad).all()
    # forward KL equals the KL over the teacher's support only (0 log 0 = 0)
    q = F.softmax(t[:, 3:] / 2.0, dim=-1)
    log_p = F.log_softmax(s / 2.0, dim=-1)[:, 3:]
    expected = 4.0 * (q * (q.log() - log_p)).sum()
    assert divergence_sum(s, t, temperature=2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    # reverse KL puts the student's mass where the teacher has none: truly infinite, not nan
    assert divergence_sum(s, t, divergence="reverse_kl").item() == math.inf
    # a row where both rule out the same class is finite for all three divergences
    both = s.clone()
    both[:, :3] = float("-inf")
    for divergence in DIVERGENCES:
        value, grad = _value_and_grad(lambda x: divergence_sum(x, t, divergence=divergence, chunk_rows=3), both)
        assert math.isfinite(value.item())
        assert torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------------------
# chunking


def _assert_chunked_matches(loss_fn, student: torch.Tensor, rtol: float) -> None:
    value, grad = _value_and_grad(lambda x: loss_fn(x, None), student)
    value_c, grad_c = _value_and_grad(lambda x: loss_fn(x, 3), student)  # 3 does not divide N = 10
    assert value_c.item() == pytest.approx(value.item(), rel=1e-6)
    assert grad_c.dtype == student.dtype
    torch.testing.assert_close(grad_c.float(), grad.float(), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("divergence,beta", SETTINGS)
def test_chunked_equals_unchunked(divergence: str, beta: float, dtype: torch.dtype, rtol: float) -> None:
    s, t = _logits(10, 37)
    s = s.to(dtype)
    _assert_chunked_matches(lambda x, c: divergence_sum(x, t, temperature=2.0, divergence=divergence, jsd_beta=beta,
                                                        chunk_rows=c), s, rtol)
    lp, ids = topk_summary(t, 5, temperature=2.0)
    _assert_chunked_matches(lambda x, c: topk_divergence_sum(x, lp, ids, temperature=2.0, divergence=divergence,
                                                             jsd_beta=beta, chunk_rows=c), s, rtol)
    if divergence != "reverse_kl":
        _assert_chunked_matches(lambda x, c: topk_divergence_sum(x, lp, ids, temperature=2.0, divergence=divergence,
                                                                 jsd_beta=beta, tail=False, chunk_rows=c), s, rtol)
    if divergence == "forward_kl":
        sample = sample_summary(t, 8, temperature=2.0, generator=torch.Generator().manual_seed(1))
        _assert_chunked_matches(lambda x, c: sampled_divergence_sum(x, *sample, temperature=2.0, chunk_rows=c), s, rtol)


def test_chunking_keeps_no_float32_vocabulary_tensor_for_backward() -> None:
    """What autograd keeps between forward and backward. Unchunked: several float32 [N, V] tensors (log-probs of
    both models, ...). Chunked: each chunk is checkpointed, so only the chunk's inputs (views of the caller's
    tensors, no new memory) are kept and the float32 intermediates are recomputed in backward. Chunks without
    checkpointing would keep as much as the unchunked loss, in smaller pieces: the test counts the total."""
    n, v, chunk, k = 64, 100, 8, 10
    s, t = _logits(n, v)
    s = s.bfloat16().requires_grad_(True)
    lp, ids = topk_summary(t, k)
    sample = sample_summary(t, k)
    callers = {x.untyped_storage().data_ptr() for x in (s, t, lp, ids, *sample)}

    def new_float32_saved(loss_fn, chunk_rows):
        storages = {}

        def pack(x):
            ptr = x.untyped_storage().data_ptr()
            if x.dtype == torch.float32 and ptr not in callers:
                storages[ptr] = x.untyped_storage().nbytes() // 4
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = loss_fn(chunk_rows)
        loss.backward()
        return sum(storages.values())

    for loss_fn in (
        lambda c: divergence_sum(s, t, divergence="jsd", chunk_rows=c),
        lambda c: topk_divergence_sum(s, lp, ids, divergence="jsd", chunk_rows=c),
        lambda c: sampled_divergence_sum(s, *sample, chunk_rows=c),
    ):
        assert new_float32_saved(loss_fn, None) >= n * v  # the hook does see the unchunked loss's [N, V] tensors
        # at most the sampled loss's [N, k] weights (built from the counts before chunking), nothing V-wide
        assert new_float32_saved(loss_fn, chunk) <= n * k


# ---------------------------------------------------------------------------------------------------
# top-k


def test_topk_summary_and_tail_logmass() -> None:
    _, t = _logits(5, 20)
    lp, ids = topk_summary(t, 6, temperature=2.0)
    assert lp.dtype == torch.float32 and ids.dtype == torch.int64 and lp.shape == ids.shape == (5, 6)
    full = F.log_softmax(t / 2.0, dim=-1)
    torch.testing.assert_close(lp, full.gather(1, ids))
    assert (lp[:, :-1] >= lp[:, 1:]).all()
    assert torch.equal(ids, full.topk(6, dim=-1).indices)
    expected_tail = torch.log1p(-full.gather(1, ids).exp().sum(-1))
    torch.testing.assert_close(tail_logmass(lp), expected_tail, rtol=1e-5, atol=1e-6)
    # all the mass in the top-k (or a little more, after rounding): tail exactly 0, log -inf, never nan
    lp_all, _ = topk_summary(t, 20)
    assert torch.isneginf(tail_logmass(lp_all + 1e-4)).all()
    # a tiny tail is kept accurately (the sum is 1 - 1e-6 in float32: 1 - sum would lose it)
    tiny = torch.tensor([[math.log(0.5), math.log(0.5 - 1e-6)]])
    assert tail_logmass(tiny).item() == pytest.approx(math.log(1e-6), rel=2e-2)


@pytest.mark.parametrize("divergence,beta", SETTINGS)
def test_topk_with_k_equal_v_equals_dense(divergence: str, beta: float) -> None:
    s, t = _logits(6, 12)
    dense, dense_grad = _value_and_grad(lambda x: divergence_sum(x, t, temperature=2.0, divergence=divergence,
                                                                 jsd_beta=beta), s)
    lp, ids = topk_summary(t, 12, temperature=2.0)
    for tail in (True, False):
        if not tail and divergence == "reverse_kl":
            continue
        value, grad = _value_and_grad(lambda x: topk_divergence_sum(x, lp, ids, temperature=2.0, divergence=divergence,
                                                                    jsd_beta=beta, tail=tail), s)
        assert value.item() == pytest.approx(dense.item(), rel=1e-5)
        torch.testing.assert_close(grad, dense_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence,beta", SETTINGS)
def test_topk_with_tail_is_below_dense(divergence: str, beta: float) -> None:
    """Coarse-graining to k + 1 buckets cannot increase an f-divergence (data-processing inequality)."""
    s, t = _logits(16, 30)
    dense = divergence_sum(s, t, temperature=2.0, divergence=divergence, jsd_beta=beta, mask=None)
    previous = 0.0
    for k in (1, 4, 16, 29):
        lp, ids = topk_summary(t, k, temperature=2.0)
        value = topk_divergence_sum(s, lp, ids, temperature=2.0, divergence=divergence, jsd_beta=beta).item()
        assert 0 <= value <= dense.item() * (1 + 1e-6)
        assert value >= previous * (1 - 1e-6)  # finer buckets (top-k nested in top-k') never lose information
        previous = value
    assert previous > 0.5 * dense.item()


def test_topk_student_with_empty_tail_has_finite_gradient() -> None:
    """A student with no mass outside the stored ids (e.g. -inf on the rest of the vocabulary): its tail bucket
    is log 0 = -inf, and a plain logsumexp over an all -inf row would put nan in the gradient."""
    s, t = _logits(4, 10)
    lp, ids = topk_summary(t, 4)
    outside = torch.ones_like(s, dtype=torch.bool).scatter(1, ids, False)
    s = s.masked_fill(outside, float("-inf"))
    for divergence, beta in (("jsd", 0.5), ("reverse_kl", 0.5)):
        value, grad = _value_and_grad(lambda x: topk_divergence_sum(x, lp, ids, divergence=divergence, jsd_beta=beta,
                                                                    chunk_rows=3), s)
        assert math.isfinite(value.item()) and value.item() > 0
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[outside], torch.zeros_like(grad[outside]))


def test_topk_without_tail_is_renormalised_teacher() -> None:
    s, t = _logits(4, 15)
    lp, ids = topk_summary(t, 5)
    q = F.softmax(lp, dim=-1)  # the teacher's top-5, renormalised
    log_p = F.log_softmax(s, dim=-1).gather(1, ids)
    expected = (q * (q.log() - log_p)).sum()
    assert topk_divergence_sum(s, lp, ids, tail=False).item() == pytest.approx(expected.item(), rel=1e-5)
    # a store may keep int32 ids and fp16 log-probs
    assert topk_divergence_sum(s, lp.half(), ids.int(), tail=False).item() == pytest.approx(expected.item(), rel=1e-3)


# ---------------------------------------------------------------------------------------------------
# sampling


def test_sample_summary_layout() -> None:
    _, t = _logits(40, 25)
    t[0] = float("-inf")
    t[0, 7] = 0.0  # a one-hot teacher row: one id, all the draws
    draws = 12
    ids, counts, lp = sample_summary(t, draws, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert ids.shape == counts.shape == lp.shape == (40, draws)
    assert ids.dtype == torch.int64 and counts.dtype == torch.int32 and lp.dtype == torch.float32
    assert (counts.sum(dim=-1) == draws).all()
    padding = ids == -1
    assert torch.equal(padding, counts == 0)
    assert (lp[padding] == 0).all()
    full = F.log_softmax(t / 2.0, dim=-1)
    for row in range(40):
        real = ids[row][~padding[row]]
        assert len(set(real.tolist())) == len(real)  # unique per row
        assert not padding[row][: len(real)].any()  # padding only at the end
        torch.testing.assert_close(lp[row][~padding[row]], full[row, real])
    assert ids[0, 0].item() == 7 and counts[0, 0].item() == draws
    assert (padding.sum(dim=-1) > 0).any() and (~padding).sum(dim=-1).max() > 1
    # the generator makes it reproducible
    again = sample_summary(t, draws, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ids) and torch.equal(again[1], counts)


def test_sampled_forward_kl_is_unbiased_in_value_and_gradient() -> None:
    n_rows, vocab, draws, repeats, temperature = 3, 50, 16, 400, 2.0
    s, t = _logits(n_rows, vocab, seed=3)
    exact, exact_grad = _value_and_grad(lambda x: divergence_sum(x, t, temperature=temperature), s)
    generator = torch.Generator().manual_seed(0)
    values, grads = [], []
    for _ in range(repeats):
        sample = sample_summary(t, draws, temperature=temperature, generator=generator)
        value, grad = _value_and_grad(lambda x: sampled_divergence_sum(x, *sample, temperature=temperature), s)
        values.append(value)
        grads.append(grad)
    values_t, grads_t = torch.stack(values), torch.stack(grads)
    standard_error = values_t.std().item() / math.sqrt(repeats)
    assert abs(values_t.mean().item() - exact.item()) < 4 * standard_error
    assert standard_error < 0.1 * exact.item()  # the test has the power to see a 40% bias
    # gradient: T (p - c/n) per row, whose mean is T (p - q); c_v/n has variance q_v (1 - q_v) / n, so the mean
    # over the repeats has standard error T sqrt(q (1 - q) / (n R)) per entry; 5 of those for 150 entries.
    q = F.softmax(t / temperature, dim=-1)
    grad_se = temperature * (q * (1 - q) / (draws * repeats)).sqrt()
    assert ((grads_t.mean(dim=0) - exact_grad).abs() <= 5 * grad_se + 1e-6).all()
    # while a single draw is far from exact: the test is not trivially loose
    assert ((grads_t[0] - exact_grad).abs() > 5 * grad_se).any()


def test_sampled_loss_with_explicit_draws_and_padding() -> None:
    s, t = _logits(2, 6)
    ids = torch.tensor([[1, 4, -1], [2, -1, -1]])
    counts = torch.tensor([[3, 1, 0], [4, 0, 0]], dtype=torch.int16)
    lq = F.log_softmax(t, dim=-1).gather(1, ids.clamp(min=0)) * (ids >= 0)
    log_p = F.log_softmax(s, dim=-1)
    expected = (0.75 * (lq[0, 0] - log_p[0, 1]) + 0.25 * (lq[0, 1] - log_p[0, 4]) + (lq[1, 0] - log_p[1, 2])).item()
    assert sampled_divergence_sum(s, ids, counts, lq).item() == pytest.approx(expected, rel=1e-6)
    assert sampled_divergence_sum(s, ids, counts, lq, draws=4).item() == pytest.approx(expected, rel=1e-6)
    assert sampled_divergence_sum(s, ids.int(), counts.to(torch.uint8), lq).item() == pytest.approx(expected, rel=1e-6)
    # draws larger than a row's counts: its missing draws count as 0 (row 1 has 4 of 8)
    halved = expected - 0.5 * (lq[1, 0] - log_p[1, 2]).item() - 0.5 * (
        0.75 * (lq[0, 0] - log_p[0, 1]) + 0.25 * (lq[0, 1] - log_p[0, 4])).item()
    assert sampled_divergence_sum(s, ids, counts, lq, draws=8).item() == pytest.approx(halved, rel=1e-6)
    with pytest.raises(ValueError, match="more than draws"):
        sampled_divergence_sum(s, ids, counts, lq, draws=3)


# ---------------------------------------------------------------------------------------------------
# errors


def test_errors() -> None:
    s, t = _logits(3, 5)
    lp, ids = topk_summary(t, 2)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        divergence_sum(s, t, divergence="kl")
    with pytest.raises(ValueError, match="unknown divergence"):
        topk_divergence_sum(s, lp, ids, divergence="tvd")
    with pytest.raises(ValueError, match="reverse_kl needs the tail bucket"):
        topk_divergence_sum(s, lp, ids, divergence="reverse_kl", tail=False)
    with pytest.raises(ValueError, match="reverse_kl needs the tail bucket"):
        topk_divergence_sum(s, lp, ids, divergence="jsd", jsd_beta=1.0, tail=False)
    with pytest.raises(ValueError, match="jsd_beta"):
        divergence_sum(s, t, divergence="jsd", jsd_beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        divergence_sum(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        divergence_sum(s, t, chunk_rows=0)
    with pytest.raises(ValueError, match="teacher_logits must have shape"):
        divergence_sum(s, t[:, :4])
    with pytest.raises(ValueError, match="mask"):
        divergence_sum(s, t, mask=torch.ones(3))
    with pytest.raises(ValueError, match="k must be"):
        topk_summary(t, 6)
    with pytest.raises(ValueError, match="draws"):
        sample_summary(t, 0)


def test_reverse_kl_stays_finite_when_the_stored_topk_hold_all_the_mass_after_rounding():
    """A peaked teacher whose fp16 top-k log-probs sum to 1: the tail is floored, not 0, so no +inf."""
    from hybridft.lm_losses import TAIL_FLOOR, topk_divergence_sum

    teacher_logprobs = torch.tensor([[0.0, -30.0]]).half().float()  # sums to 1 after rounding
    ids = torch.tensor([[0, 1]])
    student = torch.tensor([[2.0, 0.0, 1.0, 1.0]], requires_grad=True)
    value = topk_divergence_sum(student, teacher_logprobs, ids, divergence="reverse_kl", tail=True)
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(student.grad).all()
    # the student's tail mass p faces the floor: its term is p * log(p / TAIL_FLOOR)
    p = torch.softmax(student.detach(), -1)[0]
    tail = float(p[2:].sum())
    assert value.item() >= tail * math.log(tail / TAIL_FLOOR) - 1e-3
