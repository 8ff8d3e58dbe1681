"""Map-style torch datasets that load one image, augment it with a per-sample seed, and run the processor."""

from __future__ import annotations

import json
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ._images import open_rgb
from .coco import CocoDetectionData
from .errors import DataError
from .samplers import derive_seed


def _split_key(key: Any, length: int) -> tuple[int, int | None]:
    """(index, sample_seed or None) from an int index or an `(index, sample_seed)` tuple."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise DataError(f"a sample key is an int index or an (index, sample_seed) pair; got {key!r}")
        index, seed = int(key[0]), int(key[1])
    else:
        index, seed = int(key), None
    if not -length <= index < length:
        raise IndexError(f"index {index} is out of range for {length} images")
    return index % length, seed


def _pad_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack tensors whose last two dims differ, zero-padding bottom/right to the largest."""
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), *tensors[0].shape[:-2], height, width))
    for index, tensor in enumerate(tensors):
        out[index, ..., : tensor.shape[-2], : tensor.shape[-1]] = tensor
    return out


class DetectionSamples(Dataset):
    """COCO detection samples through a `DetectionImageProcessorPil`.

    `samples[i]` gives image `i` without augmentation; `samples[(i, sample_seed)]` with
    `training=True` draws the random shortest edge and the flip from
    `torch.Generator().manual_seed(sample_seed)`. Category ids become contiguous labels
    (`data.label_map`); crowd objects stay in the data but the processor leaves them out of targets.
    """

    def __init__(self, data: CocoDetectionData, image_processor: Any, *, training: bool, return_masks: bool) -> None:
        self.data = data
        self.image_processor = image_processor
        self.training = bool(training)
        self.return_masks = bool(return_masks)
        self._category_to_label = data.label_map.category_to_label

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = _split_key(key, len(self))
        row = self.data.dataset[index]
        path = row["file_name"]
        image = open_rgb(path)
        if image.size != (row["width"], row["height"]):
            raise DataError(
                f"image {path} is {image.size[0]}x{image.size[1]} (width x height) but "
                f"{self.data.annotation_file} says {row['width']}x{row['height']}; fix the image entry or the file"
            )
        objects = []
        for obj in json.loads(row["annotations"]):
            obj = dict(obj)
            obj["category_id"] = self._category_to_label[obj["category_id"]]
            objects.append(obj)
        augment = self.training and seed is not None
        generator = torch.Generator().manual_seed(seed) if augment else None
        try:
            encoded = self.image_processor(
                images=image,
                annotations={"image_id": int(row["image_id"]), "annotations": objects},
                training=augment,
                generator=generator,
                return_segmentation_masks=self.return_masks,
                return_tensors="pt",
            )
        except ValueError as error:
            raise DataError(
                f"cannot prepare {path} (image_id {row['image_id']}) from {self.data.annotation_file}: {error}"
            ) from error
        labels = dict(encoded["labels"][0])
        return {
            "pixel_values": encoded["pixel_values"][0],
            "pixel_mask": encoded["pixel_mask"][0],
            "labels": labels,
            "image_id": int(row["image_id"]),
        }


class ReplaceUnreadable(Dataset):
    """Training samples that never stop a run: an item that cannot be read (its file changed or broke
    after the data check) is replaced by another image picked from its key.

    The pick depends only on the key, so a resumed run replaces the same items with the same images
    and resumption stays exact. A replaced item carries `replaced`, the reason, which the collate
    functions hand on as the batch's `replaced` list for the loop to count and log.
    """

    def __init__(self, samples: Dataset, max_attempts: int = 8) -> None:
        self.samples = samples
        self.max_attempts = int(max_attempts)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = _split_key(key, len(self))
        try:
            return self.samples[key]
        except DataError as error:
            reason = str(error)
        for attempt in range(1, self.max_attempts + 1):
            pick = derive_seed(index, -1 if seed is None else seed, attempt)
            other = (index + 1 + pick % max(len(self) - 1, 1)) % len(self)  # never the same image
            try:
                item = self.samples[other if seed is None else (other, derive_seed(seed, attempt))]
            except DataError:
                continue
            return {**item, "replaced": reason}
        raise DataError(
            f"{reason}; and {self.max_attempts} images tried in its place could not be read either: the data "
            "set is no longer readable (a disk or network folder gone?). Fix it, then resume with --resume"
        )


def _replaced(samples: list[dict]) -> list[str]:
    return [s["replaced"] for s in samples if "replaced" in s]


def collate_detection(samples: list[dict]) -> dict[str, Any]:
    """Batch DetectionSamples items: zero-pad pixel_values / pixel_mask to the batch's largest H, W.

    `replaced` lists the reasons of items that ReplaceUnreadable replaced (empty normally).
    """
    if not samples:
        raise DataError("cannot collate an empty list of samples")
    return {
        "pixel_values": _pad_stack([s["pixel_values"] for s in samples]),
        "pixel_mask": _pad_stack([s["pixel_mask"] for s in samples]),
        "labels": [s["labels"] for s in samples],
        "image_ids": [int(s["image_id"]) for s in samples],
        "replaced": _replaced(samples),
    }


class ClassificationSamples(Dataset):
    """Image-folder samples through a classification image processor (e.g. `ViLImageProcessorPil`).

    With `training=True` and an `(index, sample_seed)` key the image is flipped horizontally with
    probability 0.5, drawn from `torch.Generator().manual_seed(sample_seed)`.
    """

    def __init__(self, data: Any, image_processor: Any, training: bool) -> None:
        self.data = data
        self.image_processor = image_processor
        self.training = bool(training)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = _split_key(key, len(self))
        row = self.data.dataset[index]
        image = open_rgb(row["file_name"])
        if self.training and seed is not None:
            generator = torch.Generator().manual_seed(seed)
            if torch.rand((), generator=generator).item() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixel_values = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixel_values, "labels": int(row["label"])}


def collate_classification(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Batch ClassificationSamples items: `pixel_values` (B, 3, H, W), `labels` (B,) int64, `replaced` (as
    collate_detection)."""
    if not samples:
        raise DataError("cannot collate an empty list of samples")
    shapes = {tuple(s["pixel_values"].shape) for s in samples}
    if len(shapes) > 1:
        raise DataError(
            f"classification images differ in size after processing ({sorted(shapes)}); use a processor that "
            "crops to a fixed size (do_center_crop=True)"
        )
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "labels": torch.tensor([int(s["labels"]) for s in samples], dtype=torch.int64),
        "replaced": _replaced(samples),
    }


__all__ = [
    "ClassificationSamples",
    "DetectionSamples",
    "ReplaceUnreadable",
    "collate_classification",
    "collate_detection",
]
