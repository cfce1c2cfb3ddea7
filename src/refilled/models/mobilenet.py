"""MobileNet-v1 (Howard et al. 2017) with a width multiplier."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .wrn import ModelOutput, init_weights

# (output channels, stride) of the 13 depthwise-separable blocks, grouped by resolution stage.
STAGES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((64, 1),),
    ((128, 2), (128, 1)),
    ((256, 2), (256, 1)),
    ((512, 2),) + ((512, 1),) * 5,
    ((1024, 2), (1024, 1)),
)


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(out_ch)]


class MobileNetV1(nn.Module):
    """MobileNet-v1 with width multiplier ``alpha`` (channels ``max(min_channels, int(c * alpha))``).

    The network is split into five resolution stages (input strides 2, 4, 8, 16, 32):
    stem conv + 64-block, the two 128-blocks, the two 256-blocks, the six 512-blocks and the
    two 1024-blocks. ``features`` holds, for each stage, the BatchNorm output of its last
    pointwise conv, i.e. the stage output before its final ReLU. The fifth is the tensor
    whose ReLU is pooled into the embedding. These are also ``pre_relu`` (the outputs of
    ``bn_before_relu()``, each stage's last BN).
    """

    min_channels = 8   # the authors' code: 1 (refilled.models.authors)

    def __init__(self, alpha: float, num_classes: int):
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"MobileNet width multiplier must be > 0, got {alpha}")
        in_ch = self.scaled(32, alpha)
        layers: list[nn.Module] = [*conv_bn(3, in_ch, 3, 2), nn.ReLU(inplace=True)]
        self.stages = nn.ModuleList()
        for stage in STAGES:
            for out, stride in stage:
                out = self.scaled(out, alpha)
                layers += [*conv_bn(in_ch, in_ch, 3, stride, groups=in_ch), nn.ReLU(inplace=True),
                           *conv_bn(in_ch, out, 1, 1), nn.ReLU(inplace=True)]
                in_ch = out
            self.stages.append(nn.Sequential(*layers[:-1]))
            layers = []
        self.head = nn.Linear(in_ch, num_classes)
        self.alpha = alpha
        self.embedding_dim = in_ch
        self.num_classes = num_classes
        self.init_weights()

    def scaled(self, channels: int, alpha: float) -> int:
        scaled = max(self.min_channels, int(channels * alpha))
        if scaled < 1:
            raise ValueError(f"MobileNet width multiplier {alpha} leaves {channels} channels with none")
        return scaled

    def init_weights(self) -> None:
        init_weights(self)

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [stage[-1] for stage in self.stages]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
            x = F.relu(x)
        embedding = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return ModelOutput(self.head(embedding), embedding, tuple(features), tuple(features))
