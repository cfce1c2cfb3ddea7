"""Overhaul of feature distillation (Heo et al., ICCV 2019; code: clovaai/overhaul-distillation,
`CIFAR-100/distiller.py`, `train_with_distillation.py`). At each of the three stages the
student's pre-ReLU feature (`pre_relu`, the BN output before the ReLU) goes through a
1x1 conv + BN connector to the teacher's width; the target is the teacher's pre-ReLU
feature through its margin-ReLU, the margins per channel from the BN before that ReLU
(`overhaul_margins`); the partial L2 is summed over elements, stage i weighted by
1 / 2**(n - i - 1); loss = CE + sum / batch / 1000.

The teacher's BN: their `train_with_distill` calls `d_net.t_net.train()`, so the teacher's
BNs normalise with batch statistics while distilling. We do the same, but without moving
its running statistics (nothing reads them during distillation, and our teacher file
stays what it was): the teacher's BNs run in training mode with `track_running_stats`
off. Dropout stays off in the teacher (their CIFAR WRN has none)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from refilled.losses import overhaul_margins, overhaul_partial_l2
from refilled.methods.base import Method
from refilled.methods.fitnet import stage_channels

HPARAMS = {
    "scale": ("float>0", 1e-3, "factor on the summed partial L2 per image [C: loss_distill.sum() / batch / 1000]"),
}


def connector(s_channels: int, t_channels: int) -> nn.Sequential:
    """Their `build_feature_connector`: 1x1 conv (He-normal over fan-out) + BN (1, 0)."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channels))
    bn = nn.BatchNorm2d(t_channels)
    return nn.Sequential(conv, bn)


class Overhaul(Method):
    def __init__(self, student, teacher, *, scale):
        super().__init__(student, teacher)
        self.scale = scale
        s, t = stage_channels(student), stage_channels(teacher)
        if len(s) != len(t):
            raise ValueError(f"Overhaul: student has {len(s)} stages, teacher {len(t)}")
        self.connectors = nn.ModuleList(connector(a, b) for a, b in zip(s, t))
        for i, bn in enumerate(teacher.bn_before_relu()):
            self.register_buffer(f"margin{i}", overhaul_margins(bn))
        self.teacher_bns = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for bn in self.teacher_bns:
            bn.track_running_stats = False   # training mode: batch statistics, running ones untouched

    def train(self, mode: bool = True):
        super().train(mode)   # the teacher in eval mode ...
        for bn in self.teacher_bns:
            bn.train(mode)    # ... but its BNs as in their t_net.train()
        return self

    def loss(self, x, y):
        out = self.student(x)
        with torch.no_grad():
            t_pre = self.teacher(x).pre_relu
        n = len(t_pre)
        distill = sum(overhaul_partial_l2(c(s), t, getattr(self, f"margin{i}")) / 2 ** (n - i - 1)
                      for i, (c, s, t) in enumerate(zip(self.connectors, out.pre_relu, t_pre)))
        return out.logits, {"ce": F.cross_entropy(out.logits.float(), y),
                            "distill": self.scale * distill / x.shape[0]}
