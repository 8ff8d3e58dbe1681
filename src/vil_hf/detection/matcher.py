"""Matching predictions (anchors, proposals) to ground-truth boxes, and sampling them for the losses."""

from __future__ import annotations

import torch

IGNORE = -1


class Matcher:
    """Assigns each prediction its best ground truth and a label by IoU bands.

    `thresholds` [t1, ..., tn] cut [0, 1] into n+1 bands, labelled by `labels` (1 foreground, 0 background,
    -1 ignored). With `allow_low_quality_matches`, every prediction that is the best match of some ground
    truth (ties included) is made foreground, so no ground truth goes unmatched.
    """

    def __init__(self, thresholds: list[float], labels: list[int], allow_low_quality_matches: bool = False):
        if len(labels) != len(thresholds) + 1:
            raise ValueError(f"need one label per IoU band: {len(thresholds) + 1} labels, got {len(labels)}")
        if list(thresholds) != sorted(thresholds):
            raise ValueError(f"thresholds must be increasing, got {thresholds}")
        self.thresholds = [float("-inf"), *thresholds, float("inf")]
        self.labels = list(labels)
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, N) IoU matrix -> matched ground-truth index (N,) and label (N,) int8."""
        num_predictions = match_quality.shape[1]
        if match_quality.shape[0] == 0:
            matches = match_quality.new_zeros(num_predictions, dtype=torch.int64)
            labels = match_quality.new_full((num_predictions,), self.labels[0], dtype=torch.int8)
            return matches, labels
        matched_quality, matches = match_quality.max(dim=0)
        labels = matches.new_ones(num_predictions, dtype=torch.int8)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            labels[(matched_quality >= low) & (matched_quality < high)] = label
        if self.allow_low_quality_matches:
            best_per_ground_truth = match_quality.max(dim=1, keepdim=True).values
            _, best_predictions = torch.nonzero(match_quality == best_per_ground_truth, as_tuple=True)
            labels[best_predictions] = 1
        return matches, labels


def sample_labels(
    labels: torch.Tensor, num_samples: int, positive_fraction: float, background_label: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random foreground and background indices: at most `positive_fraction` of `num_samples` foreground,
    background fills the rest. Labels -1 are never sampled; anything else but `background_label` is
    foreground."""
    positive = torch.nonzero((labels != IGNORE) & (labels != background_label)).squeeze(1)
    negative = torch.nonzero(labels == background_label).squeeze(1)
    num_positive = min(positive.numel(), int(num_samples * positive_fraction))
    num_negative = min(negative.numel(), num_samples - num_positive)
    positive = positive[torch.randperm(positive.numel(), device=positive.device)[:num_positive]]
    negative = negative[torch.randperm(negative.numel(), device=negative.device)[:num_negative]]
    return positive, negative
