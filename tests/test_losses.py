"""Tests for refilled.losses against independent oracles.

Oracles: pytorch-metric-learning's TripletMarginMiner for mining; explicit Python/numpy
loops (float64) for every loss; the supplement's Eq. 2 (Bernoulli form) and Eq. 4-5
(rectification + contrastive decomposition) for comparison matching.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refilled.losses import (
    _keep_closest,
    _tuple_kl_from_distances,
    _tuple_log_probs,
    aml_loss,
    comparison_matching_loss,
    local_distillation_loss,
    pairwise_distances,
    rkd_loss,
    rkd_terms,
    semihard_mask,
    semihard_triplets,
)

try:    # only the comparison with pytorch-metric-learning's miner needs it
    from pytorch_metric_learning import distances as pml_distances, miners as pml_miners
except ImportError:
    pml_distances = pml_miners = None
needs_pml = pytest.mark.skipif(pml_miners is None, reason="pytorch-metric-learning is not installed (miner comparison)")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _as_set(a, p, n):
    return set(zip(a.tolist(), p.tolist(), n.tolist()))


def _pml_set(emb, labels, margin=0.2):
    miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")
    return _as_set(*miner(emb, labels))


def _random_labels(rng, B):
    """Label sets with repeated classes, singletons, or one class."""
    kind = rng.integers(0, 4)
    if kind == 0:  # a few classes, repeated
        return rng.integers(0, max(1, rng.integers(1, 6)), size=B)
    if kind == 1:  # many classes: plenty of singletons
        return rng.integers(0, B + 1, size=B)
    if kind == 2:  # a couple of big classes plus explicit singletons
        lab = rng.integers(0, 2, size=B)
        k = rng.integers(0, B // 2 + 1)
        lab[:k] = 100 + np.arange(k)
        return rng.permutation(lab)
    return np.zeros(B, dtype=np.int64) + 7  # single class: no triplets


def _np_unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_dist(x):
    u = _np_unit(x)
    return np.sqrt(((u[:, None, :] - u[None, :, :]) ** 2).sum(-1))


def _np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max()
    return z - (m + math.log(np.exp(z - m).sum()))


def _brute_tuples(ds, labels, margin, k_hat):
    """Explicit loops: for each (a, p) the semi-hard negatives, sorted by d_s(a, n)."""
    B = len(labels)
    out = []
    for a in range(B):
        for p in range(B):
            if a == p or labels[a] != labels[p]:
                continue
            negs = []
            for n in range(B):
                if labels[n] == labels[a]:
                    continue
                gap = ds[a, n] - ds[a, p]
                if 0 < gap <= margin:
                    negs.append(n)
            if not negs:
                continue
            negs.sort(key=lambda n: ds[a, n])
            if k_hat is not None:
                negs = negs[:k_hat]
            out.append((a, p, negs))
    return out


def _brute_loss(ds, dt, labels, tau, margin, k_hat):
    tuples = _brute_tuples(ds, labels, margin, k_hat)
    if not tuples:
        return 0.0, 0
    total = 0.0
    for a, p, negs in tuples:
        idx = [p] + negs
        ls = _np_log_softmax([-ds[a, j] / tau for j in idx])
        lt = _np_log_softmax([-dt[a, j] / tau for j in idx])
        pt = np.exp(lt)
        total += float((pt * (lt - ls)).sum())
    return total / len(tuples), len(tuples)


def _draw_far_from_boundaries(seed, B, D, Dt, n_classes, margin, tol=1e-4):
    """Random embeddings whose gaps d(a,n) - d(a,p) stay clear of 0 and of the margin,
    so float32 (code) and float64 (oracle) mine the same tuples."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        s = rng.normal(size=(B, D))
        t = rng.normal(size=(B, Dt))
        labels = rng.integers(0, n_classes, size=B)
        ds = _np_dist(s)
        gaps = ds[:, None, :] - ds[:, :, None]
        near = (np.abs(gaps) < tol) | (np.abs(gaps - margin) < tol)
        # only the (a, p, n) with distinct a, p, n matter
        idx = np.arange(B)
        near[idx, idx, :] = False
        near[idx, :, idx] = False
        near[:, idx, idx] = False
        if not near.any():
            return s, t, labels
    raise RuntimeError("could not draw data clear of the mining boundaries")


# --------------------------------------------------------------------------------------
# semi-hard mining
# --------------------------------------------------------------------------------------


@needs_pml
def test_semihard_triplets_match_pml_miner_many_seeds():
    total = 0
    n_cases = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        B = int(rng.integers(2, 65))
        D = int(rng.integers(2, 33))
        labels = torch.as_tensor(_random_labels(rng, B))
        # scale the embeddings: normalisation must remove it
        emb = torch.as_tensor(rng.normal(size=(B, D)) * rng.uniform(0.1, 10), dtype=torch.float32)
        ours = _as_set(*semihard_triplets(emb, labels, margin=0.2))
        ref = _pml_set(emb, labels, margin=0.2)
        assert ours == ref, f"seed {seed}: B={B} D={D}"
        dense = semihard_mask(pairwise_distances(emb), labels, 0.2)
        assert dense.shape == (B, B, B) and dense.dtype == torch.bool
        assert _as_set(*dense.nonzero(as_tuple=True)) == ref
        total += len(ref)
        n_cases += 1
    assert total > 1000  # the comparison is not vacuous


@pytest.mark.parametrize(
    "labels",
    [
        [3] * 12,  # a single class: no negatives
        list(range(12)),  # all singletons: no positives
        [0, 1],  # B = 2
        [0, 0, 1],  # one positive pair, one singleton negative
        [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9],
    ],
)
@needs_pml
def test_semihard_triplets_edge_label_sets(labels):
    labels = torch.tensor(labels)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        emb = torch.randn(len(labels), 3, generator=g)
        assert _as_set(*semihard_triplets(emb, labels)) == _pml_set(emb, labels)


@pytest.mark.parametrize("labels", [[3] * 12, list(range(12))])
def test_semihard_triplets_without_positives_or_negatives_are_empty(labels):
    labels = torch.tensor(labels)
    a, p, n = semihard_triplets(torch.randn(len(labels), 4), labels)
    assert a.numel() == p.numel() == n.numel() == 0


def _fixed_distance(mat):
    """A pml distance returning a given matrix: lets the miner judge exact boundary gaps."""

    class FixedDistance(pml_distances.BaseDistance):
        def __init__(self):
            super().__init__(normalize_embeddings=False)

        def compute_mat(self, query_emb, ref_emb):
            return mat.clone()

    return FixedDistance()


def _boundary_case():
    """Distances chosen so that gaps are exactly 0, exactly the margin (0.25, exact in
    binary), inside, and beyond."""
    margin = 0.25
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    d = torch.zeros(6, 6)
    vals = {(0, 1): 0.5, (0, 2): 0.5, (0, 3): 0.75, (0, 4): 0.625, (0, 5): 1.0,
            (1, 2): 0.25, (1, 3): 0.5, (1, 4): 1.5, (1, 5): 0.375,
            (2, 3): 0.5, (2, 4): 0.75, (2, 5): 0.5, (3, 4): 0.25, (3, 5): 1.0, (4, 5): 0.75}
    for (i, j), v in vals.items():
        d[i, j] = d[j, i] = v
    return d, labels, margin


@needs_pml
def test_semihard_mask_boundaries_match_pml():
    """Strictness at both ends of the semi-hard band as the pml miner (the oracle) decides it."""
    d, labels, margin = _boundary_case()
    miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=_fixed_distance(d))
    ref = _as_set(*miner(torch.zeros(6, 2), labels))
    ours = _as_set(*semihard_mask(d, labels, margin).nonzero(as_tuple=True))
    assert ours == ref


def test_semihard_mask_boundaries():
    d, labels, margin = _boundary_case()
    ours = _as_set(*semihard_mask(d, labels, margin).nonzero(as_tuple=True))
    # explicit: gap 0 excluded, gap == margin included
    assert (0, 1, 2) not in ours  # 0.5 - 0.5 = 0
    assert (0, 1, 3) in ours  # 0.75 - 0.5 = 0.25 = margin
    assert (0, 1, 4) in ours
    assert (0, 1, 5) not in ours  # 0.5 > margin


# --------------------------------------------------------------------------------------
# comparison matching
# --------------------------------------------------------------------------------------

TAU = 4.0
MARGIN = 0.2


@pytest.mark.parametrize("k_hat", [None, 1, 2, 5])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_comparison_matching_equals_brute_force(k_hat, seed):
    # small spread so many negatives are semi-hard (K' often > 5)
    s, t, labels = _draw_far_from_boundaries(seed, B=24, D=6, Dt=11, n_classes=3, margin=MARGIN)
    ds, dt = _np_dist(s), _np_dist(t)
    ref, n_tuples = _brute_loss(ds, dt, labels, TAU, MARGIN, k_hat)
    assert n_tuples > 0
    got = comparison_matching_loss(
        torch.tensor(s, dtype=torch.float32),
        torch.tensor(t, dtype=torch.float32),
        torch.tensor(labels),
        tau=TAU,
        margin=MARGIN,
        k_hat=k_hat,
    )
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(ref, rel=2e-4, abs=1e-7)


def test_k_hat_truncation_is_exercised():
    s, t, labels = _draw_far_from_boundaries(0, B=24, D=6, Dt=11, n_classes=3, margin=MARGIN)
    tuples = _brute_tuples(_np_dist(s), labels, MARGIN, None)
    assert max(len(n) for _, _, n in tuples) > 5
    losses = {
        k: comparison_matching_loss(
            torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32),
            torch.tensor(labels), k_hat=k,
        ).item()
        for k in (None, 1, 2, 5)
    }
    assert len({round(v, 9) for v in losses.values()}) == 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k_hat_1_equals_bernoulli_form(seed):
    s, t, labels = _draw_far_from_boundaries(10 + seed, B=20, D=5, Dt=7, n_classes=3, margin=MARGIN)
    ds, dt = _np_dist(s), _np_dist(t)
    # independent mining for the triplet form: closest semi-hard negative per (a, p)
    total, count = 0.0, 0
    for a in range(len(labels)):
        for p in range(len(labels)):
            if a == p or labels[a] != labels[p]:
                continue
            cands = [n for n in range(len(labels))
                     if labels[n] != labels[a] and 0 < ds[a, n] - ds[a, p] <= MARGIN]
            if not cands:
                continue
            n = min(cands, key=lambda j: ds[a, j])
            sig = lambda x: 1.0 / (1.0 + math.exp(-x))
            pt = sig((dt[a, n] - dt[a, p]) / TAU)
            ps = sig((ds[a, n] - ds[a, p]) / TAU)
            total += pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
            count += 1
    assert count > 0
    got = comparison_matching_loss(
        torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32),
        torch.tensor(labels), tau=TAU, margin=MARGIN, k_hat=1,
    )
    assert got.item() == pytest.approx(total / count, rel=2e-4, abs=1e-8)


def test_padding_never_gets_probability():
    g = torch.Generator().manual_seed(0)
    B = 7
    d = torch.rand(B, B, generator=g) * 2
    keep = torch.rand(B, B, B, generator=g) < 0.3
    # extreme values everywhere a padded entry reads its distance would dominate a softmax
    d_extreme = d.clone()
    d_extreme[:, 0] = -1e6
    keep[:, :, 0] = False  # column 0 is never a kept negative
    keep[:, 0, :] = False  # ...and never a positive (its d(a, 0) only appears as padding)
    for dist in (d, d_extreme):
        logp, support = _tuple_log_probs(dist, keep, tau=TAU)
        p = logp.exp()
        assert torch.all(p[~support] == 0)
        assert torch.all(torch.isfinite(logp[support]))
        assert torch.allclose(p.sum(-1), torch.ones(B, B), atol=1e-6)
        assert torch.equal(support.sum(-1), keep.sum(-1) + 1)  # exactly K + 1 entries
    lp1, _ = _tuple_log_probs(d, keep, TAU)
    lp2, _ = _tuple_log_probs(d_extreme, keep, TAU)
    # rows p >= 1 never read column 0 except as padding: identical distributions
    assert torch.equal(lp1[:, 1:], lp2[:, 1:])
    # and the KL: value unchanged, gradient to padded distances exactly zero, no NaN
    for dist in (d, d_extreme):
        leaf = dist.clone().requires_grad_(True)
        kl, valid = _tuple_kl_from_distances(leaf, (d * 0.7).flip(0), keep, TAU)
        kl.sum().backward()
        assert torch.all(torch.isfinite(leaf.grad))
        assert torch.all(leaf.grad[:, 0] == 0)


@pytest.mark.parametrize("labels", [[1] * 10, list(range(10))])
def test_zero_tuples_gives_connected_zero(labels):
    s = torch.randn(10, 6, requires_grad=True)
    t = torch.randn(10, 9)
    loss = comparison_matching_loss(s, t, torch.tensor(labels))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert s.grad is not None
    assert torch.all(torch.isfinite(s.grad)) and torch.all(s.grad == 0)


def test_duplicate_embeddings_no_nan():
    s = torch.randn(8, 5)
    s[1] = s[0]  # identical pair: zero distance
    s[4] = s[3]
    s.requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 2, 2])
    loss = comparison_matching_loss(s, torch.randn(8, 3), labels, k_hat=2)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(s.grad))


@pytest.mark.parametrize("k_hat", [None, 1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_equals_rectification_plus_contrastive(k_hat, seed):
    """Supplement Eq. 4-5: grad KL(p_T||p_S) = grad[-sum (p_T - e0) log p_S]
    + grad[ln(1 + sum_k exp((d_ap - d_an_k)/tau))], w.r.t. the student distances."""
    s, t, labels = _draw_far_from_boundaries(20 + seed, B=16, D=5, Dt=8, n_classes=3, margin=MARGIN)
    d_s0 = pairwise_distances(torch.tensor(s, dtype=torch.float32)).double()
    d_t = pairwise_distances(torch.tensor(t, dtype=torch.float32)).double()
    lab = torch.tensor(labels)
    mask = semihard_mask(d_s0, lab, MARGIN)
    keep = _keep_closest(mask, d_s0, k_hat)

    # code under test, on leaf distances
    d_s = d_s0.clone().requires_grad_(True)
    kl, valid = _tuple_kl_from_distances(d_s, d_t, keep, TAU)
    assert valid.sum() > 0
    loss = (kl * valid).sum() / valid.sum()
    (g_code,) = torch.autograd.grad(loss, d_s)

    # reference: explicit tuples, Eq. 4-5
    d_r = d_s0.clone().requires_grad_(True)
    terms, ents = [], []
    for a, p in valid.nonzero().tolist():
        negs = keep[a, p].nonzero().flatten().tolist()
        ds_t = torch.stack([d_r[a, p]] + [d_r[a, n] for n in negs])
        dt_t = torch.stack([d_t[a, p]] + [d_t[a, n] for n in negs])
        logp_s = torch.log_softmax(-ds_t / TAU, 0)
        p_t = torch.softmax(-dt_t / TAU, 0)
        e0 = torch.zeros_like(p_t)
        e0[0] = 1
        rect = -((p_t - e0) * logp_s).sum()
        contrast = torch.log1p(torch.exp((ds_t[0] - ds_t[1:]) / TAU).sum())
        terms.append(rect + contrast)
        ents.append((p_t * torch.log(p_t)).sum())
    ref = torch.stack(terms).mean()
    (g_ref,) = torch.autograd.grad(ref, d_r)
    assert torch.allclose(g_code, g_ref, atol=1e-10, rtol=1e-7)
    assert g_ref.abs().sum() > 0
    # the dropped constant is the teacher's negative entropy
    assert loss.item() == pytest.approx(ref.item() + torch.stack(ents).mean().item(), rel=1e-9)


def test_teacher_gets_no_gradient_and_widths_may_differ():
    s = torch.randn(16, 4, requires_grad=True)
    t = torch.randn(16, 13, requires_grad=True)
    labels = torch.arange(16) % 3
    loss = comparison_matching_loss(s, t, labels)
    loss.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_bad_k_hat_raises():
    with pytest.raises(ValueError):
        comparison_matching_loss(torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), k_hat=0)


# --------------------------------------------------------------------------------------
# local distillation (stage 2)
# --------------------------------------------------------------------------------------


def _np_local(student_logits, teacher_emb, centers, labels, tau, lam, weighting):
    C = student_logits.shape[1]
    present = sorted(set(labels.tolist()))
    c = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    lam_i, kls, probs = [], [], []
    for i in range(len(labels)):
        zt = np.array([teacher_emb[i] @ c[k] for k in present]) / tau
        zs = np.array([student_logits[i, k] for k in present]) / tau
        lt, ls = _np_log_softmax(zt), _np_log_softmax(zs)
        pt = np.exp(lt)
        kls.append(float((pt * (lt - ls)).sum()))
        p_true = pt[present.index(int(labels[i]))]
        lam_i.append({"true-class": lam * p_true, "constant": lam, "none": 0.0}[weighting])
        full = np.zeros(C)
        full[present] = pt
        probs.append(full)
    lam_i = np.array(lam_i)
    return tau**2 * float(np.mean(lam_i * np.array(kls))), lam_i


def _stage2_data(seed, B=12, C=7, Dt=9):
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 2, 3, 6], size=B)  # classes 1, 4, 5 absent
    return (
        rng.normal(size=(B, C)) * 3,
        rng.normal(size=(B, Dt)) * 2,
        rng.normal(size=(C, Dt)),
        labels,
    )


@pytest.mark.parametrize("weighting", ["true-class", "constant", "none"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_distillation_equals_loop(weighting, seed):
    sl, te, ce, lab = _stage2_data(seed)
    ref, ref_lam = _np_local(sl, te, ce, lab, tau=2.0, lam=2.0, weighting=weighting)
    f = lambda x: torch.tensor(x, dtype=torch.float32)
    loss, lam_i = local_distillation_loss(f(sl), f(te), f(ce), torch.tensor(lab), tau=2.0, lam=2.0,
                                          weighting=weighting, kl_scale="tau2")
    assert lam_i.shape == (len(lab),)
    assert np.allclose(lam_i.numpy(), ref_lam, rtol=1e-5, atol=1e-7)
    assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-7)
    if weighting == "none":
        assert loss.item() == 0.0 and torch.all(lam_i == 0)
    if weighting == "constant":
        assert torch.all(lam_i == 2.0)


def test_lambda_with_lam_1_in_unit_interval_and_detached():
    sl, te, ce, lab = _stage2_data(5, B=40)
    s = torch.tensor(sl, dtype=torch.float32, requires_grad=True)
    t = torch.tensor(te, dtype=torch.float32, requires_grad=True)
    loss, lam_i = local_distillation_loss(s, t, torch.tensor(ce, dtype=torch.float32),
                                          torch.tensor(lab), lam=1.0, weighting="true-class")
    assert torch.all(lam_i > 0) and torch.all(lam_i <= 1)
    assert not lam_i.requires_grad
    loss.backward()
    assert t.grad is None


def test_absent_classes_get_no_probability():
    sl, te, ce, lab = _stage2_data(3)
    absent = [1, 4, 5]
    f = lambda x: torch.tensor(x, dtype=torch.float32)
    base, _ = local_distillation_loss(f(sl), f(te), f(ce), torch.tensor(lab), weighting="true-class")
    for val in (1e4, -1e4):
        sl2 = sl.copy()
        sl2[:, absent] = val
        ce2 = ce.copy()
        ce2[absent] = ce2[absent] * -50  # teacher centres of absent classes changed too
        s = f(sl2).requires_grad_(True)
        loss, _ = local_distillation_loss(s, f(te), f(ce2), torch.tensor(lab), weighting="true-class")
        assert loss.item() == pytest.approx(base.item(), rel=1e-6)
        loss.backward()
        assert torch.all(s.grad[:, absent] == 0)
        assert torch.all(torch.isfinite(s.grad))


def test_bad_weighting_raises():
    sl, te, ce, lab = _stage2_data(0)
    f = lambda x: torch.tensor(x, dtype=torch.float32)
    with pytest.raises(ValueError, match="confidence.*true-class.*constant.*none"):
        local_distillation_loss(f(sl), f(te), f(ce), torch.tensor(lab), weighting="fixed")


# --------------------------------------------------------------------------------------
# RKD
# --------------------------------------------------------------------------------------


def _np_smooth_l1(x, y):
    z = np.abs(x - y)
    return float(np.where(z < 1, 0.5 * z**2, z - 0.5).mean())


def _np_rkd(s, t):
    def dist(e):
        n = len(e)
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        return d / d[~np.eye(n, dtype=bool)].mean()

    def angles(e):
        n = len(e)
        out = np.zeros((n, n, n))
        for j in range(n):  # vertex
            for i in range(n):
                for k in range(n):
                    if i == j or k == j:
                        continue
                    eij = (e[i] - e[j]) / np.linalg.norm(e[i] - e[j])
                    ekj = (e[k] - e[j]) / np.linalg.norm(e[k] - e[j])
                    out[j, i, k] = eij @ ekj
        return out

    return _np_smooth_l1(dist(s), dist(t)), _np_smooth_l1(angles(s), angles(t))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rkd_against_numpy(seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(5, 3))
    t = rng.normal(size=(5, 4)) * 3  # different width and scale
    ref_d, ref_a = _np_rkd(s, t)
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float32, requires_grad=True)
    d, a = rkd_terms(st, tt)
    assert d.item() == pytest.approx(ref_d, rel=1e-4, abs=1e-7)
    assert a.item() == pytest.approx(ref_a, rel=1e-4, abs=1e-7)
    assert ref_d > 1e-3 and ref_a > 1e-3
    loss = rkd_loss(st, tt)
    assert loss.item() == pytest.approx(25 * ref_d + 50 * ref_a, rel=1e-4)
    loss.backward()
    assert tt.grad is None and torch.all(torch.isfinite(st.grad))


def test_rkd_scale_invariant_distance_and_zero_for_identical():
    s = torch.randn(6, 4)
    d, a = rkd_terms(s, s * 3.0)
    assert d.item() == pytest.approx(0.0, abs=1e-6) and a.item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------
# AML
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_aml_against_loop(seed):
    torch.manual_seed(seed)
    B, Ds, Dt, margin = 9, 5, 7, 1.2    # random unit vectors in 7-d are ~1.4 apart: some negatives inside
    s = torch.randn(B, Ds, requires_grad=True)
    t = torch.randn(B, Dt, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0])
    proj = torch.nn.Linear(Ds, Dt)
    loss = aml_loss(s, t, labels, proj, margin=margin)
    with torch.no_grad():
        q = proj(s).double().numpy()
    tn = t.detach().double().numpy()
    total, pairs, n_pos, n_neg, n_active_neg = 0.0, 0, 0, 0, 0
    for i in range(B):
        qi = q[i] / np.linalg.norm(q[i])
        for j in range(B):  # j == i (the teacher's view of the same image) is a positive
            tj = tn[j] / np.linalg.norm(tn[j])
            d = np.linalg.norm(qi - tj)
            if labels[i] == labels[j]:
                total += d**2
                n_pos += 1
            else:
                total += max(margin - d, 0.0) ** 2
                n_neg += 1
                n_active_neg += margin - d > 0
            pairs += 1
    assert loss.item() == pytest.approx(total / pairs, rel=1e-5)
    assert n_pos > 0
    assert 0 < n_active_neg < n_neg, (n_active_neg, n_neg)   # the hinge is both on and off somewhere
    loss.backward()
    assert t.grad is None and proj.weight.grad is not None and s.grad is not None


def test_aml_margin_term_active():
    # teacher == projected student for a negative pair with d < margin contributes
    B = 4
    t = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    proj = torch.nn.Identity()
    labels = torch.tensor([0, 1, 2, 3])  # all negatives
    loss = aml_loss(t.clone(), t, labels, proj, margin=0.7)
    u = F.normalize(t, dim=1)
    d01 = (u[0] - u[1]).norm().item()
    assert d01 < 0.7
    # the four i == j pairs are positives at distance 0
    assert loss.item() == pytest.approx(2 * (0.7 - d01) ** 2 / (B * B), rel=1e-5)


# --------------------------------------------------------------------------------------
# bf16 autocast, graph-friendliness
# --------------------------------------------------------------------------------------


def test_all_losses_under_bf16_autocast():
    torch.manual_seed(0)
    B, Ds, Dt, C = 32, 16, 24, 6
    x = torch.randn(B, 10)
    fs, ft, head = torch.nn.Linear(10, Ds), torch.nn.Linear(10, Dt), torch.nn.Linear(Ds, C)
    proj = torch.nn.Linear(Ds, Dt)
    labels = torch.arange(B) % 4
    centers = torch.randn(C, Dt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, t = fs(x), ft(x)
        assert s.dtype == torch.bfloat16
        logits = head(s)
        cm = comparison_matching_loss(s, t, labels, k_hat=3)
        ld, lam_i = local_distillation_loss(logits, t, centers, labels, teacher_logits=head(s))
        rk = rkd_loss(s, t)
        am = aml_loss(s, t, labels, proj)
    for v in (cm, ld, rk, am, lam_i):
        assert v.dtype == torch.float32
        assert torch.all(torch.isfinite(v))
    # the maths is fp32: same value as fp32 on the upcast bf16 inputs
    cm32 = comparison_matching_loss(s.detach().float(), t.detach().float(), labels, k_hat=3)
    assert cm.item() == pytest.approx(cm32.item(), rel=1e-6)
    (cm * 1000 + ld + rk + am).backward()
    for m in (fs, head, proj):
        assert all(torch.all(torch.isfinite(p.grad)) for p in m.parameters())


def test_stage1_has_no_host_sync_ops():
    """No nonzero / item / data-dependent shapes in the training-step path."""
    dispatch = pytest.importorskip("torch.utils._python_dispatch")

    seen = []

    class Recorder(dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    s = torch.randn(16, 8, requires_grad=True)
    t = torch.randn(16, 5)
    labels = torch.arange(16) % 3
    with Recorder():
        loss = comparison_matching_loss(s, t, labels, k_hat=2)
        loss.backward()
        local_distillation_loss(torch.randn(16, 4), t, torch.randn(4, 5), labels % 4, teacher_logits=torch.randn(16, 6))
    bad = [op for op in seen if any(k in op for k in ("nonzero", "_local_scalar_dense",
                                                      "masked_select", "unique", "bincount"))]
    assert not bad, bad
