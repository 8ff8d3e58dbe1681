"""RoI heads of Mask R-CNN: proposal sampling, box head and predictor, mask head, their losses and inference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vil_kernels.ops import batched_nms, box_iou, roi_align_maps

from .box_coder import BoxCoder
from .boxes import clip_boxes
from .checkpointing import CheckpointedModule
from .fpn import channels_last_on_cpu
from .losses import smooth_l1_loss
from .matcher import Matcher, sample_labels
from .pooler import MultiScaleRoIAlign

# Objectness given to ground-truth boxes appended to the proposals: sigmoid of it is 1 - 1e-10.
GT_PROPOSAL_LOGIT = math.log((1.0 - 1e-10) / (1 - (1.0 - 1e-10)))


class BoxHead(nn.Module):
    """Flattened pooled features through `num_fc` fully connected layers with ReLU."""

    def __init__(self, in_channels: int, resolution: int, num_fc: int, fc_dim: int):
        super().__init__()
        dims = [in_channels * resolution * resolution] + [fc_dim] * num_fc
        self.fcs = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(num_fc))
        self.out_features = dims[-1]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        hidden = pooled.flatten(1)
        for fc in self.fcs:
            hidden = F.relu(fc(hidden))
        return hidden


class BoxPredictor(nn.Module):
    """Class scores over num_labels + 1 (background LAST, as detectron2) and one box per object class."""

    def __init__(self, in_features: int, num_labels: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_labels + 1)
        self.bbox_pred = nn.Linear(in_features, num_labels * 4)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(hidden), self.bbox_pred(hidden)


class MaskHead(CheckpointedModule):
    """3x3 convs with ReLU, a 2x deconvolution with ReLU, and a 1x1 predictor of one mask per class."""

    def __init__(self, in_channels: int, num_convs: int, conv_dim: int, num_labels: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else conv_dim, conv_dim, kernel_size=3, padding=1) for i in range(num_convs)
        )
        self.deconv = nn.ConvTranspose2d(conv_dim if num_convs else in_channels, conv_dim, kernel_size=2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_labels, kernel_size=1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        hidden = channels_last_on_cpu(pooled)  # RoIAlign writes NCHW
        for conv in self.convs:
            hidden = F.relu(conv(hidden))
        return self.predictor(F.relu(self.deconv(hidden)))  # (R, K, 2S, 2S) logits


class RoIHeads(nn.Module):
    """Box (and mask) branches on proposals; detectron2's StandardROIHeads with its default recipe."""

    def __init__(self, config, in_channels: int):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.box_pooler = MultiScaleRoIAlign(
            config.box_pooler_resolution,
            config.pooler_sampling_ratio,
            config.roi_canonical_box_size,
            config.roi_canonical_level,
        )
        self.box_head = BoxHead(
            in_channels, config.box_pooler_resolution, config.box_head_fc_layers, config.box_head_fc_dim
        )
        self.box_predictor = BoxPredictor(self.box_head.out_features, config.num_labels)
        self.box_coder = BoxCoder(config.roi_box_weights, config.box_scale_clamp)
        self.matcher = Matcher([config.roi_iou_threshold], [0, 1], allow_low_quality_matches=False)
        if config.mask_on:
            self.mask_pooler = MultiScaleRoIAlign(
                config.mask_pooler_resolution,
                config.pooler_sampling_ratio,
                config.roi_canonical_box_size,
                config.roi_canonical_level,
            )
            self.mask_head = MaskHead(
                in_channels, config.mask_head_conv_layers, config.mask_head_conv_dim, config.num_labels
            )

    # ----------------------------------------------------------------------------------------------- training
    def sample_proposals(
        self, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """-> per image: sampled proposal boxes, their classes (num_labels = background), matched gt boxes and
        matched gt index."""
        config = self.config
        sampled_boxes, sampled_classes, sampled_gt_boxes, sampled_gt_index = [], [], [], []
        for boxes, target in zip(proposals, targets):
            gt_boxes, gt_classes = target["boxes"], target["class_labels"]
            if config.roi_append_ground_truth:
                boxes = torch.cat((boxes, gt_boxes.to(boxes.dtype)))
            matches, match_labels = self.matcher(box_iou(gt_boxes, boxes))
            if gt_classes.numel():
                classes = gt_classes[matches].clone()
                classes[match_labels == 0] = self.num_labels
                classes[match_labels == -1] = -1
            else:
                classes = torch.full_like(matches, self.num_labels)
            foreground, background = sample_labels(
                classes, config.roi_batch_size_per_image, config.roi_positive_fraction, self.num_labels
            )
            index = torch.cat((foreground, background))
            sampled_boxes.append(boxes[index])
            sampled_classes.append(classes[index])
            matched = matches[index]
            sampled_gt_index.append(matched)
            sampled_gt_boxes.append(gt_boxes[matched] if gt_boxes.shape[0] else torch.zeros_like(boxes[index]))
        return sampled_boxes, sampled_classes, sampled_gt_boxes, sampled_gt_index

    def box_losses(
        self,
        class_logits: torch.Tensor,
        box_deltas: torch.Tensor,
        proposals: list[torch.Tensor],
        classes: list[torch.Tensor],
        gt_boxes: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        classes = torch.cat(classes)
        proposals, gt_boxes = torch.cat(proposals), torch.cat(gt_boxes)
        loss_cls = F.cross_entropy(class_logits, classes) if classes.numel() else class_logits.sum() * 0.0
        foreground = torch.nonzero((classes >= 0) & (classes < self.num_labels)).squeeze(1)
        foreground_deltas = box_deltas.view(-1, self.num_labels, 4)[foreground, classes[foreground]]
        target_deltas = self.box_coder.encode(proposals[foreground], gt_boxes[foreground])
        box_loss = smooth_l1_loss(foreground_deltas, target_deltas, self.config.roi_box_loss_beta, "sum")
        return {"loss_cls": loss_cls, "loss_box_reg": box_loss / max(classes.numel(), 1)}

    def mask_loss(
        self,
        mask_logits: torch.Tensor,
        proposals: list[torch.Tensor],
        classes: list[torch.Tensor],
        gt_index: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
    ) -> torch.Tensor:
        """Per-pixel BCE on the ground-truth class's mask; targets are the gt masks RoIAligned onto the
        proposal and binarised at 0.5, as detectron2 does for bitmasks."""
        if mask_logits.shape[0] == 0:
            return mask_logits.sum() * 0.0
        resolution = mask_logits.shape[-1]
        masks, rois, image_of_roi = [], [], []
        for boxes, index, target in zip(proposals, gt_index, targets):
            if boxes.shape[0] == 0:
                continue
            if "masks" not in target:
                raise ValueError("mask training needs 'masks' (N, H, W) in every target; set mask_on=False otherwise")
            masks.append(target["masks"].to(mask_logits.dtype)[:, None])  # (G, 1, H, W)
            # Each proposal's RoI points at its own ground truth's mask: no (K, H, W) copy of the masks.
            rois.append(torch.cat((index[:, None].to(boxes.dtype), boxes), dim=1).to(mask_logits.dtype))
            image_of_roi.append(torch.full_like(index, len(masks) - 1))
        # each image's mask stack is a map of its own size: all RoIs in one call
        cropped = roi_align_maps(
            masks, torch.cat(rois), torch.cat(image_of_roi), resolution, [1.0] * len(masks), 0, aligned=True
        )
        mask_targets = (cropped[:, 0] >= 0.5).to(mask_logits.dtype)
        classes = torch.cat(classes)
        logits = mask_logits[torch.arange(mask_logits.shape[0], device=classes.device), classes]
        return F.binary_cross_entropy_with_logits(logits, mask_targets, reduction="mean")

    # ---------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        features: list[torch.Tensor],
        strides: list[int],
        proposals: list[torch.Tensor],
        image_sizes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None = None,
        detect: bool = True,
        extents: list[torch.Tensor] | None = None,
    ) -> tuple[dict[str, list[torch.Tensor]] | None, dict[str, torch.Tensor]]:
        """features: the pooled FPN levels (P2-P5). -> detections (when `detect`) and losses (when targets).

        extents: per level, (B, 2) each image's extent on that map (None: every image fills the batch); the
        detections then pool each image's features within its extent only.
        """
        losses = {}
        if targets is not None:
            boxes, classes, gt_boxes, gt_index = self.sample_proposals(proposals, targets)
            class_logits, box_deltas = self.box_predictor(self.box_head(self.box_pooler(features, strides, boxes)))
            losses.update(self.box_losses(class_logits, box_deltas, boxes, classes, gt_boxes))
            if self.config.mask_on:
                # Only foreground proposals teach the mask head.
                foreground = [(c >= 0) & (c < self.num_labels) for c in classes]
                fg_boxes = [b[f] for b, f in zip(boxes, foreground)]
                fg_classes = [c[f] for c, f in zip(classes, foreground)]
                fg_index = [i[f] for i, f in zip(gt_index, foreground)]
                mask_logits = self.mask_head(self.mask_pooler(features, strides, fg_boxes))
                losses["loss_mask"] = self.mask_loss(mask_logits, fg_boxes, fg_classes, fg_index, targets)
        if not detect:
            return None, losses
        pooled = self.box_pooler(features, strides, proposals, extents)
        class_logits, box_deltas = self.box_predictor(self.box_head(pooled))
        detections = self.detect(class_logits, box_deltas, proposals, image_sizes)
        if self.config.mask_on:
            mask_logits = self.mask_head(self.mask_pooler(features, strides, detections["boxes"], extents))
            labels = torch.cat(detections["labels"])
            probabilities = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels].sigmoid()
            detections["masks"] = list(probabilities.split([len(b) for b in detections["boxes"]]))
        return detections, losses

    @torch.compiler.disable  # thresholds and NMS give data-dependent sizes: runs eagerly inside compiled code
    @torch.no_grad()
    def detect(
        self,
        class_logits: torch.Tensor,
        box_deltas: torch.Tensor,
        proposals: list[torch.Tensor],
        image_sizes: torch.Tensor,
    ) -> dict[str, list[torch.Tensor]]:
        """Per-class boxes and softmax scores -> score threshold, class-wise NMS, top detections per image."""
        config = self.config
        counts = [len(p) for p in proposals]
        boxes_per_image = self.box_coder.decode(box_deltas, torch.cat(proposals)).split(counts)
        scores_per_image = F.softmax(class_logits, dim=-1).split(counts)
        result = {"boxes": [], "scores": [], "labels": []}
        for boxes, scores, (height, width) in zip(boxes_per_image, scores_per_image, image_sizes.tolist()):
            finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
            if not bool(finite.all()):
                boxes, scores = boxes[finite], scores[finite]
            scores = scores[:, :-1]  # drop background
            boxes = clip_boxes(boxes.view(-1, self.num_labels, 4), (height, width))
            keep_mask = scores > config.box_score_threshold
            candidate = torch.nonzero(keep_mask)  # (D, 2): proposal, class
            boxes, scores, labels = boxes[keep_mask], scores[keep_mask], candidate[:, 1]
            keep = batched_nms(boxes, scores, labels, config.box_nms_threshold, max_kept=config.detections_per_image)
            result["boxes"].append(boxes[keep])
            result["scores"].append(scores[keep])
            result["labels"].append(labels[keep])
        return result
