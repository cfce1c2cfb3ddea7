"""The seeded random stream of each epoch of a run: the batch order, the on-device
augmentation and stage 2's instance order all draw from it, so a run repeats from its seed."""

import torch


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + stream)
