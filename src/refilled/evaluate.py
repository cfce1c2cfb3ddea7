"""Accuracy, embeddings and nearest-class-mean (NCM) accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def forward_all(model: nn.Module, batches, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, embeddings, labels) of every batch, in fp32 on the CPU."""
    was_training = model.training
    model.eval()
    logits, embs, labels = [], [], []
    cuda = device.type == "cuda"
    for x, y in batches:
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(x)
        logits.append(out.logits.float().cpu())
        embs.append(out.embedding.float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(embs), torch.cat(labels)


def accuracy(model: nn.Module, batches, device: torch.device) -> float:
    logits, _, labels = forward_all(model, batches, device)
    return (logits.argmax(1) == labels).float().mean().item()


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """L2-normalised mean of the L2-normalised embeddings of each class, [num_classes, D]."""
    z = F.normalize(embeddings.float(), dim=1)
    sums = torch.zeros(num_classes, z.shape[1]).index_add_(0, labels, z)
    return F.normalize(sums, dim=1)


def ncm_accuracy(train_emb: torch.Tensor, train_labels: torch.Tensor,
                 test_emb: torch.Tensor, test_labels: torch.Tensor, num_classes: int) -> float:
    """Cosine nearest-class-mean accuracy, class means fitted on the training embeddings."""
    means = class_means(train_emb, train_labels, num_classes)
    pred = (F.normalize(test_emb.float(), dim=1) @ means.T).argmax(1)
    return (pred == test_labels).float().mean().item()


def true_class_probability(teacher_emb: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor,
                           tau: float) -> torch.Tensor:
    """p_T(y_i | x_i) of the teacher's embedding-induced classifier over all the given classes:
    softmax_k(<phi_T(x_i), c_k> / tau) with L2-normalised centres c_k."""
    logits = teacher_emb.float() @ F.normalize(centers.float(), dim=1).T / tau
    return logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
