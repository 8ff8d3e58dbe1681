"""Detection ops (box IoU, NMS, RoIAlign) in plain PyTorch, with torchvision.ops signatures and semantics.

They run wherever torch runs and are checked against stored torchvision outputs. RoIAlign and NMS also have C++
kernels (CPU), built on first use where a compiler is (``vil_kernels.native``), held against the PyTorch paths in
the tests.
"""

from .boxes import box_area, box_iou
from .nms import batched_nms, nms, nms_blocked, nms_greedy, nms_native
from .roi_align import roi_align, roi_align_gather, roi_align_maps

__all__ = [
    "batched_nms",
    "box_area",
    "box_iou",
    "nms",
    "nms_blocked",
    "nms_greedy",
    "nms_native",
    "roi_align",
    "roi_align_gather",
    "roi_align_maps",
]
