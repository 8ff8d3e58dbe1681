"""COCO instance annotations as a `datasets.Dataset`, checked up front with clear errors."""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import datasets

from ._images import check_image_files, report_skipped
from .errors import DataError

COCO_FEATURES = datasets.Features(
    {
        "image_id": datasets.Value("int64"),
        "file_name": datasets.Value("string"),
        "width": datasets.Value("int64"),
        "height": datasets.Value("int64"),
        "annotations": datasets.Value("string"),
    }
)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _default_name(label: int, name: str) -> bool:
    """True for transformers' placeholder names (`LABEL_3`), which say nothing about the classes."""
    return name == f"LABEL_{label}"


@dataclass
class CategoryMap:
    """COCO category ids <-> contiguous labels 0..K-1 (in increasing category id, as detectron2)."""

    category_to_label: dict[int, int]
    label_to_category: dict[int, int]
    id2label: dict[int, str]

    @classmethod
    def from_categories(cls, categories: list[dict]) -> CategoryMap:
        ordered = sorted(categories, key=lambda category: int(category["id"]))
        category_to_label = {int(c["id"]): label for label, c in enumerate(ordered)}
        return cls(
            category_to_label=category_to_label,
            label_to_category={label: category for category, label in category_to_label.items()},
            id2label={label: str(c["name"]) for label, c in enumerate(ordered)},
        )

    @property
    def num_labels(self) -> int:
        return len(self.category_to_label)

    def check_against(self, num_labels: int, id2label: dict | None = None) -> None:
        """Raise DataError when a model config with `num_labels` (and `id2label`) does not fit these categories.

        transformers' placeholder names (`LABEL_0`, ...) in `id2label` are not compared.
        """
        if int(num_labels) != self.num_labels:
            raise DataError(
                f"the data has {self.num_labels} categories but the model config has num_labels={num_labels}: "
                f"set model.num_labels={self.num_labels} (a detector trained on other classes needs a new head)"
            )
        if id2label is None:
            return
        differences = []
        for label, name in sorted(((int(k), str(v)) for k, v in id2label.items()), key=lambda item: item[0]):
            if _default_name(label, name):
                continue
            ours = self.id2label.get(label)
            if ours != name:
                differences.append(f"label {label}: data {ours!r}, model {name!r}")
        if differences:
            shown = "; ".join(differences[:5]) + ("; ..." if len(differences) > 5 else "")
            raise DataError(
                f"the data's category names differ from the model config's id2label ({shown}): the labels would "
                "mean different classes. Train from a config whose id2label matches the data's categories "
                "(labels follow increasing COCO category id), or use the matching annotation file"
            )


@dataclass
class CocoDetectionData:
    """One row per usable image: `image_id`, `file_name` (absolute path), `width`, `height`, and
    `annotations` (the image's COCO annotation dicts as JSON, untouched)."""

    dataset: datasets.Dataset
    categories: list[dict]
    annotation_file: str
    image_dir: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @cached_property
    def label_map(self) -> CategoryMap:
        return CategoryMap.from_categories(self.categories)

    def __len__(self) -> int:
        return len(self.dataset)

    def without_empty(self) -> CocoDetectionData:
        """A copy without the images that have no non-crowd annotation (left out of training, as detectron2)."""
        keep = [
            index
            for index, text in enumerate(self.dataset["annotations"])
            if any(not obj.get("iscrowd", 0) for obj in json.loads(text))
        ]
        if not keep:
            raise DataError(
                f"no image in {self.annotation_file} has a non-crowd annotation, so nothing is left to train on; "
                "check that this is the right annotation file"
            )
        return replace(self, dataset=self.dataset.select(keep))

    def aspect_ratios(self) -> list[float]:
        """width / height per row."""
        return [w / h for w, h in zip(self.dataset["width"], self.dataset["height"])]


def _read_json(annotation_file: str) -> dict:
    if not os.path.exists(annotation_file):
        raise DataError(
            f"annotation file {annotation_file} does not exist; give the path of a COCO instances JSON "
            "(e.g. annotations/instances_val2017.json)"
        )
    if not os.path.isfile(annotation_file):
        raise DataError(f"annotation file {annotation_file} is not a file; give the path of a COCO instances JSON")
    with open(annotation_file, "rb") as handle:
        raw = handle.read()
    if not raw.strip():
        raise DataError(
            f"annotation file {annotation_file} is empty; it was probably cut short while downloading or writing. "
            "Download or write it again"
        )
    try:
        content = json.loads(raw)
    except json.JSONDecodeError as error:
        raise DataError(
            f"annotation file {annotation_file} is not valid JSON (line {error.lineno}, column {error.colno}: "
            f"{error.msg}); it may be truncated. Download or write it again"
        ) from error
    except UnicodeDecodeError as error:
        raise DataError(
            f"annotation file {annotation_file} is not UTF-8 JSON ({error}); give a COCO JSON file"
        ) from error
    if not isinstance(content, dict):
        raise DataError(
            f"annotation file {annotation_file} holds a JSON {type(content).__name__}, not an object with "
            "'images', 'annotations' and 'categories' lists; give a COCO instances file"
        )
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(content.get(key), list)]
    if missing:
        raise DataError(
            f"annotation file {annotation_file} has no {' / '.join(repr(k) for k in missing)} list; COCO instance "
            "files have 'images', 'annotations' and 'categories' lists (image-info files for test-dev have no "
            "annotations and cannot be used here)"
        )
    return content


def _check_bbox(bbox: Any, where: str, annotation_file: str) -> None:
    ok = isinstance(bbox, (list, tuple)) and len(bbox) == 4
    ok = ok and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    if not ok:
        raise DataError(
            f"{annotation_file}: {where} has a malformed bbox {bbox!r}; COCO boxes are 4 finite numbers "
            "[x, y, width, height]. Fix or remove that annotation"
        )
    if bbox[2] < 0 or bbox[3] < 0:
        raise DataError(
            f"{annotation_file}: {where} has a bbox {bbox!r} with negative width or height; COCO boxes are "
            "[x, y, width, height], not [x1, y1, x2, y2]. Convert the boxes or remove that annotation"
        )


def load_coco_detection(
    image_dir: str | os.PathLike,
    annotation_file: str | os.PathLike,
    *,
    verify_images: bool = True,
    skip_corrupt_images: bool = True,
) -> CocoDetectionData:
    """Read and check a COCO instances JSON and the images it lists under `image_dir`.

    Images missing on disk (always checked), and with `verify_images` those that do not decode in full
    or whose size differs from their entry's width and height, are left out with one logged warning,
    or raise DataError when `skip_corrupt_images=False`. Decoding results are cached by file size and
    mtime (`vil_hf.data._images.cache_dir`), so loading the same data again is quick.
    """
    image_dir = os.path.abspath(os.fspath(image_dir))
    annotation_file = os.path.abspath(os.fspath(annotation_file))
    if not os.path.exists(image_dir):
        raise DataError(
            f"image folder {image_dir} does not exist; give the folder that holds the images of {annotation_file}"
        )
    if not os.path.isdir(image_dir):
        raise DataError(f"image folder {image_dir} is not a folder; give the folder that holds the images")
    content = _read_json(annotation_file)

    categories = content["categories"]
    category_ids: set[int] = set()
    for number, category in enumerate(categories):
        if not isinstance(category, dict) or not _is_int(category.get("id")) or "name" not in category:
            raise DataError(
                f"{annotation_file}: categories[{number}] must be a dict with an int 'id' and a 'name'; got {category!r}"
            )
        if category["id"] in category_ids:
            raise DataError(
                f"{annotation_file}: category id {category['id']} appears twice in 'categories'; ids must be unique"
            )
        category_ids.add(category["id"])
    if not categories:
        raise DataError(f"{annotation_file} has an empty 'categories' list; list the object categories")

    images = content["images"]
    if not images:
        raise DataError(f"{annotation_file} lists no images ('images' is empty); give an annotation file with images")
    rows: dict[int, dict] = {}
    for number, image in enumerate(images):
        if not isinstance(image, dict):
            raise DataError(f"{annotation_file}: images[{number}] must be a dict; got {type(image).__name__}")
        missing = [key for key in ("id", "file_name", "width", "height") if key not in image]
        if missing:
            raise DataError(
                f"{annotation_file}: images[{number}] lacks {missing}; COCO image entries have id, file_name, width, height"
            )
        if not _is_int(image["id"]):
            raise DataError(f"{annotation_file}: images[{number}] has a non-integer id {image['id']!r}")
        if not (_is_int(image["width"]) and _is_int(image["height"]) and image["width"] > 0 and image["height"] > 0):
            raise DataError(
                f"{annotation_file}: images[{number}] ({image['file_name']!r}) has width={image['width']!r}, "
                f"height={image['height']!r}; both must be positive ints"
            )
        if image["id"] in rows:
            raise DataError(f"{annotation_file}: image id {image['id']} appears twice in 'images'; ids must be unique")
        rows[image["id"]] = {
            "image_id": image["id"],
            "file_name": os.path.join(image_dir, str(image["file_name"])),
            "width": image["width"],
            "height": image["height"],
            "annotations": [],
        }

    for number, obj in enumerate(content["annotations"]):
        where = f"annotations[{number}]" + (f" (id {obj.get('id')})" if isinstance(obj, dict) and "id" in obj else "")
        if not isinstance(obj, dict):
            raise DataError(f"{annotation_file}: {where} must be a dict; got {type(obj).__name__}")
        image_id = obj.get("image_id")
        if image_id not in rows:
            raise DataError(
                f"{annotation_file}: {where} refers to image_id {image_id!r}, which is not in 'images'; "
                "add the image entry or remove the annotation"
            )
        category_id = obj.get("category_id")
        if category_id not in category_ids:
            raise DataError(
                f"{annotation_file}: {where} has category_id {category_id!r}, which is not in 'categories' "
                f"(ids {sorted(category_ids)}); add the category or fix the annotation"
            )
        _check_bbox(obj.get("bbox"), where, annotation_file)
        rows[image_id]["annotations"].append(obj)

    ordered = list(rows.values())
    problems = check_image_files(
        [row["file_name"] for row in ordered],
        verify=verify_images,
        what="COCO",
        base_dir=image_dir,
        expected_sizes=[(row["width"], row["height"]) for row in ordered],
    )
    skipped = report_skipped(
        problems, len(ordered), skip=skip_corrupt_images, source=annotation_file, base_dir=image_dir
    )
    if skipped:
        bad = {path for path, _ in skipped}
        ordered = [row for row in ordered if row["file_name"] not in bad]

    dataset = datasets.Dataset.from_dict(
        {
            "image_id": [row["image_id"] for row in ordered],
            "file_name": [row["file_name"] for row in ordered],
            "width": [row["width"] for row in ordered],
            "height": [row["height"] for row in ordered],
            "annotations": [json.dumps(row["annotations"]) for row in ordered],
        },
        features=COCO_FEATURES,
    )
    return CocoDetectionData(
        dataset=dataset,
        categories=list(categories),
        annotation_file=annotation_file,
        image_dir=image_dir,
        skipped=skipped,
    )


__all__ = ["CategoryMap", "CocoDetectionData", "load_coco_detection"]
