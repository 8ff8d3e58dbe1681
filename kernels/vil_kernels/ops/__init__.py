"""Detection ops (box IoU, NMS, RoIAlign) in plain PyTorch, with torchvision.ops signatures and semantics.

No compiled extension: these run wherever torch runs, and are checked against stored torchvision outputs.
"""

from .boxes import box_area, box_iou
from .nms import batched_nms, nms, nms_blocked, nms_greedy
from .roi_align import roi_align, roi_align_gather, roi_align_maps

__all__ = [
    "batched_nms",
    "box_area",
    "box_iou",
    "nms",
    "nms_blocked",
    "nms_greedy",
    "roi_align",
    "roi_align_gather",
    "roi_align_maps",
]
