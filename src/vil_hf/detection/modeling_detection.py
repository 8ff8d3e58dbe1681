"""Mask R-CNN and RetinaNet on any AutoBackbone, as transformers models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, initialization as init
from transformers.backbone_utils import load_backbone
from transformers.utils import ModelOutput

from .anchors import AnchorGenerator
from .boxes import clip_boxes, nonempty_boxes
from .configuration_detection import MaskRCNNConfig, RetinaNetConfig
from .fpn import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7
from .retinanet import RetinaNetDetector, RetinaNetHead
from .roi_heads import BoxHead, BoxPredictor, MaskHead, RoIHeads
from .rpn import RegionProposalNetwork, RPNHead
from .simple_feature_pyramid import SIMPLE_PYRAMID_STRIDES, SimpleFeaturePyramid

# Ground-truth boxes narrower or shorter than this (after clipping to the image) are dropped, as detectron2's
# dataset mapper does.
MIN_GT_BOX_SIZE = 1e-5


@dataclass
class DetectionOutput(ModelOutput):
    """Output of the detectors.

    Args:
        loss: total of the losses (when `labels` are given).
        loss_dict: each loss by name (`loss_rpn_cls`, `loss_rpn_loc`, `loss_cls`, `loss_box_reg`, `loss_mask`
            for Mask R-CNN; `loss_cls`, `loss_box_reg` for RetinaNet).
        pred_boxes: per image, (N_i, 4) absolute (x1, y1, x2, y2) in the pixels of the unpadded input image.
        scores: per image, (N_i,) detection scores, decreasing.
        labels: per image, (N_i,) class indices in 0..num_labels-1.
        pred_masks: per image, (N_i, M, M) mask probabilities in each box's frame (Mask R-CNN); paste them with
            the image processor's post-processing.
        image_sizes: (B, 2) height and width of each image's valid region in `pixel_values`.
        feature_maps: the FPN levels (with `output_hidden_states=True`).
        proposals: per image, the RPN's proposal boxes (Mask R-CNN, with `output_hidden_states=True`).
        proposal_logits: per image, their objectness logits.
    """

    loss: torch.Tensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    pred_boxes: list[torch.Tensor] | None = None
    scores: list[torch.Tensor] | None = None
    labels: list[torch.Tensor] | None = None
    pred_masks: list[torch.Tensor] | None = None
    image_sizes: torch.Tensor | None = None
    feature_maps: tuple[torch.Tensor, ...] | None = None
    proposals: list[torch.Tensor] | None = None
    proposal_logits: list[torch.Tensor] | None = None


def _xavier_fill(module: nn.Module) -> None:
    # Caffe2's "XavierFill" as detectron2 uses it: kaiming-uniform with a=1, zero bias.
    init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        init.zeros_(module.bias)


def _normal_fill(module: nn.Module, std: float, bias: float = 0.0) -> None:
    init.normal_(module.weight, std=std)
    if module.bias is not None:
        init.constant_(module.bias, bias)


class DetectionPreTrainedModel(PreTrainedModel):
    """Shared loading/initialisation of the detectors; the backbone keeps its own initialisation."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    base_model_prefix = "detector"
    # `gradient_checkpointing_enable()` turns on the backbone's own checkpointed blocks and the heads' heavy parts
    # (FPN, simple feature pyramid, RPN and RetinaNet heads, mask head: `checkpointing.CheckpointedModule`).
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        # detectron2's initialisations, so that training from a fresh head follows the published recipe.
        if isinstance(module, AnchorGenerator):
            # Non-persistent buffers come back uninitialised from from_pretrained: rebuild them.
            for level in range(len(module.sizes)):
                init.copy_(getattr(module, f"cell_anchors_{level}"), module.cell_anchors(level))
        elif isinstance(module, RetinaNetDetector):
            init.constant_(module.loss_normalizer, module.initial_loss_normalizer)
        elif isinstance(module, FeaturePyramidNetwork):
            for conv in [*module.lateral_convs, *module.output_convs]:
                _xavier_fill(conv)
        elif isinstance(module, LastLevelP6P7):
            _xavier_fill(module.p6)
            _xavier_fill(module.p7)
        elif isinstance(module, RPNHead):
            for conv in (module.conv, module.objectness_logits, module.anchor_deltas):
                _normal_fill(conv, std=0.01)
        elif isinstance(module, BoxHead):
            for fc in module.fcs:
                _xavier_fill(fc)
        elif isinstance(module, BoxPredictor):
            _normal_fill(module.cls_score, std=0.01)
            _normal_fill(module.bbox_pred, std=0.001)
        elif isinstance(module, MaskHead):
            for conv in [*module.convs, module.deconv]:
                init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                init.zeros_(conv.bias)
            _normal_fill(module.predictor, std=0.001)
        elif isinstance(module, RetinaNetHead):
            for conv in [*module.cls_convs, *module.bbox_convs, module.bbox_pred]:
                _normal_fill(conv, std=self.config.initializer_range)
            prior = self.config.prior_probability
            _normal_fill(
                module.cls_score,
                std=self.config.initializer_range,
                bias=-torch.log(torch.tensor((1 - prior) / prior)).item(),
            )

    # ------------------------------------------------------------------------------------ shared plumbing
    def _prepare_inputs(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pads to the size divisibility and reads each image's valid size off the pixel mask."""
        if pixel_values.dim() != 4 or pixel_values.shape[0] == 0:
            raise ValueError(
                f"pixel_values must be a non-empty (batch, channels, height, width) tensor, got shape "
                f"{tuple(pixel_values.shape)}; pass at least one image through the image processor."
            )
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            image_sizes = torch.tensor([[height, width]] * batch, device=pixel_values.device)
        else:
            if pixel_mask.shape != (batch, height, width):
                raise ValueError(f"pixel_mask must have shape {(batch, height, width)}, got {tuple(pixel_mask.shape)}")
            mask = pixel_mask.bool()
            image_sizes = torch.stack((mask.any(dim=2).sum(dim=1), mask.any(dim=1).sum(dim=1)), dim=1)
        divisor = self.config.size_divisibility
        pad_h, pad_w = (-height) % divisor, (-width) % divisor
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        return pixel_values, image_sizes

    def _prepare_targets(
        self, labels: list[dict[str, torch.Tensor]] | None, image_sizes: torch.Tensor, needs_masks: bool
    ) -> list[dict[str, torch.Tensor]] | None:
        """Checks the targets, clips boxes to their image and drops the ones that become empty."""
        if labels is None:
            return None
        if len(labels) != image_sizes.shape[0]:
            raise ValueError(f"got {len(labels)} targets for {image_sizes.shape[0]} images; pass one dict per image.")
        prepared = []
        for index, (target, size) in enumerate(zip(labels, image_sizes.tolist())):
            if "boxes" not in target or "class_labels" not in target:
                raise ValueError(f"target {index} needs 'boxes' (N, 4) and 'class_labels' (N,); got {sorted(target)}")
            boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=image_sizes.device)
            classes = torch.as_tensor(target["class_labels"], dtype=torch.int64, device=image_sizes.device)
            if boxes.numel() == 0:
                boxes = boxes.reshape(0, 4)
            if boxes.dim() != 2 or boxes.shape[1] != 4 or classes.shape != (boxes.shape[0],):
                raise ValueError(
                    f"target {index}: boxes must be (N, 4) and class_labels (N,), got {tuple(boxes.shape)} and "
                    f"{tuple(classes.shape)}"
                )
            if not bool(torch.isfinite(boxes).all()):
                raise ValueError(f"target {index} has non-finite box coordinates")
            if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.config.num_labels):
                raise ValueError(
                    f"target {index} has class_labels outside 0..{self.config.num_labels - 1} "
                    f"(min {int(classes.min())}, max {int(classes.max())}); map dataset ids to contiguous labels."
                )
            boxes = clip_boxes(boxes, tuple(size))
            keep = nonempty_boxes(boxes, MIN_GT_BOX_SIZE)
            entry = {"boxes": boxes[keep], "class_labels": classes[keep]}
            if needs_masks:
                if "masks" not in target:
                    raise ValueError(f"target {index} needs 'masks' (N, H, W) to train the mask head")
                masks = torch.as_tensor(target["masks"], device=image_sizes.device)
                if masks.shape[0] != keep.shape[0] or masks.dim() != 3:
                    raise ValueError(f"target {index}: masks must be (N, H, W) with N = {keep.shape[0]}")
                entry["masks"] = masks[keep]
            prepared.append(entry)
        return prepared

    def _build_backbone(self, config) -> list[int]:
        """The backbone and, for a plain (single-stride) one, ViTDet's simple feature pyramid on its map; returns
        the channels of the maps that feed the FPN."""
        self.backbone = load_backbone(config)
        channels = list(self.backbone.channels)
        self.simple_feature_pyramid = None
        if config.uses_simple_feature_pyramid:
            strides = SIMPLE_PYRAMID_STRIDES[-config.backbone_levels :]
            self.simple_feature_pyramid = SimpleFeaturePyramid(channels[-1], strides)
            channels = self.simple_feature_pyramid.channels
        return channels

    def _backbone_feature_maps(self, pixel_values: torch.Tensor, **kwargs) -> list[torch.Tensor]:
        """The maps that feed the FPN: the backbone's, or the simple feature pyramid's from a plain backbone's map.

        A plain backbone whose patches are not 16 pixels (DINOv2: 14) sees the input scaled by patch / 16, so that
        each patch covers 16x16 input pixels and the pyramid's strides stay 4 to 32; the input is padded to a
        multiple of 32, which the scaling turns into a whole number of patches.
        """
        scale = self.config.backbone_input_scale
        if scale != 1:
            height, width = pixel_values.shape[-2:]
            size = (round(height * scale), round(width * scale))
            pixel_values = F.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False, antialias=True)
        backbone_config = self.config.backbone_config
        if backbone_config.model_type == "swin" and backbone_config.use_absolute_embeddings:
            # Swin's absolute position table (off in the published Swins) is resized only when asked.
            kwargs["interpolate_pos_encoding"] = True
        maps = list(self.backbone(pixel_values, **kwargs).feature_maps)
        if self.simple_feature_pyramid is not None:
            maps = self.simple_feature_pyramid(maps[-1])
        return maps

    def _backbone_pyramid(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
        backbone_maps = self._backbone_feature_maps(pixel_values)
        pyramid = self.fpn(backbone_maps)
        # Strides from the shapes: exact, since the input is padded to a multiple of the largest stride.
        first_stride = pixel_values.shape[-1] // backbone_maps[0].shape[-1]
        strides = [first_stride * 2**level for level in range(len(pyramid))]
        return pyramid, strides

    def _pyramid_and_targets(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        labels: list[dict[str, torch.Tensor]] | None,
        needs_masks: bool,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]] | None, list[torch.Tensor], list[int]]:
        """What both detectors do first: check inputs and targets, then run the backbone and FPN."""
        if self.training and labels is None:
            raise ValueError(f"{type(self).__name__} needs `labels` in training mode; call model.eval() to detect.")
        pixel_values, image_sizes = self._prepare_inputs(pixel_values, pixel_mask)
        targets = self._prepare_targets(labels, image_sizes, needs_masks)
        pyramid, strides = self._backbone_pyramid(pixel_values)
        return image_sizes, targets, pyramid, strides

    @staticmethod
    def _make_output(
        losses: dict[str, torch.Tensor],
        detections: dict[str, list[torch.Tensor]] | None,
        image_sizes: torch.Tensor,
        pyramid: list[torch.Tensor] | None,
    ) -> DetectionOutput:
        output = DetectionOutput(image_sizes=image_sizes, feature_maps=tuple(pyramid) if pyramid else None)
        if losses:
            output.loss_dict = losses
            output.loss = sum(losses.values())
        if detections is not None:
            # detectron2 clips the final boxes to the image and drops empty ones after the top-k cut.
            finalized = {key: [] for key in detections}
            for index, size in enumerate(image_sizes.tolist()):
                boxes = clip_boxes(detections["boxes"][index], tuple(size))
                keep = nonempty_boxes(boxes)
                for key, values in detections.items():
                    finalized[key].append(boxes[keep] if key == "boxes" else values[index][keep])
            output.pred_boxes, output.scores, output.labels = (
                finalized["boxes"],
                finalized["scores"],
                finalized["labels"],
            )
            output.pred_masks = finalized.get("masks")
        return output


class MaskRCNNForObjectDetection(DetectionPreTrainedModel):
    """Mask R-CNN (He et al., 2017) with an FPN on the configured AutoBackbone.

    With `labels` (a list of per-image dicts: `boxes` (N, 4) absolute x1y1x2y2 in `pixel_values` pixels,
    `class_labels` (N,), `masks` (N, H, W)), returns the losses; in eval mode, returns detections.
    """

    config_class = MaskRCNNConfig

    def __init__(self, config: MaskRCNNConfig):
        super().__init__(config)
        channels = self._build_backbone(config)
        self.fpn = FeaturePyramidNetwork(channels, config.fpn_channels, LastLevelMaxPool())
        self.rpn = RegionProposalNetwork(config, config.fpn_channels)
        self.roi_heads = RoIHeads(config, config.fpn_channels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DetectionOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        image_sizes, targets, pyramid, strides = self._pyramid_and_targets(
            pixel_values, pixel_mask, labels, needs_masks=self.config.mask_on
        )
        proposals, proposal_logits, losses = self.rpn(pyramid, strides, image_sizes, targets)
        # The RoI heads pool from P2-P5; P6 serves the RPN only.
        detections, roi_losses = self.roi_heads(
            pyramid[:-1], strides[:-1], proposals, image_sizes, targets, detect=not self.training
        )
        losses.update(roi_losses)
        output = self._make_output(losses, detections, image_sizes, pyramid if output_hidden_states else None)
        if output_hidden_states:
            output.proposals, output.proposal_logits = proposals, proposal_logits
        return output if return_dict else output.to_tuple()


class RetinaNetForObjectDetection(DetectionPreTrainedModel):
    """RetinaNet (Lin et al., 2017) with an FPN (P3-P7) on the configured AutoBackbone.

    Takes `labels` as `MaskRCNNForObjectDetection` does (no masks).
    """

    config_class = RetinaNetConfig

    def __init__(self, config: RetinaNetConfig):
        super().__init__(config)
        channels = self._build_backbone(config)
        self.fpn = FeaturePyramidNetwork(
            channels, config.fpn_channels, LastLevelP6P7(channels[-1], config.fpn_channels)
        )
        self.detector = RetinaNetDetector(config, config.fpn_channels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DetectionOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        image_sizes, targets, pyramid, strides = self._pyramid_and_targets(
            pixel_values, pixel_mask, labels, needs_masks=False
        )
        detections, losses = self.detector(pyramid, strides, image_sizes, targets, detect=not self.training)
        output = self._make_output(losses, detections, image_sizes, pyramid if output_hidden_states else None)
        return output if return_dict else output.to_tuple()
