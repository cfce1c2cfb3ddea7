"""Final model files: tensors plus the facts needed to rebuild the network."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from refilled.io import CheckpointError, load_tensors, save_tensors
from refilled.models import build_model


def save_model(path: str | Path, model: nn.Module, arch: str, classes: list[int]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_tensors(path, {"arch": arch, "classes": list(classes), "num_classes": len(classes), "state_dict": state})


def load_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
               device: str | torch.device = "cpu", dropout: float = 0.0) -> tuple[nn.Module, dict]:
    """Rebuild a saved model; refuse one whose architecture or class count differs from the request.
    `dropout` (WRN, no weights of its own) is how the rebuilt network trains on from here."""
    ckpt = load_tensors(path)
    if not isinstance(ckpt, dict) or not {"arch", "num_classes", "state_dict"} <= set(ckpt):
        raise CheckpointError(f"{path}: not a refilled model file (expected keys arch, num_classes, state_dict)")
    if arch is not None and ckpt["arch"] != arch:
        raise CheckpointError(f"{path}: holds a {ckpt['arch']} but {arch} was requested")
    if num_classes is not None and ckpt["num_classes"] != num_classes:
        raise CheckpointError(f"{path}: has {ckpt['num_classes']} classes but {num_classes} were requested")
    model = build_model(ckpt["arch"], ckpt["num_classes"], dropout=dropout)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {ckpt['arch']}: {str(exc).splitlines()[0]}") from exc
    return model.to(device), {k: v for k, v in ckpt.items() if k != "state_dict"}
