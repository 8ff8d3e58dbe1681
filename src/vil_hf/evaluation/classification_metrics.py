"""Top-k accuracy as counts, so processes can sum them before dividing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, int]:
    """Counts of samples whose label is among the k highest logits, for each k, plus ``total``.

    Returns ``{"top1": int, "top5": int, "total": int}`` (keys follow ``ks``). A k above the number
    of classes counts every sample (as top-5 of a 3-class problem would). Sum the dicts over
    batches and processes, then `accuracy_from_counts`.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, num_classes); got shape {tuple(logits.shape)}")
    labels = labels.reshape(-1)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must hold one class per row of logits: {labels.shape[0]} labels, {logits.shape[0]} rows"
        )
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    num_classes = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}; got {int(labels.min())}..{int(labels.max())}")
    counts: dict[str, int] = {}
    largest = min(max(int(k) for k in ks), num_classes)
    top = logits.detach().topk(largest, dim=1).indices if logits.shape[0] else None
    for k in ks:
        if top is None:
            counts[f"top{int(k)}"] = 0
            continue
        hits = (top[:, : min(int(k), num_classes)] == labels.to(top.device)[:, None]).any(dim=1)
        counts[f"top{int(k)}"] = int(hits.sum())
    counts["total"] = int(labels.shape[0])
    return counts


def accuracy_from_counts(counts: Mapping[str, int]) -> dict[str, float]:
    """``{"top1": 76.5, ...}`` in percent from (summed) `topk_correct` counts; NaN when total is 0."""
    total = counts.get("total", 0)
    return {key: (100.0 * value / total if total else float("nan")) for key, value in counts.items() if key != "total"}


__all__ = ["accuracy_from_counts", "topk_correct"]
