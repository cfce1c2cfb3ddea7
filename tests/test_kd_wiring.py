"""Table 3's methods: each term is its loss function with the method's own (non-default)
hyper-parameters, and Overhaul's teacher BNs use batch statistics without moving."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refilled.losses import at_loss, fitnet_loss, jacobian_loss, kd_loss, overhaul_margins, overhaul_partial_l2
from refilled.methods import get
from refilled.models import build_model


def data(b=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(b // classes)
    return torch.randn(b, 3, 16, 16, generator=g) + y.view(-1, 1, 1, 1) * 0.5, y


def method(name, values=None, classes=4):
    torch.manual_seed(0)
    student, teacher = build_model("wrn-10-1", classes), build_model("wrn-10-2", classes).eval()
    entry = get(name)
    return entry.build(student, teacher, entry.resolve(values or {})).eval(), student, teacher


def test_kd_terms_carry_alpha_and_T():
    m, student, teacher = method("kd", {"T": 3, "alpha": 0.7})
    x, y = data()
    logits, terms = m.loss(x, y)
    with torch.no_grad():
        t = teacher(x).logits
    assert terms["kd"].item() == pytest.approx(0.7 * kd_loss(logits, t, 3.0).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.3 * F.cross_entropy(logits, y).item(), rel=1e-6)


def test_at_term_is_beta_times_the_attention_loss_of_the_group_outputs():
    m, student, teacher = method("at", {"beta": 250, "p": 2})
    x, y = data()
    _, terms = m.loss(x, y)
    with torch.no_grad():
        want = 250 * at_loss(student(x).features, teacher(x).features)
    assert terms["at"].item() == pytest.approx(want.item(), rel=1e-6) and want.item() > 0


def test_fitnet_hint_regresses_the_middle_group_and_trains_nothing_after_it():
    m, student, teacher = method("fitnet-hint")
    x, y = data()
    m.train()
    _, terms = m.loss(x, y)
    assert set(terms) == {"hint"}
    terms["hint"].backward()
    assert student.groups[1][0].conv1.weight.grad is not None and m.regressor.weight.grad is not None
    assert student.groups[2][0].conv1.weight.grad is None and student.head.weight.grad is None
    m.eval()
    with torch.no_grad():
        want = fitnet_loss(student(x).features[1], teacher(x).features[1], m.regressor)
        assert m.loss(x, y)[1]["hint"].item() == pytest.approx(want.item(), rel=1e-6)


def test_jacobian_term_carries_its_weight():
    m, student, teacher = method("jacobian", {"weight": 3})
    x, y = data()
    _, terms = m.loss(x, y)
    xr = x.clone().requires_grad_()
    want = 3 * jacobian_loss(xr, student(xr).logits, teacher(xr).logits, y)
    assert terms["jacobian"].item() == pytest.approx(want.item(), rel=1e-5) and "kd" not in terms


def test_overhaul_teacher_bns_use_batch_statistics_and_stay_unchanged():
    m, student, teacher = method("overhaul", {"scale": 0.01})
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    margins = [overhaul_margins(bn) for bn in teacher.bn_before_relu()]
    for i, margin in enumerate(margins):
        assert torch.equal(getattr(m, f"margin{i}"), margin)
    x, y = data()
    m.train()
    assert all(bn.training for bn in teacher.modules() if isinstance(bn, nn.BatchNorm2d))
    _, terms = m.loss(x, y)
    # the reference: a copy of the teacher in training mode (batch statistics), fresh student outputs
    ref_teacher = build_model("wrn-10-2", 4)
    ref_teacher.load_state_dict(before)
    ref_teacher.train()
    with torch.no_grad():
        t_pre = ref_teacher(x).pre_relu
        s_pre = student(x).pre_relu   # student in train mode too (BN stats move again: values unchanged)
        want = sum(overhaul_partial_l2(c(s), t, mg) / 2 ** (2 - i)
                   for i, (c, s, t, mg) in enumerate(zip(m.connectors, s_pre, t_pre, margins)))
    assert terms["distill"].item() == pytest.approx(0.01 * want.item() / len(y), rel=1e-5)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher {k} moved"
    m.eval()
    assert not any(bn.training for bn in teacher.modules() if isinstance(bn, nn.BatchNorm2d))
