"""KD (Hinton et al., 2015): CE plus the temperature-softened KL to the teacher's logits;
teacher and student on the same classes. T = 4 and the weights (1 - alpha) CE + alpha KD
with alpha = 0.9 are Zagoruyko & Komodakis's CIFAR setting (attention-transfer code,
`utils.distillation`, README: `--alpha 0.9`, `--temperature 4`), the KD row Heo et al.
compare against. Also FitNet's second stage (the catalog's `fitnet`, from the hint run)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refilled.losses import kd_loss
from refilled.methods.base import Method

HPARAMS = {
    "T": ("float>0", 4.0, "temperature of both softmaxes [AT code: --temperature 4]"),
    "alpha": ("float>=0", 0.9, "weight of the KD term, CE gets 1 - alpha [AT code README: --alpha 0.9]"),
}


class KD(Method):
    def __init__(self, student, teacher, *, T, alpha):
        super().__init__(student, teacher)
        self.T, self.alpha = T, alpha

    def loss(self, x, y):
        logits = self.student(x).logits
        with torch.no_grad():
            t_logits = self.teacher(x).logits
        return logits, {"ce": (1 - self.alpha) * F.cross_entropy(logits.float(), y),
                        "kd": self.alpha * kd_loss(logits, t_logits, self.T)}
