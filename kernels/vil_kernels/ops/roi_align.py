"""RoIAlign with the semantics of torchvision's CPU kernel, vectorised over RoIs in plain PyTorch.

For each RoI and output bin, a grid of ``grid_h x grid_w`` points is bilinearly sampled and averaged. The
per-point rules mirror the reference kernel so results agree to float rounding:

* point ``y = start + ph * bin_h + (iy + 0.5) * bin_h / grid_h`` (same for x), evaluated in that order;
* a point with ``y < -1`` or ``y > H`` (or the same in x) contributes 0 but still counts in the average;
* otherwise ``y`` is clamped up to 0, and at or past ``H - 1`` both taps sit on row ``H - 1``;
* the average divides by ``max(grid_h * grid_w, 1)``;
* ``aligned=False`` forces RoI sides of at least 1; ``aligned=True`` shifts boxes by half a pixel instead.

Bilinear weights are separable (``w = wy * wx``) and so is the in-range test, so each output value is a
weighted sum over a (2 grid_h) x (2 grid_w) set of taps: the RoI's y taps crossed with its x taps. Every
output value becomes one "bag" of tap indices into the (N*H*W, C) channels-last feature table.

The adaptive grid (``sampling_ratio <= 0``: ``ceil(roi_side / output_side)``) differs per RoI. RoIs are
grouped by their grid rounded up to a bucket (1, 2, 3, 4, 6, 8, 12, 16, ...), each group padded to its bucket
with zero-weight taps: padding costs at most 1.5x per axis, and there is no loop over RoIs.

Three ways to compute it, same numbers up to float rounding (``implementation``):

* ``gather`` (:func:`roi_align_gather`, plain): gather the taps, (bags, taps, C), and contract with the
  weights; chunked over RoIs to bound that tensor.
* ``embedding_bag`` (CPU and CUDA): ``F.embedding_bag`` with per-sample weights does the gather and the
  weighted sum in one kernel without materialising the taps (the backward is a second one over the taps sorted
  by row, :class:`_BagSum`); each axis's taps that land
  on the same row or column are merged first (a bin's points lie within a pixel of each other), which cuts the
  taps of a 4 x 4 grid from 64 to at most 25.
* ``native`` (CPU, float32 and float64, where ``vil_kernels.native`` builds): C++ that works out each RoI's taps
  on the fly from the geometry computed here, with no tap tensors, no grouping by grid and no sort
  (:class:`_NativeRoIAlign`). ``auto`` takes it where it runs, else ``embedding_bag`` (else ``gather``).

:func:`roi_align_maps` pools each RoI from its own map among several (the FPN levels, or one mask stack per
image), each RoI optionally within its image's extent, in one reduction: all maps are rows of one table, and each
RoI carries where its map starts in the table, its row stride and the extent its samples clamp to.

Gradients flow to ``input`` only (as in torchvision); the box geometry is treated as constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..native import native_ops

__all__ = ["IMPLEMENTATIONS", "roi_align", "roi_align_gather", "roi_align_maps"]

IMPLEMENTATIONS = ("auto", "native", "embedding_bag", "gather")

# Tap entries (bags x taps) per reduction call: bounds the int64 index and weight tensors to ~50 MB.
_MAX_TAPS_PER_CALL = 1 << 22
# The plain path also materialises (taps, C) gathered values: keep that to 64 MB of float32.
_MAX_GATHERED_ELEMENTS = 1 << 24


def _pair(output_size) -> tuple[int, int]:
    if isinstance(output_size, int):
        size = (output_size, output_size)
    else:
        size = tuple(int(s) for s in output_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"output_size must be a positive int or (height, width), got {output_size!r}")
    return size


def _as_rois(boxes, input: torch.Tensor) -> torch.Tensor:
    """Boxes as one (K, 5) tensor of (batch_index, x1, y1, x2, y2) in the input's dtype and device."""
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                "boxes given as a tensor must have shape (K, 5) as (batch_index, x1, y1, x2, y2), "
                f"got {tuple(boxes.shape)}; pass a list of (K_i, 4) tensors for per-image boxes"
            )
        rois = boxes
    elif isinstance(boxes, (list, tuple)):
        if len(boxes) != input.shape[0]:
            raise ValueError(f"got {len(boxes)} per-image box tensors for a batch of {input.shape[0]} images")
        parts = []
        for i, b in enumerate(boxes):
            if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[1] != 4:
                shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f"boxes[{i}] must be a (K_i, 4) tensor of (x1, y1, x2, y2), got {shape}")
            b = b.to(device=input.device, dtype=input.dtype)
            parts.append(torch.cat([b.new_full((b.shape[0], 1), float(i)), b], dim=1))
        rois = torch.cat(parts) if parts else input.new_zeros(0, 5)
    else:
        raise TypeError(f"boxes must be a (K, 5) tensor or a list of (K_i, 4) tensors, got {type(boxes).__name__}")
    rois = rois.detach().to(device=input.device, dtype=input.dtype)
    if rois.shape[0]:
        batch = rois[:, 0]
        if bool(((batch < 0) | (batch >= input.shape[0])).any()):
            raise ValueError(f"RoI batch indices must lie in [0, {input.shape[0]}); got {batch.unique().tolist()}")
    return rois


def _check_input(input: torch.Tensor) -> None:
    if not isinstance(input, torch.Tensor) or input.dim() != 4:
        shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
        raise ValueError(f"input must be an (N, C, H, W) tensor, got {shape}")
    if not input.is_floating_point():
        raise TypeError(f"input must be floating point, got {input.dtype}")


def _geometry(rois, spatial_scale, out_h, out_w, sampling_ratio, aligned):
    """Per-RoI start, bin size and sampling grid along y and x: six (K,) tensors. ``spatial_scale``: a number or
    a (K,) tensor."""
    offset = 0.5 if aligned else 0.0
    start_x = rois[:, 1] * spatial_scale - offset
    start_y = rois[:, 2] * spatial_scale - offset
    width = rois[:, 3] * spatial_scale - offset - start_x
    height = rois[:, 4] * spatial_scale - offset - start_y
    if not aligned:
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    bin_h, bin_w = height / out_h, width / out_w
    if sampling_ratio > 0:
        grid_h = torch.full_like(bin_h, sampling_ratio, dtype=torch.long)
        grid_w = torch.full_like(bin_w, sampling_ratio, dtype=torch.long)
    else:
        # a negative side (x2 < x1 with aligned=True) gives no samples, hence zeros, like the reference loop
        grid_h, grid_w = bin_h.ceil().clamp(min=0).long(), bin_w.ceil().clamp(min=0).long()
    return start_y, start_x, bin_h, bin_w, grid_h, grid_w


def _bucket(grid: torch.Tensor) -> torch.Tensor:
    """Round grid sizes up to 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (at most 1.5x)."""
    top = int(grid.max()) if grid.numel() else 0
    edges = [0, 1, 2, 3, 4]
    while edges[-1] < top:
        edges.append(edges[-2] * 2)  # 4 -> 6 (=3*2), 8, 12, 16, ...
    edges_t = torch.tensor(edges, device=grid.device)
    return edges_t[torch.bucketize(grid, edges_t)]


def _axis_taps(start, bin_size, grid, pooled: int, padded_grid: int, size):
    """Bilinear taps along one axis: row/column indices and weights, each (k, pooled, padded_grid, 2).

    ``size``: each RoI's map extent along the axis, (k,); samples clamp to it.
    """
    dtype = start.dtype
    p = torch.arange(pooled, device=start.device, dtype=dtype)[None, :, None]  # (1, P, 1)
    i = torch.arange(padded_grid, device=start.device)[None, None, :]  # (1, 1, G)
    grid_f = grid.clamp(min=1).to(dtype)[:, None, None]
    bin_size = bin_size[:, None, None]
    last = (size - 1).to(dtype)[:, None, None]  # (k, 1, 1) the last row (column) of each RoI's map
    coord = start[:, None, None] + p * bin_size + (i.to(dtype) + 0.5) * bin_size / grid_f  # (k, P, G)
    valid = (i < grid[:, None, None]) & (coord >= -1.0) & (coord <= last + 1.0)
    coord = coord.clamp(min=0.0)
    low = torch.minimum(coord.floor(), last)
    at_edge = low >= last
    coord = torch.where(at_edge, low, coord)
    frac = coord - low  # (k, P, G); 0 at the edge, so the high tap gets no weight there
    low_i = low.long()
    high_i = torch.where(at_edge, low_i, low_i + 1)
    zero = torch.zeros((), dtype=dtype, device=start.device)
    weights = torch.stack([torch.where(valid, 1.0 - frac, zero), torch.where(valid, frac, zero)], dim=-1)
    # out-of-range points keep a harmless in-range index; their weight is 0
    index = torch.stack([torch.where(valid, low_i, 0), torch.where(valid, high_i, 0)], dim=-1)
    return index, weights


def _merge_axis_taps(index, weight, size):
    """One axis's taps that hit the same row (column) merged into one: (k, P, T) -> (k, P, S), S <= T.

    With the adaptive grid a bin's sample points lie at most a pixel apart, so its 2G taps touch at most G + 1
    rows: summing their weights first cuts a bin's 2D taps from 4 G^2 to (G + 1)^2 (25 instead of 64 at G = 4),
    forward and backward. The outer product of merged weights is the same sum grouped differently: equal up to
    float rounding. Zero-weight taps are dropped. ``size``: each RoI's map extent along the axis, (k,).
    """
    if index.shape[-1] <= 2:
        return index, weight  # one sample point per bin: its two taps are distinct rows already
    used = weight != 0
    last = (size - 1)[:, None, None]  # (k, 1, 1)
    base = torch.minimum(torch.where(used, index, last + 1).amin(-1, keepdim=True), last)  # (k, P, 1) first row used
    offset = torch.where(used, index - base, 0)
    slots = int(offset.max()) + 1 if offset.numel() else 1
    if slots >= index.shape[-1]:
        return index, weight
    merged = weight.new_zeros(*weight.shape[:-1], slots).scatter_add_(-1, offset, weight)
    # slots past the map's edge carry no weight; any in-range row does for them
    slot_index = torch.minimum(base + torch.arange(slots, device=index.device), last)
    return slot_index, merged


def _bags(geometry, layout, members, grid_hw, out_hw, merge_taps=False):
    """Tap indices and weights for the RoIs ``members``: (k*out_h*out_w, taps) each, plus the (k,) counts.

    ``layout``: per RoI (table row of its map's first pixel, row stride, map height, map width), four (K,) long
    tensors. ``merge_taps``: merge each axis's taps on the same row or column first (:func:`_merge_axis_taps`).
    """
    start_y, start_x, bin_h, bin_w, grid_h, grid_w = (g[members] for g in geometry)
    base, row_stride, height, width = (t[members] for t in layout)
    (gh, gw), (ph, pw) = grid_hw, out_hw
    k = members.shape[0]
    y_idx, y_w = (t.reshape(k, ph, 2 * gh) for t in _axis_taps(start_y, bin_h, grid_h, ph, gh, height))
    x_idx, x_w = (t.reshape(k, pw, 2 * gw) for t in _axis_taps(start_x, bin_w, grid_w, pw, gw, width))
    if merge_taps:
        y_idx, y_w = _merge_axis_taps(y_idx, y_w, height)
        x_idx, x_w = _merge_axis_taps(x_idx, x_w, width)
    ty, tx = y_idx.shape[-1], x_idx.shape[-1]
    rows = base[:, None, None] + y_idx * row_stride[:, None, None]  # (k, ph, ty) table row of each y tap's column 0
    index = rows.reshape(k, ph, 1, ty, 1) + x_idx.reshape(k, 1, pw, 1, tx)  # (k, ph, pw, ty, tx)
    weight = y_w.reshape(k, ph, 1, ty, 1) * x_w.reshape(k, 1, pw, 1, tx)
    count = (grid_h * grid_w).clamp(min=1).to(start_y.dtype)  # (k,)
    return index.reshape(k * ph * pw, ty * tx), weight.reshape(k * ph * pw, ty * tx), count


def _groups(grid_h, grid_w, bucketed: bool):
    """(member indices, (grid_h, grid_w)) per group of RoIs sharing one padded sampling grid."""
    if not bucketed:
        return [(torch.arange(grid_h.shape[0], device=grid_h.device), (int(grid_h.max()), int(grid_w.max())))]
    bh, bw = _bucket(grid_h), _bucket(grid_w)
    key = bh * (int(bw.max()) + 1) + bw
    order = torch.sort(key, stable=True).indices
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    groups = []
    for members in torch.split(order, counts.tolist()):
        first = members[0]
        groups.append((members, (int(bh[first]), int(bw[first]))))
    return groups


# The grouping by sampling grid reads box sizes (data) to choose shapes: runs eagerly inside compiled code.
@torch.compiler.disable
def _pool(
    table, rois, layout, spatial_scale, out_hw, sampling_ratio, aligned, reduce, tap_budget, bucketed, merge_taps
):
    """RoIAlign over a channels-last table: (K, 5) RoIs, each with its map's ``layout`` (see :func:`_bags`) and
    scale (a number or (K,)) -> (K, C, out_h, out_w). ``reduce`` None: the C++ kernel (:class:`_NativeRoIAlign`)."""
    ph, pw = out_hw
    k, c = rois.shape[0], table.shape[1]
    if k == 0 or c == 0:
        return table.new_zeros(k, c, ph, pw)
    geometry = _geometry(rois, spatial_scale, ph, pw, int(sampling_ratio), aligned)
    empty_map = (layout[2] == 0) | (layout[3] == 0)
    if bool(empty_map.any()):  # a RoI on a map without pixels averages nothing: zeros, like the reference loop
        geometry = (*geometry[:4], geometry[4].masked_fill(empty_map, 0), geometry[5].masked_fill(empty_map, 0))
    if reduce is None:
        return _NativeRoIAlign.apply(table, geometry, layout, out_hw)
    pieces, placed = [], []
    # (RoI members, padded grid) chunks, packed into calls of at most tap_budget taps each
    calls, call_taps = [[]], 0
    for members, grid_hw in _groups(geometry[4], geometry[5], bucketed):
        if grid_hw[0] == 0 or grid_hw[1] == 0:
            # no sample points at all: the reference averages nothing, i.e. zeros
            pieces.append(table.new_zeros(members.shape[0], ph, pw, c))
            placed.append(members)
            continue
        taps_per_roi = ph * pw * 4 * grid_hw[0] * grid_hw[1]
        for part in torch.split(members, max(1, tap_budget // taps_per_roi)):
            taps = part.shape[0] * taps_per_roi
            if calls[-1] and call_taps + taps > tap_budget:
                calls.append([])
                call_taps = 0
            calls[-1].append((part, grid_hw))
            call_taps += taps
    for call in calls:
        if not call:
            continue
        bags = [_bags(geometry, layout, part, grid_hw, (ph, pw), merge_taps) for part, grid_hw in call]
        summed = reduce(table, [b[0] for b in bags], [b[1] for b in bags])  # (sum of kp*ph*pw, C)
        parts = torch.cat([part for part, _ in call])
        count = torch.cat([b[2] for b in bags])  # (sum of kp,)
        pieces.append(summed.reshape(parts.shape[0], ph, pw, c) / count[:, None, None, None])
        placed.append(parts)
    out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # (K, ph, pw, C) in group order
    where = torch.cat(placed) if len(placed) > 1 else placed[0]
    if not torch.equal(where, torch.arange(k, device=where.device)):
        # index_copy: its backward is a plain index_select (index_select's own is a slow scatter-add on CPU)
        out = out.new_empty(out.shape).index_copy(0, where, out)
    return out.permute(0, 3, 1, 2).contiguous()  # (K, C, ph, pw)


def _roi_align(
    input, boxes, output_size, spatial_scale, sampling_ratio, aligned, reduce, tap_budget, bucketed, merge_taps=False
):
    out_hw = _pair(output_size)
    rois = _as_rois(boxes, input)
    n, c, height, width = input.shape
    table = input.permute(0, 2, 3, 1).reshape(n * height * width, c)  # channels-last: one row per pixel
    image = rois[:, 0].long()
    layout = (image * (height * width), *(torch.full_like(image, v) for v in (width, height, width)))
    return _pool(
        table, rois, layout, float(spatial_scale), out_hw, sampling_ratio, aligned, reduce, tap_budget, bucketed,
        merge_taps,
    )  # fmt: skip


def _reduce_gather(table, indices, weights):
    """Weighted tap sums: lists of (bags_i, taps_i) indices and weights -> (sum of bags_i, C)."""
    sums = []
    for index, weight in zip(indices, weights):
        # index_select, not table[index]: its backward is index_add_, far faster than index_put_ on CPU
        taps = table.index_select(0, index.reshape(-1)).reshape(*index.shape, table.shape[1])  # (bags, taps, C)
        sums.append(torch.bmm(weight[:, None, :], taps)[:, 0])
    return torch.cat(sums) if len(sums) > 1 else sums[0]


def _gather_budget(input) -> int:
    return min(_MAX_TAPS_PER_CALL, _MAX_GATHERED_ELEMENTS // max(1, input.shape[1]))


def _native_for(input):
    """The C++ ops if they run on ``input`` (CPU, float32 or float64, built), else None."""
    if input.device.type != "cpu" or input.dtype not in (torch.float32, torch.float64):
        return None
    return native_ops()


def _reduction(input, implementation: str = "auto"):
    """(reduce, tap budget) for ``implementation`` (see the module docstring); reduce None: the C++ kernel."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown RoIAlign implementation {implementation!r}; choose one of {IMPLEMENTATIONS}.")
    if implementation == "auto":
        if _native_for(input) is not None:
            return None, 0
        implementation = "embedding_bag" if input.device.type in ("cpu", "cuda") else "gather"
    if implementation == "native":
        if _native_for(input) is None:
            raise ValueError(
                f"The 'native' RoIAlign runs on CPU float32/float64 tensors where vil_kernels' C++ kernels build; got "
                f"{input.dtype} on {input.device.type}, C++ kernels {'built' if native_ops() else 'not built'}. "
                "Use implementation='auto'."
            )
        return None, 0
    if implementation == "embedding_bag":
        return _reduce_embedding_bag, _MAX_TAPS_PER_CALL
    return _reduce_gather, _gather_budget(input)


class _NativeRoIAlign(torch.autograd.Function):
    """The C++ forward and input gradient (``csrc/roi_align.cpp``): -> (K, C, out_h, out_w)."""

    @staticmethod
    def forward(ctx, table, geometry, layout, out_hw):
        start_y, start_x, bin_h, bin_w, grid_h, grid_w = geometry
        spans = torch.stack((start_y, start_x, bin_h, bin_w), dim=1).contiguous()  # (K, 4), the table's dtype
        sizes = torch.stack((grid_h, grid_w, *layout), dim=1).contiguous()  # (K, 6) int64
        ctx.save_for_backward(spans, sizes)
        ctx.rows = table.shape[0]
        return native_ops().roi_align_forward(table.contiguous(), spans, sizes, *out_hw)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        spans, sizes = ctx.saved_tensors
        return native_ops().roi_align_backward(grad.contiguous(), spans, sizes, ctx.rows), None, None, None


class _BagSum(torch.autograd.Function):
    """Weighted sums of table rows, bag by bag: ``out[b] = sum_t weight[t] * table[index[t]]`` over bag b's taps.

    The forward is ``F.embedding_bag``. Its gradient w.r.t. the table is the same kind of sum with the roles
    swapped (row r gathers ``weight[t] * grad[bag of t]`` over the taps t that read it): the taps sorted by row
    make those bags, and a second ``embedding_bag`` sums them. On CPU that measured about 4x faster than
    embedding_bag's own dense backward on the detection poolers' shapes (the sort is most of its cost).
    """

    @staticmethod
    def forward(ctx, table, index, offsets, weight):
        ctx.save_for_backward(index, offsets, weight)
        ctx.rows = table.shape[0]
        return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        index, offsets, weight = ctx.saved_tensors
        taps_per_bag = torch.diff(offsets, append=offsets.new_tensor([index.shape[0]]))
        bag_of_tap = torch.repeat_interleave(torch.arange(offsets.shape[0], device=index.device), taps_per_bag)
        by_row = torch.sort(index, stable=True).indices  # stable: each row sums its taps in bag order, every run
        taps_per_row = torch.bincount(index, minlength=ctx.rows)
        grad_table = F.embedding_bag(
            bag_of_tap[by_row],
            grad.contiguous(),
            torch.cumsum(taps_per_row, 0) - taps_per_row,
            mode="sum",
            per_sample_weights=weight[by_row],
        )
        return grad_table, None, None, None


def _reduce_embedding_bag(table, indices, weights):
    """Same as :func:`_reduce_gather` in one embedding_bag call (:class:`_BagSum`).

    One call per batch of groups matters for the backward: each call builds a dense (N*H*W, C) gradient.
    Groups have different tap counts, so the bags are passed flat with offsets.
    """
    offsets, start = [], 0
    for index in indices:
        bags, taps = index.shape
        offsets.append(torch.arange(bags, device=index.device) * taps + start)
        start += bags * taps
    flat_index = torch.cat([index.reshape(-1) for index in indices])
    flat_weight = torch.cat([weight.reshape(-1) for weight in weights])
    return _BagSum.apply(table, flat_index, torch.cat(offsets), flat_weight)


def _check_args(spatial_scale, sampling_ratio):
    if not math.isfinite(float(spatial_scale)) or float(spatial_scale) <= 0:
        raise ValueError(f"spatial_scale must be a positive number, got {spatial_scale!r}")
    if int(sampling_ratio) != sampling_ratio:
        raise ValueError(f"sampling_ratio must be an integer, got {sampling_ratio!r}")


def roi_align(
    input: torch.Tensor,
    boxes,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    implementation: str = "auto",
) -> torch.Tensor:
    """RoIAlign, torchvision.ops.roi_align semantics: (N, C, H, W) features -> (K, C, out_h, out_w).

    boxes: a (K, 5) tensor of (batch_index, x1, y1, x2, y2) in input-image coordinates, or a list of N
    (K_i, 4) tensors of (x1, y1, x2, y2). ``spatial_scale`` maps box coordinates to the feature map;
    ``sampling_ratio <= 0`` picks ``ceil(roi_side / out_side)`` points per bin and axis for each RoI;
    ``aligned=True`` is detectron2's ROIAlignV2 (half-pixel shift). Differentiable w.r.t. ``input``.
    ``implementation``: one of ``IMPLEMENTATIONS`` (see the module docstring); ``auto`` takes the fastest that runs.
    """
    _check_args(spatial_scale, sampling_ratio)
    _check_input(input)
    reduce, budget = _reduction(input, implementation)
    return _roi_align(
        input, boxes, output_size, spatial_scale, sampling_ratio, aligned, reduce, budget, True, merge_taps=True
    )


def roi_align_gather(
    input: torch.Tensor,
    boxes,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    bucketed: bool = False,
) -> torch.Tensor:
    """The plain formulation of :func:`roi_align` (explicit gather, then a weighted sum); same arguments.

    By default every RoI is padded to the largest sampling grid (one group); ``bucketed=True`` groups as
    :func:`roi_align` does. Runs on any device; used to check the fast path.
    """
    _check_args(spatial_scale, sampling_ratio)
    _check_input(input)
    budget = _gather_budget(input)
    return _roi_align(
        input, boxes, output_size, spatial_scale, sampling_ratio, aligned, _reduce_gather, budget, bucketed
    )


def roi_align_maps(
    inputs: Sequence[torch.Tensor],
    rois: torch.Tensor,
    map_index: torch.Tensor,
    output_size,
    spatial_scales: Sequence[float],
    sampling_ratio: int = -1,
    aligned: bool = False,
    extents: Sequence[torch.Tensor | None] | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """RoIAlign of each RoI from its own map among several, in one reduction: -> (K, C, out_h, out_w).

    RoI ``k`` (a row of the (K, 5) ``rois``: batch_index, x1, y1, x2, y2) is pooled from image ``rois[k, 0]`` of
    ``inputs[map_index[k]]``, an (N_i, C, H_i, W_i) map, at ``spatial_scales[map_index[k]]``: the same numbers as
    :func:`roi_align` of that map and RoI alone, up to float rounding. ``extents``: per map, an (N_i, 2) tensor of
    each image's (height, width) on it, or None where the images fill the map; a RoI's samples then clamp to its
    image's extent as they would on the map cut there. The maps share C, dtype and device. ``implementation``: as
    :func:`roi_align`'s (``gather`` is the plain reference, to check the others). Differentiable w.r.t. ``inputs``.
    """
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise ValueError("inputs must be a non-empty list of (N_i, C, H_i, W_i) maps")
    for x in inputs:
        _check_input(x)
    if len({(x.shape[1], x.dtype, x.device) for x in inputs}) > 1:
        found = [(x.shape[1], x.dtype, x.device) for x in inputs]
        raise ValueError(f"the maps must share channels, dtype and device; got (C, dtype, device) {found}")
    if len(spatial_scales) != len(inputs):
        raise ValueError(f"got {len(spatial_scales)} spatial_scales for {len(inputs)} maps: give one per map")
    for scale in spatial_scales:
        _check_args(scale, sampling_ratio)
    first = inputs[0]
    if not isinstance(rois, torch.Tensor) or rois.dim() != 2 or rois.shape[1] != 5:
        shape = tuple(rois.shape) if isinstance(rois, torch.Tensor) else type(rois).__name__
        raise ValueError(f"rois must be a (K, 5) tensor of (batch_index, x1, y1, x2, y2), got {shape}")
    if not isinstance(map_index, torch.Tensor) or map_index.shape != (rois.shape[0],):
        shape = tuple(map_index.shape) if isinstance(map_index, torch.Tensor) else type(map_index).__name__
        raise ValueError(f"map_index must be a ({rois.shape[0]},) tensor, one map per RoI; got {shape}")
    rois = rois.detach().to(device=first.device, dtype=first.dtype)
    maps = map_index.to(device=first.device, dtype=torch.long)
    image = rois[:, 0].long()
    shapes = torch.tensor([x.shape[:1] + x.shape[2:] for x in inputs], device=first.device)  # (M, 3): N, H, W
    if rois.shape[0]:
        if bool(((maps < 0) | (maps >= len(inputs))).any()):
            raise ValueError(f"map_index must lie in [0, {len(inputs)}); got {maps.unique().tolist()}")
        if bool(((image < 0) | (image >= shapes[maps, 0])).any()):
            raise ValueError(f"RoI batch indices must lie within their map's batch of {shapes[:, 0].tolist()} images")
    pixels = shapes[:, 0] * shapes[:, 1] * shapes[:, 2]
    map_start = torch.cumsum(pixels, 0) - pixels  # each map's first row in the table
    height, width = shapes[maps, 1], shapes[maps, 2]
    base = map_start[maps] + image * height * width
    row_stride = width
    if extents is not None:
        if len(extents) != len(inputs):
            raise ValueError(
                f"got {len(extents)} extents for {len(inputs)} maps: give one (N_i, 2) tensor or None each"
            )
        filled = []
        for x, extent in zip(inputs, extents):
            full = torch.tensor([x.shape[2], x.shape[3]], device=first.device).expand(x.shape[0], 2)
            if extent is None:
                extent = full
            elif extent.shape != (x.shape[0], 2) or bool(((extent < 0) | (extent.to(full.device) > full)).any()):
                raise ValueError(
                    f"each map's extents must be an (N_i, 2) tensor of heights and widths within the map; got "
                    f"{extent.tolist()} for a map of {tuple(x.shape)}"
                )
            filled.append(extent.to(device=first.device, dtype=torch.long))
        first_image = torch.cumsum(shapes[:, 0], 0) - shapes[:, 0]
        per_image = torch.cat(filled)[first_image[maps] + image]  # (K, 2)
        height, width = per_image[:, 0], per_image[:, 1]
    channels = first.shape[1]
    table = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, channels) for x in inputs])  # every map's pixels, a row each
    scale = torch.tensor([float(v) for v in spatial_scales], dtype=first.dtype, device=first.device)[maps]
    reduce, budget = _reduction(first, implementation)
    return _pool(
        table, rois, (base, row_stride, height, width), scale, _pair(output_size), sampling_ratio, aligned, reduce,
        budget, bucketed=True, merge_taps=implementation != "gather",
    )  # fmt: skip
