"""Data for training and evaluating the ViL models: COCO detection, image folders, samplers, synthetic shapes."""

from .coco import CategoryMap, CocoDetectionData, load_coco_detection
from .errors import DataError
from .samplers import InferenceSampler, TrainingBatchSampler, derive_seed
from .samples import ClassificationSamples, DetectionSamples, collate_classification, collate_detection

__all__ = [
    "CategoryMap",
    "ClassificationSamples",
    "CocoDetectionData",
    "DataError",
    "DetectionSamples",
    "InferenceSampler",
    "TrainingBatchSampler",
    "collate_classification",
    "collate_detection",
    "derive_seed",
    "load_coco_detection",
]
