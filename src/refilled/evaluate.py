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


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def accuracy(model: nn.Module, batches, device: torch.device) -> float:
    logits, _, labels = forward_all(model, batches, device)
    return top1(logits, labels)


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


# ---- the joint label space C' ∪ C (supplement §2: harmonic mean) ----------------------------


def harmonic_mean(acc_old: float | None, acc_new: float) -> float:
    """H = 2·Acc_C'·Acc_C / (Acc_C' + Acc_C). `acc_old` None: there are no old classes (r = 1),
    and H is the plain accuracy Acc_C. Both zero: H = 0."""
    if acc_old is None:
        return float(acc_new)
    total = acc_old + acc_new
    return 0.0 if total == 0 else 2.0 * acc_old * acc_new / total


def joint_accuracy(old_scores: torch.Tensor, new_scores: torch.Tensor, labels: torch.Tensor,
                   old_classes: list[int], new_classes: list[int]) -> tuple[float | None, float]:
    """(Acc_C', Acc_C) of the argmax over the joint label space.

    `old_scores` [N, |old_classes|] and `new_scores` [N, |new_classes|] are comparable scores
    (the joint head's logits, or probabilities) whose columns are those classes (dataset ids);
    `labels` [N] are dataset class ids. A class in both lists is one class of the joint space,
    scored by its `new_scores` column: its `old_scores` column is dropped ("shared classes
    count for C"). Acc_C' is the accuracy on the instances of the old-only classes (None if
    there are none), Acc_C on the instances of `new_classes`; both predict over all of
    (old \\ new) ∪ new."""
    old_classes, new_classes = [int(c) for c in old_classes], [int(c) for c in new_classes]
    if old_scores.shape != (len(labels), len(old_classes)) or new_scores.shape != (len(labels), len(new_classes)):
        raise ValueError(f"scores must be [N={len(labels)}, classes]: old {tuple(old_scores.shape)} for "
                         f"{len(old_classes)} classes, new {tuple(new_scores.shape)} for {len(new_classes)} classes")
    keep = [i for i, c in enumerate(old_classes) if c not in new_classes]
    joint = [old_classes[i] for i in keep] + new_classes
    scores = torch.cat([old_scores[:, keep].float(), new_scores.float()], dim=1)
    to_joint = {c: j for j, c in enumerate(joint)}
    stray = sorted({int(c) for c in labels.tolist()} - set(to_joint))
    if stray:
        raise ValueError(f"labels of classes {stray} are in neither {old_classes} nor {new_classes}")
    target = torch.tensor([to_joint[int(c)] for c in labels.tolist()], dtype=torch.long)
    correct = scores.argmax(1) == target
    is_new = target >= len(keep)
    if not bool(is_new.any()):
        raise ValueError("no instance of the new classes C: Acc_C is undefined")
    acc_old = correct[~is_new].float().mean().item() if bool((~is_new).any()) else None
    return acc_old, correct[is_new].float().mean().item()


def reference_scores(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training-free joint model: the teacher's head over C' and the student's head over C,
    each softmaxed; `joint_accuracy` concatenates them (shared classes from the student)."""
    return teacher_logits.float().softmax(1), student_logits.float().softmax(1)
