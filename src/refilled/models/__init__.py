"""Model zoo: WRN-depth-width and MobileNet-v1, all returning :class:`ModelOutput`."""
from __future__ import annotations

import re

from torch import nn

from .mobilenet import MobileNetV1
from .wrn import ModelOutput, WideResNet

__all__ = ["KNOWN_ARCHS", "ModelOutput", "MobileNetV1", "WideResNet", "build_model", "parse_arch"]

KNOWN_ARCHS: tuple[str, ...] = (
    "wrn-40-2", "wrn-16-2", "wrn-40-1", "wrn-16-1",
    "mobilenet-1.0", "mobilenet-0.75", "mobilenet-0.5", "mobilenet-0.25",
    "wrn-28-4",
    "wrn-16-4", "wrn-28-2",
)

_ACCEPTED = "'wrn-<depth>-<width>' with (depth - 4) % 6 == 0, depth >= 10, width >= 1, or 'mobilenet-<alpha>' with alpha > 0"
_WRN = re.compile(r"wrn-(\d+)-(\d+)")
_MOBILENET = re.compile(r"mobilenet-(\d+(?:\.\d+)?)")


def _bad(name: str, why: str) -> ValueError:
    return ValueError(f"unknown architecture {name!r} ({why}); accepted forms: {_ACCEPTED}; "
                      f"paper architectures: {', '.join(KNOWN_ARCHS)}")


def parse_arch(name: str) -> tuple[str, tuple]:
    """``'wrn-40-2'`` -> ``('wrn', (40, 2))``; ``'mobilenet-0.5'`` -> ``('mobilenet', (0.5,))``."""
    if m := _WRN.fullmatch(name):
        depth, width = int(m[1]), int(m[2])
        if depth < 10 or (depth - 4) % 6 != 0:
            raise _bad(name, f"WRN depth {depth} is not 6n + 4 with n >= 1")
        if width < 1:
            raise _bad(name, f"WRN width {width} < 1")
        return "wrn", (depth, width)
    if m := _MOBILENET.fullmatch(name):
        alpha = float(m[1])
        if alpha <= 0:
            raise _bad(name, f"width multiplier {alpha} <= 0")
        return "mobilenet", (alpha,)
    raise _bad(name, "malformed name")


def build_model(name: str, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """The network ``name`` (see :func:`parse_arch`) with a head over ``num_classes``.

    ``dropout``: WRN only, the rate of the dropout between the two convolutions of every
    block (the authors' 0.3); 0 (default) builds the network without it. MobileNet-v1 has
    no dropout (neither has the authors' ``networks/mobile_net.py``): a nonzero value for
    it is a ValueError rather than silently ignored.
    """
    family, args = parse_arch(name)
    if family == "wrn":
        return WideResNet(*args, num_classes=num_classes, dropout=dropout)
    if dropout:
        raise ValueError(f"{name}: MobileNet-v1 has no dropout (the authors' MobileNet has none); "
                         f"got dropout={dropout}, use 0")
    return MobileNetV1(*args, num_classes=num_classes)
