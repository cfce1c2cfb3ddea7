"""Evaluation is cheaper but computes the same numbers: the batch size of forward passes that
train nothing (refilled.training.run.eval_batch_size) changes no output bit, and the final NCM score
reuses the last evaluation's test-set forward only when that forward is of the final model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import refilled.training.run
from cli_runner import cli
from cpu_pin import one_cpu  # noqa: F401 (autouse: this module runs on one CPU)
from fakedata import fashion_with_split
from refilled.models import build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return fashion_with_split(tmp_path_factory.mktemp("evalb"), 12, 40, classes_per_task=4)


def student_run(fashion, out: Path) -> dict:
    rc, _, err = cli(["train", "--method", "student", "--split", fashion["split"], "--arch", "wrn-10-1",
                      "--data-root", fashion["root"], "--no-checksum", "--epochs", 3, "--eval-every", 1,
                      "--batch-size", 8, "--device", "cpu", "--out", out])
    assert rc == 0, err
    return json.loads((out / "summary.json").read_text())


SCORES = ("test_acc", "ncm_acc", "train_acc")


def test_outputs_do_not_depend_on_the_evaluation_batch_size_or_the_reuse(fashion, tmp_path, monkeypatch):
    default = student_run(fashion, tmp_path / "default")
    # the old way: batches of 512 and a fresh test-set forward for the NCM score
    monkeypatch.setattr(refilled.training.run, "eval_batch_size", lambda device: 512)
    fresh = refilled.training.run.Context.test_forward
    monkeypatch.setattr(refilled.training.run.Context, "test_forward", lambda self, model, reuse=False: fresh(self, model))
    old = student_run(fashion, tmp_path / "old")
    assert {k: default.get(k) for k in SCORES} == {k: old.get(k) for k in SCORES}
    assert (tmp_path / "default/model.pt").read_bytes() == (tmp_path / "old/model.pt").read_bytes()
    assert (tmp_path / "default/metrics.csv").read_text().count("\n") == 4
    strip = lambda text: [line.rsplit(",", 1)[0] for line in text.splitlines()]   # the seconds column is last
    assert strip((tmp_path / "default/metrics.csv").read_text()) == strip((tmp_path / "old/metrics.csv").read_text())


def test_a_forward_gives_the_same_outputs_at_the_evaluation_batch_sizes():
    """Per image, a forward pass in eval mode does not depend on the batch it is in, up to the
    kernels' blocking (on this project's CPU: the same bits at 128 and 512; elsewhere the last
    bits may differ, the predictions may not)."""
    torch.manual_seed(0)
    x = torch.randn(300, 3, 32, 32)
    for arch in ("wrn-10-1", "mobilenet-0.25"):
        model = build_model(arch, 5).eval()
        with torch.no_grad():
            outs = {bs: [torch.cat(t) for t in zip(*((o.logits, o.embedding) for o in map(model, x.split(bs))))]
                    for bs in (512, refilled.training.run.eval_batch_size(torch.device("cpu")))}
        small, large = outs.values()
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(small, large)), arch
        assert torch.equal(small[0].argmax(1), large[0].argmax(1)), arch


def test_the_test_forward_is_reused_only_for_the_same_model_and_when_asked(fashion):
    spec = refilled.training.run.RunSpec(split=Path(fashion["split"]), arch="wrn-10-1", out=Path("unused"), epochs=1,
                                 data_root=Path(fashion["root"]), verify_checksums=False, device="cpu")
    ctx = refilled.training.run.Context(spec, "student")
    model = ctx.new_student()
    first = ctx.test_forward(model)
    assert ctx.test_forward(model, reuse=True) is first
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    again = ctx.test_forward(model)            # not asked: a new forward, of the changed model
    assert again is not first and not torch.equal(again[0], first[0])
    other = ctx.new_student()
    assert ctx.test_forward(other, reuse=True) is not again   # another model: never another's forward
