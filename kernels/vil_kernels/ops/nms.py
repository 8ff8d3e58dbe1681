"""Greedy non-maximum suppression with torchvision's semantics, in plain PyTorch.

Semantics (torchvision CPU): visit boxes by decreasing score, ties kept in input order (stable sort); a box
is kept unless an already kept box overlaps it with IoU > threshold. The result lists kept indices in that
visiting order.

Three implementations give identical results:

* :func:`nms_greedy` - the plain one: one vectorised IoU row per kept box against every later box.
* :func:`nms_native` - the greedy loop in C++ (``csrc/nms.cpp``; CPU tensors, where ``vil_kernels.native``
  builds): what :func:`nms` and :func:`batched_nms` run where it runs.
* :func:`nms_blocked` - the fast one in PyTorch (what they run elsewhere): boxes are taken in blocks of
  ``block_size``; a block's boxes are first tested against every box kept by earlier blocks in one (kept, B) IoU tile, then
  the greedy chain inside the block is resolved as a fixed point on the block's (B, B) suppression matrix.
  Only the upper triangle (later boxes) is ever compared, and with ``max_kept`` the blocks after the one
  that fills the quota are never visited.

The fixed point: with ``M[i, j]`` = "i may suppress j" (i before j, IoU > t) and ``c`` the block's boxes not
suppressed by earlier blocks, greedy keeps ``k[j] = c[j] and not any_i(k[i] and M[i, j])``. That recursion has
exactly one solution (induct on j). Iterating ``k <- c & ~any(k[:, None] & M)`` from ``k = c`` fixes one more
leading entry per step, so it stops within B steps, and a stationary ``k`` satisfies the recursion, hence is
the greedy answer. Real detections rarely chain more than a few boxes deep, so it takes a handful of steps.
"""

from __future__ import annotations

import math

import torch

from ..native import native_ops
from .boxes import check_boxes, pairwise_iou

__all__ = ["batched_nms", "nms", "nms_blocked", "nms_greedy", "nms_native"]


def _strict_threshold(iou_threshold: float, dtype: torch.dtype) -> float:
    """A threshold t' representable in ``dtype`` with ``iou > t'`` (in dtype) == ``double(iou) > iou_threshold``.

    torchvision compares the float IoU with the double threshold; torch would instead round the threshold
    to the tensor's dtype, which flips ``iou == round(t)`` whenever ``round(t) > t`` (e.g. a float32 IoU
    exactly at float32(0.3)). Stepping one ulp down in that case restores the double comparison.
    """
    exact = torch.tensor(float(iou_threshold), dtype=torch.float64)
    rounded = exact.to(dtype)
    if rounded.to(torch.float64) > exact:
        rounded = torch.nextafter(rounded, torch.tensor(-math.inf, dtype=dtype))
    return rounded.item()


def _prepare(boxes, scores, idxs=None):
    check_boxes(boxes)
    # NMS selects indices: nothing to differentiate, and the in-place IoU needs tensors outside autograd.
    boxes = boxes.detach()
    scores = scores.detach() if isinstance(scores, torch.Tensor) else scores
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must have shape ({boxes.shape[0]},) to match boxes, got {shape}")
    if idxs is not None:
        if not isinstance(idxs, torch.Tensor) or idxs.shape != scores.shape:
            shape = tuple(idxs.shape) if isinstance(idxs, torch.Tensor) else type(idxs).__name__
            raise ValueError(f"idxs must have shape ({boxes.shape[0]},) to match boxes, got {shape}")
        if idxs.is_floating_point() or idxs.is_complex():
            raise TypeError(f"idxs must hold integer category ids, got {idxs.dtype}")
    if not boxes.is_floating_point():
        boxes = boxes.float()
    elif boxes.dtype not in (torch.float32, torch.float64):
        # float16/bfloat16 IoUs would round far more than the reference's float32 ones
        boxes = boxes.float()
    order = torch.sort(scores, descending=True, stable=True).indices  # (N,)
    coords = boxes[order].t().contiguous()  # (4, N) sorted, coordinate-major for pairwise_iou
    area = (coords[2] - coords[0]) * (coords[3] - coords[1])  # (N,)
    sorted_idxs = None if idxs is None else idxs[order]
    return order, coords, area, sorted_idxs


@torch.compiler.disable  # data-dependent loops and output size: runs eagerly inside compiled code
def nms_greedy(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, idxs: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain greedy NMS (one IoU row per kept box); reference for :func:`nms_blocked`. ``idxs``: per-class NMS."""
    order, b, area, cls = _prepare(boxes, scores, idxs)
    threshold = _strict_threshold(iou_threshold, b.dtype)
    n = b.shape[1]
    suppressed = torch.zeros(n, dtype=torch.bool, device=b.device)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        over = pairwise_iou(b[:, i : i + 1], area[i : i + 1], b[:, i + 1 :], area[i + 1 :])[0] > threshold  # (n-i-1,)
        if cls is not None:
            over &= cls[i + 1 :] == cls[i]
        suppressed[i + 1 :] |= over
    return order[torch.tensor(keep, dtype=torch.long, device=b.device)]


@torch.compiler.disable  # data-dependent loops and output size: runs eagerly inside compiled code
def nms_blocked(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    idxs: torch.Tensor | None = None,
    block_size: int = 256,
    max_kept: int | None = None,
) -> torch.Tensor:
    """Block-tiled greedy NMS (see the module docstring); same result as :func:`nms_greedy`.

    ``max_kept``: return only the first ``max_kept`` kept indices, i.e. ``nms_greedy(...)[:max_kept]``. A box's
    fate depends only on higher-scoring boxes, so the blocks after the one that fills the quota are never looked
    at: what callers that cut the result to a top-k (the RPN's post-NMS top-k) need, at a fraction of the work.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    _check_max_kept(max_kept)
    order, b, area, cls = _prepare(boxes, scores, idxs)
    threshold = _strict_threshold(iou_threshold, b.dtype)
    n = b.shape[1]
    device = b.device
    limit = n if max_kept is None else min(max_kept, n)
    kept, num_kept = [], 0
    kept_idx = torch.empty(0, dtype=torch.long, device=device)  # all kept so far, in visiting order
    for start in range(0, n, block_size):
        if num_kept >= limit:
            break
        stop = min(start + block_size, n)
        bb, ba = b[:, start:stop], area[start:stop]
        if num_kept:
            # Suppressed by an earlier block's kept box: one (kept, B) tile. Only boxes still to be visited are
            # ever compared, so the tail after an early stop costs nothing.
            over = pairwise_iou(b[:, kept_idx], area[kept_idx], bb, ba) > threshold  # (k, B)
            if cls is not None:
                over &= cls[kept_idx, None] == cls[None, start:stop]
            candidates = ~over.any(0)  # (B,)
        else:
            candidates = torch.ones(stop - start, dtype=torch.bool, device=device)
        may_suppress = pairwise_iou(bb, ba, bb, ba) > threshold  # (B, B)
        may_suppress = torch.triu(may_suppress, diagonal=1)  # only an earlier box suppresses a later one
        if cls is not None:
            may_suppress &= cls[start:stop, None] == cls[None, start:stop]
        keep = candidates
        while True:
            new_keep = candidates & ~(may_suppress & keep[:, None]).any(0)
            if torch.equal(new_keep, keep):
                break
            keep = new_keep
        block_kept = start + keep.nonzero()[:, 0]  # (k_b,)
        if block_kept.numel():
            kept.append(block_kept)
            kept_idx = torch.cat(kept) if len(kept) > 1 else block_kept
            num_kept = kept_idx.shape[0]
    if not kept:
        return torch.empty(0, dtype=torch.long, device=device)
    return order[kept_idx[:limit]]


def _check_max_kept(max_kept: int | None) -> None:
    if max_kept is not None and max_kept < 0:
        raise ValueError(f"max_kept must be None or non-negative, got {max_kept}")


def _native_for(boxes) -> object | None:
    """The C++ ops if they run on these boxes (CPU tensors; _prepare makes them float32 or float64), else None."""
    if not isinstance(boxes, torch.Tensor) or boxes.device.type != "cpu":
        return None
    return native_ops()


@torch.compiler.disable  # data-dependent output size: runs eagerly inside compiled code
def nms_native(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    idxs: torch.Tensor | None = None,
    max_kept: int | None = None,
) -> torch.Tensor:
    """Greedy NMS in C++ (see the module docstring); same arguments and result as :func:`nms_blocked`."""
    _check_max_kept(max_kept)
    order, b, area, cls = _prepare(boxes, scores, idxs)
    ops = _native_for(b)
    if ops is None:
        raise ValueError(
            f"nms_native runs on CPU boxes where vil_kernels' C++ kernels build; got boxes on {b.device.type}, "
            f"C++ kernels {'built' if native_ops() else 'not built'}. Use nms or batched_nms."
        )
    threshold = _strict_threshold(iou_threshold, b.dtype)
    limit = b.shape[1] if max_kept is None else max_kept
    return order[ops.nms_sorted(b, area, None if cls is None else cls.long().contiguous(), threshold, limit)]


def _nms(boxes, scores, iou_threshold, idxs=None, max_kept=None) -> torch.Tensor:
    """The C++ loop where it runs, else the blocked PyTorch one."""
    if _native_for(boxes) is not None:
        return nms_native(boxes, scores, iou_threshold, idxs=idxs, max_kept=max_kept)
    return nms_blocked(boxes, scores, iou_threshold, idxs=idxs, max_kept=max_kept)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (LongTensor) of the boxes kept by greedy NMS, by decreasing score; torchvision.ops.nms semantics.

    boxes (N, 4) as (x1, y1, x2, y2), scores (N,); boxes with IoU > ``iou_threshold`` against a higher-scoring
    kept box are dropped.
    """
    return _nms(boxes, scores, iou_threshold)


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor,
    iou_threshold: float,
    *,
    max_kept: int | None = None,
) -> torch.Tensor:
    """NMS within each category ``idxs`` (N,) independently; kept indices by decreasing score (the first
    ``max_kept`` of them when given: faster than cutting the full result, same indices).

    Boxes of different categories never suppress each other. Done as one pass with the cross-category pairs
    masked out, rather than torchvision's coordinate offset, so the IoUs are the unshifted ones exactly.
    """
    return _nms(boxes, scores, iou_threshold, idxs=idxs, max_kept=max_kept)
