"""The joint head (supplement §2, harmonic mean; docs/method.md "Harmonic mean" [D]): any
student run may carry a second linear head over the teacher's classes the student does not
have, C' \\ C ("old" classes), so that the student predicts over C' ∪ C.

`JointHead` wraps any catalog method without changing it: the method's loss terms stay as
they are, and one term is added,

    old = weight · T² · KL(softmax(t / T) ‖ softmax(h(e) / T)),

with e the student's embedding of the batch (the one the method's own forward computed,
read through a forward hook: no second student forward), h a Linear(embedding_dim,
|C' \\ C|) and t the frozen teacher's own-head logits for those classes on the same,
augmented, student images (learning without forgetting, Li & Hoiem 2016; T = 2). The
gradient reaches the backbone: a joint-head run trains another network than the plain run,
which is why it is its own run. No image of a class outside C is ever seen. The joint
prediction is the argmax over [h(e), the student's head over C] (`refilled.evaluate.
joint_accuracy`). At r = 1 there are no old classes: no head, and `old` is 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from refilled.losses import lwf_loss
from refilled.methods.base import Method


class JointHead(Method):
    def __init__(self, method: Method, teacher: nn.Module, old_index: list[int], weight: float, T: float,
                 seed: int):
        super().__init__(method.student, teacher)
        self.inner = method
        self.trains_classifier = method.trains_classifier
        self.weight, self.T = float(weight), float(T)
        self.register_buffer("old_index", torch.tensor(old_index, dtype=torch.long), persistent=False)
        dim = method.student.embedding_dim
        self.old_head = nn.Linear(dim, len(old_index)) if old_index else None
        if self.old_head is not None:   # nn.Linear's default init, from the run's seed (init runs draw nothing else)
            g = torch.Generator().manual_seed(seed * 7_919 + 1)
            bound = 1 / math.sqrt(dim)
            with torch.no_grad():
                self.old_head.weight.copy_(torch.empty_like(self.old_head.weight).uniform_(-bound, bound, generator=g))
                self.old_head.bias.copy_(torch.empty_like(self.old_head.bias).uniform_(-bound, bound, generator=g))
        self._embedding = None
        method.student.register_forward_hook(self._keep_embedding)

    def train(self, mode: bool = True):
        super().train(mode)      # the base class puts the teacher in eval mode ...
        self.inner.train(mode)   # ... but the method decides its teacher's mode (Overhaul: BN batch statistics)
        return self

    def _keep_embedding(self, module, inputs, output):
        self._embedding = output.embedding

    def prepare(self, run) -> None:
        self.inner.prepare(run)

    def finish(self, run) -> dict:
        return self.inner.finish(run)

    def old_logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """The old-class head on student embeddings, [N, |C' \\ C|] (N x 0 at r = 1)."""
        if self.old_head is None:
            return embedding.new_zeros((embedding.shape[0], 0))
        return self.old_head(embedding)

    def loss(self, x, y):
        self._embedding = None
        logits, terms = self.inner.loss(x, y)
        if "old" in terms:
            raise RuntimeError(f"{type(self.inner).__name__} already has a loss term named 'old'")
        if self.old_head is None:
            return logits, {**terms, "old": logits.new_zeros((), dtype=torch.float32)}
        emb = self._embedding
        if emb is None or emb.shape[0] != x.shape[0]:
            raise RuntimeError(f"{type(self.inner).__name__}.loss did not run the student on the batch")
        with torch.no_grad():
            t_old = self.teacher(x).logits.index_select(1, self.old_index)
        return logits, {**terms, "old": self.weight * lwf_loss(self.old_head(emb), t_old, self.T)}
