"""The joint label space C' ∪ C (supplement §2, Table H): the harmonic mean, joint accuracy,
the training-free reference, the balanced test set, the joint head's LwF term, and a
joint-head run end to end (no image of a class outside C reaches training).

Every expected value is computed here by hand or with numpy, not by the code under test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_runner import cli
from fakedata import make_fashion_idx
from methods_cases import build_case
from resume_check import kill_then_resume

from refilled.data.batches import Batches, balanced_split
from refilled.data.datasets import ArraySplit
from refilled.evaluate import harmonic_mean, joint_accuracy, reference_scores
from refilled.losses import lwf_loss
from refilled.methods import CATALOG
from refilled.methods.joint import JointHead
from refilled.training.step import TrainStep

CPU = torch.device("cpu")


# ---- harmonic mean and joint accuracy, hand-computed ---------------------------------------------


def test_harmonic_mean_hand_cases():
    assert harmonic_mean(0.5, 1.0) == pytest.approx(2 * 0.5 * 1.0 / 1.5)      # 0.6667
    assert harmonic_mean(0.8, 0.8) == pytest.approx(0.8)
    assert harmonic_mean(0.0, 0.9) == 0.0                                     # no old class recognised: H = 0
    assert harmonic_mean(0.0, 0.0) == 0.0                                     # not 0 / 0
    assert harmonic_mean(None, 0.7) == 0.7                                    # r = 1: no old classes, H = Acc_C


def test_joint_accuracy_with_a_shared_class_scores_it_as_the_students():
    # teacher classes C' = [7, 8, 5], student classes C = [5, 3]: class 5 is shared, so the joint
    # space is {7, 8} ∪ {5, 3} and the old scores' column for 5 is dropped
    old_classes, new_classes = [7, 8, 5], [5, 3]
    old = torch.tensor([[0.9, 0.0, 0.0],    # label 7: joint [.9 .0 | .5 .1] -> 7, right
                        [0.2, 0.3, 0.9],    # label 8: [.2 .3 | .4 .1] -> 5, wrong (the dropped .9 would not count)
                        [0.8, 0.1, 0.0],    # label 7: [.8 .1 | .1 .2] -> 7, right
                        [0.0, 0.0, 0.99],   # label 5: [0 0 | .3 .6] -> 3, wrong (the old head's 5 is ignored)
                        [0.1, 0.1, 0.0]])   # label 3: [.1 .1 | .2 .8] -> 3, right
    new = torch.tensor([[0.5, 0.1], [0.4, 0.1], [0.1, 0.2], [0.3, 0.6], [0.2, 0.8]])
    labels = torch.tensor([7, 8, 7, 5, 3])
    acc_old, acc_new = joint_accuracy(old, new, labels, old_classes, new_classes)
    assert acc_old == pytest.approx(2 / 3) and acc_new == pytest.approx(1 / 2)
    assert harmonic_mean(acc_old, acc_new) == pytest.approx(4 / 7)          # 2·(2/3)(1/2) / (7/6)


def test_joint_accuracy_at_ratio_one_has_no_old_accuracy():
    # r = 1: every teacher class is a student class, so there are no old classes
    new = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    acc_old, acc_new = joint_accuracy(torch.zeros(3, 2), new, torch.tensor([5, 3, 3]), [3, 5], [5, 3])
    assert acc_old is None and acc_new == pytest.approx(2 / 3)
    assert harmonic_mean(acc_old, acc_new) == pytest.approx(2 / 3)
    acc_old, acc_new = joint_accuracy(torch.zeros(3, 0), new, torch.tensor([5, 3, 3]), [], [5, 3])
    assert acc_old is None and acc_new == pytest.approx(2 / 3)


def test_joint_accuracy_refuses_stray_labels_and_wrong_shapes():
    with pytest.raises(ValueError, match=r"classes \[9\]"):
        joint_accuracy(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([1, 9]), [0], [1])
    with pytest.raises(ValueError, match="scores must be"):
        joint_accuracy(torch.zeros(2, 2), torch.zeros(2, 1), torch.tensor([1, 0]), [0], [1])


def test_reference_softmaxes_each_head_before_concatenating():
    # C' = [7, 5], C = [5, 3]. Teacher logits [10, 9]: p(7) = 1/(1+e^-1) = .731; student logits
    # [0, .1]: p(3) = 1/(1+e^-.1) = .525. By probabilities the instance of class 3 is called 7
    # (wrong); by raw logits it would be 7 as well, so the second instance separates the two:
    # teacher [0, 0] -> p(7) = .5, student [-5, 5] -> p(3) = .99995: class 3, right
    t = torch.tensor([[10.0, 9.0], [0.0, 0.0]])
    s = torch.tensor([[0.0, 0.1], [-5.0, 5.0]])
    old, new = reference_scores(t, s)
    assert old[0, 0].item() == pytest.approx(1 / (1 + np.exp(-1.0)), abs=1e-6)
    acc_old, acc_new = joint_accuracy(old, new, torch.tensor([3, 3]), [7, 5], [5, 3])
    assert acc_old is None and acc_new == pytest.approx(0.5)
    # with an old instance: teacher [3, 0] -> p(7) = .953 beats the student's best .5
    old, new = reference_scores(torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.0]]))
    with pytest.raises(ValueError, match="Acc_C is undefined"):
        joint_accuracy(old, new, torch.tensor([7]), [7, 5], [5, 3])


# ---- the LwF term against numpy -------------------------------------------------------------------


def _np_kl_term(s: np.ndarray, t: np.ndarray, T: float) -> float:
    def softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(t / T), softmax(s / T)
    return float(T**2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_lwf_loss_is_T_squared_times_the_numpy_kl(T):
    rng = np.random.default_rng(int(T))
    s, t = rng.normal(size=(7, 3)) * 3, rng.normal(size=(7, 3)) * 3
    got = lwf_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), T).item()
    assert got == pytest.approx(_np_kl_term(s, t, T), rel=1e-5)
    assert lwf_loss(torch.tensor(t), torch.tensor(t), T).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        lwf_loss(torch.zeros(2, 3), torch.zeros(2, 2))


# ---- the balanced test set ------------------------------------------------------------------------


def _source(counts: dict[int, int]) -> ArraySplit:
    labels = torch.cat([torch.full((n,), c) for c, n in counts.items()])
    return ArraySplit(torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8), labels)


def test_balanced_split_draws_the_same_count_per_class_seeded_and_recorded():
    src = _source({0: 9, 1: 5, 2: 7, 3: 12, 4: 6})
    split, rec = balanced_split(src, [1, 4], [3, 0, 2], None, seed=3)
    assert rec["per_class"] == 5                                    # the rarest class (1) has 5
    assert rec["counts"] == {"1": 5, "4": 5, "3": 5, "0": 5, "2": 5}
    # joint labels: old classes first, then new, each index's source label the right class
    for j, c in enumerate([1, 4, 3, 0, 2]):
        assert sorted(src.labels[split.indices[split.labels == j]].unique().tolist()) == [c]
    again, _ = balanced_split(src, [1, 4], [3, 0, 2], None, seed=3)
    other, _ = balanced_split(src, [1, 4], [3, 0, 2], None, seed=4)
    assert torch.equal(again.indices, split.indices) and not torch.equal(other.indices, split.indices)
    assert rec["seed"] == 3 and rec["n_images"] == 25
    split, rec = balanced_split(src, [1], [3, 0], 4, seed=0)
    assert rec["counts"] == {"1": 4, "3": 4, "0": 4}
    with pytest.raises(ValueError, match=r"6 images per class asked.*\{1: 5\}"):
        balanced_split(src, [1, 4], [3], 6, seed=0)
    with pytest.raises(ValueError, match="shared"):
        balanced_split(src, [1, 3], [3], None, seed=0)


# ---- the joint head around every method -----------------------------------------------------------

# methods with a head over C that run across tasks (a same-classes method has no old classes)
SCORED = [n for n, e in CATALOG.items() if e.scored_by == "test_acc" and e.applies_to == "any"]


@pytest.mark.parametrize("name", SCORED)
def test_joint_head_adds_the_old_term_and_changes_nothing_else(name):
    from refilled.data.batches import Batches, task_split
    from fakedata import tiny_dataset

    ds = tiny_dataset(n_per_class=6, n_classes=4)
    batches = Batches(task_split(ds.train, [0, 1, 2, 3]), ds, 8, False, CPU)
    plain = build_case(name, prepare_batches=batches, seed=1)
    joint_inner = build_case(name, prepare_batches=batches, seed=1)
    teacher = joint_inner.teacher if joint_inner.teacher is not None else build_case("rkd", seed=1).teacher
    old_index = [4, 1, 5]                          # three of the teacher's six classes
    method = JointHead(joint_inner, teacher, old_index, weight=0.5, T=2.0, seed=0)
    x, y = next(iter(batches))
    plain.train(), method.train()
    torch.manual_seed(0)
    logits_p, terms_p = plain.loss(x, y)
    torch.manual_seed(0)
    logits_j, terms_j = method.loss(x, y)
    assert list(terms_j) == [*terms_p, "old"]
    for k in terms_p:                               # the method's own terms are untouched
        assert terms_j[k].item() == pytest.approx(terms_p[k].item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(logits_j, logits_p, atol=1e-5)
    # the old term, recomputed by hand: student embedding -> old head, teacher's own head columns
    with torch.no_grad():
        emb = method.student(x).embedding.numpy()
        t_old = teacher(x).logits[:, old_index].numpy()
        W, b = method.old_head.weight.numpy(), method.old_head.bias.numpy()
    assert terms_j["old"].item() == pytest.approx(0.5 * _np_kl_term(emb @ W.T + b, t_old, 2.0), rel=1e-4)
    # the old head is trained by the step: its parameters are in the optimiser and move
    step = TrainStep(method, CPU, lr=0.1, graph="emulate", warmup_steps=1)
    assert any(p is method.old_head.weight for p in step.params)
    before = method.old_head.weight.detach().clone()
    step.begin_epoch(0, 0.1)
    step.step(x, y)
    step.step(x, y)
    assert not torch.equal(before, method.old_head.weight.detach())
    assert all(not p.requires_grad for p in teacher.parameters())


def test_joint_head_without_old_classes_adds_a_zero_term():
    method = build_case("student", seed=0)
    teacher = build_case("rkd", seed=0).teacher
    joint = JointHead(method, teacher, [], weight=1.0, T=2.0, seed=0)
    _, terms = joint.loss(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert joint.old_head is None and terms["old"].item() == 0.0


# ---- a joint-head run end to end (CLI) ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Fake Fashion-MNIST, a split at r = .4 (h = 5), a 1-epoch teacher and a plain student."""
    root = tmp_path_factory.mktemp("joint")
    make_fashion_idx(root / "raw", n_train_per_class=8, n_test_per_class=6)
    common = ["--data-root", root / "raw", "--no-checksum", "--arch", "wrn-10-1", "--epochs", "1"]
    for r, name in ((0.4, "s.json"), (0, "s0.json")):
        assert cli(["split", "--dataset", "fashion-mnist", "--ratio", r, "--seed", 0, "--classes-per-task", 5,
                    "--out", root / name])[0] == 0
    assert cli(["train", "--method", "student", "--task", "teacher", "--split", root / "s0.json", *common,
                "--out", root / "t"])[0] == 0
    assert cli(["train", "--method", "student", "--split", root / "s.json", *common, "--out", root / "plain"])[0] == 0
    return root, common


def test_a_joint_run_never_sees_an_image_outside_C_and_records_its_test_set(tiny_runs, monkeypatch):
    import refilled.training.run as runs

    root, common = tiny_runs
    split = json.loads((root / "s.json").read_text())
    student_classes, old = split["student_classes"], [c for c in split["teacher_classes"]
                                                       if c not in split["student_classes"]]
    seen, training = [], {"on": False}
    real_iter, real_fit = Batches.__iter__, runs.fit

    def spy_iter(self):
        if training["on"]:
            seen.append(set(self.split.source.labels[self.split.indices].tolist()))
        return real_iter(self)

    def spy_fit(*a, **kw):
        training["on"] = True
        try:
            return real_fit(*a, **kw)
        finally:
            training["on"] = False

    monkeypatch.setattr(Batches, "__iter__", spy_iter)
    monkeypatch.setattr(runs, "fit", spy_fit)
    rc, out, err = cli(["train", "--method", "student", "--split", root / "s.json", *common, "--teacher",
                        root / "t" / "model.pt", "--joint-head", "1", "--joint-test-per-class", "4",
                        "--out", root / "joint"])
    assert rc == 0, err
    assert seen and all(classes <= set(student_classes) for classes in seen)   # training: images of C only
    s = json.loads((root / "joint" / "summary.json").read_text())
    j = s["joint"]
    assert j["old_classes"] == old and j["weight"] == 1.0 and j["T"] == 2.0
    assert j["test"]["counts"] == {str(c): 4 for c in old + student_classes} and j["test"]["seed"] == 0
    old_acc, new_acc = j["acc_old"], j["acc_new"]
    assert j["H"] == pytest.approx(2 * old_acc * new_acc / (old_acc + new_acc) if old_acc + new_acc else 0.0)
    assert s["fingerprint"]["optim"]["extra"]["joint"] == {"weight": 1.0, "T": 2.0, "test_per_class": 4}
    assert (root / "joint" / "old_head.pt").is_file()
    rows = (root / "joint" / "metrics.csv").read_text().splitlines()
    assert "old" in rows[0].split(",")


def test_a_joint_run_is_never_a_plain_run(tiny_runs):
    root, common = tiny_runs
    # the plain run's directory: another configuration, refused (exit 2), nothing rewritten
    before = (root / "plain" / "summary.json").read_bytes()
    rc, _, err = cli(["train", "--method", "student", "--split", root / "s.json", *common, "--teacher",
                      root / "t" / "model.pt", "--joint-head", "1", "--out", root / "plain"])
    assert rc == 2 and "another configuration" in err
    assert (root / "plain" / "summary.json").read_bytes() == before
    rc, _, err = cli(["train", "--method", "student", "--split", root / "s.json", *common, "--joint-head", "1",
                      "--out", root / "nothing"])
    assert rc == 2 and "needs --teacher" in err and not (root / "nothing").exists()
    rc, _, err = cli(["train", "--method", "student", "--split", root / "s.json", *common, "--teacher",
                      root / "t" / "model.pt", "--joint-head", "0", "--out", root / "nothing"])
    assert rc == 2 and "weight must be > 0" in err and not (root / "nothing").exists()


def test_reference_scores_the_plain_student_and_the_teacher(tiny_runs):
    from refilled.training.checkpoints import load_model
    from refilled.data import load_dataset
    from refilled.data.batches import task_split
    from refilled.evaluate import forward_all

    root, _ = tiny_runs
    rc, _, err = cli(["joint-reference", "--split", root / "s.json", "--teacher", root / "t" / "model.pt",
                      "--student", root / "plain" / "model.pt", "--data-root", root / "raw", "--no-checksum",
                      "--seed", 0, "--out", root / "ref"])
    assert rc == 0, err
    s = json.loads((root / "ref" / "summary.json").read_text())
    assert s["method"] == "reference" and s["arch"] == "wrn-10-1"
    # recomputed here: every test image of C' ∪ C (6 per class, all of them), probabilities by hand
    split = json.loads((root / "s.json").read_text())
    C, Ct = split["student_classes"], split["teacher_classes"]
    old = [c for c in Ct if c not in C]
    ds = load_dataset("fashion-mnist", root / "raw", verify_checksums=False)
    test = Batches(task_split(ds.test, old + C), ds, 512, False, CPU)     # every test image of C' ∪ C
    y = ds.test.labels[test.split.indices]
    teacher, _ = load_model(root / "t" / "model.pt")
    student, _ = load_model(root / "plain" / "model.pt")
    pt, ps = forward_all(teacher, test, CPU)[0].softmax(1), forward_all(student, test, CPU)[0].softmax(1)
    cols = {c: pt[:, i] for i, c in enumerate(Ct) if c not in C} | {c: ps[:, i] for i, c in enumerate(C)}
    classes = list(cols)
    pred = torch.tensor(classes)[torch.stack([cols[c] for c in classes], 1).argmax(1)]
    is_old = torch.isin(y, torch.tensor(old))
    acc_old = (pred == y)[is_old].float().mean().item()
    acc_new = (pred == y)[~is_old].float().mean().item()
    assert s["joint"]["acc_old"] == pytest.approx(acc_old) and s["joint"]["acc_new"] == pytest.approx(acc_new)
    assert s["joint"]["test"]["per_class"] == 6


# ---- Table H from summaries -----------------------------------------------------------------------


def _joint_summary(root, ratio, method, seed, acc_old, acc_new, arch="wrn-10-1"):
    run = "reference" if method == "reference" else f"{method}-joint"
    path = root / "students" / "table2" / f"r{ratio:g}" / arch / f"seed{seed}" / run / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    h = acc_new if acc_old is None else 2 * acc_old * acc_new / (acc_old + acc_new)
    path.write_text(json.dumps({"method": method, "arch": arch, "seed": seed, "split": {"ratio": ratio},
                                "joint": {"acc_old": acc_old, "acc_new": acc_new, "H": h,
                                          "test": {"seed": seed, "per_class": 10}}}))
    return path


def test_table_h_cells_are_means_over_seeds_and_gaps_are_refused(tmp_path):
    values = {(0.4, 0): (0.5, 0.9), (0.4, 1): (0.7, 0.7), (1.0, 0): (None, 0.8), (1.0, 1): (None, 0.6)}
    paths = [_joint_summary(tmp_path, r, m, s, *v) for (r, s), v in values.items()
             for m in ("student", "refilled", "reference")]
    out = tmp_path / "h.csv"
    args = ["table", "--table", "h", "--grid", "table2", "0.4,1", "wrn-10-1", "--methods", "student", "refilled",
            "--out", out, "--long", tmp_path / "h_long.csv", "--markdown", tmp_path / "h.md"]
    rc, _, err = cli([*args[:3], "--summaries", *paths, *args[3:]])
    assert rc == 0, err
    import csv

    wide = list(csv.DictReader(open(out, encoding="utf-8")))
    assert [(w["ratio"], w["method"]) for w in wide] == [
        ("0.4", "Student + joint head"), ("0.4", "REFILLED + joint head"),
        ("0.4", "Reference (teacher ⊕ student heads, no training)"),
        ("1", "Student + joint head"), ("1", "REFILLED + joint head"),
        ("1", "Reference (teacher ⊕ student heads, no training)")]
    # r = .4: Acc_C' 50, 70 -> 60.00 ± 14.14; Acc_C 90, 70 -> 80.00 ± 14.14;
    # H 2·.5·.9/1.4 = 64.2857, 70 -> 67.14 ± 4.04 (sample std: |70 - 64.2857| / sqrt 2)
    assert wide[0]["wrn-10-1"] == "60.00 ± 14.14 / 80.00 ± 14.14 / 67.14 ± 4.04"
    assert wide[3]["wrn-10-1"] == "— / 70.00 ± 14.14 / 70.00 ± 14.14"        # r = 1: H is Acc_C
    md = (tmp_path / "h.md").read_text()
    assert "H is the plain accuracy" in md and md.count("overlap ratio =") == 2
    long = list(csv.DictReader(open(tmp_path / "h_long.csv", encoding="utf-8")))
    assert len(long) == 12 and {r["acc_old"] for r in long if r["ratio"] == "1"} == {""}
    # a missing cell (one seed's reference gone), a duplicate, a plain run: refused, exit 2, nothing written
    for bad, words in ((paths[:-1], "lack some"), (paths + paths[:1], "a second run"),
                       (paths, "not a joint-head run")):
        if words == "not a joint-head run":
            plain = tmp_path / "students" / "table2" / "r0.4" / "wrn-10-1" / "seed0" / "student" / "summary.json"
            plain.parent.mkdir(parents=True)
            plain.write_text(json.dumps({"method": "student", "arch": "wrn-10-1", "seed": 0,
                                         "split": {"ratio": 0.4}, "test_acc": 0.9}))
            bad = paths + [plain]
        out.unlink(missing_ok=True)
        rc, _, err = cli([*args[:3], "--summaries", *bad, *args[3:]])
        assert rc == 2 and words in err and not out.exists(), err


def test_an_embedding_only_method_gets_no_joint_head(tiny_runs):
    root, common = tiny_runs
    rc, _, err = cli(["train", "--method", "stage1", "--split", root / "s.json", *common, "--teacher",
                      root / "t" / "model.pt", "--joint-head", "1", "--out", root / "s1joint"])
    assert rc == 2 and "trains no head over C" in err and not (root / "s1joint").exists()


def test_lwf_term_is_zero_with_a_single_old_class():
    # the documented limitation (docs/method.md, Harmonic mean): a softmax over one class is 1, so the KL is 0
    # whatever the logits, and the old head of a run with |C' \ C| = 1 gets no signal
    s = torch.randn(5, 1, requires_grad=True)
    loss = lwf_loss(s, torch.randn(5, 1) * 10)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(s.grad) == 0


@pytest.mark.parametrize("name", ["student", "refilled"])
def test_a_killed_joint_run_resumes_to_the_same_weights(name, tmp_path):
    """Two epochs straight against a run killed in epoch 2 and the same call again: the joint
    head's weights are in the resume checkpoint with the rest, and the resumed run ends
    bit-identical."""
    from refilled.training.loop import OptimConfig, fit

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 16, 16, generator=g), torch.arange(4).repeat(2)) for _ in range(3)]

    class Data(list):
        def set_epoch(self, epoch):
            pass

    cfg = OptimConfig(epochs=2, batch_size=8, lr=0.05)

    def run(run_dir):
        inner = build_case(name, prepare_batches=data[:1], seed=1)
        teacher = inner.teacher if inner.teacher is not None else build_case("rkd", seed=2).teacher
        method = JointHead(inner, teacher, [4, 5], weight=1.0, T=2.0, seed=1)
        fit(method, Data(data), lambda: {}, cfg, run_dir, CPU, 1, graph="off")
        return {k: v.clone() for k, v in method.state_dict().items()}

    straight = run(tmp_path / "straight")
    resumed = kill_then_resume(run, tmp_path / "resumed", cfg.epochs)
    assert any(k.startswith("old_head.") for k in straight) and straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
