"""The contract every method follows (mdistiller-style: one dispatch point, `loss` returns
the logits and the named loss terms that the training loop sums)."""

from __future__ import annotations

import torch
from torch import nn


class Method(nn.Module):
    """`student` is the network being trained; a method with a teacher holds it frozen.

    Hyper-parameters arrive as keyword arguments, exactly the keys of the method file's
    `HPARAMS` (resolved by the catalog: defaults, the catalog line's preset, the profile and
    `--set`). Two optional hooks see the run (`refilled.training.run.Context`): `prepare` once before
    training (stage 2 computes its class centres there) and `finish` after it (extra output
    files; returns extra summary values).
    """

    trains_classifier = True    # set from the catalog's scored_by: False for embedding-only methods

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None):
        super().__init__()
        self.student = student
        if teacher is not None:
            self.teacher = teacher.eval().requires_grad_(False)
        else:
            self.teacher = None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # a teacher is never trained and its BN statistics never move
        return self

    def teacher_embedding(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(x).embedding

    def prepare(self, run) -> None:
        """Called once before training with the run's context (data, device, split)."""

    def finish(self, run) -> dict:
        """Called after training, before summary.json; extra files go to `run.spec.out`."""
        return {}

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError
