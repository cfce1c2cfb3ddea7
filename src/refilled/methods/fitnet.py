"""FitNet (Romero et al., ICLR 2015), stage 1: hint training. The student's layers up to the
guided layer (the output of its middle group) learn to regress the teacher's hint (the
output of the teacher's middle group) through a 1x1 convolutional regressor (Romero's
convolutional regressor with kernel N_g - N_h + 1 = 1: the WRN groups of teacher and
student have the same spatial size). Nothing after the guided layer gets a gradient; the
head is not trained (the run is not a table row). Stage 2 is KD from this initialisation
(the catalog's `fitnet` line: `refilled.methods.kd:KD`, starts from this run)."""

from __future__ import annotations

import torch
from torch import nn

from refilled.losses import fitnet_loss
from refilled.methods.base import Method

HPARAMS = {}


def stage_channels(model: nn.Module) -> list[int]:
    """Channels of each stage output (the BN after each stage sees them all)."""
    return [bn.num_features for bn in model.bn_before_relu()]


def build_regressor(student: nn.Module, teacher: nn.Module) -> tuple[int, nn.Conv2d]:
    """(the middle stage's index, the 1x1 regressor from the student's guided layer to the
    teacher's hint)."""
    s, t = stage_channels(student), stage_channels(teacher)
    if len(s) != len(t):
        raise ValueError(f"FitNet: student has {len(s)} stages, teacher {len(t)}; the hint needs the same layout")
    middle = len(s) // 2
    return middle, nn.Conv2d(s[middle], t[middle], kernel_size=1)


class FitNetHint(Method):
    def __init__(self, student, teacher):
        super().__init__(student, teacher)
        self.middle, self.regressor = build_regressor(student, teacher)

    def loss(self, x, y):
        out = self.student(x)
        with torch.no_grad():
            hint = self.teacher(x).features[self.middle]
        return out.logits, {"hint": fitnet_loss(out.features[self.middle], hint, self.regressor)}
