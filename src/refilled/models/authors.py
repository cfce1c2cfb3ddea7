"""The authors' networks, layer for layer as njulus/GKD builds them (`networks/wide_resnet.py`,
`networks/mobile_net.py`; njulus/REFILLED's copies build the same layers), with our
:class:`ModelOutput` (same features, pre-ReLU BNs, embedding and head as ours).

Their WRN against ours (:class:`WideResNet`, Overhaul's and xternalz's layout):
- a downsampling block strides its second 3x3 convolution, not its first;
- every convolution has a bias (the stem, both 3x3s, the 1x1 shortcut);
- the 1x1 shortcut reads the block's raw input, not its BN-ReLU'd input;
- the BN before pooling has ``momentum=0.9``: in PyTorch's convention the running statistics
  are 0.1 * old + 0.9 * the batch's, i.e. almost the last batch's alone;
- every block holds a ``Dropout`` module (rate 0 when none);
- PyTorch's default initialisation (their ``conv_init`` is defined, never applied).
Their MobileNet against ours (:class:`MobileNetV1`): channels ``int(c * alpha)`` without our
floor of 8 (the same below alpha = 0.25 only) and PyTorch's default initialisation; the rest
(no conv bias, BN momentum 0.1, stride-2 stem at every input size, a head with bias; their
``fc_teacher`` exists only with ``flag_general``, which their scripts never set) is ours.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mobilenet import MobileNetV1
from .wrn import WideResNet


class AuthorsBlock(nn.Module):
    """Their ``BasicBlock``: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3(stride), all convs with a
    bias, plus the block's raw input (a strided 1x1 conv when shapes differ)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, 1, 1, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride, 1, bias=True)
        same_shape = in_planes == out_planes and stride == 1
        self.shortcut = None if same_shape else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=True)

    def forward(self, x: torch.Tensor, normed: torch.Tensor | None = None) -> torch.Tensor:
        """``normed``: ``bn1(x)`` already computed by the network (see ``WideResNet.forward``)."""
        act = F.relu(self.bn1(x) if normed is None else normed)
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(act)))))
        return out + (x if self.shortcut is None else self.shortcut(x))


class AuthorsWideResNet(WideResNet):
    """``wrn-authors-<depth>-<width>``: their ``MyNetwork`` (the module list above); ``forward``
    and the features are :class:`WideResNet`'s."""

    block = AuthorsBlock
    stem_bias = True
    final_bn_momentum = 0.9

    def init_weights(self) -> None:
        """PyTorch's defaults, as in their code."""


class AuthorsMobileNet(MobileNetV1):
    """``mobilenet-authors-<alpha>``: their ``MyNetwork`` (``flag_general=False, flag_bias=True``,
    what their scripts build)."""

    min_channels = 1

    def init_weights(self) -> None:
        """PyTorch's defaults, as in their code."""
