"""REFILLED stage 2: local classifier distillation. The stage-1 student is fine-tuned with
CE plus the KL between the teacher's embedding-induced classifier over the classes of the
batch and the student's, weighted per instance by λ_i. One class, three table rows (the
catalog's presets of `weighting`): REFILLED (adaptive λ_i), REFILLED⁻ (λ_i = λ) and
REFILLED^EMB (λ = 0, CE fine-tuning of the stage-1 embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refilled.evaluate import forward_all, true_class_probability
from refilled.io import write_csv
from refilled.losses import local_distillation_loss
from refilled.methods.base import Method

HPARAMS = {
    "lam": ("float>=0", 2.0, "λ, the weight of the teaching term [S Figure 2]"),
    "tau": ("float>0", 2.0, "temperature τ2 of both local classifiers"),
    "centers": ("choice:fixed|batch", "fixed", "teacher class centres: once from the student's training images "
                                               "(GKD code) or from each batch (CVPR code)"),
    "weighting": ("choice:true-class|constant|none", "true-class",
                  "λ_i: λ·p_T(y_i|x_i) of the local classifier, λ, or 0"),
}


class LocalDistillation(Method):
    def __init__(self, student, teacher, *, lam, tau, centers, weighting):
        super().__init__(student, teacher)
        self.lam, self.tau, self.weighting, self.centers_mode = lam, tau, weighting, centers
        self.register_buffer("centers", torch.zeros(student.num_classes, teacher.embedding_dim))

    def prepare(self, run):
        """The teacher's class centres from the student's un-augmented training images."""
        _, self._t_emb, self._t_labels = forward_all(self.teacher, run.train_plain, run.device)
        self.set_centers(batch_centers(self._t_emb, self._t_labels, self.student.num_classes))

    def set_centers(self, centers: torch.Tensor) -> None:
        self.centers.copy_(centers.detach().float())

    def loss(self, x, y):
        logits = self.student(x).logits
        t_emb = self.teacher_embedding(x)
        centers = batch_centers(t_emb, y, logits.shape[1]) if self.centers_mode == "batch" else self.centers
        teach, _ = local_distillation_loss(logits, t_emb, centers, y, tau=self.tau, lam=self.lam,
                                           weighting=self.weighting)
        return logits, {"ce": F.cross_entropy(logits.float(), y), "teach": teach}

    def finish(self, run):
        self.write_lambda_dump(run, run.spec.out / "lambda_i.csv")
        return {}

    def write_lambda_dump(self, run, path):
        """λ_i of every training instance (un-augmented), all student classes as the local set,
        from the centres computed before training (also under `centers: batch`)."""
        emb, y = self._t_emb, self._t_labels
        p_true = true_class_probability(emb, self.centers.cpu(), y, self.tau)
        lam_i = {"true-class": self.lam * p_true, "constant": torch.full_like(p_true, self.lam),
                 "none": torch.zeros_like(p_true)}[self.weighting]
        seen = set(run.split["teacher_classes"])
        rows = [{"index": int(i), "label": int(label), "class": run.classes[label],
                 "seen": int(run.classes[label] in seen), "p_teacher_true": round(float(p), 6),
                 "lambda_i": round(float(l), 6)}
                for i, label, p, l in zip(run.train_plain.split.indices.tolist(), y.tolist(), p_true, lam_i)]
        write_csv(path, rows, list(rows[0]))


def batch_centers(teacher_emb: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """L2-normalised class means of raw teacher embeddings (rows of absent classes are 0)."""
    sums = torch.zeros(num_classes, teacher_emb.shape[1], device=teacher_emb.device)
    sums = sums.index_add(0, labels, teacher_emb.float())
    return F.normalize(sums, dim=1)
