from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Method(nn.Module):
    """`student` is the network being trained; subclasses may hold a frozen `teacher`."""

    name = "base"
    trains_classifier = True    # False: the student's head is untouched, its accuracy means nothing

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "teacher", None) is not None:
            self.teacher.eval()  # a teacher is never trained and its BN statistics never move
        return self

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class CrossEntropy(Method):
    name = "ce"

    def loss(self, x, y):
        logits = self.student(x).logits
        return logits, {"ce": F.cross_entropy(logits.float(), y)}
