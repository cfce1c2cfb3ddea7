"""The teacher stays frozen through `fit`: after a short training run of every method that
has a teacher, the teacher's state_dict (weights and BN running statistics, including
num_batches_tracked) equals the one before, bit for bit, while the student did change.

The teacher network is built in train mode on purpose (a fresh module is), so a method that
forgot to keep it in eval mode would move its BN statistics in the first teacher forward."""

from __future__ import annotations

import pytest
import torch

from fakedata import tiny_dataset
from methods_cases import CASES, build_case
from refilled.data.batches import Batches, task_split
from refilled.methods import CATALOG
from refilled.training.loop import OptimConfig, fit

CPU = torch.device("cpu")
TEACHER_CASES = [case_id for case_id, name, _ in CASES if CATALOG[name].teacher]


def test_there_are_methods_with_a_teacher():
    assert {"rkd", "aml", "stage1", "refilled"} <= set(TEACHER_CASES)


@pytest.mark.parametrize("case_id", TEACHER_CASES)
def test_teacher_state_is_unchanged_by_fit(tmp_path, case_id):
    ds = tiny_dataset()
    classes = list(range(ds.num_classes))
    plain = Batches(task_split(ds.train, classes), ds, 8, False, CPU, 0)       # un-augmented, for prepare
    method = build_case(case_id, classes=ds.num_classes, prepare_batches=plain, seed=1)
    method.teacher.train()             # as built; Method must put (and keep) it in eval mode
    teacher_before = {k: v.detach().clone() for k, v in method.teacher.state_dict().items()}
    student_before = {k: v.detach().clone() for k, v in method.student.state_dict().items()}
    assert any(k.endswith("running_mean") for k in teacher_before)             # it has BN statistics to move

    train = Batches(task_split(ds.train, classes), ds, 8, True, CPU, 3)
    fit(method, train, lambda: {}, OptimConfig(epochs=2, batch_size=8, lr=0.05), tmp_path, CPU, 3, graph="off")

    after = method.teacher.state_dict()
    assert after.keys() == teacher_before.keys()
    changed = [k for k, v in after.items() if not torch.equal(v, teacher_before[k])]
    assert not changed, f"{case_id}: the teacher changed in {changed[:5]}"
    assert not method.teacher.training
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    moved = [k for k, v in method.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert moved, f"{case_id}: the student did not train, so the comparison says nothing"
