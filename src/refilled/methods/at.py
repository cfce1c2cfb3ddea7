"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): CE plus beta times the summed
squared differences of the normalised spatial attention maps (p = 2) of the three WRN
groups (`features`, the group outputs, as in their `cifar.py`: `g0, g1, g2`); beta = 1000
as in their code (`--beta 1e+3`, the loss written as `beta * sum(at_losses)`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refilled.losses import at_loss
from refilled.methods.base import Method

HPARAMS = {
    "beta": ("float>=0", 1000.0, "weight of the attention term [AT code README: --beta 1e+3]"),
    "p": ("float>0", 2.0, "power of |F| in the attention map [AT paper and code: 2]"),
}


class AT(Method):
    def __init__(self, student, teacher, *, beta, p):
        super().__init__(student, teacher)
        self.beta, self.p = beta, p

    def loss(self, x, y):
        out = self.student(x)
        with torch.no_grad():
            t_features = self.teacher(x).features
        return out.logits, {"ce": F.cross_entropy(out.logits.float(), y),
                            "at": self.beta * at_loss(out.features, t_features, self.p)}
