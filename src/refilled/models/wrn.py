"""Wide residual networks (Zagoruyko & Komodakis 2016) in the pre-activation CIFAR layout."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class ModelOutput(NamedTuple):
    """What every model's ``forward`` returns.

    logits: (B, num_classes).
    embedding: (B, embedding_dim), the globally average-pooled post-BN-ReLU features fed to
        ``head``; this is phi(x) for the relationship-matching losses.
    features: per-stage feature maps (B, C_i, H_i, W_i), shallow to deep, the stage outputs
        FitNet and attention transfer read; see each model's docstring for which tensors.
    pre_relu: per-stage outputs of the BN before the next ReLU (Overhaul's "pre-ReLU"
        features; the BNs are ``model.bn_before_relu()``, same order).
    """

    logits: torch.Tensor
    embedding: torch.Tensor
    features: tuple[torch.Tensor, ...]
    pre_relu: tuple[torch.Tensor, ...] = ()


def init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, 1x1 conv shortcut when
    shapes differ. ``dropout > 0`` puts ``nn.Dropout(dropout)`` between the two convolutions,
    after the second ReLU (the authors' ``networks/wide_resnet.py``, ``dropout_rate``);
    ``dropout = 0`` adds no module at all."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        same_shape = in_planes == out_planes and stride == 1
        self.shortcut = None if same_shape else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor, normed: torch.Tensor | None = None) -> torch.Tensor:
        """``normed``: ``bn1(x)`` when the caller already computed it (the network's pre-ReLU
        feature), so that the BN runs once (its running statistics move once per batch)."""
        # a given `normed` is also returned as a pre-ReLU feature: not overwritten in place
        act = self.relu1(self.bn1(x)) if normed is None else F.relu(normed)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.conv2(out)
        # As in xternalz/WideResNet-pytorch: the projection shortcut sees the activated input.
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-depth-width for CIFAR-style inputs (any size >= 8 px).

    ``features`` holds the raw outputs of the three groups (16w, 32w, 64w channels at
    strides 1, 2, 4 relative to the input), i.e. the residual sums before the next
    block's BN-ReLU; the third is the tensor before the final BN-ReLU. ``pre_relu`` holds
    those BNs' outputs (the next group's first ``bn1``, then the final ``bn``), what
    Overhaul's ``extract_feature(preReLU=True)`` returns for its WRN; computed once and
    fed on to the next block.

    ``dropout``: rate of the dropout between the two convolutions of every block (the
    authors use 0.3); 0 (default) builds the network without dropout.
    """

    # What the authors' code builds differently (refilled.models.authors overrides these).
    block: type[nn.Module] = BasicBlock
    stem_bias = False
    final_bn_momentum = 0.1    # PyTorch's default

    def __init__(self, depth: int, width: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must satisfy (depth - 4) % 6 == 0 and depth >= 10, got {depth}")
        if width < 1:
            raise ValueError(f"WRN width must be >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WRN dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=self.stem_bias)
        self.groups = nn.ModuleList(
            nn.Sequential(*(self.block(channels[i] if j == 0 else channels[i + 1], channels[i + 1],
                                       stride if j == 0 else 1, dropout) for j in range(n)))
            for i, stride in enumerate((1, 2, 2))
        )
        self.bn = nn.BatchNorm2d(channels[3], momentum=self.final_bn_momentum)
        self.relu = nn.ReLU()
        self.head = nn.Linear(channels[3], num_classes)
        self.depth, self.width, self.dropout_rate = depth, width, float(dropout)
        self.embedding_dim = channels[3]
        self.num_classes = num_classes
        self.init_weights()

    def init_weights(self) -> None:
        init_weights(self)

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN before the ReLU after each group (Overhaul's ``get_bn_before_relu``)."""
        return [self.groups[1][0].bn1, self.groups[2][0].bn1, self.bn]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        x = self.conv1(x)
        features, pre_relu = [], []
        for group, bn in zip(self.groups, self.bn_before_relu()):
            normed = pre_relu[-1] if pre_relu else None
            for j, block in enumerate(group):
                x = block(x, normed) if j == 0 else block(x)
            features.append(x)
            pre_relu.append(bn(x))
        x = self.relu(pre_relu[-1])
        embedding = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return ModelOutput(self.head(embedding), embedding, tuple(features), tuple(pre_relu))
