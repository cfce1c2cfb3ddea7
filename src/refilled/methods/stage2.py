"""REFILLED stage 2: local classifier distillation. The stage-1 student is fine-tuned with
CE plus the KL between the teacher's embedding-induced classifier over the classes of the
batch and the student's, weighted per instance by λ_i. One class, three table rows (the
catalog's presets of `weighting`): REFILLED (adaptive λ_i), REFILLED⁻ (λ_i = λ) and
REFILLED^EMB (λ = 0, CE fine-tuning of the stage-1 embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refilled.data.streams import epoch_generator
from refilled.evaluate import forward_all, true_class_probability
from refilled.io import write_csv
from refilled.losses import local_distillation_loss, teacher_confidence
from refilled.methods.base import Method

HPARAMS = {
    "lam": ("float>=0", 2.0, "λ, the weight of the teaching term [S Figure 2; the GKD code's default is 1]"),
    "tau": ("float>0", 1.0, "temperature τ2, dividing both local classifiers' logits [C: 1; CVPR code: 2]"),
    "kl_scale": ("choice:none|tau2", "none", "factor on the KL: none [C] or τ² (Hinton's scaling, our earlier reading)"),
    "centers": ("choice:fixed|batch", "fixed", "teacher class centres: once from the student's training images "
                                               "[C GKD] or from each batch [C CVPR]"),
    "weighting": ("choice:confidence|true-class|constant|none", "confidence",
                  "λ_i: λ·2σ(−w̃_i) from the teacher's own-head confidence [C wgkd]; λ·p_T(y_i|x_i) of the "
                  "local classifier (our earlier reading); λ; or 0"),
}


class LocalDistillation(Method):
    def __init__(self, student, teacher, *, lam, tau, kl_scale, centers, weighting):
        super().__init__(student, teacher)
        self.lam, self.tau, self.kl_scale, self.weighting, self.centers_mode = lam, tau, kl_scale, weighting, centers
        self.register_buffer("centers", torch.zeros(student.num_classes, teacher.embedding_dim))

    def prepare(self, run):
        """The teacher's class centres from the student's un-augmented training images."""
        self._t_logits, self._t_emb, self._t_labels = forward_all(self.teacher, run.train_plain, run.device)
        self.set_centers(batch_centers(self._t_emb, self._t_labels, self.student.num_classes))

    def set_centers(self, centers: torch.Tensor) -> None:
        self.centers.copy_(centers.detach().float())

    def loss(self, x, y):
        logits = self.student(x).logits
        with torch.no_grad():
            t_out = self.teacher(x)
        centers = batch_centers(t_out.embedding, y, logits.shape[1]) if self.centers_mode == "batch" else self.centers
        teach, _ = local_distillation_loss(logits, t_out.embedding, centers, y, tau=self.tau, lam=self.lam,
                                           weighting=self.weighting, teacher_logits=t_out.logits,
                                           kl_scale=self.kl_scale)
        return logits, {"ce": F.cross_entropy(logits.float(), y), "teach": teach}

    def finish(self, run):
        self.write_lambda_dump(run, run.spec.out / "lambda_i.csv")
        return {}

    def write_lambda_dump(self, run, path):
        """Per training instance: the teacher's raw confidence w_i and λ_i as training computes
        them, over un-augmented images in batches of the training batch size, in epoch 0's
        seeded order (the last, partial batch included, so every instance has one), with the
        centres computed before training (also under `centers: batch`). p_teacher_true is the
        local classifier's p_T(y_i | x_i) over all student classes, for the `true-class` reading."""
        logits, emb, y = self._t_logits, self._t_emb, self._t_labels
        n, bs = len(y), run.spec.batch_size
        order = torch.randperm(n, generator=epoch_generator(run.spec.seed, 0))
        confidence, lam_i = torch.zeros(n), torch.zeros(n)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            confidence[idx] = teacher_confidence(logits[idx])
            lam_i[idx] = local_distillation_loss(torch.zeros(len(idx), self.student.num_classes), emb[idx],
                                                 self.centers.cpu(), y[idx], tau=self.tau, lam=self.lam,
                                                 weighting=self.weighting, teacher_logits=logits[idx])[1]
        p_true = true_class_probability(emb, self.centers.cpu(), y, self.tau)
        seen = set(run.split["teacher_classes"])
        rows = [{"index": int(i), "label": int(label), "class": run.classes[label],
                 "seen": int(run.classes[label] in seen), "confidence": round(float(w), 6),
                 "p_teacher_true": round(float(p), 6), "lambda_i": round(float(l), 6)}
                for i, label, w, p, l in zip(run.train_plain.split.indices.tolist(), y.tolist(), confidence,
                                             p_true, lam_i)]
        write_csv(path, rows, list(rows[0]))


def batch_centers(teacher_emb: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """L2-normalised class means of raw teacher embeddings (rows of absent classes are 0)."""
    sums = torch.zeros(num_classes, teacher_emb.shape[1], device=teacher_emb.device)
    sums = sums.index_add(0, labels, teacher_emb.float())
    return F.normalize(sums, dim=1)
