"""Registration of the detectors with transformers' Auto classes and pipelines."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageSegmentation,
    AutoModelForInstanceSegmentation,
    AutoModelForObjectDetection,
)
from transformers.models.auto import modeling_auto

from .configuration_detection import MaskRCNNConfig, RetinaNetConfig
from .image_processing_detection import DetectionImageProcessorPil
from .modeling_detection import MaskRCNNForObjectDetection, RetinaNetForObjectDetection


def register_detectors() -> None:
    """Makes the detectors loadable by the Auto classes and usable by the object-detection and (Mask R-CNN)
    image-segmentation pipelines."""
    for config, detector in (
        (MaskRCNNConfig, MaskRCNNForObjectDetection),
        (RetinaNetConfig, RetinaNetForObjectDetection),
    ):
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModelForObjectDetection.register(config, detector, exist_ok=True)
        AutoImageProcessor.register(config, image_processor_classes={"pil": DetectionImageProcessorPil}, exist_ok=True)
    # Mask R-CNN also answers instance segmentation; the image-segmentation pipeline loads a folder with
    # AutoModelForImageSegmentation (then AutoModelForSemanticSegmentation), so it is registered there too.
    AutoModelForInstanceSegmentation.register(MaskRCNNConfig, MaskRCNNForObjectDetection, exist_ok=True)
    AutoModelForImageSegmentation.register(MaskRCNNConfig, MaskRCNNForObjectDetection, exist_ok=True)

    # The pipelines check the model's class name against the static `*_MAPPING_NAMES` tables. Registered models are
    # meant to pass through the tables' link to their Auto mapping (`names._model_mapping._extra_content`), but the
    # object-detection and image-segmentation pipelines merge several tables into a copy, which loses that link
    # (transformers 5.24), so every pipeline logged a ~6,000-character "not supported" error. There is no other
    # hook: declare our model types in the tables the Auto classes are already registered for. The Auto mappings
    # skip table entries whose model type is not one of transformers' own configs, so loading is unaffected.
    for names, config, detector in (
        (modeling_auto.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES, MaskRCNNConfig, MaskRCNNForObjectDetection),
        (modeling_auto.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES, RetinaNetConfig, RetinaNetForObjectDetection),
        (modeling_auto.MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES, MaskRCNNConfig, MaskRCNNForObjectDetection),
    ):
        names.setdefault(config.model_type, detector.__name__)
