"""Inference over a data set on every Accelerate process, metrics on the main one."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image
from torch.utils.data import DataLoader

from ..console import progress_bar
from ..data import (
    ClassificationSamples,
    CocoDetectionData,
    DetectionSamples,
    ImageFolderData,
    InferenceSampler,
    collate_classification,
    collate_detection,
)
from ..io_utils import atomic_write_text
from .classification_metrics import accuracy_from_counts, topk_correct
from .coco_eval import CocoMetrics, detections_to_coco, evaluate_coco
from .detections import detections_per_image, predicts_masks
from .visualize import draw_detections, save_detection_grid

logger = logging.getLogger(__name__)


def no_accelerator_device() -> bool:
    """True on CPU-only machines, where Accelerate must be told `cpu=True` to join a multi-process group."""
    api = getattr(torch, "accelerator", None)
    return not (api.is_available() if api is not None else torch.cuda.is_available())


def _loader(samples, accelerator: Accelerator, batch_size: int, collate, num_workers: int) -> DataLoader:
    indices = list(InferenceSampler(len(samples), accelerator.num_processes, accelerator.process_index))
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return DataLoader(samples, batch_sampler=batches, collate_fn=collate, num_workers=num_workers)


def _predicts_masks(model: torch.nn.Module, accelerator: Accelerator) -> bool:
    return predicts_masks(accelerator.unwrap_model(model).config)


@torch.no_grad()
def predict_coco(
    model: torch.nn.Module,
    data: CocoDetectionData,
    image_processor,
    accelerator: Accelerator,
    *,
    batch_size: int = 1,
    num_workers: int = 0,
) -> list[dict[str, Any]]:
    """COCO-format detections (and RLE masks for Mask R-CNN) of every image, gathered on all processes."""
    samples = DetectionSamples(data, image_processor, training=False, return_masks=False)
    label_to_category = data.label_map.label_to_category
    with_masks = _predicts_masks(model, accelerator)
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    loader = _loader(samples, accelerator, batch_size, collate_detection, num_workers)
    for batch in progress_bar(loader, desc="evaluating", disable=not accelerator.is_local_main_process, leave=False):
        outputs = model(
            pixel_values=batch["pixel_values"].to(accelerator.device),
            pixel_mask=batch["pixel_mask"].to(accelerator.device),
        )
        sizes = [target["orig_size"] for target in batch["labels"]]
        found = detections_per_image(outputs, image_processor, sizes, threshold=0.0, with_masks=with_masks)
        for image_id, image in zip(batch["image_ids"], found):
            results.extend(
                detections_to_coco(
                    image_id, image["boxes"], image["scores"], image["labels"], label_to_category, image.get("masks")
                )
            )
    model.train(was_training)
    gathered = gather_object(results)
    return sorted(gathered, key=lambda d: (d["image_id"], -d["score"]))


def draw_coco_results(
    data: CocoDetectionData, results: list[dict], path: Path, count: int, min_side: int = 320
) -> None:
    """One PNG of the first `count` images with their detections; small images are enlarged to `min_side`."""
    from pycocotools import mask as mask_util

    id2label = data.label_map.id2label
    category_to_label = data.label_map.category_to_label
    panels = []
    for row in data.dataset.select(range(min(count, len(data)))):
        found = [d for d in results if d["image_id"] == row["image_id"]]
        image = Image.open(row["file_name"]).convert("RGB")
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in found)]).reshape(-1, 4)
        masks = None
        if found and "segmentation" in found[0]:
            masks = torch.from_numpy(np.stack([mask_util.decode(d["segmentation"]) for d in found]).astype(bool))
        panels.append(
            draw_detections(
                image,
                boxes,
                torch.tensor([category_to_label[d["category_id"]] for d in found], dtype=torch.int64),
                torch.tensor([d["score"] for d in found]),
                masks=masks,
                id2label=id2label,
                min_side=min_side,
            )
        )
    if panels:
        save_detection_grid(panels, path, columns=min(3, len(panels)))


def evaluate_detector(
    model: torch.nn.Module,
    data: CocoDetectionData,
    image_processor,
    accelerator: Accelerator,
    output_dir: str | Path,
    *,
    batch_size: int = 1,
    num_workers: int = 0,
    num_visualized: int = 4,
) -> CocoMetrics | None:
    """COCO box (and mask) AP of `model` on `data`; writes detections, metrics and a picture.

    Returns the metrics on the main process and None on the others.
    """
    results = predict_coco(model, data, image_processor, accelerator, batch_size=batch_size, num_workers=num_workers)
    if not accelerator.is_main_process:
        return None
    output_dir = Path(output_dir)
    iou_types = ("bbox", "segm") if _predicts_masks(model, accelerator) else ("bbox",)
    metrics = evaluate_coco(data.annotation_file, results, iou_types=iou_types)
    atomic_write_text(output_dir / "detections.json", json.dumps(results))
    metrics.save_json(output_dir / "metrics.json")
    atomic_write_text(output_dir / "metrics.md", metrics.markdown())
    if num_visualized:
        draw_coco_results(data, results, output_dir / "detections.png", num_visualized)
    logger.info("evaluation on %d images:\n%s", len(data), metrics.markdown())
    return metrics


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module,
    data: ImageFolderData,
    image_processor,
    accelerator: Accelerator,
    output_dir: str | Path,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
) -> dict[str, float] | None:
    """Top-1 and top-5 accuracy (percent) of an image classifier on an image-folder data set."""
    samples = ClassificationSamples(data, image_processor, training=False)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    loader = _loader(samples, accelerator, batch_size, collate_classification, num_workers)
    for batch in progress_bar(loader, desc="evaluating", disable=not accelerator.is_local_main_process, leave=False):
        logits = model(pixel_values=batch["pixel_values"].to(accelerator.device)).logits
        correct = topk_correct(logits, batch["labels"].to(accelerator.device), ks=(1, 5))
        totals += torch.tensor(
            [correct["top1"], correct["top5"], correct["total"]], dtype=torch.float64, device=totals.device
        )
    model.train(was_training)
    totals = accelerator.reduce(totals, reduction="sum")
    if not accelerator.is_main_process:
        return None
    counts = dict(zip(("top1", "top5", "total"), (int(v) for v in totals.tolist())))
    metrics = {**accuracy_from_counts(counts), "images": counts["total"]}
    atomic_write_text(Path(output_dir) / "metrics.json", json.dumps(metrics, indent=2))
    logger.info("top-1 %.2f%%, top-5 %.2f%% on %d images", metrics["top1"], metrics["top5"], metrics["images"])
    return metrics
