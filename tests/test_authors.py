"""The authors' recipe (njulus/GKD), each piece against an independent computation written
from docs/method.md: numpy or per-instance Python loops, not our helpers.

- stage 2: the confidence weights lambda_i of GKD's ``wgkd`` and the local KL without tau^2;
- stage 1: one K per batch (GKD's ``utils/triplet.py``, ``merge``) over the miner's output;
- the fixed class orders of ``utils/split_class.py``;
- WRN dropout between the two convolutions of every block.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from refilled.data.splits import (CIFAR100_FINE_LABELS, SplitError, authors_class_order, check_class_names,
                                  check_split, make_split)
from refilled.losses import (K_MODES, comparison_matching_loss, confidence_weights, local_distillation_loss,
                             teacher_confidence, tuple_mask)
from refilled.models import build_model
from refilled.models.wrn import WideResNet


# ---------------------------------------------------------------------------------------------
# numpy oracles (docs/method.md, "Stage 2")
# ---------------------------------------------------------------------------------------------


def _log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max()
    return z - m - math.log(np.exp(z - m).sum())


def _np_confidence(teacher_logits, lam):
    """w_i = -log max_k p_T(k|x_i); min-max over the batch (all equal: 0); lam * 2 sigmoid(-w~)."""
    w = np.array([-np.max(_log_softmax(row)) for row in teacher_logits])
    lo, hi = min(w), max(w)
    wn = [0.0 if hi == lo else (x - lo) / (hi - lo) for x in w]
    return w, np.array([lam * 2.0 / (1.0 + math.exp(x)) for x in wn])


def _np_stage2(sl, te, ce, labels, tau, lam, weighting, tl=None, tau2_factor=False):
    present = sorted(set(int(v) for v in labels))
    c = [ce[k] / np.linalg.norm(ce[k]) for k in range(len(ce))]
    conf = _np_confidence(tl, lam)[1] if weighting == "confidence" else None
    lam_i, kls = [], []
    for i in range(len(labels)):
        lt = _log_softmax([float(te[i] @ c[k]) / tau for k in present])
        ls = _log_softmax([float(sl[i, k]) / tau for k in present])
        pt = np.exp(lt)
        kls.append(float((pt * (lt - ls)).sum()))
        lam_i.append({"confidence": lambda: conf[i], "true-class": lambda: lam * pt[present.index(int(labels[i]))],
                      "constant": lambda: lam, "none": lambda: 0.0}[weighting]())
    loss = sum(l * k for l, k in zip(lam_i, kls)) / len(labels)
    return (tau**2 if tau2_factor else 1.0) * loss, np.array(lam_i)


def _stage2_data(seed, B=14, C=7, Dt=9, Ct=5):
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 2, 3, 6], size=B)  # classes 1, 4, 5 absent from the batch
    return (rng.normal(size=(B, C)) * 3, rng.normal(size=(B, Dt)) * 2, rng.normal(size=(C, Dt)), labels,
            rng.normal(size=(B, Ct)) * 2)


def _t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# confidence weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_confidence_weights_equal_loop(seed, lam):
    tl = np.random.default_rng(seed).normal(size=(20, 6)) * 3
    w_ref, lam_ref = _np_confidence(tl, lam)
    w = teacher_confidence(_t(tl))
    got = confidence_weights(_t(tl), lam)
    assert w.shape == (20,) and got.shape == (20,)
    assert np.allclose(w.numpy(), w_ref, rtol=1e-5, atol=1e-6)
    assert np.allclose(got.numpy(), lam_ref, rtol=1e-5, atol=1e-6)
    # the most confident instance gets lam, the least confident lam * 2 sigmoid(-1)
    assert got.max().item() == pytest.approx(lam, rel=1e-6)
    assert got.min().item() == pytest.approx(lam * 2 / (1 + math.e), rel=1e-5)


def test_confidence_weights_all_equal_and_single_instance():
    same = _t(np.tile([[1.0, -2.0, 0.5]], (6, 1)))
    for tl in (same, _t([[0.3, 2.0, -1.0, 4.0]])):
        w_ref, lam_ref = _np_confidence(tl.numpy(), 2.0)
        got = confidence_weights(tl, 2.0)
        assert torch.all(torch.isfinite(got))
        assert np.allclose(got.numpy(), lam_ref) and torch.all(got == 2.0)
        assert np.allclose(teacher_confidence(tl).numpy(), w_ref, rtol=1e-5)


def test_confidence_weights_detached_and_without_host_sync():
    from host_sync import OpRecorder

    tl = torch.randn(8, 5, requires_grad=True)
    with OpRecorder() as rec:
        lam_i = confidence_weights(tl, 1.0)
        w = teacher_confidence(tl)
    assert not lam_i.requires_grad and not w.requires_grad
    assert rec.ops and not rec.bad(), rec.bad()


# ---------------------------------------------------------------------------------------------
# stage-2 loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["confidence", "true-class", "constant", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_stage2_at_tau_1_has_no_tau2_factor(weighting, seed):
    sl, te, ce, lab, tl = _stage2_data(seed)
    ref, ref_lam = _np_stage2(sl, te, ce, lab, 1.0, 2.0, weighting, tl)
    loss, lam_i = local_distillation_loss(_t(sl), _t(te), _t(ce), torch.tensor(lab), weighting=weighting,
                                          teacher_logits=_t(tl))   # defaults: tau 1, lam 2, kl_scale none
    assert lam_i.shape == (len(lab),) and not lam_i.requires_grad
    assert np.allclose(lam_i.numpy(), ref_lam, rtol=1e-5, atol=1e-7)
    assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-7)
    if weighting != "none":
        assert loss.item() > 0


def test_stage2_default_weighting_is_confidence():
    sl, te, ce, lab, tl = _stage2_data(4)
    ref, _ = _np_stage2(sl, te, ce, lab, 1.0, 2.0, "confidence", tl)
    loss, _ = local_distillation_loss(_t(sl), _t(te), _t(ce), torch.tensor(lab), teacher_logits=_t(tl))
    assert loss.item() == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("tau", [2.0, 0.5])
@pytest.mark.parametrize("weighting", ["confidence", "true-class", "constant"])
def test_stage2_tau_divides_teacher_and_student(tau, weighting):
    sl, te, ce, lab, tl = _stage2_data(7)
    ref, ref_lam = _np_stage2(sl, te, ce, lab, tau, 1.5, weighting, tl)
    loss, lam_i = local_distillation_loss(_t(sl), _t(te), _t(ce), torch.tensor(lab), tau, 1.5, weighting,
                                          teacher_logits=_t(tl))
    assert np.allclose(lam_i.numpy(), ref_lam, rtol=1e-5, atol=1e-7)
    assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("weighting", ["true-class", "constant"])
def test_kl_scale_tau2_reproduces_the_old_reading(weighting):
    """Our earlier reading: tau^2 * mean lambda_i KL, lambda_i = lam p_T(y_i) (tau-tempered)."""
    sl, te, ce, lab, _ = _stage2_data(3)
    oracle_w = weighting
    ref, ref_lam = _np_stage2(sl, te, ce, lab, 2.0, 2.0, oracle_w, tau2_factor=True)
    loss, lam_i = local_distillation_loss(_t(sl), _t(te), _t(ce), torch.tensor(lab), 2.0, 2.0, weighting,
                                          kl_scale="tau2")
    assert np.allclose(lam_i.numpy(), ref_lam, rtol=1e-5, atol=1e-7)
    assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-7)
    plain, _ = local_distillation_loss(_t(sl), _t(te), _t(ce), torch.tensor(lab), 2.0, 2.0, weighting)
    assert loss.item() == pytest.approx(4.0 * plain.item(), rel=1e-5)


def test_stage2_the_old_weighting_name_is_gone():
    """The catalog rewiring removed 'adaptive' (now 'true-class'): it is refused, naming the allowed ones."""
    sl, te, ce, lab, _ = _stage2_data(2)
    with pytest.raises(ValueError, match="'confidence', 'true-class', 'constant', 'none'; got 'adaptive'"):
        local_distillation_loss(_t(sl), _t(te), _t(ce), torch.tensor(lab), 2.0, 2.0, "adaptive")


def test_confidence_without_teacher_logits_raises():
    sl, te, ce, lab, _ = _stage2_data(0)
    with pytest.raises(ValueError, match="confidence.*teacher_logits"):
        local_distillation_loss(_t(sl), _t(te), _t(ce), torch.tensor(lab))
    with pytest.raises(ValueError, match="confidence.*teacher_logits"):
        local_distillation_loss(_t(sl), _t(te), _t(ce), torch.tensor(lab), weighting="confidence")


def test_bad_weighting_and_kl_scale_raise():
    sl, te, ce, lab, tl = _stage2_data(0)
    with pytest.raises(ValueError, match="confidence.*true-class.*constant.*none"):
        local_distillation_loss(_t(sl), _t(te), _t(ce), torch.tensor(lab), weighting="fixed")
    with pytest.raises(ValueError, match="kl_scale"):
        local_distillation_loss(_t(sl), _t(te), _t(ce), torch.tensor(lab), teacher_logits=_t(tl), kl_scale="t2")


# ---------------------------------------------------------------------------------------------
# stage 1: the authors' one K per batch, against a loop over the miner's output
# ---------------------------------------------------------------------------------------------


def _miner():
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    return miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")


def _authors_tuples(student, labels, k_hat=None):
    """GKD's merge, as a loop: group the miner's triplets by (a, p) in the miner's order,
    K = the smallest group (capped by k_hat), each group keeps its first K negatives."""
    a, p, n = _miner()(student, labels)
    groups: dict[tuple[int, int], list[int]] = {}
    for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist()):
        groups.setdefault((ai, pi), []).append(ni)
    if not groups:
        return {}, {}
    k = min(len(v) for v in groups.values())
    if k_hat is not None:
        k = min(k, k_hat)
    return {key: negs[:k] for key, negs in groups.items()}, {key: len(v) for key, v in groups.items()}


def _np_tuple_loss(student, teacher, tuples, tau):
    def dist(e, i, j):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        return float(np.linalg.norm(e[i] - e[j]))

    kls = []
    for (a, p), negs in tuples.items():
        zt = [-dist(teacher, a, p) / tau] + [-dist(teacher, a, n) / tau for n in negs]
        zs = [-dist(student, a, p) / tau] + [-dist(student, a, n) / tau for n in negs]
        lt, ls = _log_softmax(zt), _log_softmax(zs)
        kls.append(float((np.exp(lt) * (lt - ls)).sum()))
    return sum(kls) / len(kls)


def _stage1_data(seed, B=24, D=6, Dt=10, n_labels=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, D, generator=g), torch.randn(B, Dt, generator=g),
            torch.randint(0, n_labels, (B,), generator=g))


@pytest.mark.parametrize("k_hat", [None, 2])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batch_min_k_equals_loop_over_the_miner(seed, k_hat):
    s, t, labels = _stage1_data(seed)
    tuples, sizes = _authors_tuples(s, labels, k_hat)
    assert len(set(sizes.values())) > 1, "the data must give pairs with different K'"
    dense = tuple_mask(torch.cdist(*(2 * [torch.nn.functional.normalize(s, dim=1)])), labels, 0.2, k_hat,
                       "batch-min")
    got = {(int(a), int(p)): [] for a, p, _ in dense.nonzero().tolist()}
    for a, p, n in dense.nonzero().tolist():
        got[(a, p)].append(n)
    assert got == tuples
    loss = comparison_matching_loss(s, t, labels, 4.0, 0.2, k_hat, k_mode="batch-min")
    assert loss.item() == pytest.approx(_np_tuple_loss(s.numpy(), t.numpy(), tuples, 4.0), rel=1e-4, abs=1e-7)
    if k_hat is None:   # per-pair keeps every negative: another loss
        per_pair = comparison_matching_loss(s, t, labels, 4.0, 0.2, None)
        assert abs(per_pair.item() - loss.item()) > 1e-6


@pytest.mark.parametrize("k_hat", [None, 1])
def test_batch_min_k_capped_by_k_hat(k_hat):
    """Points on a circle where every pair has K' >= 2 semi-hard negatives (min 2, max 3),
    so both the batch minimum and the k_hat cap change the tuples."""
    ang = torch.tensor([0.0, 0.03, 0.06, 0.1, 0.13, 0.16])
    s = torch.stack([ang.cos(), ang.sin()], dim=1)
    t = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    tuples, sizes = _authors_tuples(s, labels, k_hat)
    assert min(sizes.values()) == 2 and max(sizes.values()) == 3
    assert {len(v) for v in tuples.values()} == {1 if k_hat == 1 else 2}
    d = torch.cdist(s, s)
    dense = tuple_mask(d, labels, 0.2, k_hat, "batch-min")
    got: dict = {}
    for a, p, n in dense.nonzero().tolist():
        got.setdefault((a, p), []).append(n)
    assert got == tuples
    loss = comparison_matching_loss(s, t, labels, 4.0, 0.2, k_hat, k_mode="batch-min")
    assert loss.item() == pytest.approx(_np_tuple_loss(s.numpy(), t.numpy(), tuples, 4.0), rel=1e-4, abs=1e-8)


def test_batch_min_without_any_tuple_is_zero():
    s = torch.randn(6, 4, requires_grad=True)
    loss = comparison_matching_loss(s, torch.randn(6, 3), torch.arange(6), k_mode="batch-min")  # no positives
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(s.grad == 0)


def test_batch_min_has_no_host_sync_and_bad_k_mode_raises():
    from host_sync import OpRecorder

    s, t, labels = _stage1_data(0)
    s.requires_grad_(True)
    with OpRecorder() as rec:
        comparison_matching_loss(s, t, labels, k_hat=3, k_mode="batch-min").backward()
    assert rec.ops and not rec.bad(), rec.bad()
    assert K_MODES == ("per-pair", "batch-min")
    with pytest.raises(ValueError, match="per-pair.*batch-min"):
        comparison_matching_loss(s, t, labels, k_mode="batch")


# ---------------------------------------------------------------------------------------------
# class orders (docs/method.md, "Split"; GKD utils/split_class.py)
# ---------------------------------------------------------------------------------------------

CIFAR_FS_VAL = ("beaver otter flatfish shark lamp television beetle butterfly sea camel cattle crab crocodile "
                "maple_tree motorcycle tractor").split()
CIFAR_FS_TEST = ("whale poppy rose sweet_pepper telephone bed table wardrobe leopard plain chimpanzee fox snail "
                 "worm baby man woman bicycle pickup_truck rocket").split()


def test_cifar100_fine_label_names():
    assert len(CIFAR100_FINE_LABELS) == 100 and len(set(CIFAR100_FINE_LABELS)) == 100
    assert list(CIFAR100_FINE_LABELS) == sorted(CIFAR100_FINE_LABELS)  # the official list is alphabetical
    assert CIFAR100_FINE_LABELS[:3] == ("apple", "aquarium_fish", "baby") and CIFAR100_FINE_LABELS[-1] == "worm"
    assert set(CIFAR_FS_VAL + CIFAR_FS_TEST) <= set(CIFAR100_FINE_LABELS)


def test_authors_cifar100_order_is_cifar_fs_train_val_test():
    order = authors_class_order("cifar100")
    assert sorted(order) == list(range(100))
    names = [CIFAR100_FINE_LABELS[i] for i in order]
    train, val, test = order[:64], order[64:80], order[80:]
    assert set(names[64:80]) == set(CIFAR_FS_VAL) and set(names[80:]) == set(CIFAR_FS_TEST)
    assert not (set(names[:64]) & set(CIFAR_FS_VAL + CIFAR_FS_TEST))
    for part in (train, val, test):
        assert part == sorted(part)
    assert order[:5] == [0, 1, 3, 6, 9]   # apple, aquarium_fish, bear, bee, bottle


def test_authors_cub_order_is_identity():
    assert authors_class_order("cub200") == list(range(200))


@pytest.mark.parametrize("ratio", [0, 0.2, 0.4, 0.6, 0.8, 1])
def test_make_split_authors_cifar100(ratio):
    order = authors_class_order("cifar100")
    h = 50
    s0, s1 = make_split("cifar100", ratio, 0, class_order="authors"), make_split("cifar100", ratio, 7, None, "authors")
    assert s0["class_order"] == "authors"
    assert s0["teacher_classes"] == order[:h] == s1["teacher_classes"]
    lo = round(h * (1 - ratio))
    assert s0["student_classes"] == order[lo:lo + h] == s1["student_classes"]
    assert len(set(s0["student_classes"]) & set(s0["teacher_classes"])) == round(ratio * h)
    assert check_split(dict(s0)) == s0


@pytest.mark.parametrize("ratio", [0, 0.25, 0.5, 0.75, 1])
def test_make_split_authors_cub200(ratio):
    s = make_split("cub200", ratio, 3, class_order="authors")
    lo = round(100 * (1 - ratio))
    assert s["teacher_classes"] == list(range(100)) and s["student_classes"] == list(range(lo, lo + 100))
    assert check_split(s) == s


def test_authors_order_refused_for_fashion_mnist_and_unknown_order():
    with pytest.raises(SplitError, match="fashion-mnist"):
        make_split("fashion-mnist", 0.6, 0, 5, "authors")
    with pytest.raises(SplitError, match="seeded.*authors"):
        make_split("cifar100", 0.6, 0, None, "fixed")


def test_check_split_old_file_without_class_order_is_seeded():
    seeded = make_split("cifar100", 0.6, 1)
    assert seeded["class_order"] == "seeded"
    old = {k: v for k, v in seeded.items() if k != "class_order"}
    assert check_split(old) == old
    # an old (key-less) file holding the authors' classes does not pass as seeded
    authors = {k: v for k, v in make_split("cifar100", 0.6, 1, None, "authors").items() if k != "class_order"}
    with pytest.raises(SplitError, match="does not match"):
        check_split(authors)
    tampered = {**make_split("cub200", 0.5, 0, None, "authors"), "class_order": "seeded"}
    with pytest.raises(SplitError, match="does not match"):
        check_split(tampered)


def test_cli_split_class_order(tmp_path):
    from cli_runner import cli
    import json

    out = tmp_path / "s.json"
    rc, _, err = cli(["split", "--dataset", "cifar100", "--ratio", "0.6", "--seed", "2", "--class-order", "authors",
                      "--out", out])
    assert rc == 0, err
    assert json.loads(out.read_text()) == make_split("cifar100", 0.6, 2, None, "authors")
    rc, _, err = cli(["split", "--dataset", "fashion-mnist", "--ratio", "0.6", "--seed", "2",
                      "--classes-per-task", "5", "--class-order", "authors", "--out", tmp_path / "f.json"])
    assert rc != 0 and "fashion-mnist" in err


def test_loader_reads_meta_names_in_id_order(tmp_path):
    """The authors' order is given by names; the loader's label ids are the positions in
    meta's fine_label_names, which check_class_names compares with the official list."""
    from fakedata import make_cifar100

    from refilled.data import load_dataset

    out = make_cifar100(tmp_path)
    with open(out["dir"] / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in CIFAR100_FINE_LABELS],
                     b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, f)
    ds = load_dataset("cifar100", tmp_path, verify_checksums=False)
    assert list(ds.classes) == list(CIFAR100_FINE_LABELS)
    check_class_names("cifar100", ds.classes)
    swapped = list(ds.classes)
    swapped[4], swapped[5] = swapped[5], swapped[4]
    with pytest.raises(SplitError, match="id 4"):
        check_class_names("cifar100", swapped)
    with pytest.raises(SplitError, match="id 0"):
        check_class_names("cifar100", [f"class_{i:03d}" for i in range(100)])   # fakedata's own names


# ---------------------------------------------------------------------------------------------
# WRN dropout (GKD networks/wide_resnet.py: BN-ReLU-conv-BN-ReLU-dropout-conv)
# ---------------------------------------------------------------------------------------------


def _blocks(model):
    return [b for g in model.groups for b in g]


def test_dropout_between_the_two_convolutions_in_train_mode_only():
    torch.manual_seed(0)
    model = build_model("wrn-16-2", 5, dropout=0.3)
    assert len(_blocks(model)) == 6
    x = torch.randn(4, 3, 16, 16)
    seen = {}
    hooks = []
    for i, b in enumerate(_blocks(model)):
        hooks.append(b.relu2.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("relu", i), o.clone())))
        hooks.append(b.conv2.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("conv2", i), a[0].clone())))
    model.train()
    out1, out2 = model(x).logits, model(x).logits
    assert not torch.allclose(out1, out2)           # fresh masks each forward
    for i in range(6):
        r, c = seen[("relu", i)], seen[("conv2", i)]
        live = r > 0
        dropped = live & (c == 0)
        kept = live & (c != 0)
        assert torch.allclose(c[kept], r[kept] / 0.7, rtol=1e-5)   # inverted dropout, p = 0.3
        frac = dropped.sum().item() / live.sum().item()
        assert 0.25 < frac < 0.35, frac
    model.eval()
    e1, e2 = model(x).logits, model(x).logits
    assert torch.equal(e1, e2)
    for i in range(6):
        assert torch.equal(seen[("relu", i)], seen[("conv2", i)])
    for h in hooks:
        h.remove()
    plain = build_model("wrn-16-2", 5)
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain.eval()(x).logits, e1)


def test_dropout_zero_is_the_old_network():
    torch.manual_seed(1)
    a = build_model("wrn-10-1", 4)
    torch.manual_seed(1)
    b = build_model("wrn-10-1", 4, dropout=0.3)
    assert not any(isinstance(m, torch.nn.Dropout) for m in a.modules())
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in b.modules()) == len(_blocks(b))
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    x = torch.randn(3, 3, 12, 12)
    a.train()
    torch.manual_seed(5)
    y1 = a(x).logits
    torch.manual_seed(5)
    r1 = torch.rand(1)
    torch.manual_seed(5)
    a(x)
    assert torch.equal(torch.rand(1), r1)            # dropout 0 draws no random numbers
    assert torch.equal(a(x).logits, y1)


def test_dropout_rejected_for_mobilenet_and_out_of_range():
    with pytest.raises(ValueError, match="MobileNet.*dropout"):
        build_model("mobilenet-0.25", 4, dropout=0.3)
    assert build_model("mobilenet-0.25", 4, dropout=0.0).num_classes == 4
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            WideResNet(10, 1, 4, dropout=p)
