"""Box coding: boxes <-> regression deltas relative to reference boxes (anchors or proposals)."""

from __future__ import annotations

import math

import torch


class BoxCoder:
    """Encodes a target box as (dx, dy, dw, dh) relative to a reference box, and decodes back.

    dx, dy are centre offsets in units of the reference size, dw, dh log size ratios; each is multiplied by
    its `weights` entry when encoding. Decoding clamps dw, dh at `scale_clamp` so exp() cannot overflow.
    """

    def __init__(self, weights: tuple[float, float, float, float], scale_clamp: float = math.log(1000.0 / 16)):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, reference_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
        """(N, 4) references and (N, 4) targets -> (N, 4) deltas."""
        wx, wy, ww, wh = self.weights
        ref_widths = reference_boxes[:, 2] - reference_boxes[:, 0]
        ref_heights = reference_boxes[:, 3] - reference_boxes[:, 1]
        ref_ctr_x = reference_boxes[:, 0] + 0.5 * ref_widths
        ref_ctr_y = reference_boxes[:, 1] + 0.5 * ref_heights
        target_widths = target_boxes[:, 2] - target_boxes[:, 0]
        target_heights = target_boxes[:, 3] - target_boxes[:, 1]
        target_ctr_x = target_boxes[:, 0] + 0.5 * target_widths
        target_ctr_y = target_boxes[:, 1] + 0.5 * target_heights
        dx = wx * (target_ctr_x - ref_ctr_x) / ref_widths
        dy = wy * (target_ctr_y - ref_ctr_y) / ref_heights
        dw = ww * torch.log(target_widths / ref_widths)
        dh = wh * torch.log(target_heights / ref_heights)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: torch.Tensor, reference_boxes: torch.Tensor) -> torch.Tensor:
        """(N, 4k) deltas (k boxes per reference, e.g. one per class) and (N, 4) references -> (N, 4k) boxes."""
        deltas = deltas.float()
        reference_boxes = reference_boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = (reference_boxes[:, 2] - reference_boxes[:, 0])[:, None]
        heights = (reference_boxes[:, 3] - reference_boxes[:, 1])[:, None]
        ctr_x = reference_boxes[:, 0, None] + 0.5 * widths
        ctr_y = reference_boxes[:, 1, None] + 0.5 * heights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        pred_w = torch.exp(dw) * widths
        pred_h = torch.exp(dh) * heights
        boxes = torch.stack(
            (
                pred_ctr_x - 0.5 * pred_w,
                pred_ctr_y - 0.5 * pred_h,
                pred_ctr_x + 0.5 * pred_w,
                pred_ctr_y + 0.5 * pred_h,
            ),
            dim=2,
        )  # (N, k, 4)
        return boxes.reshape(deltas.shape)
