"""Mask R-CNN and RetinaNet on any AutoBackbone, as transformers models."""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, initialization as init
from transformers.backbone_utils import load_backbone
from transformers.utils import ModelOutput

from .anchors import AnchorGenerator
from .boxes import clip_boxes, nonempty_boxes
from .configuration_detection import MaskRCNNConfig, RetinaNetConfig
from .extents import extent_mask, extents_at_stride, image_extents, zero_beyond_extents
from .fpn import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7
from .retinanet import RetinaNetDetector, RetinaNetHead
from .roi_heads import BoxHead, BoxPredictor, MaskHead, RoIHeads
from .rpn import RegionProposalNetwork, RPNHead
from .simple_feature_pyramid import SIMPLE_PYRAMID_STRIDES, LayerNorm2d, SimpleFeaturePyramid

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
        image_sizes: (B, 2) height and width of each image's valid region in `pixel_values`.
        pred_boxes: per image, (N_i, 4) absolute (x1, y1, x2, y2) in the pixels of the unpadded input image.
        scores: per image, (N_i,) detection scores, decreasing.
        labels: per image, (N_i,) class indices in 0..num_labels-1.
        pred_masks: per image, (N_i, M, M) mask probabilities in each box's frame (Mask R-CNN); paste them with
            the image processor's post-processing.
        hidden_states: the backbone's maps that feed the FPN (with `output_hidden_states=True`).
        feature_maps: the FPN levels (with `output_hidden_states=True`); in eval mode with a `pixel_mask` of images
            of different sizes, each image's levels (and backbone maps) are zero beyond its extent (its size
            padded to `size_divisibility`), and the batch is cut to the largest extent.
        proposals: per image, the RPN's proposal boxes (Mask R-CNN, with `output_hidden_states=True`).
        proposal_logits: per image, their objectness logits.
    """

    loss: torch.Tensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    # first in eval mode: a tensor, as transformers' tests and tools expect of `outputs[0]`
    image_sizes: torch.Tensor | None = None
    pred_boxes: list[torch.Tensor] | None = None
    scores: list[torch.Tensor] | None = None
    labels: list[torch.Tensor] | None = None
    pred_masks: list[torch.Tensor] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    feature_maps: tuple[torch.Tensor, ...] | None = None
    proposals: list[torch.Tensor] | None = None
    proposal_logits: list[torch.Tensor] | None = None


def _xavier_fill(module: nn.Module) -> None:
    # Caffe2's "XavierFill" as detectron2 uses it: kaiming-uniform with a=1, zero bias.
    init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        init.zeros_(module.bias)


def _pytorch_default_fill(layer: nn.Module) -> None:
    # What nn.Linear / nn.Conv2d / nn.ConvTranspose2d.reset_parameters do, through transformers' init functions
    # (which leave loaded tensors alone). The fan-in is weight[0].numel() for all three: a transposed
    # convolution's weight is (in, out, kh, kw) and PyTorch takes out x kh x kw as its fan-in.
    init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
    if layer.bias is not None:
        bound = 1 / math.sqrt(layer.weight[0].numel())
        init.uniform_(layer.bias, -bound, bound)


def _normal_fill(module: nn.Module, std: float, bias: float = 0.0) -> None:
    init.normal_(module.weight, std=std)
    if module.bias is not None:
        init.constant_(module.bias, bias)


# Modules whose recipe initialisation (in `_init_weights`) sets the parameters of the layers they hold.
_RECIPE_INIT_MODULES = (
    FeaturePyramidNetwork,
    LastLevelP6P7,
    RPNHead,
    BoxHead,
    BoxPredictor,
    MaskHead,
    RetinaNetHead,
    SimpleFeaturePyramid,
)


# Mask R-CNN's layers that `MaskRCNNConfig.head_initialization="pytorch"` leaves at PyTorch's defaults.
_MASK_RCNN_HEADS = (FeaturePyramidNetwork, RPNHead, BoxHead, BoxPredictor, MaskHead)


class DetectionPreTrainedModel(PreTrainedModel):
    """Shared loading/initialisation of the detectors; the backbone keeps its own initialisation."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # No submodule is a separate base model (`model.base_model` is the detector itself): the prefix names none.
    # It must not name one either: RetinaNet's head is `detector`, and a prefix equal to it made `base_model` the head.
    # Saved keys do not depend on it, so folders saved with the former prefix ("detector") load unchanged.
    base_model_prefix = "model"
    # `gradient_checkpointing_enable()` turns on the backbone's own checkpointed blocks and the heads' heavy parts
    # (FPN, simple feature pyramid, RPN and RetinaNet heads, mask head: `checkpointing.CheckpointedModule`).
    supports_gradient_checkpointing = True
    # The losses follow the recipe's own normalisation: Trainer must not pass `num_items_in_batch` nor skip its
    # division by the gradient-accumulation steps.
    accepts_loss_kwargs = False
    # What transformers' Trainer or pipelines may pass to any model, which the detectors accept and ignore.
    _ignored_forward_kwargs = ("num_items_in_batch",)

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # For code outside its package, transformers marks a module that owns no parameter directly as initialised
        # without calling `_init_weights`, which would leave the heads at PyTorch's defaults (fresh model) or at
        # uninitialised memory (heads that `from_pretrained` must create). The recipe modules own no parameter
        # directly, so run their initialisation here; transformers' init functions skip loaded tensors.
        if isinstance(module, _RECIPE_INIT_MODULES) and not getattr(module, "_is_hf_initialized", False):
            self._init_weights(module)
            module._is_hf_initialized = True
            return
        super()._initialize_weights(module, is_custom_code)

    def _init_weights(self, module: nn.Module) -> None:
        # detectron2's initialisations, so that training from a fresh head follows the published recipe.
        if isinstance(module, AnchorGenerator):
            # Non-persistent buffers come back uninitialised from from_pretrained: rebuild them.
            for level in range(len(module.sizes)):
                init.copy_(getattr(module, f"cell_anchors_{level}"), module.cell_anchors(level))
        elif isinstance(module, RetinaNetDetector):
            init.constant_(module.loss_normalizer, module.initial_loss_normalizer)
        elif isinstance(module, _MASK_RCNN_HEADS) and getattr(self.config, "head_initialization", None) == "pytorch":
            for layer in module.modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                    _pytorch_default_fill(layer)
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
        elif isinstance(module, SimpleFeaturePyramid):
            # ViTDet leaves its deconvolutions at PyTorch's defaults; those are restated here because a layer that
            # from_pretrained creates is never constructed, and its norms start as identities.
            for layer in module.modules():
                if isinstance(layer, nn.ConvTranspose2d):
                    _pytorch_default_fill(layer)
                elif isinstance(layer, LayerNorm2d):
                    init.ones_(layer.weight)
                    init.zeros_(layer.bias)
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
    def _check_forward_kwargs(self, output_attentions: bool | None, kwargs: dict) -> None:
        """Rejects keyword arguments the detector does not know (a typo such as `pixel_maks` would silently drop
        the mask otherwise), naming the accepted ones."""
        if output_attentions:
            raise ValueError(f"{type(self).__name__} returns no attention maps; call it without output_attentions.")
        unknown = [name for name in kwargs if name not in self._ignored_forward_kwargs]
        if unknown:
            accepted = [name for name in inspect.signature(self.forward).parameters if name not in ("kwargs", "self")]
            hints = [difflib.get_close_matches(name, accepted, n=1) for name in unknown]
            hint = "".join(
                f" (did you mean {match[0]!r} for {name!r}?)" for name, match in zip(unknown, hints) if match
            )
            raise TypeError(
                f"{type(self).__name__}.forward() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}"
                f"{hint}; it accepts {', '.join(accepted)}."
            )

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
            empty = torch.nonzero(image_sizes.amin(dim=1) == 0).flatten().tolist()
            if empty:
                raise ValueError(
                    f"pixel_mask marks no pixel of image(s) {empty}; it must be 1 on each image's pixels (as the "
                    "image processor returns it), or pass no pixel_mask when every image fills pixel_values."
                )
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

    def _batch_extents(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each image's extent (its size padded as it would be alone), for detection that does not depend on the
        other images of the batch. -> the input cut to the largest extent, and the (B, 2) extents, or None when
        every image fills the batch: then the batch runs as one, exactly as a single image does."""
        extents = image_extents(image_sizes, self.config.size_divisibility)
        height, width = (int(size) for size in extents.max(dim=0).values.tolist())
        if (height, width) != tuple(pixel_values.shape[-2:]):
            pixel_values = pixel_values[..., :height, :width]  # padding no image reaches
        if bool((extents == extents.new_tensor([height, width])).all()):
            return pixel_values, None
        return pixel_values, extents

    def _backbone_maps(self, pixel_values: torch.Tensor, extents: torch.Tensor | None) -> list[torch.Tensor]:
        """The backbone's maps, each image's zero beyond its extent (when extents are given) and as it has alone."""
        if extents is None:
            return self._backbone_feature_maps(pixel_values)
        height, width = pixel_values.shape[-2:]
        if getattr(self.backbone, "supports_pixel_mask", False):
            # The backbone keeps each image within its extent itself (ViL's attention masks the rest out).
            pixel_mask = extent_mask(extents, height, width).to(torch.int64)
            return self._backbone_feature_maps(pixel_values, pixel_mask=pixel_mask)
        # Otherwise: one run per group of images of equal extent, on the input cut to it, zero-padded back.
        distinct, group_of_image = torch.unique(extents, dim=0, return_inverse=True)
        maps = None
        for group, (extent_height, extent_width) in enumerate(distinct.tolist()):
            members = torch.nonzero(group_of_image == group).squeeze(1)
            group_maps = self._backbone_feature_maps(pixel_values[members, :, :extent_height, :extent_width])
            if maps is None:
                # Map sizes of the whole batch: the strides divide the extents (multiples of size_divisibility).
                maps = [
                    group_map.new_zeros(
                        len(extents),
                        group_map.shape[1],
                        height // (extent_height // group_map.shape[-2]),
                        width // (extent_width // group_map.shape[-1]),
                    )
                    for group_map in group_maps
                ]
            for batch_map, group_map in zip(maps, group_maps):
                batch_map[members, :, : group_map.shape[-2], : group_map.shape[-1]] = group_map
        return maps

    def _backbone_pyramid(
        self, pixel_values: torch.Tensor, extents: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[int], list[torch.Tensor] | None, list[torch.Tensor]]:
        """-> the FPN levels, their strides, per level each image's extent (None when every image fills the
        batch; the levels are then zero beyond the extents), and the backbone's maps."""
        backbone_maps = self._backbone_maps(pixel_values, extents)
        # Strides from the shapes: exact, since the input is padded to a multiple of the largest stride.
        first_stride = pixel_values.shape[-1] // backbone_maps[0].shape[-1]
        backbone_extents = None
        if extents is not None:
            backbone_extents = [
                extents_at_stride(extents, first_stride * 2**level) for level in range(len(backbone_maps))
            ]
        pyramid = self.fpn(backbone_maps, backbone_extents)
        strides = [first_stride * 2**level for level in range(len(pyramid))]
        if extents is None:
            return pyramid, strides, None, backbone_maps
        level_extents = [extents_at_stride(extents, stride) for stride in strides]
        pyramid = [zero_beyond_extents(level, e) for level, e in zip(pyramid, level_extents)]
        return pyramid, strides, level_extents, backbone_maps

    def _pyramid_and_targets(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        labels: list[dict[str, torch.Tensor]] | None,
        needs_masks: bool,
    ) -> tuple[
        torch.Tensor,
        list[dict[str, torch.Tensor]] | None,
        list[torch.Tensor],
        list[int],
        list | None,
        list[torch.Tensor],
    ]:
        """What both detectors do first: check inputs and targets, then run the backbone and FPN. -> image sizes,
        targets, FPN levels, their strides and extents (see `_backbone_pyramid`), and the backbone's maps.

        In eval mode, each image of a batch is detected as it would be alone (see `_batch_extents`); training runs
        the padded batch as one, as detectron2 trains.
        """
        if self.training and labels is None:
            raise ValueError(f"{type(self).__name__} needs `labels` in training mode; call model.eval() to detect.")
        pixel_values, image_sizes = self._prepare_inputs(pixel_values, pixel_mask)
        targets = self._prepare_targets(labels, image_sizes, needs_masks)
        extents = None
        if not self.training and pixel_mask is not None:
            pixel_values, extents = self._batch_extents(pixel_values, image_sizes)
        pyramid, strides, level_extents, backbone_maps = self._backbone_pyramid(pixel_values, extents)
        return image_sizes, targets, pyramid, strides, level_extents, backbone_maps

    @staticmethod
    @torch.compiler.disable  # dropping empty boxes gives data-dependent sizes
    def _make_output(
        losses: dict[str, torch.Tensor],
        detections: dict[str, list[torch.Tensor]] | None,
        image_sizes: torch.Tensor,
        hidden: dict[str, Any] | None = None,
    ) -> DetectionOutput:
        """The output, built in one call so that its fields (and `to_tuple()`) keep their declared order, loss
        first. `hidden`: what `output_hidden_states` adds (backbone maps, FPN levels, proposals)."""
        fields: dict[str, Any] = {"image_sizes": image_sizes, **(hidden or {})}
        if losses:
            fields["loss"] = sum(losses.values())
            fields["loss_dict"] = losses
        if detections is not None:
            # detectron2 clips the final boxes to the image and drops empty ones after the top-k cut.
            finalized = {key: [] for key in detections}
            for index, size in enumerate(image_sizes.tolist()):
                boxes = clip_boxes(detections["boxes"][index], tuple(size))
                keep = nonempty_boxes(boxes)
                for key, values in detections.items():
                    finalized[key].append(boxes[keep] if key == "boxes" else values[index][keep])
            fields.update(
                pred_boxes=finalized["boxes"],
                scores=finalized["scores"],
                labels=finalized["labels"],
                pred_masks=finalized.get("masks"),
            )
        return DetectionOutput(**{name: fields.get(name) for name in DetectionOutput.__dataclass_fields__})


class MaskRCNNForObjectDetection(DetectionPreTrainedModel):
    """Mask R-CNN (He et al., 2017) with an FPN on the configured AutoBackbone.

    With `labels` (a list of per-image dicts: `boxes` (N, 4) absolute x1y1x2y2 in `pixel_values` pixels,
    `class_labels` (N,), `masks` (N, H, W)), returns the losses; in eval mode, returns detections.
    `output_hidden_states` (default `config.output_hidden_states`) adds the backbone maps, the FPN levels and the
    proposals.
    Unknown keyword arguments raise a TypeError naming the accepted ones.
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
        output_attentions: bool | None = None,
        **kwargs,
    ) -> DetectionOutput | tuple:
        self._check_forward_kwargs(output_attentions, kwargs)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        image_sizes, targets, pyramid, strides, extents, backbone_maps = self._pyramid_and_targets(
            pixel_values, pixel_mask, labels, needs_masks=self.config.mask_on
        )
        proposals, proposal_logits, losses = self.rpn(pyramid, strides, image_sizes, targets, extents)
        # The RoI heads pool from P2-P5; P6 serves the RPN only.
        detections, roi_losses = self.roi_heads(
            pyramid[:-1],
            strides[:-1],
            proposals,
            image_sizes,
            targets,
            detect=not self.training,
            extents=None if extents is None else extents[:-1],
        )
        losses.update(roi_losses)
        hidden = None
        if output_hidden_states:
            hidden = {
                "hidden_states": tuple(backbone_maps),
                "feature_maps": tuple(pyramid),
                "proposals": proposals,
                "proposal_logits": proposal_logits,
            }
        output = self._make_output(losses, detections, image_sizes, hidden)
        return output if return_dict else output.to_tuple()


class RetinaNetForObjectDetection(DetectionPreTrainedModel):
    """RetinaNet (Lin et al., 2017) with an FPN (P3-P7) on the configured AutoBackbone.

    Takes `labels` as `MaskRCNNForObjectDetection` does (no masks); `output_hidden_states` adds the backbone maps
    and the FPN levels.
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
        output_attentions: bool | None = None,
        **kwargs,
    ) -> DetectionOutput | tuple:
        self._check_forward_kwargs(output_attentions, kwargs)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        image_sizes, targets, pyramid, strides, extents, backbone_maps = self._pyramid_and_targets(
            pixel_values, pixel_mask, labels, needs_masks=False
        )
        detections, losses = self.detector(
            pyramid, strides, image_sizes, targets, detect=not self.training, extents=extents
        )
        hidden = (
            {"hidden_states": tuple(backbone_maps), "feature_maps": tuple(pyramid)} if output_hidden_states else None
        )
        output = self._make_output(losses, detections, image_sizes, hidden)
        return output if return_dict else output.to_tuple()
