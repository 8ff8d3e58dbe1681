"""RetinaNet's dense head: per-anchor class logits and box deltas, focal loss, and inference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vil_kernels.ops import batched_nms, box_iou

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .checkpointing import CheckpointedModule
from .extents import anchors_and_outputs_of_image, zero_beyond_extents
from .losses import sigmoid_focal_loss, smooth_l1_loss
from .matcher import Matcher


class RetinaNetHead(CheckpointedModule):
    """Two towers of 3x3 convs + ReLU shared over levels; 3x3 convs give K logits and 4 deltas per anchor."""

    def __init__(self, in_channels: int, num_anchors: int, num_labels: int, num_convs: int):
        super().__init__()
        self.num_labels = num_labels
        self.cls_convs = nn.ModuleList(nn.Conv2d(in_channels, in_channels, 3, padding=1) for _ in range(num_convs))
        self.bbox_convs = nn.ModuleList(nn.Conv2d(in_channels, in_channels, 3, padding=1) for _ in range(num_convs))
        self.cls_score = nn.Conv2d(in_channels, num_anchors * num_labels, kernel_size=3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=3, padding=1)

    @staticmethod
    def _to_anchor_rows(prediction: torch.Tensor, columns: int) -> torch.Tensor:
        """(N, A*k, H, W) -> (N, H*W*A, k), location-major like the anchors."""
        batch, _, height, width = prediction.shape
        prediction = prediction.view(batch, -1, columns, height, width).permute(0, 3, 4, 1, 2)
        return prediction.reshape(batch, -1, columns)

    def forward(
        self, features: list[torch.Tensor], extents: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`extents`: per level, (B, 2) each image's extent (None: every image fills the batch), beyond which the
        features are zero; each tower's 3x3 convolutions then see zeros there too, as they would pad alone."""
        extents = extents or [None] * len(features)
        logits, deltas = [], []
        for feature, level_extents in zip(features, extents):
            cls_hidden, bbox_hidden = feature, feature
            for cls_conv, bbox_conv in zip(self.cls_convs, self.bbox_convs):
                cls_hidden = zero_beyond_extents(F.relu(cls_conv(cls_hidden)), level_extents)
                bbox_hidden = zero_beyond_extents(F.relu(bbox_conv(bbox_hidden)), level_extents)
            logits.append(self._to_anchor_rows(self.cls_score(cls_hidden), self.num_labels))
            deltas.append(self._to_anchor_rows(self.bbox_pred(bbox_hidden), 4))
        return logits, deltas


class RetinaNetDetector(nn.Module):
    """Anchors, head, focal-loss training and per-level top-k inference of detectron2's RetinaNet."""

    initial_loss_normalizer = 100.0

    def __init__(self, config, in_channels: int):
        super().__init__()
        self.config = config
        sizes = [[size * scale for scale in config.anchor_scales] for size in config.anchor_sizes]
        self.anchor_generator = AnchorGenerator(sizes, config.anchor_aspect_ratios)
        self.head = RetinaNetHead(
            in_channels, self.anchor_generator.num_anchors_per_location, config.num_labels, config.head_conv_layers
        )
        self.box_coder = BoxCoder(config.box_weights, config.box_scale_clamp)
        self.matcher = Matcher(config.iou_thresholds, [0, -1, 1], allow_low_quality_matches=True)
        # Running mean of positive anchors per batch, the loss normaliser (starts at 100 as in detectron2).
        self.register_buffer("loss_normalizer", torch.tensor(self.initial_loss_normalizer), persistent=False)

    @property
    def prior_bias(self) -> float:
        return -math.log((1 - self.config.prior_probability) / self.config.prior_probability)

    def forward(
        self,
        features: list[torch.Tensor],
        strides: list[int],
        image_sizes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None = None,
        detect: bool = True,
        extents: list[torch.Tensor] | None = None,
    ) -> tuple[dict[str, list[torch.Tensor]] | None, dict[str, torch.Tensor]]:
        """`extents`: per level, (B, 2) each image's extent on that map (None: every image fills the batch); the
        features must be zero beyond them. Each image's detections then come from the anchors inside its extent."""
        anchors = self.anchor_generator(features, strides)
        logits, deltas = self.head(features, extents)
        losses = self.losses(anchors, logits, deltas, targets) if targets is not None else {}
        detections = None
        if detect and extents is None:
            detections = self.detect(anchors, logits, deltas)
        elif detect:
            map_sizes = [feature.shape[-2:] for feature in features]
            detections = {"boxes": [], "scores": [], "labels": []}
            for image in range(features[0].shape[0]):
                image_anchors, (image_logits, image_deltas) = anchors_and_outputs_of_image(
                    image, anchors, [logits, deltas], map_sizes, extents
                )
                for key, values in self.detect(image_anchors, image_logits, image_deltas).items():
                    detections[key].extend(values)
        return detections, losses

    def losses(self, anchors, logits, deltas, targets) -> dict[str, torch.Tensor]:
        config = self.config
        num_labels = config.num_labels
        all_anchors = torch.cat(anchors)
        gt_labels, target_deltas = [], []
        for target in targets:
            boxes, classes = target["boxes"], target["class_labels"]
            matches, match_labels = self.matcher(box_iou(boxes, all_anchors))
            if boxes.shape[0]:
                labels = classes[matches].clone()
                labels[match_labels == 0] = num_labels
                labels[match_labels == -1] = -1
                matched_boxes = boxes[matches]
            else:
                labels = torch.full_like(matches, num_labels)
                matched_boxes = torch.zeros_like(all_anchors)
            gt_labels.append(labels)
            target_deltas.append(self.box_coder.encode(all_anchors, matched_boxes))
        gt_labels, target_deltas = torch.stack(gt_labels), torch.stack(target_deltas)  # (N, R), (N, R, 4)
        valid = gt_labels >= 0
        positive = valid & (gt_labels != num_labels)
        num_positive = positive.sum().item()
        if self.training:
            momentum = config.loss_normalizer_momentum
            self.loss_normalizer.mul_(momentum).add_((1 - momentum) * max(num_positive, 1))
            normalizer = float(self.loss_normalizer)
        else:
            normalizer = float(max(num_positive, 1))
        # One-hot over num_labels + 1 columns, background column dropped: background anchors are all-zero rows.
        one_hot = F.one_hot(gt_labels[valid], num_labels + 1)[:, :-1]
        all_logits, all_deltas = torch.cat(logits, dim=1), torch.cat(deltas, dim=1)
        loss_cls = sigmoid_focal_loss(
            all_logits[valid], one_hot.to(all_logits.dtype), config.focal_loss_alpha, config.focal_loss_gamma, "sum"
        )
        loss_box = smooth_l1_loss(all_deltas[positive], target_deltas[positive], config.box_loss_beta, "sum")
        return {"loss_cls": loss_cls / normalizer, "loss_box_reg": loss_box / normalizer}

    @torch.compiler.disable  # thresholds and NMS give data-dependent sizes: runs eagerly inside compiled code
    @torch.no_grad()
    def detect(self, anchors, logits, deltas) -> dict[str, list[torch.Tensor]]:
        """Per image: score threshold and top-k candidates per level, decoding, class-wise NMS, top detections."""
        config = self.config
        num_labels = config.num_labels
        result = {"boxes": [], "scores": [], "labels": []}
        for image in range(logits[0].shape[0]):
            boxes_all, scores_all, labels_all = [], [], []
            for level_anchors, level_logits, level_deltas in zip(anchors, logits, deltas):
                scores = level_logits[image].sigmoid().flatten()  # (H*W*A*K,)
                candidates = torch.nonzero(scores > config.score_threshold).squeeze(1)
                top_scores, order = scores[candidates].topk(min(config.topk_candidates, candidates.numel()))
                candidates = candidates[order]
                anchor_index = torch.div(candidates, num_labels, rounding_mode="floor")
                boxes_all.append(self.box_coder.decode(level_deltas[image][anchor_index], level_anchors[anchor_index]))
                scores_all.append(top_scores)
                labels_all.append(candidates % num_labels)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            keep = batched_nms(boxes, scores, labels, config.nms_threshold, max_kept=config.detections_per_image)
            result["boxes"].append(boxes[keep])
            result["scores"].append(scores[keep])
            result["labels"].append(labels[keep])
        return result
