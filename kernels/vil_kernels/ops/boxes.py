"""Box geometry on (x1, y1, x2, y2) boxes, with the arithmetic laid out as torchvision's CPU code does it.

NMS compares IoUs against a threshold with a strict ``>``, so the order of the floating-point operations
decides borderline pairs; everything here (and nms.py) goes through :func:`pairwise_iou` to keep one order:
``inter / (area_row + area_col - inter)``.
"""

from __future__ import annotations

import torch


def check_boxes(boxes: torch.Tensor, name: str = "boxes") -> None:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) as (x1, y1, x2, y2), got {tuple(boxes.shape)}")


def _as_float(boxes: torch.Tensor) -> torch.Tensor:
    # Integer boxes would make the IoU an integer division; torchvision upcasts them the same way.
    if boxes.is_floating_point():
        return boxes
    return boxes.float()


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of each box: (N, 4) -> (N,). Degenerate boxes (x2 < x1) give negative areas, as in torchvision."""
    check_boxes(boxes)
    boxes = _as_float(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def pairwise_iou(
    rows: torch.Tensor, row_area: torch.Tensor, cols: torch.Tensor, col_area: torch.Tensor
) -> torch.Tensor:
    """IoU of every row box with every column box -> (R, C). No input checks.

    Boxes come coordinate-major, rows (4, R) and cols (4, C), with areas (R,) and (C,): broadcasting
    contiguous coordinate vectors, in place, runs several times faster than (R, C, 2) views of (N, 4) boxes.
    Inputs that need gradients take the same operations out of place (autograd refuses ``out=``).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (rows, row_area, cols, col_area)):
        w = torch.minimum(rows[2][:, None], cols[2][None, :]) - torch.maximum(rows[0][:, None], cols[0][None, :])
        h = torch.minimum(rows[3][:, None], cols[3][None, :]) - torch.maximum(rows[1][:, None], cols[1][None, :])
        inter = w.clamp(min=0) * h.clamp(min=0)
        return inter / (row_area[:, None] + col_area[None, :] - inter)
    xx1 = torch.maximum(rows[0][:, None], cols[0][None, :])  # (R, C)
    w = torch.minimum(rows[2][:, None], cols[2][None, :]).sub_(xx1).clamp_(min=0)
    yy1 = torch.maximum(rows[1][:, None], cols[1][None, :], out=xx1)
    h = torch.minimum(rows[3][:, None], cols[3][None, :]).sub_(yy1).clamp_(min=0)
    inter = w.mul_(h)
    union = torch.add(row_area[:, None], col_area[None, :], out=h).sub_(inter)
    return inter.div_(union)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Intersection over union of every box in ``boxes1`` (N, 4) with every box in ``boxes2`` (M, 4) -> (N, M)."""
    check_boxes(boxes1, "boxes1")
    check_boxes(boxes2, "boxes2")
    boxes1, boxes2 = _as_float(boxes1), _as_float(boxes2)
    if boxes1.dtype != boxes2.dtype:
        dtype = torch.promote_types(boxes1.dtype, boxes2.dtype)
        boxes1, boxes2 = boxes1.to(dtype), boxes2.to(dtype)
    return pairwise_iou(boxes1.t().contiguous(), box_area(boxes1), boxes2.t().contiguous(), box_area(boxes2))
