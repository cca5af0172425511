"""Class-balanced soft-target cross-entropy (Cui et al., CVPR 2019), as trained in the paper.

Weights come from the *binarised training labels*: with N training clips and n_c clips positive for
class c, ``beta = (N - 1) / N`` and ``w_c = (1 - beta) / (1 - beta**n_c)`` (the inverse "effective
number of samples"), rescaled so the C weights sum to C. Each clip's soft-target cross-entropy is
multiplied by ``sum_c w_c * t_c`` and the batch loss is the mean over clips.

A class with no positive training clip (n_c = 0) has an infinite weight (0 in the denominator);
that is refused with a :class:`StimulusError` rather than silently clipped, because it means the
training split or label set is wrong for this model.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from s3prl_stimulus import CLASSES
from s3prl_stimulus.errors import StimulusError


def class_balanced_weights(binary_labels, classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Class-balanced weights [C] (float64, summing to C) from a binary [N, C] training label matrix."""
    labels = np.asarray(binary_labels)
    if labels.ndim != 2 or labels.shape[0] == 0:
        raise StimulusError(f"class weights need a non-empty [clips, classes] binary label matrix, got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise StimulusError("class weights need binary (0/1) training labels: binarise the label distributions first")
    positives = labels.sum(axis=0).astype(np.float64)
    empty = np.flatnonzero(positives == 0)
    if len(empty):
        name = classes[empty[0]] if len(classes) == labels.shape[1] else f"column {empty[0]}"
        raise StimulusError(
            f"class {name} has no positive clip among the {labels.shape[0]} training clips, so its class-balanced "
            "weight is infinite: train on a split/label set where every class occurs"
        )
    n = labels.shape[0]
    # 1 - beta**n_c with beta = 1 - 1/N, evaluated as -expm1(n_c * log1p(-1/N)) so nothing cancels
    # when beta is within 1e-4 of 1 (N ~ 5,000); (1 - beta) = 1/N is exact.
    with np.errstate(divide="ignore"):  # N = 1: beta = 0, log1p(-1) = -inf, every share is 1
        effective_share = -np.expm1(positives * np.log1p(-1.0 / n))
    weights = (1.0 / n) / effective_share
    return weights * (labels.shape[1] / weights.sum())


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, class_weights=None) -> torch.Tensor:
    """Mean over the batch of ``(sum_c w_c t_c) * (-sum_c t_c log_softmax(logits)_c)``; no weights: plain soft CE."""
    if logits.shape != targets.shape or logits.dim() != 2:
        raise StimulusError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be [batch, classes]")
    targets = targets.to(logits.dtype)
    per_clip = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    if class_weights is not None:
        weights = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
        per_clip = per_clip * (targets * weights).sum(dim=-1)
    return per_clip.mean()


def soft_cross_entropy_and_gradient(logits: torch.Tensor, targets: torch.Tensor, class_weights) -> tuple:
    """:func:`soft_cross_entropy` (weighted) and its gradient with respect to ``logits``, in closed form.

    Per clip, d/dz of ``-sum_c t_c log_softmax(z)_c`` is ``softmax(z) * sum_c t_c - t``; the clip's term
    is scaled by ``s = sum_c w_c t_c`` and the mean divides by the batch size. ``class_weights`` may
    be ``[C]`` or one row per clip. Used where autograd's bookkeeping would cost more than the loss.
    """
    if logits.shape != targets.shape or logits.dim() != 2:
        raise StimulusError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be [batch, classes]")
    targets = targets.to(logits.dtype)
    log_probs = F.log_softmax(logits, dim=-1)
    scale = (targets * torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)).sum(dim=-1)
    loss = (-(targets * log_probs).sum(dim=-1) * scale).mean()
    grad = (scale / len(logits)).unsqueeze(-1) * (log_probs.exp() * targets.sum(dim=-1, keepdim=True) - targets)
    return loss, grad


class ClassBalancedSoftCrossEntropy(nn.Module):
    """Soft-target cross-entropy with per-clip class-balanced scaling; weights kept as a buffer.

    ``weights=None`` gives plain soft-target cross-entropy. The buffer moves with ``.to(device)`` and
    is saved in the state dict, so a checkpoint carries the weights it was trained with.
    """

    def __init__(self, weights=None):
        super().__init__()
        tensor: Optional[torch.Tensor] = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32)
        self.register_buffer("class_weights", tensor)

    @classmethod
    def from_labels(cls, binary_labels) -> "ClassBalancedSoftCrossEntropy":
        """Weights computed from a binary [N, C] training label matrix."""
        return cls(class_balanced_weights(binary_labels))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(logits, targets, self.class_weights)
