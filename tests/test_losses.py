"""The hybrid loss: golden numbers computed by hand, and the properties the formula promises."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybridft.losses import hybrid_loss, kd_loss

S = torch.tensor([[1.0, 2.0, 3.0]])
T_ = torch.tensor([[3.0, 2.0, 1.0]])


def test_kd_golden_value_t1():
    # softmax([3,2,1]) = [e^2, e, 1] / (e^2 + e + 1); the log-ratio of teacher to student is +2, 0, -2,
    # so KL = 2 * (p1 - p3).
    z = math.e**2 + math.e + 1
    expected = 2 * (math.e**2 / z - 1 / z)
    assert expected == pytest.approx(1.15042, abs=1e-5)
    assert kd_loss(S, T_, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_golden_value_t2_includes_t_squared():
    # At T=2 the logits halve: log-ratio +1, 0, -1, so KL = q1 - q3 with q = softmax([1.5, 1, 0.5]); times T^2 = 4.
    z = math.exp(1.5) + math.exp(1.0) + math.exp(0.5)
    kl = (math.exp(1.5) - math.exp(0.5)) / z
    assert 4 * kl == pytest.approx(1.28063, abs=1e-5)
    assert kd_loss(S, T_, temperature=2.0).item() == pytest.approx(4 * kl, rel=1e-6)


def test_kd_matches_batchmean_kl_div_times_t_squared():
    torch.manual_seed(0)
    s, t = torch.randn(7, 5), torch.randn(7, 5)
    for temp in (1.0, 2.0, 4.0):
        ref = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                       reduction="batchmean") * temp**2
        assert kd_loss(s, t, temp).item() == pytest.approx(ref.item(), rel=1e-5)


def test_kd_of_identical_logits_is_zero():
    x = torch.randn(4, 6)
    assert kd_loss(x, x.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_is_a_sum_over_classes_not_a_mean():
    """Adding classes with zero mass on both sides must not shrink the value (the nn.KLDivLoss 'mean' bug would
    divide it by the class count)."""
    base = kd_loss(S, T_, 2.0)
    pad = torch.full((1, 7), float("-inf"))
    wider = kd_loss(torch.cat([S, pad], 1), torch.cat([T_, pad], 1), 2.0)
    assert torch.isfinite(wider)
    assert wider.item() == pytest.approx(base.item(), rel=1e-6)
    mean_bug = F.kl_div(F.log_softmax(S / 2, -1), F.softmax(T_ / 2, -1), reduction="sum") * 4 / S.numel()
    assert mean_bug.item() == pytest.approx(base.item() / 3, rel=1e-5)  # what we must not compute


def test_t_squared_keeps_gradient_scale_comparable_across_temperatures():
    torch.manual_seed(0)
    t = torch.randn(64, 10) * 3
    norms = {}
    for temp in (1.0, 2.0, 4.0, 8.0):
        s = (torch.randn(64, 10) * 3).requires_grad_()
        kd_loss(s, t, temp).backward()
        norms[temp] = s.grad.norm().item()
    # Without T^2 the gradient would fall roughly like 1/T^2 (64x from T=1 to T=8); with it, it stays in range.
    assert max(norms.values()) / min(norms.values()) < 4


def test_alpha_zero_is_pure_ce_and_beta_zero_is_pure_kd():
    labels = torch.tensor([2])
    ce = F.cross_entropy(S, labels)
    assert ce.item() == pytest.approx(-math.log(math.e**2 / (math.e**2 + math.e + 1)), rel=1e-6)
    only_ce = hybrid_loss(S, T_, labels, alpha=0.0, beta=1.0, temperature=2.0)
    assert only_ce.total.item() == pytest.approx(ce.item(), rel=1e-6)
    only_kd = hybrid_loss(S, T_, labels, alpha=1.0, beta=0.0, temperature=2.0)
    assert only_kd.total.item() == pytest.approx(kd_loss(S, T_, 2.0).item(), rel=1e-6)
    mixed = hybrid_loss(S, T_, labels, alpha=0.3, beta=0.7, temperature=2.0)
    assert mixed.total.item() == pytest.approx(0.3 * kd_loss(S, T_, 2.0).item() + 0.7 * ce.item(), rel=1e-6)


def test_batch_without_labels_gives_kd_only_and_no_nan():
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    parts = hybrid_loss(s, t, torch.full((4,), -100), alpha=0.5, beta=0.5, temperature=2.0)
    assert torch.isfinite(parts.total)
    assert parts.ce.item() == 0.0
    assert parts.total.item() == pytest.approx(0.5 * kd_loss(s, t, 2.0).item(), rel=1e-6)
    parts.total.backward()
    assert torch.isfinite(s.grad).all()


def test_ignored_labels_do_not_count_in_the_ce_mean():
    s = torch.randn(4, 3)
    labels = torch.tensor([0, -100, 2, -100])
    parts = hybrid_loss(s, None, labels, alpha=0.0, beta=1.0, temperature=1.0)
    assert parts.ce.item() == pytest.approx(F.cross_entropy(s[[0, 2]], labels[[0, 2]]).item(), rel=1e-6)


def test_global_denominators_make_micro_batches_add_up_to_the_full_batch():
    torch.manual_seed(0)
    s, t = torch.randn(8, 4), torch.randn(8, 4)
    labels = torch.tensor([0, -100, -100, -100, 1, 2, 3, -100])
    full = hybrid_loss(s, t, labels, alpha=0.5, beta=0.5, temperature=2.0)
    halves = [hybrid_loss(s[i:i + 4], t[i:i + 4], labels[i:i + 4], alpha=0.5, beta=0.5, temperature=2.0,
                          kd_denominator=8, ce_denominator=4) for i in (0, 4)]
    assert sum(h.total for h in halves).item() == pytest.approx(full.total.item(), rel=1e-6)
