"""vil-hf: the Vision Longformer (ViL) as transformers models.

Importing this package registers ViL with transformers' Auto classes.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
)

from .configuration_vil import PUBLISHED_MODELS, ViLConfig, parse_arch, published_arch
from .detection import (
    DetectionImageProcessorPil,
    MaskRCNNConfig,
    MaskRCNNForObjectDetection,
    RetinaNetConfig,
    RetinaNetForObjectDetection,
)
from .detection.registration import register_detectors
from .evaluation.visualize import draw_detections
from .image_processing_vil import ViLImageProcessorPil
from .modeling_vil import ViLBackbone, ViLForImageClassification, ViLModel, ViLPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(ViLConfig.model_type, ViLConfig, exist_ok=True)
AutoModel.register(ViLConfig, ViLModel, exist_ok=True)
AutoModelForImageClassification.register(ViLConfig, ViLForImageClassification, exist_ok=True)
AutoBackbone.register(ViLConfig, ViLBackbone, exist_ok=True)
AutoImageProcessor.register(ViLConfig, image_processor_classes={"pil": ViLImageProcessorPil}, exist_ok=True)
register_detectors()

__all__ = [
    "DetectionImageProcessorPil",
    "MaskRCNNConfig",
    "MaskRCNNForObjectDetection",
    "RetinaNetConfig",
    "RetinaNetForObjectDetection",
    "PUBLISHED_MODELS",
    "ViLBackbone",
    "ViLConfig",
    "ViLForImageClassification",
    "ViLImageProcessorPil",
    "ViLModel",
    "ViLPreTrainedModel",
    "draw_detections",
    "parse_arch",
    "published_arch",
]
