"""RKD (Park et al., CVPR 2019): CE + distance-wise and angle-wise relational losses on the
pooled embeddings; label-free, so it applies across tasks. Weights 25 / 50 are the
paper's (and its code's) CIFAR setting."""

from __future__ import annotations

import torch.nn.functional as F

from refilled.losses import rkd_terms
from refilled.methods.base import Method

HPARAMS = {
    "distance_weight": ("float>=0", 25.0, "weight of the distance-wise term (Park et al.)"),
    "angle_weight": ("float>=0", 50.0, "weight of the angle-wise term (Park et al.)"),
}


class RKD(Method):
    def __init__(self, student, teacher, *, distance_weight, angle_weight):
        super().__init__(student, teacher)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def loss(self, x, y):
        out = self.student(x)
        dist, angle = rkd_terms(out.embedding, self.teacher_embedding(x))
        return out.logits, {"ce": F.cross_entropy(out.logits.float(), y),
                            "rkd_distance": self.distance_weight * dist, "rkd_angle": self.angle_weight * angle}
