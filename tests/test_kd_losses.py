"""The standard-KD losses of Table 3 against independent computations: numpy softmax/KL for
KD, a loop over channels for AT, a Monte Carlo estimate of E[x | x < 0] for Overhaul's
margin and an element loop for its partial L2, finite differences for Jacobian matching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refilled.losses import at_loss, fitnet_loss, jacobian_loss, kd_loss, overhaul_margins, overhaul_partial_l2


def _np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss_against_numpy(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    log_p_t, log_p_s = _np_log_softmax(t.double().numpy() / T), _np_log_softmax(s.double().numpy() / T)
    want = T**2 * np.mean([sum(np.exp(log_p_t[i, k]) * (log_p_t[i, k] - log_p_s[i, k]) for k in range(5))
                           for i in range(6)])
    assert kd_loss(s, t, T=T).item() == pytest.approx(want, rel=1e-5)
    assert kd_loss(t, t, T=T).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_gradient_only_to_student_and_shape_check():
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    kd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(torch.randn(4, 3), torch.randn(4, 5))


def test_at_loss_against_channel_loop():
    g = torch.Generator().manual_seed(1)
    shapes = [((3, 4, 8, 8), (3, 6, 8, 8)), ((3, 5, 4, 4), (3, 2, 4, 4))]
    s = [torch.randn(*a, generator=g) for a, _ in shapes]
    t = [torch.randn(*b, generator=g) for _, b in shapes]
    want = 0.0
    for fs, ft in zip(s, t):
        def att(f):
            B, C, H, W = f.shape
            a = np.zeros((B, H * W))
            for c in range(C):
                a += np.abs(f[:, c].double().numpy().reshape(B, -1)) ** 2 / C
            return a / np.linalg.norm(a, axis=1, keepdims=True)
        want += np.mean((att(fs) - att(ft)) ** 2)
    assert at_loss(s, t).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="same B, H, W"):
        at_loss([torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 8, 8)])


def test_overhaul_margin_matches_monte_carlo():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 1.0]))   # |gamma| is the std
        bn.bias.copy_(torch.tensor([0.0, 1.0, -0.3, 5.0]))     # channel 3: P(x < 0) < 0.001
    margins = overhaul_margins(bn)
    rng = np.random.default_rng(0)
    for c in range(3):
        x = rng.normal(bn.bias[c].item(), abs(bn.weight[c].item()), 2_000_000)
        assert margins[c].item() == pytest.approx(x[x < 0].mean(), abs=5e-3)
    assert margins[3].item() == pytest.approx(-3.0)
    assert (margins[:3] < 0).all()


def test_overhaul_partial_l2_against_loop():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    margin = torch.tensor([-0.5, -0.1, -1.0])
    want = 0.0
    for idx in np.ndindex(*s.shape):
        target = max(t[idx].item(), margin[idx[1]].item())
        if s[idx].item() > target or target > 0:
            want += (s[idx].item() - target) ** 2
    assert overhaul_partial_l2(s, t, margin).item() == pytest.approx(want, rel=1e-5)
    # a student below a non-positive target costs nothing
    assert overhaul_partial_l2(torch.full((1, 1, 1, 1), -2.0), torch.full((1, 1, 1, 1), -3.0),
                               torch.tensor([-1.0])).item() == 0.0


def test_fitnet_loss_against_numpy():
    g = torch.Generator().manual_seed(3)
    reg = nn.Conv2d(4, 6, 1, bias=False)
    s, t = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 6, 3, 3, generator=g)
    w = reg.weight.detach().double().numpy()[:, :, 0, 0]
    r = np.einsum("oc,bchw->bohw", w, s.double().numpy())
    want = 0.5 * np.mean((r - t.double().numpy()) ** 2)
    assert fitnet_loss(s, t, reg).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        fitnet_loss(s, torch.randn(2, 5, 3, 3), reg)


def _small_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double()


def _fd_normalised_gradient(net, x, label, eps=1e-6):
    """Central differences of net(x)[label] in every input coordinate, L2-normalised."""
    flat = x.detach().flatten().clone()
    grad = np.zeros(flat.numel())
    for j in range(flat.numel()):
        for sign in (1, -1):
            xp = flat.clone()
            xp[j] += sign * eps
            grad[j] += sign * net(xp.view_as(x)[None])[0, label].item() / (2 * eps)
    return grad / np.linalg.norm(grad)


def test_jacobian_loss_against_finite_differences():
    student, teacher = _small_net(0), _small_net(1)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([2, 0])
    want = np.mean([np.sum((_fd_normalised_gradient(student, x[i], y[i].item())
                            - _fd_normalised_gradient(teacher, x[i], y[i].item())) ** 2) for i in range(2)])
    xr = x.clone().requires_grad_()
    loss = jacobian_loss(xr, student(xr), teacher(xr), y)
    assert loss.item() == pytest.approx(want, rel=1e-4)
    # the double backward reaches the student's weights and matches finite differences of the loss
    loss.backward()
    w = student[0].weight
    analytic = w.grad[0, 0, 1, 1].item()
    eps = 1e-3   # the loss is computed in fp32: a larger step keeps rounding below the tolerance
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            w[0, 0, 1, 1] += sign * eps
        xr = x.clone().requires_grad_()
        values.append(jacobian_loss(xr, student(xr), teacher(xr), y).item())
        with torch.no_grad():
            w[0, 0, 1, 1] -= sign * eps
    assert analytic == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-2)
    with pytest.raises(ValueError, match="require grad"):
        jacobian_loss(x, student(x), teacher(x), y)
