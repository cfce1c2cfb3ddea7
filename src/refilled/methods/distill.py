"""REFILLED's two stages and the cross-task baselines RKD and AML.

Each method holds the student it trains and a frozen teacher; `loss` returns the
student's logits and the named loss terms that the training loop sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refilled.losses import aml_loss, comparison_matching_loss, local_distillation_loss, rkd_terms
from refilled.methods.base import Method


class TeacherMethod(Method):
    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__(student)
        self.teacher = teacher.eval().requires_grad_(False)

    def teacher_embedding(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(x).embedding


class ComparisonMatching(TeacherMethod):
    """Stage 1: match the teacher's similarity comparisons over tuples (embedding only)."""

    name = "stage1"
    trains_classifier = False   # embedding only: metrics report NCM accuracy, not the head's

    def __init__(self, student, teacher, k_hat: int | None = None, tau: float = 4.0, margin: float = 0.2,
                 scale: float = 1000.0):
        super().__init__(student, teacher)
        self.k_hat, self.tau, self.margin, self.scale = k_hat, tau, margin, scale

    def loss(self, x, y):
        out = self.student(x)
        cm = comparison_matching_loss(out.embedding, self.teacher_embedding(x), y, self.tau, self.margin, self.k_hat)
        return out.logits, {"cm": self.scale * cm}


class LocalDistillation(TeacherMethod):
    """Stage 2: CE + the teacher's embedding-induced local classifier, weighted per instance.

    `centers` are the teacher's L2-normalised class centres of the student's classes,
    computed once before training; centers=None recomputes them from each batch.
    """

    name = "stage2"

    def __init__(self, student, teacher, centers: torch.Tensor | None, weighting: str = "adaptive",
                 lam: float = 2.0, tau: float = 2.0):
        super().__init__(student, teacher)
        self.weighting, self.lam, self.tau = weighting, lam, tau
        self.per_batch_centers = centers is None
        num_classes = student.num_classes
        self.register_buffer("centers", torch.zeros(num_classes, teacher.embedding_dim) if centers is None
                             else centers.detach().clone().float())

    def loss(self, x, y):
        logits = self.student(x).logits
        t_emb = self.teacher_embedding(x)
        centers = batch_centers(t_emb, y, logits.shape[1]) if self.per_batch_centers else self.centers
        teach, _ = local_distillation_loss(logits, t_emb, centers, y, self.tau, self.lam, self.weighting)
        return logits, {"ce": F.cross_entropy(logits.float(), y), "teach": teach}


def batch_centers(teacher_emb: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """L2-normalised class means of raw teacher embeddings (rows of absent classes are 0)."""
    sums = torch.zeros(num_classes, teacher_emb.shape[1], device=teacher_emb.device)
    sums = sums.index_add(0, labels, teacher_emb.float())
    return F.normalize(sums, dim=1)


class RKD(TeacherMethod):
    """Park et al. 2019: CE + 25 * distance + 50 * angle on the pooled embeddings."""

    name = "rkd"

    def __init__(self, student, teacher, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__(student, teacher)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def loss(self, x, y):
        out = self.student(x)
        dist, angle = rkd_terms(out.embedding, self.teacher_embedding(x))
        return out.logits, {"ce": F.cross_entropy(out.logits.float(), y),
                            "rkd_distance": self.distance_weight * dist, "rkd_angle": self.angle_weight * angle}


class AML(TeacherMethod):
    """CE + asymmetric contrastive loss: student anchors (projected), teacher positives/negatives."""

    name = "aml"

    def __init__(self, student, teacher, margin: float = 0.7, weight: float = 1.0):
        super().__init__(student, teacher)
        self.projection = nn.Linear(student.embedding_dim, teacher.embedding_dim)
        self.margin, self.weight = margin, weight

    def loss(self, x, y):
        out = self.student(x)
        aml = aml_loss(out.embedding, self.teacher_embedding(x), y, self.projection, self.margin)
        return out.logits, {"ce": F.cross_entropy(out.logits.float(), y), "aml": self.weight * aml}
