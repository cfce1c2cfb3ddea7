"""AML, asymmetric metric learning (Budnik & Avrithis, CVPR 2021): CE + a contrastive loss
whose anchors are the student's projected, normalised embeddings and whose positives and
negatives are the teacher's embeddings of the batch."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from refilled.losses import aml_loss
from refilled.methods.base import Method

HPARAMS = {
    "margin": ("float>0", 0.7, "margin beyond which negatives are not pushed [D]"),
    "weight": ("float>=0", 1.0, "weight of the contrastive term [D]"),
}


class AML(Method):
    def __init__(self, student, teacher, *, margin, weight):
        super().__init__(student, teacher)
        self.projection = nn.Linear(student.embedding_dim, teacher.embedding_dim)
        self.margin, self.weight = margin, weight

    def loss(self, x, y):
        out = self.student(x)
        aml = aml_loss(out.embedding, self.teacher_embedding(x), y, self.projection, self.margin)
        return out.logits, {"ce": F.cross_entropy(out.logits.float(), y), "aml": self.weight * aml}
