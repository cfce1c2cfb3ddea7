"""Jacobian matching (Srinivas & Fleuret, ICML 2018), our reading: CE (plus, where alpha > 0,
Hinton's KD term) plus a weight times the squared distance between the L2-normalised
gradients, with respect to the input image, of the true-class logit of teacher and
student (`refilled.losses.jacobian_loss`). Needs a double backward; the step still goes
through `TrainStep` (if a CUDA graph cannot capture it, the step falls back to eager and
says so). The weight and the class whose gradient is matched are our choice: we have not
checked them against the paper's code (none is public)."""

from __future__ import annotations

import torch.nn.functional as F

from refilled.losses import jacobian_loss, kd_loss
from refilled.methods.base import Method

HPARAMS = {
    "weight": ("float>=0", 1.0, "weight of the Jacobian term [our choice]"),
    "alpha": ("float>=0", 0.0, "weight of an added KD term (T = 4), CE gets 1 - alpha [our choice: CE only]"),
}


class JacobianMatching(Method):
    def __init__(self, student, teacher, *, weight, alpha):
        super().__init__(student, teacher)
        self.weight, self.alpha = weight, alpha

    def loss(self, x, y):
        x = x.detach().requires_grad_()   # a leaf on the batch's storage: gradients w.r.t. the image
        logits = self.student(x).logits
        t_logits = self.teacher(x).logits   # grad through the frozen teacher to x only
        terms = {"ce": (1 - self.alpha) * F.cross_entropy(logits.float(), y),
                 "jacobian": self.weight * jacobian_loss(x, logits, t_logits, y)}
        if self.alpha > 0:
            terms["kd"] = self.alpha * kd_loss(logits, t_logits.detach())
        return logits, terms
