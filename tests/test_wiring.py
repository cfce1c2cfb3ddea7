"""Method wiring: each method's loss terms are its loss functions with its own hyper-parameters
(in the right places: non-default values, so that a swap shows), and only Figure 1's runs
evaluate after every epoch."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from refilled.losses import comparison_matching_loss, rkd_terms
from refilled.methods import get
from refilled.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def data(b=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(b // classes)
    return torch.randn(b, 3, 16, 16, generator=g) + y.view(-1, 1, 1, 1) * 0.5, y


def networks(seed=0, classes=3):
    torch.manual_seed(seed)
    return build_model("wrn-10-1", classes).eval(), build_model("wrn-10-2", 5).eval()


def test_stage1_term_is_scale_times_the_comparison_matching_loss():
    student, teacher = networks()
    values = {"k_hat": "2", "tau": "2.5", "margin": "0.35", "scale": "7", "k_mode": "per-pair"}
    entry = get("stage1")
    method = entry.build(student, teacher, entry.resolve(values)).eval()   # eval: BN in inference mode
    x, y = data()
    _, terms = method.loss(x, y)
    with torch.no_grad():
        expected = 7.0 * comparison_matching_loss(student(x).embedding, teacher(x).embedding, y, tau=2.5,
                                                  margin=0.35, k_hat=2)
    assert set(terms) == {"cm"}
    assert terms["cm"].item() == pytest.approx(expected.item(), rel=1e-6) and expected.item() > 0


def test_rkd_terms_carry_their_own_weights():
    student, teacher = networks()
    entry = get("rkd")
    method = entry.build(student, teacher, entry.resolve({"distance_weight": 3, "angle_weight": 11})).eval()
    x, y = data()
    logits, terms = method.loss(x, y)
    with torch.no_grad():
        dist, angle = rkd_terms(student(x).embedding, teacher(x).embedding)
    assert terms["rkd_distance"].item() == pytest.approx(3 * dist.item(), rel=1e-6)
    assert terms["rkd_angle"].item() == pytest.approx(11 * angle.item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert dist.item() > 0 and angle.item() > 0


class FakeRun:
    def __init__(self, batches, out, batch_size=4, seed=0):
        from types import SimpleNamespace

        self.train_plain = batches
        self.device = torch.device("cpu")
        self.spec = SimpleNamespace(out=out, batch_size=batch_size, seed=seed)
        self.classes = [7, 2, 9]
        self.split = {"teacher_classes": [7, 1, 3, 4, 5]}


class Batches(list):
    """Un-augmented batches with the `split.indices` the dump reads."""

    def __init__(self, x, y):
        super().__init__([(x, y)])
        from types import SimpleNamespace

        self.split = SimpleNamespace(indices=torch.arange(100, 100 + len(y)))


def test_stage2_lam_and_tau_reach_the_term_and_the_dump(tmp_path):
    """λ = 1, τ2 = 4 with the true-class weighting: swapping them (λ = 4, τ2 = 1) changes both."""
    student, teacher = networks()
    entry = get("refilled")
    values = entry.resolve({"lam": 1, "tau": 4, "weighting": "true-class"})
    method = entry.build(student, teacher, values).eval()
    x, y = data()
    run = FakeRun(Batches(x, y), tmp_path)
    method.prepare(run)
    _, terms = method.loss(x, y)

    # independent: numpy, from docs/method.md (local classes = all 3 present; KL(p_T || p_S), both / tau)
    with torch.no_grad():
        t_emb = teacher(x).embedding.double().numpy()
        s_logits = student(x).logits.double().numpy()
    yy = y.numpy()
    centres = np.stack([t_emb[yy == k].mean(0) for k in range(3)])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def softmax(z):
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    p_t = softmax(t_emb @ centres.T / 4)
    p_s = softmax(s_logits / 4)
    p_true = p_t[np.arange(len(yy)), yy]
    lam_i = 1.0 * p_true
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(1)
    assert abs(terms["teach"].item() - (lam_i * kl).mean()) < 1e-5

    method.finish(run)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "lambda_i.csv")))
    dumped = np.array([float(r["lambda_i"]) for r in rows])
    assert np.abs(dumped - lam_i).max() < 1e-5
    assert np.abs(dumped - 4 * softmax(t_emb @ centres.T)[np.arange(len(yy)), yy]).max() > 1e-2   # the swap


def test_only_figure1_runs_evaluate_every_epoch_in_the_demo_dry_run(tmp_path):
    out = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "-p", "-s", ROOT / "Snakefile",
                          "-d", tmp_path, "--config", "profile=demo"], capture_output=True, text=True, timeout=600,
                         check=True).stdout
    commands = [line for line in out.splitlines() if " train --method " in line and "--task teacher" not in line]
    every = {re.search(r"--out (\S+)", c).group(1) for c in commands if "--eval-every 1 " in c}
    runs = "results/runs/demo/students/table2/r0.6/wrn-16-1/seed0"       # config/demo.yaml's figure1
    assert every == {f"{runs}/stage1_kinf", f"{runs}/refilled_lam2"}
    # per seed: 87 runs of Tables 1, 2, 4 and the figures (Table 1: 3 ratios x 1 student x 7 runs,
    # Table 4's 2 x 2 other K-hats, Figure 2's 4 other lambdas x 1 student; Table 2: 4 x 2 x 7,
    # Figure 3's 2), 18 of Table 3 (2 students x 9 runs) and Table H's 6 joint-head runs (2 ratios
    # x 3 rows, one student); Figure 1's two runs evaluate every epoch, on seed 0 only
    seeds = len(yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())["seeds"])
    assert len(commands) == seeds * (21 + 4 + 4 + 56 + 2 + 18 + 6)
    assert sum("--eval-every 1000 " in c for c in commands) == len(commands) - 2
    assert sum(" --joint-head " in c for c in commands) == seeds * 6
