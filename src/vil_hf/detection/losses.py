"""Detection losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_l1_loss(input: torch.Tensor, target: torch.Tensor, beta: float, reduction: str = "sum") -> torch.Tensor:
    """Smooth L1 that is exactly L1 at beta 0 (PyTorch's own rejects beta 0 on some versions)."""
    if beta < 1e-5:
        loss = torch.abs(input - target)
    else:
        diff = torch.abs(input - target)
        loss = torch.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    return loss


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "sum"
) -> torch.Tensor:
    """Focal loss (Lin et al., 2017) on independent sigmoids; `targets` are 0/1 floats of the same shape."""
    probabilities = torch.sigmoid(logits)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    loss = cross_entropy * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss
