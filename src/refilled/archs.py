"""Architecture names, torch-free (the profile checks and the Snakefile's wildcard use them
too): `wrn-<depth>-<width>` (pre-activation Wide ResNet) and `mobilenet-<width multiplier>`."""

from __future__ import annotations

import re

# The Snakefile's {arch} wildcard; parse_arch checks the numbers.
ARCH_PATTERN = r"wrn-\d+-\d+|mobilenet-\d+(?:\.\d+)?"

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


def arch_ok(name: str) -> bool:
    try:
        parse_arch(name)
    except ValueError:
        return False
    return True
