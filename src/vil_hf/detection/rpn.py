"""Region proposal network: objectness and box deltas per anchor, proposals by per-level top-k and NMS."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vil_kernels.ops import batched_nms, box_iou

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .boxes import clip_boxes, nonempty_boxes
from .checkpointing import CheckpointedModule
from .extents import anchors_and_outputs_of_image
from .losses import smooth_l1_loss
from .matcher import Matcher, sample_labels


class RPNHead(CheckpointedModule):
    """A shared 3x3 conv + ReLU, then 1x1 convs for A objectness logits and 4A deltas per location."""

    def __init__(self, in_channels: int, num_anchors: int, conv_channels: int | None = None):
        super().__init__()
        conv_channels = conv_channels or in_channels
        self.conv = nn.Conv2d(in_channels, conv_channels, kernel_size=3, padding=1)
        self.objectness_logits = nn.Conv2d(conv_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(conv_channels, num_anchors * 4, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: logits (N, H*W*A) and deltas (N, H*W*A, 4), location-major like the anchors."""
        logits, deltas = [], []
        for feature in features:
            hidden = F.relu(self.conv(feature))
            level_logits = self.objectness_logits(hidden)  # (N, A, H, W)
            level_deltas = self.anchor_deltas(hidden)  # (N, A*4, H, W)
            batch, num_anchors, height, width = level_logits.shape
            logits.append(level_logits.permute(0, 2, 3, 1).flatten(1))
            level_deltas = level_deltas.view(batch, num_anchors, 4, height, width).permute(0, 3, 4, 1, 2)
            deltas.append(level_deltas.reshape(batch, -1, 4))
        return logits, deltas


class RegionProposalNetwork(nn.Module):
    """Proposals and RPN losses (detectron2's RPN with its default sampling and loss normalisation)."""

    def __init__(self, config, in_channels: int):
        super().__init__()
        self.anchor_generator = AnchorGenerator([[size] for size in config.anchor_sizes], config.anchor_aspect_ratios)
        self.head = RPNHead(in_channels, self.anchor_generator.num_anchors_per_location, config.rpn_conv_channels)
        self.box_coder = BoxCoder(config.rpn_box_weights, config.box_scale_clamp)
        self.matcher = Matcher(config.rpn_iou_thresholds, [0, -1, 1], allow_low_quality_matches=True)
        self.config = config

    def forward(
        self,
        features: list[torch.Tensor],
        strides: list[int],
        image_sizes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None = None,
        extents: list[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
        """-> per-image proposal boxes (P_i, 4) and objectness logits (P_i,), and the losses when targets are given.

        `extents`: per level, (B, 2) each image's extent on that map (None: every image fills the batch); the
        features must be zero beyond them. Each image's proposals then come from the anchors inside its extent.
        """
        anchors = self.anchor_generator(features, strides)
        logits, deltas = self.head(features)
        losses = {}
        if targets is not None:
            losses = self.losses(anchors, logits, deltas, [target["boxes"] for target in targets])
        if extents is None:
            candidates = self.top_candidates(anchors, logits, deltas)
        else:
            map_sizes = [feature.shape[-2:] for feature in features]
            candidates = self.top_candidates_per_extent(anchors, logits, deltas, map_sizes, extents)
        proposals, scores = self.propose(*candidates, image_sizes)
        return proposals, scores, losses

    @torch.no_grad()
    def top_candidates(
        self, anchors: list[torch.Tensor], logits: list[torch.Tensor], deltas: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top-scoring anchors of each level, decoded: boxes (N, K, 4), logits (N, K) and levels (K,)."""
        pre_nms_topk = self.config.rpn_pre_nms_topk_train if self.training else self.config.rpn_pre_nms_topk_test
        batch = logits[0].shape[0]
        batch_index = torch.arange(batch, device=logits[0].device)[:, None]
        level_boxes, level_scores, level_ids = [], [], []
        for level, (level_anchors, level_logits, level_deltas) in enumerate(zip(anchors, logits, deltas)):
            num_keep = min(pre_nms_topk, level_logits.shape[1])
            top_scores, top_index = level_logits.topk(num_keep, dim=1)  # (N, k), sorted
            top_deltas = level_deltas[batch_index, top_index]  # (N, k, 4)
            top_anchors = level_anchors[top_index]  # (N, k, 4)
            boxes = self.box_coder.decode(top_deltas.reshape(-1, 4), top_anchors.reshape(-1, 4))
            level_boxes.append(boxes.view(batch, num_keep, 4))
            level_scores.append(top_scores)
            level_ids.append(torch.full((num_keep,), level, dtype=torch.int64, device=top_scores.device))
        return torch.cat(level_boxes, 1), torch.cat(level_scores, 1), torch.cat(level_ids)

    @torch.compiler.disable  # per-image crops of data-dependent size
    @torch.no_grad()
    def top_candidates_per_extent(
        self,
        anchors: list[torch.Tensor],
        logits: list[torch.Tensor],
        deltas: list[torch.Tensor],
        map_sizes: list[tuple[int, int]],
        extents: list[torch.Tensor],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """`top_candidates` of each image alone: per-level top-k over the anchors inside its extent."""
        per_image = ([], [], [])
        for image in range(logits[0].shape[0]):
            image_anchors, (image_logits, image_deltas) = anchors_and_outputs_of_image(
                image, anchors, [logits, deltas], map_sizes, extents
            )
            boxes, scores, levels = self.top_candidates(image_anchors, image_logits, image_deltas)
            for collected, value in zip(per_image, (boxes[0], scores[0], levels)):
                collected.append(value)
        return per_image

    @torch.compiler.disable  # filtering and NMS give data-dependent sizes: runs eagerly inside compiled code
    @torch.no_grad()
    def propose(
        self,
        all_boxes: torch.Tensor | list[torch.Tensor],
        all_scores: torch.Tensor | list[torch.Tensor],
        all_levels: torch.Tensor | list[torch.Tensor],
        image_sizes: torch.Tensor,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image, the candidates' boxes (K, 4), logits (K,) and levels (K, or one tensor for all images) ->
        proposals after clipping, per-level NMS and the post-NMS top-k."""
        config = self.config
        post_nms_topk = config.rpn_post_nms_topk_train if self.training else config.rpn_post_nms_topk_test
        if isinstance(all_levels, torch.Tensor):
            all_levels = [all_levels] * len(image_sizes)
        proposals, proposal_scores = [], []
        for boxes, scores, levels, (height, width) in zip(all_boxes, all_scores, all_levels, image_sizes.tolist()):
            finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            if not bool(finite.all()):
                if self.training:
                    raise FloatingPointError("the RPN predicted non-finite boxes or scores; the training diverged")
                boxes, scores, levels = boxes[finite], scores[finite], levels[finite]
            boxes = clip_boxes(boxes, (height, width))
            keep = nonempty_boxes(boxes)
            boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
            keep = batched_nms(boxes, scores, levels, config.rpn_nms_threshold, max_kept=post_nms_topk)
            proposals.append(boxes[keep])
            proposal_scores.append(scores[keep])
        return proposals, proposal_scores

    def losses(
        self,
        anchors: list[torch.Tensor],
        logits: list[torch.Tensor],
        deltas: list[torch.Tensor],
        gt_boxes: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        config = self.config
        all_anchors = torch.cat(anchors)
        labels, target_deltas = [], []
        for boxes in gt_boxes:
            matches, match_labels = self.matcher(box_iou(boxes, all_anchors))
            anchor_labels = torch.full_like(matches, -1)
            positive, negative = sample_labels(
                match_labels, config.rpn_batch_size_per_image, config.rpn_positive_fraction, background_label=0
            )
            anchor_labels[positive] = 1
            anchor_labels[negative] = 0
            matched_boxes = boxes[matches] if boxes.shape[0] else torch.zeros_like(all_anchors)
            labels.append(anchor_labels)
            target_deltas.append(self.box_coder.encode(all_anchors, matched_boxes))
        labels = torch.stack(labels)  # (N, R)
        target_deltas = torch.stack(target_deltas)  # (N, R, 4)
        all_logits, all_deltas = torch.cat(logits, dim=1), torch.cat(deltas, dim=1)
        positive = labels == 1
        valid = labels >= 0
        box_loss = smooth_l1_loss(all_deltas[positive], target_deltas[positive], config.rpn_loss_beta, "sum")
        objectness_loss = F.binary_cross_entropy_with_logits(
            all_logits[valid], labels[valid].to(all_logits.dtype), reduction="sum"
        )
        normalizer = config.rpn_batch_size_per_image * len(gt_boxes)
        return {"loss_rpn_cls": objectness_loss / normalizer, "loss_rpn_loc": box_loss / normalizer}
