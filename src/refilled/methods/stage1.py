"""REFILLED stage 1: comparison matching. The student's embedding learns to reproduce the
frozen teacher's similarity comparisons over semi-hard tuples (supplement Eq. 1-5; tuple
temperature and loss scale from the authors' GKD code). The head is not trained: the
run is scored by NCM accuracy."""

from __future__ import annotations

import torch

from refilled.losses import comparison_matching_loss, pairwise_distances, semihard_mask
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

    def reference_loss(self, x, y):
        """The same loss the authors' way (a Python tuple loop): `refilled bench`'s reference."""
        out = self.student(x)
        cm = reference_tuple_loss(out.embedding, self.teacher_embedding(x), y, self.tau, self.margin, self.k_hat)
        return out.logits, {"cm": self.scale * cm}


def reference_tuple_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
                         tau: float = 4.0, margin: float = 0.2, k_hat: int | None = None) -> torch.Tensor:
    """Stage-1 comparison matching the way the authors' code builds it: a vectorised miner
    returns the semi-hard triplets (a, p, n) sorted by (a, p); a Python loop walks the
    triplets one by one (tensor element comparisons, one host sync each) to find the
    tuples (a, p); for each tuple a boolean mask over all triplets selects its negatives
    (the K̂ closest to the anchor kept), which are padded into an index matrix with a
    validity mask; then KL(p_T || p_S) of each tuple's softmax over
    [-d(a,p), -d(a,n_1), ...] / tau, averaged over tuples. Same value as the dense form
    `refilled.losses.comparison_matching_loss` (tests/test_bench.py); `refilled bench`
    measures our step against it."""

    d_s = pairwise_distances(student_emb)
    d_t = pairwise_distances(teacher_emb.detach())
    dev = d_s.device
    with torch.no_grad():   # the miner
        anchor_id, positive_id, negative_id = semihard_mask(d_s.detach(), labels, margin).nonzero(as_tuple=True)
    tuple_a, tuple_p = [], []
    last_a = last_p = -1
    for i in range(anchor_id.shape[0]):
        if anchor_id[i] != last_a or positive_id[i] != last_p:
            tuple_a.append(anchor_id[i])
            tuple_p.append(positive_id[i])
            last_a, last_p = anchor_id[i], positive_id[i]
    if not tuple_a:
        return d_s.sum() * 0
    negatives = []
    for a, p in zip(tuple_a, tuple_p):
        negs = negative_id[(anchor_id == a) & (positive_id == p)]
        if k_hat is not None and negs.shape[0] > k_hat:
            negs = negs[torch.sort(d_s.detach()[a, negs], stable=True).indices[:k_hat]]
        negatives.append(negs)
    width = max(n.shape[0] for n in negatives)
    neg_idx = torch.stack([torch.cat([n, torch.zeros(width - n.shape[0], dtype=torch.long, device=dev)])
                           for n in negatives])
    valid = torch.stack([torch.cat([torch.ones(n.shape[0], dtype=torch.bool, device=dev),
                                    torch.zeros(width - n.shape[0], dtype=torch.bool, device=dev)])
                         for n in negatives])
    a, p = torch.stack(tuple_a), torch.stack(tuple_p)

    def log_probs(d):
        neg = (-d[a[:, None], neg_idx]).masked_fill(~valid, float("-inf"))
        return torch.log_softmax(torch.cat([-d[a, p][:, None], neg], 1) / tau, dim=1)

    log_s, log_t = log_probs(d_s), log_probs(d_t)
    support = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
    kl = torch.where(support, log_t.exp() * (log_t - log_s), torch.zeros_like(log_s)).sum(1)
    return kl.mean()
