"""REFILLED stage 1: comparison matching. The student's embedding learns to reproduce the
frozen teacher's similarity comparisons over semi-hard tuples (supplement Eq. 1-5; tuple
temperature and loss scale from the authors' GKD code). The head is not trained: the
run is scored by NCM accuracy."""

from __future__ import annotations

from refilled.losses import comparison_matching_loss
from refilled.methods.base import Method

HPARAMS = {
    "k_hat": ("k_hat", "inf", "max negatives per tuple K̂ (1: triplets; inf: every semi-hard negative) [S Table 4]"),
    "k_mode": ("choice:per-pair|batch-min", "per-pair",
               "K per (a, p): min(K', K̂), the closest negatives (Table 4's reading) [D]; batch-min: one K for the "
               "batch, the fewest semi-hard negatives of any pair, the first K in the miner's order [C merge]"),
    "tau": ("float>0", 4.0, "tuple temperature τ1 [C]"),
    "margin": ("float>0", 0.2, "semi-hard margin m of the miner [C]"),
    "scale": ("float>0", 1000.0, "factor on the KL term [C]"),
}


class ComparisonMatching(Method):
    def __init__(self, student, teacher, *, k_hat, k_mode, tau, margin, scale):
        super().__init__(student, teacher)
        self.k_hat, self.k_mode, self.tau, self.margin, self.scale = k_hat, k_mode, tau, margin, scale

    def loss(self, x, y):
        out = self.student(x)
        cm = comparison_matching_loss(out.embedding, self.teacher_embedding(x), y, self.tau, self.margin, self.k_hat,
                                      k_mode=self.k_mode)
        return out.logits, {"cm": self.scale * cm}
