"""Configurations of the detectors: Mask R-CNN and RetinaNet on any AutoBackbone.

Defaults are the recipe that the published ViL detection configs ran (vil-reference section 5)
and detectron2's documented defaults for what those configs leave unsaid.
"""

from __future__ import annotations

import math

from transformers import AutoConfig, PretrainedConfig
from transformers.utils import logging

from ..backbones import plain_patch_size
from ..configuration_vil import ViLConfig, published_arch
from ..integrations.timm_backbone import backbone_config_from_kwargs, is_timm_backbone_config, timm_backbone_features

logger = logging.get_logger(__name__)

# Earlier configs carried detectron2's pixel statistics (0-255 RGB), which no model code read.
_UNUSED_NORMALISATION = {"pixel_mean": [123.675, 116.28, 103.53], "pixel_std": [58.395, 57.12, 57.375]}


def _drop_unused_normalisation(kwargs: dict) -> None:
    """Pixel statistics live in the image processor (`image_mean` / `image_std`), which normalises
    before the model sees the pixels, as in transformers' other detectors; a model config copy
    could only disagree with it. Old config.json files that carry them still load; values other than
    the defaults, which they never applied either, are reported."""
    for name, default in _UNUSED_NORMALISATION.items():
        value = kwargs.pop(name, None)
        if value is not None and [float(v) for v in value] != default:
            logger.warning(
                "this detector config sets %s=%s, which the model never used: images are normalised by the "
                "image processor (image_mean / image_std in preprocessor_config.json, on the 0-1 scale); "
                "set them there. The value is dropped.",
                name,
                list(value),
            )


def _resolve_backbone_config(backbone_config) -> PretrainedConfig:
    if backbone_config is None:
        # ViL-Small with longformer attention everywhere: the published "_sparse" detection backbone.
        return ViLConfig(arch=published_arch("small", sparse=True), image_size=1333)
    if isinstance(backbone_config, PretrainedConfig):
        return backbone_config
    if isinstance(backbone_config, dict):
        backbone_config = dict(backbone_config)
        model_type = backbone_config.pop("model_type", None)
        if model_type is None:
            raise ValueError("backbone_config given as a dict needs a 'model_type' (e.g. 'vil', 'swin', 'resnet').")
        return AutoConfig.for_model(model_type, **backbone_config)
    raise TypeError(
        f"backbone_config must be a PretrainedConfig, a dict or None, not {type(backbone_config).__name__}."
    )


def _backbone_stages(backbone_config: PretrainedConfig) -> list[str]:
    stages = [name for name in getattr(backbone_config, "stage_names", []) if name.startswith("stage")]
    if not stages:
        raise ValueError(
            f"{type(backbone_config).__name__} has no 'stage*' entries in stage_names; the detectors need a "
            "BackboneMixin backbone (ViL, Swin, ResNet, ConvNeXt, ...)."
        )
    return stages


# How Mask R-CNN's fresh head layers start (MaskRCNNConfig.head_initialization).
HEAD_INITIALIZATIONS = ("detectron2", "pytorch")


class DetectionConfigMixin:
    """What both detectors share: the backbone and which of its stages feed the FPN.

    A hierarchical backbone (strides 4-32: ViL, Swin, ResNet, ConvNeXt) feeds the FPN one map per stage; a plain
    one (one stride in every stage: DINOv2, ViTDet) feeds its last stage to ViTDet's simple feature pyramid, which
    makes the FPN's inputs (see `uses_simple_feature_pyramid`).
    """

    # Each detector sets `backbone_levels`, the FPN levels made from the backbone (P2-P5 for Mask R-CNN, P3-P5 for
    # RetinaNet): the default stage count of a hierarchical backbone, the simple feature pyramid's levels for a plain one.

    def _setup_backbone(
        self, backbone_config, backbone_features: list[str] | None, default_count: int, kwargs: dict
    ) -> None:
        # transformers' `backbone="resnet18", use_timm_backbone=True` arguments, as DETR takes them.
        backbone_config = _resolve_backbone_config(backbone_config_from_kwargs(backbone_config, kwargs))
        if is_timm_backbone_config(backbone_config):
            self.backbone_features = timm_backbone_features(backbone_config, backbone_features, default_count)
            self.backbone_config = backbone_config
            return
        stages = _backbone_stages(backbone_config)
        plain = plain_patch_size(backbone_config) is not None
        if backbone_features is None:
            backbone_features = stages[-1:] if plain else stages[-default_count:]
        backbone_features = list(backbone_features)
        unknown = [name for name in backbone_features if name not in stages]
        if unknown:
            raise ValueError(f"backbone_features {unknown} are not stages of the backbone; choose from {stages}.")
        if [name for name in stages if name in backbone_features] != backbone_features:
            raise ValueError(f"backbone_features must be in increasing stage order, got {backbone_features}.")
        if plain and len(backbone_features) != 1:
            raise ValueError(
                f"{type(backbone_config).__name__} keeps one stride in every stage: the simple feature pyramid takes "
                f"one of its maps, so give one stage in backbone_features (by default the last, {stages[-1]!r}), "
                f"not {backbone_features}."
            )
        # The backbone must hand out exactly these maps, in this order.
        backbone_config.set_output_features_output_indices(out_features=backbone_features, out_indices=None)
        self.backbone_config = backbone_config
        self.backbone_features = backbone_features

    @property
    def uses_simple_feature_pyramid(self) -> bool:
        """True for a plain (single-stride) backbone, whose one map goes through the simple feature pyramid."""
        return plain_patch_size(self.backbone_config) is not None

    @property
    def backbone_input_scale(self) -> float:
        """What the input is scaled by before a plain backbone, so that its patch grid has stride 16 in the input:
        patch / 16 (0.875 for DINOv2's 14-pixel patches; 1 for ViTDet and every hierarchical backbone)."""
        patch_size = plain_patch_size(self.backbone_config)
        return 1.0 if patch_size is None else patch_size / 16

    @property
    def num_backbone_levels(self) -> int:
        """The FPN levels made from the backbone's maps (before the extra P6/P7)."""
        return self.backbone_levels if self.uses_simple_feature_pyramid else len(self.backbone_features)

    def _validate_size_divisibility(self) -> None:
        if self.uses_simple_feature_pyramid and self.size_divisibility % 32:
            raise ValueError(
                f"size_divisibility={self.size_divisibility}: with a plain backbone the simple feature pyramid's "
                "stride-32 level must divide the padded input, so size_divisibility must be a multiple of 32 (a "
                f"patch-{plain_patch_size(self.backbone_config)} backbone sees that input scaled by "
                f"{self.backbone_input_scale:g}, a whole number of patches)."
            )


class MaskRCNNConfig(DetectionConfigMixin, PretrainedConfig):
    r"""Mask R-CNN with an FPN on an AutoBackbone.

    Args:
        backbone_config: the backbone's config (a `PretrainedConfig` or a dict with `model_type`); ViL-Small
            "_sparse" when None. A timm backbone also comes as transformers' arguments, as DETR takes them:
            `backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False` (`backbone_kwargs`
            go to `TimmBackboneConfig`); `backbone_features` are then timm feature indices.
        backbone_features: backbone stages fed to the FPN, in increasing stride order; the last four stages when
            None (ViL, Swin, ResNet and ConvNeXt: strides 4 to 32).
        num_labels: object classes, without background (background is the last row of the box classifier,
            as in detectron2).
        fpn_channels: FPN width; P6 is a stride-2 subsampling of P5 (used by the RPN only).
        anchor_sizes / anchor_aspect_ratios: one size per FPN level, ratios h/w shared by all levels.
        rpn_*: proposal network; pre-NMS top-k is per level, post-NMS top-k per image.
        roi_*: RoI heads; box head `box_head_fc_layers` x `box_head_fc_dim` on `box_pooler_resolution`^2
            RoIAlign, mask head `mask_head_conv_layers` 3x3 convs on `mask_pooler_resolution`^2.
        box_score_threshold / box_nms_threshold / detections_per_image: test-time filtering.
        head_initialization: how fresh FPN, RPN and RoI-head layers start. "detectron2" (the recipe's: Caffe2
            Xavier/MSRA fills, std 0.01 / 0.001 predictors) or "pytorch" (every layer at PyTorch's own default,
            kaiming-uniform with a=sqrt(5)), which trained small heads on a from-scratch backbone faster in the
            demo's measurements. Layers that a checkpoint provides are loaded either way.
    """

    model_type = "vil-mask-rcnn"
    sub_configs = {"backbone_config": AutoConfig}
    backbone_levels = 4  # P2-P5

    def __init__(
        self,
        backbone_config=None,
        backbone_features: list[str] | None = None,
        num_labels: int = 80,
        fpn_channels: int = 256,
        anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512),
        anchor_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        rpn_conv_channels: int | None = None,
        rpn_pre_nms_topk_train: int = 2000,
        rpn_pre_nms_topk_test: int = 1000,
        rpn_post_nms_topk_train: int = 1000,
        rpn_post_nms_topk_test: int = 1000,
        rpn_nms_threshold: float = 0.7,
        rpn_iou_thresholds: tuple[float, float] = (0.3, 0.7),
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_box_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
        rpn_loss_beta: float = 0.0,
        roi_iou_threshold: float = 0.5,
        roi_batch_size_per_image: int = 512,
        roi_positive_fraction: float = 0.25,
        roi_append_ground_truth: bool = True,
        roi_box_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0),
        roi_box_loss_beta: float = 0.0,
        roi_canonical_box_size: int = 224,
        roi_canonical_level: int = 4,
        box_pooler_resolution: int = 7,
        box_head_fc_layers: int = 2,
        box_head_fc_dim: int = 1024,
        mask_on: bool = True,
        mask_pooler_resolution: int = 14,
        mask_head_conv_layers: int = 4,
        mask_head_conv_dim: int = 256,
        pooler_sampling_ratio: int = 0,
        box_score_threshold: float = 0.05,
        box_nms_threshold: float = 0.5,
        detections_per_image: int = 100,
        box_scale_clamp: float = math.log(1000.0 / 16),
        size_divisibility: int = 32,
        initializer_range: float = 0.02,
        head_initialization: str = "detectron2",
        **kwargs,
    ):
        _drop_unused_normalisation(kwargs)
        self._setup_backbone(backbone_config, backbone_features, default_count=4, kwargs=kwargs)
        self.fpn_channels = fpn_channels
        self.anchor_sizes = [float(size) for size in anchor_sizes]
        self.anchor_aspect_ratios = [float(ratio) for ratio in anchor_aspect_ratios]
        self.rpn_conv_channels = rpn_conv_channels
        self.rpn_pre_nms_topk_train = rpn_pre_nms_topk_train
        self.rpn_pre_nms_topk_test = rpn_pre_nms_topk_test
        self.rpn_post_nms_topk_train = rpn_post_nms_topk_train
        self.rpn_post_nms_topk_test = rpn_post_nms_topk_test
        self.rpn_nms_threshold = rpn_nms_threshold
        self.rpn_iou_thresholds = list(rpn_iou_thresholds)
        self.rpn_batch_size_per_image = rpn_batch_size_per_image
        self.rpn_positive_fraction = rpn_positive_fraction
        self.rpn_box_weights = list(rpn_box_weights)
        self.rpn_loss_beta = rpn_loss_beta
        self.roi_iou_threshold = roi_iou_threshold
        self.roi_batch_size_per_image = roi_batch_size_per_image
        self.roi_positive_fraction = roi_positive_fraction
        self.roi_append_ground_truth = roi_append_ground_truth
        self.roi_box_weights = list(roi_box_weights)
        self.roi_box_loss_beta = roi_box_loss_beta
        self.roi_canonical_box_size = roi_canonical_box_size
        self.roi_canonical_level = roi_canonical_level
        self.box_pooler_resolution = box_pooler_resolution
        self.box_head_fc_layers = box_head_fc_layers
        self.box_head_fc_dim = box_head_fc_dim
        self.mask_on = mask_on
        self.mask_pooler_resolution = mask_pooler_resolution
        self.mask_head_conv_layers = mask_head_conv_layers
        self.mask_head_conv_dim = mask_head_conv_dim
        self.pooler_sampling_ratio = pooler_sampling_ratio
        self.box_score_threshold = box_score_threshold
        self.box_nms_threshold = box_nms_threshold
        self.detections_per_image = detections_per_image
        self.box_scale_clamp = box_scale_clamp
        self.size_divisibility = size_divisibility
        self.initializer_range = initializer_range
        self.head_initialization = head_initialization
        if "id2label" not in kwargs:  # a saved config carries id2label, which fixes num_labels
            kwargs["num_labels"] = num_labels
        super().__init__(**kwargs)
        self._validate()

    @property
    def num_fpn_levels(self) -> int:
        return self.num_backbone_levels + 1  # + P6

    def _validate(self) -> None:
        if len(self.anchor_sizes) != self.num_fpn_levels:
            raise ValueError(
                f"anchor_sizes has {len(self.anchor_sizes)} entries but the FPN has {self.num_fpn_levels} levels "
                f"({self.num_backbone_levels} from the backbone + P6); give one size per level."
            )
        self._validate_size_divisibility()
        low, high = self.rpn_iou_thresholds
        if not 0 <= low <= high <= 1:
            raise ValueError(f"rpn_iou_thresholds must satisfy 0 <= low <= high <= 1, got {self.rpn_iou_thresholds}.")
        for name in ("rpn_positive_fraction", "roi_positive_fraction", "roi_iou_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}.")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {self.num_labels}.")
        if self.head_initialization not in HEAD_INITIALIZATIONS:
            raise ValueError(
                f"head_initialization={self.head_initialization!r} is not known; choose one of "
                f"{', '.join(map(repr, HEAD_INITIALIZATIONS))}."
            )


class RetinaNetConfig(DetectionConfigMixin, PretrainedConfig):
    r"""RetinaNet with an FPN on an AutoBackbone.

    Args:
        backbone_config: as for `MaskRCNNConfig`.
        backbone_features: stages for P3-P5; the last three stages when None. P6 is a stride-2 3x3 conv on the
            raw last backbone feature (not on P5), P7 a stride-2 conv on ReLU(P6).
        num_labels: object classes (sigmoid classifier, no background).
        anchor_sizes: base size per level; each level uses `anchor_scales` multiples of it.
        focal_loss_alpha / focal_loss_gamma / prior_probability: focal loss and classifier bias init.
        box_loss_beta: smooth-L1 beta of the box loss; 0 is the plain L1 loss of the published configs.
    """

    model_type = "vil-retinanet"
    sub_configs = {"backbone_config": AutoConfig}
    backbone_levels = 3  # P3-P5

    def __init__(
        self,
        backbone_config=None,
        backbone_features: list[str] | None = None,
        num_labels: int = 80,
        fpn_channels: int = 256,
        anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512),
        anchor_scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        anchor_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        head_conv_layers: int = 4,
        iou_thresholds: tuple[float, float] = (0.4, 0.5),
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        prior_probability: float = 0.01,
        box_loss_beta: float = 0.0,
        box_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
        loss_normalizer_momentum: float = 0.9,
        score_threshold: float = 0.05,
        topk_candidates: int = 1000,
        nms_threshold: float = 0.5,
        detections_per_image: int = 100,
        box_scale_clamp: float = math.log(1000.0 / 16),
        size_divisibility: int = 32,
        initializer_range: float = 0.01,
        **kwargs,
    ):
        _drop_unused_normalisation(kwargs)
        self._setup_backbone(backbone_config, backbone_features, default_count=3, kwargs=kwargs)
        self.fpn_channels = fpn_channels
        self.anchor_sizes = [float(size) for size in anchor_sizes]
        self.anchor_scales = [float(scale) for scale in anchor_scales]
        self.anchor_aspect_ratios = [float(ratio) for ratio in anchor_aspect_ratios]
        self.head_conv_layers = head_conv_layers
        self.iou_thresholds = list(iou_thresholds)
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.prior_probability = prior_probability
        self.box_loss_beta = box_loss_beta
        self.box_weights = list(box_weights)
        self.loss_normalizer_momentum = loss_normalizer_momentum
        self.score_threshold = score_threshold
        self.topk_candidates = topk_candidates
        self.nms_threshold = nms_threshold
        self.detections_per_image = detections_per_image
        self.box_scale_clamp = box_scale_clamp
        self.size_divisibility = size_divisibility
        self.initializer_range = initializer_range
        if "id2label" not in kwargs:  # a saved config carries id2label, which fixes num_labels
            kwargs["num_labels"] = num_labels
        super().__init__(**kwargs)
        self._validate()

    @property
    def num_fpn_levels(self) -> int:
        return self.num_backbone_levels + 2  # + P6, P7

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.anchor_scales) * len(self.anchor_aspect_ratios)

    def _validate(self) -> None:
        if len(self.anchor_sizes) != self.num_fpn_levels:
            raise ValueError(
                f"anchor_sizes has {len(self.anchor_sizes)} entries but the FPN has {self.num_fpn_levels} levels "
                f"({self.num_backbone_levels} from the backbone + P6 + P7); give one size per level."
            )
        self._validate_size_divisibility()
        low, high = self.iou_thresholds
        if not 0 <= low <= high <= 1:
            raise ValueError(f"iou_thresholds must satisfy 0 <= low <= high <= 1, got {self.iou_thresholds}.")
        if not 0 < self.prior_probability < 1:
            raise ValueError(f"prior_probability must lie in (0, 1), got {self.prior_probability}.")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {self.num_labels}.")
