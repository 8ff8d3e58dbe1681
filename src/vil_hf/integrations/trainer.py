"""Training and evaluating the detectors with transformers' `Trainer`, as its object-detection example
does with DETR: a collate function, data sets whose augmentation is drawn per epoch, and a
`compute_metrics` that gives COCO box (and mask) AP.

Trainer hands `compute_metrics` the model's outputs gathered per batch. Detections differ in number
per image, so they cannot be concatenated across batches: run with `batch_eval_metrics=True` (each
batch is turned into COCO results at once, nothing else is kept) or `eval_do_concat_batches=False`
(all batches are kept, then converted). Evaluation runs on one process: Trainer gathers outputs
across processes as equal-shaped tensors, which per-image detections are not; `accelerate launch
scripts/evaluate.py` evaluates on many.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ..data import CocoDetectionData, DetectionSamples, collate_detection, derive_seed
from ..evaluation.coco_eval import _load_ground_truth, detections_to_coco, evaluate_coco
from ..evaluation.detections import as_tensors, detections_per_image
from ..metrics.coco import flat_metrics

_SETTINGS_HINT = (
    "pass TrainingArguments(batch_eval_metrics=True) (or eval_do_concat_batches=False) so that Trainer keeps "
    "each batch's detections apart"
)


def collate_for_trainer(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch `DetectionSamples` items for `Trainer`: ``pixel_values`` and ``pixel_mask`` zero-padded to
    the batch's largest size, ``labels`` one dict per image (with ``image_id`` and ``orig_size``)."""
    with_ids = [
        sample if "image_id" in sample else {**sample, "image_id": int(sample["labels"]["image_id"])}
        for sample in samples
    ]
    batch = collate_detection(with_ids)
    # The model takes neither: the labels carry the image ids, and ReplaceUnreadable logs each
    # replacement itself (Trainer has no history to count them in).
    del batch["image_ids"], batch["replaced"]
    return batch


class EpochAugmentedSamples(Dataset):
    """`DetectionSamples` for `Trainer`'s training set: item ``i`` of epoch ``e`` draws its random
    resize and flip from ``derive_seed(seed, e, i)``, so epochs differ and a run repeats exactly.

    Trainer tells the data set the epoch through `set_epoch` (Accelerate's data loader calls it when
    each epoch starts; workers started after that see it).
    """

    def __init__(self, samples: DetectionSamples, seed: int = 0) -> None:
        if not isinstance(samples, DetectionSamples) or not samples.training:
            raise ValueError("EpochAugmentedSamples wraps DetectionSamples(..., training=True)")
        self.samples = samples
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[(index, derive_seed(self.seed, self.epoch, index))]


def _ndim(value: Any) -> int:
    return len(value.shape) if hasattr(value, "shape") else -1


def _is_float(value: Any) -> bool:
    dtype = value.dtype
    return dtype.is_floating_point if isinstance(dtype, torch.dtype) else dtype.kind == "f"


def detector_fields(logits: Sequence[Any]) -> dict[str, Any]:
    """The detection fields of one batch of a detector's outputs as Trainer hands them over.

    Trainer's prediction_step turns the model's output into a tuple of its values other than the loss,
    in the order the fields were set, so fields are recognised by what they hold: per-image lists of
    (N, 4) boxes, (N,) float scores, (N,) integer labels, (N, M, M) mask probabilities, and the
    (B, 2) integer ``image_sizes``. The first list of each kind is taken (the detections come before
    any proposals that `output_hidden_states` adds).
    """
    if not isinstance(logits, (tuple, list)):
        raise ValueError(f"expected the detector's outputs as a tuple, got {type(logits).__name__}; " + _SETTINGS_HINT)
    fields: dict[str, Any] = {}
    for value in logits:
        if isinstance(value, Mapping):  # loss_dict
            continue
        if isinstance(value, list) and value and all(hasattr(v, "shape") for v in value):
            first = value[0]
            if _ndim(first) == 2 and first.shape[-1] == 4:
                name = "pred_boxes"
            elif _ndim(first) == 1:
                name = "scores" if _is_float(first) else "labels"
            elif _ndim(first) == 3:
                name = "pred_masks"
            else:
                continue
            fields.setdefault(name, value)
        elif _ndim(value) == 2 and value.shape[-1] == 2 and not _is_float(value):
            fields.setdefault("image_sizes", value)
    missing = [name for name in ("pred_boxes", "scores", "labels", "image_sizes") if name not in fields]
    if missing:
        raise ValueError(
            f"the predictions hold no {', '.join(missing)}: this compute_metrics reads the outputs of "
            f"MaskRCNNForObjectDetection or RetinaNetForObjectDetection, one batch at a time; {_SETTINGS_HINT}"
        )
    return fields


class CocoMetricsForTrainer:
    """`compute_metrics` for `transformers.Trainer`: COCO AP of a detector on a `CocoDetectionData`.

    Returns ``box_AP``, ``box_AP50``, ... (the names of `STAT_NAMES`), ``mask_*`` for Mask R-CNN, and
    ``box_AP_<class>`` per class, in percent; Trainer prefixes them with ``eval_``. The numbers are
    those of `vil_hf.evaluation.evaluate_coco` on the images evaluated.

    Args:
        data: the evaluation data set (its annotation file is the ground truth).
        image_processor: the processor that prepared the images; it rescales boxes and pastes masks.
        iou_types: ``("bbox",)`` or ``("bbox", "segm")``; default: masks too when the model predicts them.
    """

    def __init__(self, data: CocoDetectionData, image_processor: Any, iou_types: Sequence[str] | None = None) -> None:
        self.data = data
        self.image_processor = image_processor
        self.iou_types = tuple(iou_types) if iou_types is not None else None
        self._ground_truth = None
        # The COCO results and CocoMetrics of the last evaluation (e.g. to save its detections).
        self.last_results: list[dict[str, Any]] = []
        self.last_metrics = None
        self._reset()

    def _reset(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.image_ids: list[int] = []
        self.with_masks: bool | None = None

    def add_batch(self, logits: Sequence[Any], labels: Sequence[Mapping[str, Any]]) -> None:
        """Turn one batch of outputs into COCO results (labels give each image's id and original size)."""
        fields = as_tensors(detector_fields(logits))
        labels = list(labels)
        if any("image_id" not in label or "orig_size" not in label for label in labels):
            raise ValueError(
                "each label needs 'image_id' and 'orig_size': build the evaluation set with "
                "DetectionSamples(data, image_processor, training=False, ...) and collate it with collate_for_trainer"
            )
        if len(labels) != len(fields["pred_boxes"]):
            raise ValueError(f"got {len(labels)} labels for {len(fields['pred_boxes'])} images; {_SETTINGS_HINT}")
        if self.with_masks is None:
            has_masks = "pred_masks" in fields
            self.with_masks = has_masks if self.iou_types is None else "segm" in self.iou_types
            if self.with_masks and not has_masks:
                raise ValueError("iou_types asks for 'segm' but the model predicts no masks; use iou_types=('bbox',)")
        found = detections_per_image(
            fields,
            self.image_processor,
            [label["orig_size"] for label in labels],
            threshold=0.0,
            with_masks=self.with_masks,
        )
        label_to_category = self.data.label_map.label_to_category
        for label, image in zip(labels, found):
            image_id = int(label["image_id"])
            self.image_ids.append(image_id)
            self.results.extend(
                detections_to_coco(
                    image_id, image["boxes"], image["scores"], image["labels"], label_to_category, image.get("masks")
                )
            )

    def compute(self) -> dict[str, float]:
        """COCO metrics of the batches added since the last `compute`, flat for Trainer's logs."""
        if not self.image_ids:
            raise ValueError("no batch was added: nothing to evaluate")
        if self._ground_truth is None:
            self._ground_truth = _load_ground_truth(self.data.annotation_file)
        iou_types = ("bbox", "segm") if self.with_masks else ("bbox",)
        metrics = evaluate_coco(self._ground_truth, self.results, iou_types=iou_types, image_ids=self.image_ids)
        self.last_results, self.last_metrics = self.results, metrics
        self._reset()
        return flat_metrics(metrics)

    def __call__(self, eval_prediction: Any, compute_result: bool | None = None) -> dict[str, float]:
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        if compute_result is None:
            # Called once at the end: with eval_do_concat_batches=False, a list with one entry per batch.
            if not isinstance(predictions, list) or not isinstance(labels, list):
                raise ValueError(f"Trainer concatenated the detections of different batches; {_SETTINGS_HINT}")
            self._reset()
            for batch_logits, batch_labels in zip(predictions, labels):
                self.add_batch(batch_logits, batch_labels)
            return self.compute()
        # batch_eval_metrics=True: one batch per call, the result after the last one.
        self.add_batch(predictions, labels)
        return self.compute() if compute_result else {}


__all__ = ["CocoMetricsForTrainer", "EpochAugmentedSamples", "collate_for_trainer", "detector_fields"]
