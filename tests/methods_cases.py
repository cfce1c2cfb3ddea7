"""Every method of the catalog, built for the step-level tests: the catalog's names plus a
few hyper-parameter variants whose code paths differ (K̂ = 2, per-batch centres)."""

import torch

from refilled.methods import CATALOG
from refilled.models import build_model

# (id, catalog name, --set overrides)
CASES = [(name, name, {}) for name in CATALOG] + [
    ("stage1-k2", "stage1", {"k_hat": 2}),
    ("refilled-batch-centers", "refilled", {"centers": "batch"}),
]
CASE_IDS = [c[0] for c in CASES]


class FakeRun:
    """What `Method.prepare` reads of a run: un-augmented training batches and the device."""

    def __init__(self, batches, device):
        self.train_plain, self.device = batches, device


def build_case(case_id, student_arch="wrn-10-1", teacher_arch="wrn-10-2", classes=4, teacher_classes=6,
               prepare_batches=None, device=torch.device("cpu"), seed=0):
    """The method of CASES[case_id] around fresh networks (seeded), prepared on `prepare_batches`."""
    _, name, overrides = CASES[CASE_IDS.index(case_id)]
    entry = CATALOG[name]
    torch.manual_seed(seed)
    student = build_model(student_arch, classes)
    if entry.applies_to == "same-classes":   # KD and its kin read the teacher's logits over the student's classes
        teacher_classes = classes
    teacher = build_model(teacher_arch, teacher_classes).eval() if entry.teacher else None
    method = entry.build(student, teacher, entry.resolve(overrides))
    if prepare_batches is not None:
        method.to(device).prepare(FakeRun(prepare_batches, device))
    return method


def batches(n=3, b=8, classes=4, seed=0):
    """n seeded batches of b 16x16 images whose mean depends on the label (something to learn)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.arange(classes).repeat_interleave(b // classes)[torch.randperm(b, generator=g)]
        out.append((torch.randn(b, 3, 16, 16, generator=g) + y.view(-1, 1, 1, 1) * 0.3, y))
    return out
