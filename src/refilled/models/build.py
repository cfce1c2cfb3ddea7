"""`build_model`: the network an architecture name (refilled.models.archs) stands for."""
from __future__ import annotations

from torch import nn

from refilled.models.archs import AUTHORS, arch_code, parse_arch

from .authors import AuthorsMobileNet, AuthorsWideResNet
from .mobilenet import MobileNetV1
from .wrn import WideResNet


def build_model(name: str, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """The network ``name`` (see :func:`parse_arch`) with a head over ``num_classes``.

    ``dropout``: WRN only, the rate of the dropout between the two convolutions of every
    block (the authors' 0.3); 0 (default) builds the network without it. MobileNet-v1 has
    no dropout (neither has the authors' ``networks/mobile_net.py``): a nonzero value for
    it is a ValueError rather than silently ignored.
    """
    family, args = parse_arch(name)
    authors = arch_code(name) == AUTHORS
    if family == "wrn":
        return (AuthorsWideResNet if authors else WideResNet)(*args, num_classes=num_classes, dropout=dropout)
    if dropout:
        raise ValueError(f"{name}: MobileNet-v1 has no dropout (the authors' MobileNet has none); "
                         f"got dropout={dropout}, use 0")
    return (AuthorsMobileNet if authors else MobileNetV1)(*args, num_classes=num_classes)
