"""Evaluation: COCO metrics, drawing detections, classification accuracy, model cards.

The submodules import only what they need; ``model_cards`` (huggingface_hub) loads on first use.
"""

from __future__ import annotations

from typing import Any

from .classification_metrics import accuracy_from_counts, topk_correct
from .coco_eval import STAT_NAMES, CocoMetrics, detections_to_coco, evaluate_coco, mask_to_rle
from .visualize import class_colour, draw_detections, save_detection_grid

_MODEL_CARDS = (
    "HubUploadError",
    "evaluation_model_card",
    "published_model_card",
    "push_to_hub",
    "write_card",
)


def __getattr__(name: str) -> Any:
    if name in _MODEL_CARDS:
        from . import model_cards

        return getattr(model_cards, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "STAT_NAMES",
    "CocoMetrics",
    "accuracy_from_counts",
    "class_colour",
    "detections_to_coco",
    "draw_detections",
    "evaluate_coco",
    "mask_to_rle",
    "save_detection_grid",
    "topk_correct",
    *_MODEL_CARDS,
]
