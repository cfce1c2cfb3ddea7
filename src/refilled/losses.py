"""Loss functions for REFILLED and the compared methods.

Everything here computes distances, softmaxes and KL divergences in fp32: inputs are cast
with ``.float()`` and autocast is switched off locally, so the losses behave the same in
fp32 and under ``torch.autocast(..., dtype=torch.bfloat16)``.

Stage 1 (comparison matching) is written densely over an ``[anchor, positive, negative]``
cube whose shape depends only on the batch size: no Python loops over triplets, no
``nonzero``/``.item()`` and no data-dependent shapes, so the training step can be
captured in a CUDA graph. ``semihard_triplets`` is the index-list view of the same mining
(it uses ``torch.nonzero``) for tests and analysis.

Public API
----------
- ``pairwise_distances(emb)``: Euclidean distances between L2-normalised rows.
- ``semihard_triplets(embeddings, labels, margin)``: index tensors ``(a, p, n)``.
- ``semihard_mask(dist, labels, margin)``: bool ``[B, B, B]`` mask ``m[a, p, n]``.
- ``tuple_mask(dist, labels, margin, k_hat, k_mode)``: bool ``[B, B, B]`` negatives kept
  per ``(a, p)`` tuple (``k_mode``: ``"per-pair"`` or the authors' ``"batch-min"``).
- ``comparison_matching_loss(student_emb, teacher_emb, labels, tau, margin, k_hat,
  k_mode="per-pair")``.
- ``teacher_confidence(teacher_logits)`` -> ``w_i``; ``confidence_weights(teacher_logits,
  lam)`` -> the authors' adaptive ``lambda_i`` (GKD ``Train.py``, ``wgkd``).
- ``local_distillation_loss(student_logits, teacher_emb, centers, labels, tau, lam,
  weighting, teacher_logits=None, kl_scale="none") -> (loss, lambda_i)``.
- ``rkd_terms(student_emb, teacher_emb) -> (dist, angle)`` and ``rkd_loss(...)``.
- ``aml_loss(student_emb, teacher_emb, labels, projection, margin)``.

Standard knowledge distillation (Table 3; teacher and student on the same classes):

- ``kd_loss(student_logits, teacher_logits, T)`` (Hinton et al.).
- ``at_loss(student_features, teacher_features, p)`` (Zagoruyko & Komodakis).
- ``fitnet_loss(student_feature, teacher_feature, regressor)`` (Romero et al., hint stage).
- ``jacobian_loss(inputs, student_logits, teacher_logits, labels)`` (Srinivas & Fleuret).
- ``overhaul_margins(bn)`` and ``overhaul_partial_l2(student_feature, teacher_feature,
  margin)`` (Heo et al., ICCV 2019).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F

__all__ = [
    "pairwise_distances",
    "semihard_triplets",
    "semihard_mask",
    "tuple_mask",
    "comparison_matching_loss",
    "K_MODES",
    "teacher_confidence",
    "confidence_weights",
    "local_distillation_loss",
    "WEIGHTINGS",
    "KL_SCALES",
    "rkd_terms",
    "rkd_loss",
    "aml_loss",
    "kd_loss",
    "at_loss",
    "fitnet_loss",
    "jacobian_loss",
    "overhaul_margins",
    "overhaul_partial_l2",
]

WEIGHTINGS = ("confidence", "true-class", "constant", "none")
KL_SCALES = ("none", "tau2")
K_MODES = ("per-pair", "batch-min")


def _fp32(device: torch.device):
    """Context that switches autocast off on ``device`` (fp32 maths inside)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _check_2d(name: str, x: torch.Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(x.shape)}")


def _check_labels(labels: torch.Tensor, batch: int) -> None:
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise ValueError(
            f"labels must be 1-D of length {batch}, got shape {tuple(labels.shape)}"
        )


def _check_embedding_pair(student_emb: torch.Tensor, teacher_emb: torch.Tensor,
                          labels: torch.Tensor | None = None) -> int:
    """Validate a student/teacher embedding batch (and its labels); return the batch size."""
    _check_2d("student_emb", student_emb)
    _check_2d("teacher_emb", teacher_emb)
    batch = student_emb.shape[0]
    if teacher_emb.shape[0] != batch:
        raise ValueError("student_emb and teacher_emb must have the same batch size")
    if labels is not None:
        _check_labels(labels, batch)
    return batch


def pairwise_distances(emb: torch.Tensor) -> torch.Tensor:
    """Plain (not squared) Euclidean distances between the L2-normalised rows of ``emb``.

    This is exactly what pytorch-metric-learning's default ``LpDistance`` does
    (``F.normalize(x, p=2, dim=1)`` then ``torch.cdist(x, x, p=2)``), computed in fp32.
    ``torch.cdist``'s backward sets the gradient of zero distances to zero, so duplicate
    embeddings (and the diagonal) never produce NaN gradients.
    """
    _check_2d("embeddings", emb)
    with _fp32(emb.device):
        x = F.normalize(emb.float(), p=2, dim=1)
        return torch.cdist(x, x, p=2)


# --------------------------------------------------------------------------------------
# Semi-hard mining
# --------------------------------------------------------------------------------------


def semihard_mask(dist: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Dense semi-hard triplet mask ``m[a, p, n]`` (bool, shape ``[B, B, B]``).

    ``m[a, p, n]`` is True iff ``a != p``, ``labels[a] == labels[p]``,
    ``labels[n] != labels[a]`` and ``0 < dist[a, n] - dist[a, p] <= margin``
    (strict at 0, non-strict at the margin: pytorch-metric-learning's
    ``TripletMarginMiner(type_of_triplets="semihard")``). ``dist`` is the ``[B, B]``
    distance matrix (use :func:`pairwise_distances` to match the miner bit for bit).

    Static shapes, no host synchronisation, no Python loops.

    Memory: the cube has B**3 entries. At B = 128 that is 2 MiB as bool; at B = 512 it is
    128 MiB as bool, plus float intermediates of the same shape at 4 bytes per entry
    (512 MiB each at B = 512; 8 MiB each at B = 128).
    """
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist must be square [B, B], got {tuple(dist.shape)}")
    B = dist.shape[0]
    _check_labels(labels, B)
    labels = labels.to(dist.device)
    same = labels[:, None] == labels[None, :]  # [a, p]
    eye = torch.eye(B, dtype=torch.bool, device=dist.device)
    pos = same & ~eye  # [a, p]
    neg = ~same  # [a, n]
    # gap[a, p, n] = d(a, n) - d(a, p), the same fp subtraction as the miner's an - ap.
    gap = dist[:, None, :] - dist[:, :, None]
    return pos[:, :, None] & neg[:, None, :] & (gap > 0) & (gap <= margin)


def semihard_triplets(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors ``(anchor, positive, negative)`` of every semi-hard triplet.

    Distances are plain Euclidean distances between L2-normalised embeddings
    (:func:`pairwise_distances`); a triplet is semi-hard iff ``a != p`` share a label,
    ``n`` has another label and ``0 < d(a, n) - d(a, p) <= margin``. Returns the same set
    as ``TripletMarginMiner(margin, type_of_triplets="semihard")`` with its default
    ``LpDistance(normalize_embeddings=True, p=2, power=1)`` on fp32 input (inputs in other
    dtypes are cast to fp32 here, whereas the miner would compute in their dtype).
    Indices are sorted lexicographically by (a, p, n). Uses ``torch.nonzero`` (host sync).
    """
    _check_2d("embeddings", embeddings)
    with torch.no_grad():
        mask = semihard_mask(pairwise_distances(embeddings), labels, margin)
        a, p, n = mask.nonzero(as_tuple=True)
    return a, p, n


def _keep_closest(mask: torch.Tensor, dist: torch.Tensor, k_hat: int | None) -> torch.Tensor:
    """Restrict each ``(a, p)`` row of ``mask`` to its ``k_hat`` negatives closest to ``a``.

    Fixed-shape: ``topk`` with ``k = min(k_hat, B)`` over the negative axis of the masked
    distances, scattered back into a bool cube and intersected with ``mask`` (so rows with
    fewer than ``k_hat`` semi-hard negatives keep all of them). ``k_hat=None`` keeps all.
    """
    B = mask.shape[-1]
    if k_hat is None or k_hat >= B:
        return mask
    masked = torch.where(mask, dist[:, None, :], torch.full_like(dist[:, None, :], float("inf")))
    idx = masked.topk(k_hat, dim=-1, largest=False, sorted=False).indices
    chosen = torch.zeros_like(mask).scatter_(-1, idx, True)
    return mask & chosen


def _keep_first_batch_min(mask: torch.Tensor, k_hat: int | None) -> torch.Tensor:
    """The authors' K (GKD ``utils/triplet.py``, ``merge``): one K for the whole batch.

    ``K = min K'(a, p)`` over the ``(a, p)`` pairs that have at least one semi-hard
    negative (the pairs that appear in the miner's output); every such pair keeps its
    first K negatives in the miner's order, which is ascending ``n`` (the miner's triplets
    come from ``torch.where`` over the ``[a, p, n]`` cube, so they are sorted by
    ``(a, p, n)``). ``k_hat`` (if given) caps K further: ``K = min(K, k_hat)``.

    Static shape, no host sync: ranks are a cumsum along ``n``, K stays a 0-d tensor.
    """
    B = mask.shape[-1]
    counts = mask.sum(dim=-1, dtype=torch.int32)  # K'(a, p)
    has_any = counts > 0
    k = torch.where(has_any, counts, torch.full_like(counts, B + 1)).amin()
    if k_hat is not None:
        k = k.clamp(max=int(k_hat))
    # 1-based rank of n among (a, p)'s negatives, in n order (int32: half the cube of int64)
    rank = mask.cumsum(dim=-1, dtype=torch.int32)
    return mask & (rank <= k)


def tuple_mask(
    dist: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.2,
    k_hat: int | None = None,
    k_mode: str = "per-pair",
) -> torch.Tensor:
    """Bool ``[B, B, B]`` cube ``keep[a, p, n]``: the negatives each ``(a, p)`` tuple holds.

    ``dist``: the ``[B, B]`` distances the tuples are mined on (the student's).
    ``k_mode="per-pair"``: ``K = min(K', k_hat)`` per pair, the ``k_hat`` semi-hard
    negatives closest to the anchor (``k_hat=None``: all of them).
    ``k_mode="batch-min"``: the authors' ``merge``: see :func:`_keep_first_batch_min`.
    """
    if k_mode not in K_MODES:
        raise ValueError(f"k_mode must be one of {K_MODES}, got {k_mode!r}")
    mask = semihard_mask(dist, labels, margin)
    if k_mode == "batch-min":
        return _keep_first_batch_min(mask, k_hat)
    return _keep_closest(mask, dist, k_hat)


# --------------------------------------------------------------------------------------
# Stage 1: comparison matching
# --------------------------------------------------------------------------------------


def _tuple_log_probs(dist: torch.Tensor, keep: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of every ``(a, p)`` tuple distribution.

    Returns ``(logp, support)``, both ``[B, B, B + 1]``: slot 0 is the positive
    (logit ``-d(a, p) / tau``), slot ``1 + n`` the negative ``n`` (logit
    ``-d(a, n) / tau``) when ``keep[a, p, n]``, else ``-inf`` (log-probability ``-inf``,
    probability exactly 0). ``support`` marks the K + 1 real entries of each tuple.
    """
    B = dist.shape[0]
    logits = -dist / tau
    pos = logits[:, :, None]  # [a, p, 1]
    neg = logits[:, None, :].expand(B, B, B).masked_fill(~keep, float("-inf"))  # [a, p, n]
    logp = torch.log_softmax(torch.cat([pos, neg], dim=-1), dim=-1)
    support = torch.cat([torch.ones_like(keep[:, :, :1]), keep], dim=-1)
    return logp, support


def _tuple_kl_from_distances(
    d_student: torch.Tensor, d_teacher: torch.Tensor, keep: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair KL(p_T || p_S) over the tuples described by ``keep``.

    ``d_student``/``d_teacher``: ``[B, B]`` distance matrices; ``keep``: bool
    ``[B, B, B]`` (which negatives each ``(a, p)`` tuple holds). Returns ``(kl, valid)``
    of shape ``[B, B]``: ``valid[a, p]`` iff the tuple has at least one negative; ``kl``
    is 0 for invalid pairs. Entries outside the support contribute exactly 0 in value and
    gradient (``0 * log 0`` is never evaluated).
    """
    logp_s, support = _tuple_log_probs(d_student, keep, tau)
    logp_t, _ = _tuple_log_probs(d_teacher.detach(), keep, tau)
    p_t = logp_t.exp()
    terms = torch.where(support, p_t * (logp_t - logp_s), torch.zeros_like(logp_s))
    kl = terms.sum(dim=-1)
    valid = keep.any(dim=-1)
    return kl, valid


def comparison_matching_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 4.0,
    margin: float = 0.2,
    k_hat: int | None = None,
    k_mode: str = "per-pair",
) -> torch.Tensor:
    """REFILLED stage-1 loss: mean over tuples of KL(p_T || p_S), unscaled.

    Tuples are mined without grad on the student's L2-normalised embedding: for every
    ordered pair ``(a, p)`` (``a != p``, same label) the semi-hard negatives are ``n``
    with another label and ``0 < d(a, n) - d(a, p) <= margin`` (:func:`semihard_mask`).
    A pair with none gives no tuple. How many negatives a tuple keeps (:func:`tuple_mask`):

    - ``k_mode="per-pair"`` (default): if a pair has ``K' > k_hat`` of them, the ``k_hat``
      closest to the anchor (student distance) are kept; ``k_hat=None`` keeps all.
    - ``k_mode="batch-min"`` (the authors' GKD ``merge``): one ``K`` for the batch, the
      smallest ``K'`` over the pairs that have any; each pair keeps its first ``K``
      negatives in the miner's order (ascending index ``n``); ``k_hat`` caps ``K``.

    For each tuple, teacher and student alike, ``p = softmax([-d(a,p), -d(a,n_1), ...,
    -d(a,n_K)] / tau)`` with ``d`` the Euclidean distance between that model's
    L2-normalised embeddings (teacher width may differ from the student's). The teacher
    gets no gradient. With no tuple in the batch the result is a zero that is still
    connected to ``student_emb``'s graph (zero gradient). The caller applies the scale
    (the authors use 1000).
    """
    _check_embedding_pair(student_emb, teacher_emb, labels)
    if k_hat is not None:
        if isinstance(k_hat, bool) or not isinstance(k_hat, numbers.Integral) or k_hat < 1:
            raise ValueError(f"k_hat must be a positive int or None, got {k_hat!r}")
        k_hat = int(k_hat)
    if k_mode not in K_MODES:
        raise ValueError(f"k_mode must be one of {K_MODES}, got {k_mode!r}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    with _fp32(student_emb.device):
        d_s = pairwise_distances(student_emb)
        with torch.no_grad():
            d_t = pairwise_distances(teacher_emb.detach())
            keep = tuple_mask(d_s.detach(), labels, margin, k_hat, k_mode)
        kl, valid = _tuple_kl_from_distances(d_s, d_t, keep, tau)
        count = valid.sum().clamp(min=1)
        return torch.where(valid, kl, torch.zeros_like(kl)).sum() / count


# --------------------------------------------------------------------------------------
# Stage 2: local classifier distillation
# --------------------------------------------------------------------------------------


def teacher_confidence(teacher_logits: torch.Tensor) -> torch.Tensor:
    """``w_i = -log max_k softmax(teacher_logits_i)_k`` (shape ``[B]``, fp32, no grad).

    ``teacher_logits``: the teacher's own head over its classes C' (temperature 1). This
    is the authors' ``CrossEntropyLoss(reduction='none')(logits, argmax(logits))`` in GKD
    ``Train.py`` (``wgkd``): small for confident instances, ``log |C'|`` at most.
    """
    _check_2d("teacher_logits", teacher_logits)
    with torch.no_grad(), _fp32(teacher_logits.device):
        return -torch.log_softmax(teacher_logits.detach().float(), dim=1).amax(dim=1)


def confidence_weights(teacher_logits: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """The authors' adaptive weights ``lambda_i`` (GKD ``Train.py``, ``wgkd``), shape ``[B]``.

    ``w = teacher_confidence(teacher_logits)``; min-max normalised within the batch,
    ``w~ = (w - min w) / (max w - min w)``; ``lambda_i = lam * 2 * sigmoid(-w~_i)``, in
    ``[0.538 lam, lam]``. When all ``w`` are equal (a batch of one, say) ``w~ = 0`` and
    every ``lambda_i = lam`` (the authors' code divides 0 by 0 there and gets NaN).
    Branch-free (``torch.where`` on the range, no host sync) and detached.
    """
    w = teacher_confidence(teacher_logits)
    with torch.no_grad(), _fp32(w.device):
        lo, hi = w.amin(), w.amax()
        span = hi - lo
        positive = span > 0
        w_norm = torch.where(positive, (w - lo) / torch.where(positive, span, torch.ones_like(span)),
                             torch.zeros_like(w))
        return lam * 2.0 * torch.sigmoid(-w_norm)


def _resolve_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(
            "weighting must be one of 'confidence', 'true-class', 'constant', 'none'; "
            f"got {weighting!r}"
        )
    return weighting


def local_distillation_loss(
    student_logits: torch.Tensor,
    teacher_emb: torch.Tensor,
    centers: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 1.0,
    lam: float = 2.0,
    weighting: str = "confidence",
    teacher_logits: torch.Tensor | None = None,
    kl_scale: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """REFILLED stage-2 teaching term (cross-entropy NOT included).

    - ``student_logits`` ``[B, C]``; ``teacher_emb`` ``[B, Dt]`` (raw, not normalised);
      ``centers`` ``[C, Dt]`` the teacher's class centres for the student's C classes.
      The centres are L2-normalised here (idempotent if the caller already did).
    - Local classes L: those present in the batch (bool mask over C, static shape).
    - Teacher local logits ``<phi_T(x_i), c_k>``, student local logits = its logits, both
      restricted to L and divided by ``tau`` (both sides, as in the authors' CVPR code;
      their GKD code divides only the teacher's, with tau = 1 by default); softmax over L
      only (classes outside L get probability exactly 0).
    - ``lambda_i`` (detached), by ``weighting``:
      ``"confidence"`` (the authors' GKD ``wgkd``): :func:`confidence_weights` of
      ``teacher_logits``, the teacher's own head over C' ``[B, C']`` (required);
      ``"true-class"``: ``lam * p_T(y_i | x_i)`` with p_T the tempered local teacher
      distribution above (this project's earlier reading); ``"constant"``: ``lam``
      (REFILLED-minus, the authors' ``gkd``); ``"none"``: 0.
    - ``loss = s * mean_i lambda_i * KL(p_T,i || p_S,i)`` with ``s = 1``
      (``kl_scale="none"``, the authors') or ``s = tau**2`` (``kl_scale="tau2"``, Hinton's
      gradient-scale correction: this project's earlier reading).

    Returns ``(loss, lambda_i)`` with ``lambda_i`` of shape ``[B]``.
    """
    weighting = _resolve_weighting(weighting)
    if kl_scale not in KL_SCALES:
        raise ValueError(f"kl_scale must be one of {KL_SCALES}, got {kl_scale!r}")
    _check_2d("student_logits", student_logits)
    _check_2d("teacher_emb", teacher_emb)
    _check_2d("centers", centers)
    B, C = student_logits.shape
    if teacher_emb.shape[0] != B:
        raise ValueError("student_logits and teacher_emb must have the same batch size")
    if centers.shape[0] != C or centers.shape[1] != teacher_emb.shape[1]:
        raise ValueError(
            f"centers must be [C={C}, Dt={teacher_emb.shape[1]}], got {tuple(centers.shape)}"
        )
    _check_labels(labels, B)
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if weighting == "confidence":
        if teacher_logits is None:
            raise ValueError(
                "weighting='confidence' needs teacher_logits (the teacher's own head over its "
                "classes C', shape [B, C']); pass them, or choose 'true-class', 'constant' or 'none'"
            )
        _check_2d("teacher_logits", teacher_logits)
        if teacher_logits.shape[0] != B:
            raise ValueError("teacher_logits and student_logits must have the same batch size")
    with _fp32(student_logits.device):
        labels = labels.to(student_logits.device)
        classes = torch.arange(C, device=student_logits.device)
        present = (labels[:, None] == classes[None, :]).any(dim=0)  # [C], no host sync
        neg_inf = float("-inf")
        with torch.no_grad():
            c = F.normalize(centers.detach().float(), p=2, dim=1)
            t_logits = teacher_emb.detach().float() @ c.t()
            logp_t = torch.log_softmax(t_logits.masked_fill(~present, neg_inf) / tau, dim=1)
            p_t = logp_t.exp()
            if weighting == "confidence":
                lam_i = confidence_weights(teacher_logits.to(p_t.device), lam)
            elif weighting == "true-class":
                lam_i = lam * p_t.gather(1, labels[:, None]).squeeze(1)
            elif weighting == "constant":
                lam_i = torch.full((B,), float(lam), device=p_t.device)
            else:
                lam_i = torch.zeros(B, device=p_t.device)
        logp_s = torch.log_softmax(
            student_logits.float().masked_fill(~present, neg_inf) / tau, dim=1
        )
        terms = torch.where(present[None, :], p_t * (logp_t - logp_s), torch.zeros_like(logp_s))
        kl = terms.sum(dim=1)
        scale = tau**2 if kl_scale == "tau2" else 1.0
        loss = scale * (lam_i * kl).mean()
    return loss, lam_i


# --------------------------------------------------------------------------------------
# RKD (Park et al., CVPR 2019)
# --------------------------------------------------------------------------------------


def _rkd_pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Park et al.'s pdist: sqrt(clamp(||e_i||^2 + ||e_j||^2 - 2 e_i.e_j, eps)), diag 0."""
    sq = e.pow(2).sum(dim=1)
    res = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return res.masked_fill(eye, 0.0)


def _rkd_normalised_dist(e: torch.Tensor) -> torch.Tensor:
    d = _rkd_pdist(e)
    nz = d > 0
    mean = (d * nz).sum() / nz.sum().clamp(min=1)  # mean over non-zero entries, no sync
    return d / mean.clamp(min=1e-12)


def _rkd_angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between i and k: <e_ij, e_kj> with e_ij = normalise(x_i - x_j).

    Park et al. build ``diff[a, b] = x_b - x_a`` and take ``diff[a] @ diff[a].T``: all
    ``B**3`` triplets, vertex ``a``, degenerate entries (``b == a``) are 0.
    """
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # [a, b, D] = x_b - x_a
    return torch.bmm(diff, diff.transpose(1, 2))


def rkd_terms(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted RKD distance and angle terms (raw, un-normalised embeddings).

    distance: ``smooth_l1(psi_D(S), psi_D(T))`` averaged over all ``B x B`` entries, where
    ``psi_D`` is the pairwise Euclidean distance matrix divided by the mean of its
    non-zero (off-diagonal) entries. angle: ``smooth_l1`` between the ``B x B x B``
    cosine-angle cubes of :func:`_rkd_angles`, averaged. Teacher under ``no_grad``.
    ``smooth_l1`` uses beta = 1 (PyTorch's default, as in Park et al.'s code).
    """
    _check_embedding_pair(student_emb, teacher_emb)
    with _fp32(student_emb.device):
        s = student_emb.float()
        with torch.no_grad():
            t = teacher_emb.detach().float()
            t_d = _rkd_normalised_dist(t)
            t_a = _rkd_angles(t)
        dist = F.smooth_l1_loss(_rkd_normalised_dist(s), t_d)
        angle = F.smooth_l1_loss(_rkd_angles(s), t_a)
    return dist, angle


def rkd_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """RKD loss: ``distance_weight * dist + angle_weight * angle`` (see :func:`rkd_terms`)."""
    dist, angle = rkd_terms(student_emb, teacher_emb)
    return distance_weight * dist + angle_weight * angle


# --------------------------------------------------------------------------------------
# AML (asymmetric metric learning, Budnik & Avrithis, CVPR 2021)
# --------------------------------------------------------------------------------------


def aml_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    labels: torch.Tensor,
    projection: torch.nn.Module,
    margin: float = 0.7,
) -> torch.Tensor:
    """Asymmetric contrastive loss (our reading of Budnik & Avrithis, CVPR 2021).

    ``q_i = normalise(projection(student_emb_i))`` (``projection``: the caller's
    ``nn.Linear`` from student to teacher width, trained with the student),
    ``t_j = normalise(teacher_emb_j)`` (no grad), ``d_ij = ||q_i - t_j||_2``::

        loss = 1 / B**2 * sum_{i, j} [ y_i == y_j ] * d_ij**2
                                   + [ y_i != y_j ] * relu(margin - d_ij)**2

    i.e. Hadsell-style contrastive loss over every ordered pair of the batch, averaged.
    The pair ``i == j`` (the teacher's embedding of the student's own image) is a
    positive: the asymmetric setting's most direct target.
    """
    _check_embedding_pair(student_emb, teacher_emb, labels)
    proj = projection(student_emb)
    with _fp32(student_emb.device):
        q = F.normalize(proj.float(), p=2, dim=1)
        with torch.no_grad():
            t = F.normalize(teacher_emb.detach().float(), p=2, dim=1)
        d = torch.cdist(q, t, p=2)
        labels = labels.to(d.device)
        same = labels[:, None] == labels[None, :]
        per_pair = torch.where(same, d.pow(2), F.relu(margin - d).pow(2))
        return per_pair.mean()


# --------------------------------------------------------------------------------------
# Standard knowledge distillation (Table 3)
# --------------------------------------------------------------------------------------


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton et al.'s soft-target term: ``T**2 * KL(softmax(t / T) || softmax(s / T))``,
    summed over classes and averaged over the batch (Zagoruyko & Komodakis's
    ``utils.distillation``: ``kl_div(..., size_average=False) * T**2 / B``). Teacher
    detached; the caller adds the cross-entropy with its source's weights."""
    _check_2d("student_logits", student_logits)
    _check_2d("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (same classes)")
    if T <= 0:
        raise ValueError(f"T must be positive, got {T}")
    with _fp32(student_logits.device):
        log_s = F.log_softmax(student_logits.float() / T, dim=1)
        with torch.no_grad():
            log_t = F.log_softmax(teacher_logits.detach().float() / T, dim=1)
        kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)
        return T**2 * kl.mean()


def _attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """``normalise(mean_c |F_c|**p)`` flattened to ``[B, H*W]`` (Zagoruyko & Komodakis's ``at``;
    they write ``x.pow(2)``, i.e. p = 2, where |.| changes nothing)."""
    return F.normalize(feature.float().abs().pow(p).mean(dim=1).flatten(1), p=2, dim=1)


def at_loss(student_features, teacher_features, p: float = 2.0) -> torch.Tensor:
    """Attention transfer: for every stage, the mean over batch and positions of the squared
    difference of the two attention maps (:func:`_attention_map`), summed over the stages
    (their ``cifar.py``: ``sum(at_loss(x, y) for x, y in zip(g_s, g_t))``); the caller
    multiplies by beta. Stage pairs must have the same spatial size; channels may differ."""
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(f"at_loss needs as many student as teacher stages (>= 1), got "
                         f"{len(student_features)} and {len(teacher_features)}")
    total = None
    with _fp32(student_features[0].device):
        for i, (s, t) in enumerate(zip(student_features, teacher_features)):
            if s.ndim != 4 or s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
                raise ValueError(f"at_loss stage {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} "
                                 "must be [B, C, H, W] with the same B, H, W")
            with torch.no_grad():
                a_t = _attention_map(t.detach(), p)
            term = (_attention_map(s, p) - a_t).pow(2).mean()
            total = term if total is None else total + term
    return total


def fitnet_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor,
                regressor: torch.nn.Module) -> torch.Tensor:
    """FitNet hint loss (Romero et al., Eq. 3): ``1/2 * ||u_h(x) - r(v_g(x))||**2`` between the
    teacher's hint ``u_h`` (detached) and the regressor ``r`` applied to the student's guided
    layer ``v_g``; here averaged over every element (not summed), so that its scale does not
    grow with the feature map (our choice)."""
    out = regressor(student_feature)
    if out.shape != teacher_feature.shape:
        raise ValueError(f"fitnet_loss: regressor output {tuple(out.shape)} does not match the teacher's hint "
                         f"{tuple(teacher_feature.shape)}")
    with _fp32(out.device):
        return 0.5 * (out.float() - teacher_feature.detach().float()).pow(2).mean()


def _class_input_gradient(inputs: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                          create_graph: bool) -> torch.Tensor:
    """``d logits[i, y_i] / d inputs[i]`` for every i, flattened and L2-normalised ``[B, D]``
    (the rows are independent: image i's logit depends on image i alone in eval-mode BN;
    in train mode batch statistics couple them slightly, as in every batched implementation)."""
    picked = logits.float().gather(1, labels[:, None]).sum()
    (grad,) = torch.autograd.grad(picked, inputs, create_graph=create_graph)
    return F.normalize(grad.float().flatten(1), p=2, dim=1)


def jacobian_loss(inputs: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """Jacobian matching (Srinivas & Fleuret, ICML 2018, our reading): the mean over the batch
    of ``|| g_T / ||g_T|| - g_S / ||g_S|| ||**2`` with ``g = d z_y / d x``, the gradient with
    respect to the input image of the logit of the true class. ``inputs`` must require grad
    and both logits must have been computed from it; the student's gradient keeps its graph
    (a double backward), the teacher's does not."""
    if not inputs.requires_grad:
        raise ValueError("jacobian_loss: inputs must require grad (call inputs.requires_grad_() before the forwards)")
    _check_2d("student_logits", student_logits)
    _check_2d("teacher_logits", teacher_logits)
    _check_labels(labels, inputs.shape[0])
    with _fp32(inputs.device):
        g_t = _class_input_gradient(inputs, teacher_logits, labels, create_graph=False).detach()
        g_s = _class_input_gradient(inputs, student_logits, labels, create_graph=True)
        return (g_s - g_t).pow(2).sum(dim=1).mean()


def overhaul_margins(bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """Heo et al.'s margin per channel, from the BN before the teacher's ReLU: with the BN's
    output modelled as Gaussian with mean ``beta`` (bias) and std ``|gamma|`` (weight), the
    expectation of a negative response ``E[x | x < 0] = m - s * phi(m/s) / Phi(-m/s)``; where
    ``Phi(-m/s) <= 0.001`` it is ``-3 s`` (their ``get_margin_from_BN``). Shape ``[C]``, fp32."""
    with torch.no_grad():
        s = bn.weight.detach().float().abs()
        m = bn.bias.detach().float()
        z = -m / s
        cdf = torch.special.ndtr(z)
        pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
        safe = cdf > 0.001
        return torch.where(safe, m - s * pdf / torch.where(safe, cdf, torch.ones_like(cdf)), -3 * s)


def overhaul_partial_l2(student_feature: torch.Tensor, teacher_feature: torch.Tensor,
                        margin: torch.Tensor) -> torch.Tensor:
    """Heo et al.'s partial L2 (their ``distillation_loss``), summed over every element: the
    target is the teacher's margin-ReLU ``max(t, margin_c)``; an element counts unless the
    target is not positive and the student is already below it (``s <= target <= 0``).
    ``student_feature`` is the connector's output; ``margin``: ``[C]``."""
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(f"overhaul_partial_l2: student {tuple(student_feature.shape)} and teacher "
                         f"{tuple(teacher_feature.shape)} must have the same shape (after the connector)")
    if margin.shape != (teacher_feature.shape[1],):
        raise ValueError(f"overhaul_partial_l2: margin {tuple(margin.shape)} must be [C={teacher_feature.shape[1]}]")
    with _fp32(student_feature.device):
        s = student_feature.float()
        with torch.no_grad():
            target = torch.maximum(teacher_feature.detach().float(), margin.float().view(1, -1, 1, 1))
        counted = (s > target) | (target > 0)
        return torch.where(counted, (s - target).pow(2), torch.zeros_like(s)).sum()


# --------------------------------------------------------------------------------------
# Learning without forgetting (Li & Hoiem 2016): the joint head's old-class term
# --------------------------------------------------------------------------------------


def lwf_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 2.0) -> torch.Tensor:
    """``T² · mean_i KL(softmax(t_i / T) ‖ softmax(s_i / T))`` over the old classes: Hinton's
    term (:func:`kd_loss`) at LwF's temperature T = 2.

    ``student_logits`` ``[B, K]``: the joint head's old-class head on the student's
    embedding; ``teacher_logits`` ``[B, K]``: the teacher's own head restricted to the same
    K classes (C' \\ C), detached. The T² factor is Hinton's gradient-scale correction (our
    choice [D]: LwF's paper gives the tempered cross-entropy without it): it keeps the term's
    gradients on the scale of the CE term whatever T is, so `weight` means the same at any T."""
    return kd_loss(student_logits, teacher_logits, T)
