"""Why does RKD sit near chance in the demo's WRN cells? The gradient norms of CE and of the
weighted RKD terms (Park et al.'s 25 / 50) with respect to the student's parameters, at the
first step and at the last, for batch 32 and 128, and the final test accuracy beside CE alone.

    PYTHONPATH=src python scripts/rkd_gradient_probe.py SPLIT.json TEACHER/model.pt [ARCH PER_CLASS EPOCHS]
"""
import json
import sys

import torch
import torch.nn.functional as F

from refilled.training.checkpoints import load_model
from refilled.data import load_dataset
from refilled.data.batches import Batches, task_split
from refilled.losses import rkd_terms
from refilled.models import build_model
from refilled.training.run import read_split

torch.set_num_threads(2)
split = read_split(sys.argv[1])
teacher, _ = load_model(sys.argv[2])
teacher.eval()
arch, per_class, epochs = (sys.argv[3:6] + ["wrn-10-1", "30", "30"][len(sys.argv[3:6]):])
per_class, epochs = int(per_class), int(epochs)
ds = load_dataset("fashion-mnist", "data/raw", verify_checksums=False)
cls = split["student_classes"]
def gnorm(loss, model):
    g = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((x.float() ** 2).sum() for x in g if x is not None)))
for bs in (32, 128):
    for w in ((25, 50), (0, 0)):
        torch.manual_seed(0)
        student = build_model(arch, len(cls))
        opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
        tr = Batches(task_split(ds.train, cls, per_class, 0), ds, bs, True, "cpu", 0)
        te = Batches(task_split(ds.test, cls), ds, 500, False, "cpu")
        log = []
        for epoch in range(epochs):
            student.train()
            for x, y in tr:
                out = student(x)
                with torch.no_grad():
                    t = teacher(x).embedding
                d, a = rkd_terms(out.embedding, t)
                ce = F.cross_entropy(out.logits, y)
                if epoch == 0 and not log or (epoch == epochs - 1 and len(log) == 1):
                    log.append({"epoch": epoch, "ce": round(float(ce.detach()), 3), "dist": round(float(w[0] * d.detach()), 3),
                                "angle": round(float(w[1] * a.detach()), 3), "g_ce": round(gnorm(ce, student), 3),
                                "g_dist": round(gnorm(w[0] * d, student), 3) if w[0] else 0,
                                "g_angle": round(gnorm(w[1] * a, student), 3) if w[1] else 0,
                                "emb_norm": round(float(out.embedding.detach().norm(dim=1).mean()), 3)})
                loss = ce + w[0] * d + w[1] * a
                opt.zero_grad()
                loss.backward()
                opt.step()
        student.eval()
        correct = n = 0
        with torch.no_grad():
            for x, y in te:
                correct += int((student(x).logits.argmax(1) == y).sum()); n += len(y)
        print(json.dumps({"batch": bs, "weights": w, "test_acc": round(correct / n, 3), "log": log}), flush=True)
