"""Data for training and evaluating the ViL models: COCO detection, image folders, samplers, synthetic shapes."""

from .coco import CategoryMap, CocoDetectionData, load_coco_detection
from .errors import DataError
from .image_folder import ImageFolderData, load_image_folder
from .samplers import InferenceSampler, TrainingBatchSampler, derive_seed
from .samples import (
    ClassificationSamples,
    DetectionSamples,
    ReplaceUnreadable,
    collate_classification,
    collate_detection,
)
from .shapes import make_shapes

__all__ = [
    "CategoryMap",
    "ClassificationSamples",
    "CocoDetectionData",
    "DataError",
    "DetectionSamples",
    "ImageFolderData",
    "InferenceSampler",
    "ReplaceUnreadable",
    "TrainingBatchSampler",
    "collate_classification",
    "collate_detection",
    "derive_seed",
    "load_coco_detection",
    "load_image_folder",
    "make_shapes",
]
