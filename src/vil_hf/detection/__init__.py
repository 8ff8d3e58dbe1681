"""Backbone-agnostic detectors (Mask R-CNN, RetinaNet), their parts and the detection image processor."""

from .configuration_detection import MaskRCNNConfig, RetinaNetConfig
from .image_processing_detection import DetectionImageProcessorPil
from .modeling_detection import (
    DetectionOutput,
    DetectionPreTrainedModel,
    MaskRCNNForObjectDetection,
    RetinaNetForObjectDetection,
)

__all__ = [
    "DetectionImageProcessorPil",
    "DetectionOutput",
    "DetectionPreTrainedModel",
    "MaskRCNNConfig",
    "MaskRCNNForObjectDetection",
    "RetinaNetConfig",
    "RetinaNetForObjectDetection",
]
