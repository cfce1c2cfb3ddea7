"""FLOPs, parameters and checkpoint sizes per architecture and input size: counted once
with torch's `FlopCounterMode` into the committed table `flops.csv` beside this file, read
back without torch by `refilled plan`.

What a row holds, for a network with a head over `c` classes (everything is linear in c;
`_base` is the value at c = 0, `_per_class` the slope, both from counts at two class counts):

- fwd_flops: one image's forward pass (training mode); convolutions and matrix products,
  2 FLOPs per multiply-add, as FlopCounterMode counts them;
- train_flops: one image's forward and backward pass of the cross-entropy loss (the input
  needs no gradient, so the first convolution has no input gradient);
- params: learnable parameters; buffer_bytes: the bytes of the buffers (BatchNorm running
  statistics in float32, the step counters in int64);
- ckpt_overhead_bytes: what `refilled.training.checkpoints.save_model`'s file holds beyond the
  tensors' bytes (the pickle, the zip records and their alignment), measured at 10 classes.

Regenerate (after a change to a model, or to add architectures) with
`python -m refilled.tools.flops --out src/refilled/tools/flops.csv [--add ARCH@PX ...]`; tests/test_plan.py
recounts the small architectures and compares them with the committed rows.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from refilled.models.archs import AUTHORS_ARCHS, KNOWN_ARCHS, parse_arch

TABLE = Path(__file__).with_name("flops.csv")
COLUMNS = ["arch", "px", "fwd_flops_base", "fwd_flops_per_class", "train_flops_base", "train_flops_per_class",
           "params_base", "params_per_class", "buffer_bytes", "ckpt_overhead_bytes"]
FLOAT_BYTES = 4   # the checkpoints hold float32 weights
# the two class counts the linear fit uses, and the one the checkpoint overhead is measured at
FIT_CLASSES = (10, 20)

_SMALL = ("wrn-10-1", "wrn-10-2", "wrn-16-1", "wrn-16-2", "mobilenet-0.25", "mobilenet-0.5")
# Every architecture of the committed profiles and of the paper (ours and the authors') at 32 px (Fashion-MNIST,
# CIFAR-100); the MobileNets also at 224 px (CUB-200-2011); and what `refilled bench --config
# small` runs (MobileNet-0.25 at 64 px), whose rows `refilled plan` turns into FLOPs per second.
_ALL = tuple(dict.fromkeys(_SMALL + KNOWN_ARCHS + AUTHORS_ARCHS))   # ours, then the authors' layer-for-layer
DEFAULT_ENTRIES: tuple[tuple[str, int], ...] = tuple(
    [(a, 32) for a in _ALL] + [(a, 224) for a in _ALL if a.startswith("mobilenet")] + [("mobilenet-0.25", 64)])


class FlopsTableError(ValueError):
    """The table lacks an architecture, or is malformed; the message names the file."""


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape, **kwargs) -> int:
    """FLOPs of a convolution's backward: the input gradient and the weight gradient each cost
    what the forward convolution costs. torch's own formula (torch.utils.flop_counter,
    conv_backward_flop, torch 2.11-2.14) ignores `groups` in the weight gradient and so counts a
    depthwise convolution's weight gradient C times over (MobileNet's training FLOPs came out
    at 10x its forward instead of 3x)."""
    from torch.utils.flop_counter import conv_backward_flop, conv_flop_count

    if transposed:   # none in our models: torch's formula
        return conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                                  _output_padding, _groups, output_mask, out_shape, **kwargs)
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape))   # w_shape[1] is c_in / groups
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flop_counter():
    """torch's FlopCounterMode with the grouped-convolution backward counted right."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})


def count(arch: str, px: int, classes: int) -> dict:
    """Forward and forward+backward FLOPs per image of `arch` at `px` with a head over
    `classes` (`flop_counter`), counted on the meta device (shapes only, no arithmetic)."""
    import torch

    from refilled.models import build_model

    batch = 2   # BatchNorm in training mode needs two values per channel (MobileNet's last map is 1x1)
    with torch.device("meta"):
        model = build_model(arch, classes).train()
        x = torch.zeros(batch, 3, px, px)
        y = torch.zeros(batch, dtype=torch.long)
    forward = flop_counter()
    with forward:
        model(x)
    train = flop_counter()
    with train:
        loss = torch.nn.functional.cross_entropy(model(x).logits, y)
        loss.backward()
    return {"fwd": forward.get_total_flops() // batch, "train": train.get_total_flops() // batch}


def sizes(arch: str, classes: int) -> dict:
    """Parameters, buffer bytes and the size of the file `save_model` writes for `arch` with `classes` classes."""
    import tempfile

    from refilled.training.checkpoints import save_model
    from refilled.models import build_model

    model = build_model(arch, classes)
    params = sum(p.numel() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    with tempfile.TemporaryDirectory(prefix="refilled-flops-") as tmp:
        path = Path(tmp) / "model.pt"
        save_model(path, model, arch, list(range(classes)))
        file_bytes = path.stat().st_size
    return {"params": params, "buffer_bytes": buffer_bytes, "file_bytes": file_bytes}


def row(arch: str, px: int) -> dict:
    parse_arch(arch)
    lo, hi = FIT_CLASSES
    c_lo, c_hi = count(arch, px, lo), count(arch, px, hi)
    s_lo, s_hi = sizes(arch, lo), sizes(arch, hi)
    out = {"arch": arch, "px": px}
    for key, a, b in (("fwd_flops", c_lo["fwd"], c_hi["fwd"]), ("train_flops", c_lo["train"], c_hi["train"]),
                      ("params", s_lo["params"], s_hi["params"])):
        slope, rest = divmod(b - a, hi - lo)
        if rest:
            raise FlopsTableError(f"{arch} at {px} px: {key} is not linear in the classes ({a} at {lo}, {b} at {hi})")
        out[f"{key}_base"], out[f"{key}_per_class"] = a - slope * lo, slope
    out["buffer_bytes"] = s_lo["buffer_bytes"]
    out["ckpt_overhead_bytes"] = s_lo["file_bytes"] - FLOAT_BYTES * s_lo["params"] - s_lo["buffer_bytes"]
    return out


def generate(entries=DEFAULT_ENTRIES) -> list[dict]:
    return [row(arch, px) for arch, px in entries]


def write_table(rows: list[dict], path: Path = TABLE) -> None:
    from refilled.io import write_csv

    write_csv(path, rows, COLUMNS)


def load_table(path: Path = TABLE) -> dict[tuple[str, int], dict]:
    """(arch, px) -> the row, numbers as ints; torch-free."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = set(COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise FlopsTableError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
            table = {}
            for i, r in enumerate(reader, start=2):
                try:
                    table[(r["arch"], int(r["px"]))] = {k: (r[k] if k == "arch" else int(r[k])) for k in COLUMNS}
                except ValueError:
                    raise FlopsTableError(f"{path}, line {i}: a value is not an integer: {r}") from None
    except FileNotFoundError:
        raise FlopsTableError(f"{path}: FLOPs table not found (python -m refilled.tools.flops --out {path})") from None
    return table


class Costs:
    """The committed table's numbers for one (architecture, input size, classes)."""

    def __init__(self, table: dict, arch: str, px: int, classes: int, source: Path = TABLE):
        r = table.get((arch, px))
        if r is None:
            raise FlopsTableError(f"{source}: no row for {arch} at {px} px; add it with "
                                  f"`python -m refilled.tools.flops --out {source} --add {arch}@{px}`")
        self.fwd = r["fwd_flops_base"] + r["fwd_flops_per_class"] * classes
        self.train = r["train_flops_base"] + r["train_flops_per_class"] * classes
        self.params = r["params_base"] + r["params_per_class"] * classes
        self.checkpoint_bytes = FLOAT_BYTES * self.params + r["buffer_bytes"] + r["ckpt_overhead_bytes"]


def _entry(text: str) -> tuple[str, int]:
    arch, _, px = text.partition("@")
    try:
        parse_arch(arch)
        return arch, int(px or 32)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m refilled.tools.flops", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=TABLE, help=f"CSV to write (default: {TABLE})")
    p.add_argument("--add", type=_entry, nargs="+", default=[], metavar="ARCH@PX",
                   help="architectures beyond the default list, e.g. wrn-22-1@32 mobilenet-0.75@96")
    args = p.parse_args(argv)
    entries = list(dict.fromkeys(list(DEFAULT_ENTRIES) + args.add))
    rows = generate(entries)
    write_table(rows, args.out)
    print(f"wrote {args.out}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
