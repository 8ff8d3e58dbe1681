"""A detector's raw outputs -> per-image detections at the original image size, the one conversion that
evaluation, `Trainer` metrics and `vil-hf predict` share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def predicts_masks(config: Any) -> bool:
    """Whether a detector with this config predicts instance masks (Mask R-CNN with `mask_on`)."""
    return bool(getattr(config, "mask_on", False))


def detections_per_image(
    outputs: Any,
    image_processor: Any,
    original_sizes: Sequence[Sequence[int]],
    *,
    threshold: float,
    with_masks: bool,
) -> list[dict[str, torch.Tensor]]:
    """One dict per image: ``boxes`` (N, 4) x1y1x2y2, ``scores`` (N,), ``labels`` (N,) and, with
    ``with_masks``, ``masks`` (N, H, W) bool, all on the CPU at the image's original (height, width).

    ``outputs`` is the detector's eval-mode output (or a dict with its fields); detections scoring
    ``> threshold`` are kept, as the image processor's post-processing does.
    """
    sizes = [tuple(int(v) for v in size) for size in original_sizes]
    found = image_processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes)
    masks: list[Any] = [None] * len(found)
    if with_masks:
        masks = [
            segmented["segmentation"]
            for segmented in image_processor.post_process_instance_segmentation(
                outputs, threshold=threshold, target_sizes=sizes, return_binary_maps=True
            )
        ]
    detections = []
    for image, image_masks in zip(found, masks):
        entry = {key: image[key].detach().cpu() for key in ("boxes", "scores", "labels")}
        entry["scores"] = entry["scores"].float()
        if image_masks is not None:
            entry["masks"] = image_masks.detach().cpu()
        detections.append(entry)
    return detections


def as_tensors(value: Any) -> Any:
    """Nested lists/tuples/dicts of numpy arrays (as `Trainer` hands predictions over) -> torch tensors."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        return {key: as_tensors(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(as_tensors(item) for item in value)
    if isinstance(value, (np.ndarray, np.generic)):
        return torch.from_numpy(np.asarray(value))
    return value


__all__ = ["as_tensors", "detections_per_image", "predicts_masks"]
