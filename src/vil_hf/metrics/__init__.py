"""COCO detection AP as an `evaluate` module of ours, loadable offline by path::

    import evaluate
    from vil_hf.metrics import COCO_DETECTION

    coco = evaluate.load(COCO_DETECTION)        # the folder src/vil_hf/metrics/coco_detection
    coco.add_batch(predictions=[...], references=[...])
    coco.compute(id2label=model.config.id2label)  # {"box_AP": ..., "box_AP50": ..., ...}

The numbers are those of `vil_hf.evaluation.evaluate_coco`; the input format is in `vil_hf.metrics.coco`.
"""

from __future__ import annotations

from pathlib import Path

from .coco import coco_ground_truth, compute_coco_detection, flat_metrics, references_from_coco

# The evaluate module's folder (it holds coco_detection.py): pass it to `evaluate.load`.
COCO_DETECTION = str(Path(__file__).resolve().parent / "coco_detection")

__all__ = ["COCO_DETECTION", "coco_ground_truth", "compute_coco_detection", "flat_metrics", "references_from_coco"]
