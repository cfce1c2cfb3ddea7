"""Architecture names, torch-free (the profile checks and the Snakefile's wildcard use them
too). Two codes build the same shapes:

- ours: `wrn-<depth>-<width>` (pre-activation Wide ResNet in the layout of Overhaul's and
  xternalz's code) and `mobilenet-<width multiplier>` (MobileNet-v1);
- the authors': `wrn-authors-<depth>-<width>` and `mobilenet-authors-<width multiplier>`,
  layer for layer what njulus/GKD's `networks/wide_resnet.py` and `networks/mobile_net.py`
  build (refilled.models.authors says how they differ from ours).

`parse_arch` gives the family and the numbers, the same for both codes (a `wrn-authors-16-1`
student stands to a `wrn-authors-40-2` teacher as `wrn-16-1` to `wrn-40-2`); `arch_code`
tells the codes apart and `paper_name` is the supplement's spelling of the shape."""

from __future__ import annotations

import re

AUTHORS, OURS = "authors", "ours"

# The Snakefile's {arch} wildcard; parse_arch checks the numbers.
ARCH_PATTERN = r"wrn-(?:authors-)?\d+-\d+|mobilenet-(?:authors-)?\d+(?:\.\d+)?"

KNOWN_ARCHS: tuple[str, ...] = (
    "wrn-40-2", "wrn-16-2", "wrn-40-1", "wrn-16-1",
    "mobilenet-1.0", "mobilenet-0.75", "mobilenet-0.5", "mobilenet-0.25",
    "wrn-28-4",
    "wrn-16-4", "wrn-28-2",
)
# Tables 1 and 2 as the authors' code builds them (Table 3 follows Overhaul's code, whose WRN is ours).
AUTHORS_ARCHS: tuple[str, ...] = (
    "wrn-authors-40-2", "wrn-authors-16-2", "wrn-authors-40-1", "wrn-authors-16-1",
    "mobilenet-authors-1.0", "mobilenet-authors-0.75", "mobilenet-authors-0.5", "mobilenet-authors-0.25",
)

ACCEPTED = ("'wrn-<depth>-<width>' with (depth - 4) % 6 == 0, depth >= 10, width >= 1, or 'mobilenet-<alpha>' "
            "with alpha > 0 (ours); 'wrn-authors-<depth>-<width>' or 'mobilenet-authors-<alpha>' with "
            "int(32 * alpha) >= 1 (the authors' code)")
_WRN = re.compile(r"wrn-(authors-)?(\d+)-(\d+)")
_MOBILENET = re.compile(r"mobilenet-(authors-)?(\d+(?:\.\d+)?)")


def _bad(name: str, why: str) -> ValueError:
    return ValueError(f"unknown architecture {name!r} ({why}); accepted forms: {ACCEPTED}; "
                      f"paper architectures: {', '.join(KNOWN_ARCHS + AUTHORS_ARCHS)}")


def _match(name: str) -> tuple[str, str, tuple]:
    """(family, code, numbers), the numbers checked."""
    if m := _WRN.fullmatch(name):
        depth, width = int(m[2]), int(m[3])
        if depth < 10 or (depth - 4) % 6 != 0:
            raise _bad(name, f"WRN depth {depth} is not 6n + 4 with n >= 1")
        if width < 1:
            raise _bad(name, f"WRN width {width} < 1")
        return "wrn", AUTHORS if m[1] else OURS, (depth, width)
    if m := _MOBILENET.fullmatch(name):
        alpha = float(m[2])
        if alpha <= 0:
            raise _bad(name, f"width multiplier {alpha} <= 0")
        if m[1] and int(32 * alpha) < 1:   # their channels are int(c * alpha), with no floor
            raise _bad(name, f"width multiplier {alpha} gives the authors' stem int(32 * {alpha}) = 0 channels")
        return "mobilenet", AUTHORS if m[1] else OURS, (alpha,)
    raise _bad(name, "malformed name")


def parse_arch(name: str) -> tuple[str, tuple]:
    """``'wrn-40-2'`` and ``'wrn-authors-40-2'`` -> ``('wrn', (40, 2))``; ``'mobilenet-0.5'`` ->
    ``('mobilenet', (0.5,))``. ValueError naming the accepted forms otherwise."""
    family, _, numbers = _match(name)
    return family, numbers


def arch_code(name: str) -> str:
    """Whose code builds the network: ``AUTHORS`` (``*-authors-*``) or ``OURS``."""
    return _match(name)[1]


def paper_name(name: str) -> str:
    """The shape as the supplement spells it: ``'wrn-authors-16-1'`` -> ``'wrn-16-1'``."""
    _match(name)
    return name.replace(f"-{AUTHORS}-", "-", 1)


def arch_ok(name: str) -> bool:
    try:
        parse_arch(name)
    except ValueError:
        return False
    return True
