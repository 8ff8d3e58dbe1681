"""Fast longformer attention on CPU: batched matrix products over blocks of chunks.

Layout. The query map is zero-padded to whole W x W chunks; chunk (i, j) holds W^2 queries.

Keys. In the sliding-chunk and exact modes a query chunk sees the 3x3 chunks around it. The key map,
zero-padded by one chunk on every side, is copied once into a buffer whose block (i, c) stacks the
three chunks of padded column c in padded rows i, i+1, i+2 (plus the G global keys): 3 copies
instead of 9. The nine chunks of query chunk (i, j) are then blocks (i, j), (i, j+1), (i, j+2), one
contiguous stretch of memory, so the key windows of a run of chunks in one chunk row are a strided
*view* (overlapping windows) and their scores are one ``bmm``. Random shifting (own chunk + one
neighbour) copies the two chunks per query chunk instead.

Masks. Which keys a query may see is the product of two simpler rules:
- keys in the zero padding are never seen: every key gets one extra feature, 0 for map tokens and a
  huge negative number for padding, and every query an extra feature 1, so the matrix product itself
  adds the padding mask (no per-chunk mask tensor, no border special cases);
- everything else (relative bias, the exact window's square, local-to-global bias, and the global
  copies in blocks t+1 and t+2 that must not count twice) depends only on (query slot, key slot), so
  it is one additive (H, W^2, S) tensor shared by all chunks, built once per call from the tables
  (so its gradient flows back to them through ordinary autograd).
So the whole forward of a run of chunks is bmm, add, softmax, bmm.

Reduced precision (bfloat16: tensors converted to it, or cast by autocast on entry). The products
accumulate in float32 inside oneDNN, but a CPU ``bmm`` of bfloat16 inputs can only write bfloat16
(``out_dtype`` is CUDA-only in torch 2.13), so scores are rounded to 8 significant bits, as in any
plain bfloat16 attention. From there the bias, the softmax and the backward's dS run in float32 on a
copy of each run's scores (see ``_Scratch``), and the probabilities are rounded once for the next
product: faster than bfloat16's own add and softmax, and more accurate. Float32 score products
throughout, or a fused CPU flash-attention call per run over the same window views, measured 5-35%
slower. The bias-table gradient, a sum over every run of every image, is accumulated in float32.

Memory. Scores exist for one run of chunks at a time (sized to stay in cache). The backward is a
custom autograd function that keeps only q, k, v, the output and the shared bias, and recomputes
each run's probabilities (as flash attention does; recomputing the fused softmax is cheaper than
exp(S - logsumexp) over masked entries), so no (C, W^2, S) tensor is ever stored.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .geometry import NEIGHBOR_OFFSETS, chunk_offsets, num_chunks, relative_bias_index

# Scores of one block of chunks are kept near this size, so that softmax and the second product
# read them from cache.
_BLOCK_BYTES = 2 * 1024 * 1024
# Workspaces kept per thread: one per map size, so a four-stage backbone reuses all of its own.
_CACHED_WORKSPACES = 8
# Buffers of heads loaded together stay under this size (small maps: all heads at once).
_GROUP_BYTES = 48 * 1024 * 1024


@dataclass(frozen=True)
class _Layout:
    height: int
    width: int
    window: int
    neighbor: int | None
    num_global: int
    chunk_rows: int  # mx
    chunk_cols: int  # my
    block_pitch: int  # buffer blocks per chunk row: my + 2 (3x3 windows) or my (random shifting)
    span: int  # buffer blocks one key window covers: 3, or 1 for random shifting
    block_keys: int  # key rows per buffer block: chunks * W^2 + G

    @property
    def window_keys(self) -> int:  # S, key slots per query chunk
        return self.span * self.block_keys

    @property
    def num_blocks(self) -> int:
        return self.chunk_rows * self.block_pitch


def _layout(height: int, width: int, window: int, neighbor: int | None, num_global: int) -> _Layout:
    mx, my = num_chunks(height, width, window)
    w2 = window * window
    if neighbor is None:
        return _Layout(height, width, window, None, num_global, mx, my, my + 2, 3, 3 * w2 + num_global)
    return _Layout(height, width, window, neighbor, num_global, mx, my, my, 1, 2 * w2 + num_global)


@lru_cache(maxsize=64)
def _slot_geometry(window: int, neighbor: int | None, num_global: int, exact: bool, device: str):
    """Per (query slot, key slot): bias-table row (W^2, S), allowed (W^2, S), global index or -1 (S,)."""
    w, g = window, num_global
    inner_row = torch.arange(w).repeat_interleave(w)
    inner_col = torch.arange(w).repeat(w)
    if neighbor is None:
        # slot order: dj (block t + dj), then [di-th chunk of the block, inner position | global]
        offsets, span = [(di - 1, dj - 1) for dj in range(3) for di in range(3)], 3
    else:
        offsets, span = list(chunk_offsets(neighbor)), 1
    chunks_per_block = len(offsets) // span
    slot_row, slot_col, slot_global = [], [], []
    for block in range(span):
        for dr, dc in offsets[block * chunks_per_block : (block + 1) * chunks_per_block]:
            slot_row.append(dr * w + inner_row)
            slot_col.append(dc * w + inner_col)
            slot_global.append(torch.full((w * w,), -1))
        slot_row.append(torch.zeros(g, dtype=torch.long))
        slot_col.append(torch.zeros(g, dtype=torch.long))
        # only the first block's copy of the globals counts; the others are masked
        slot_global.append(torch.arange(g) if block == 0 else torch.full((g,), -2))
    slot_row, slot_col, slot_global = torch.cat(slot_row), torch.cat(slot_col), torch.cat(slot_global)
    delta_row = inner_row[:, None] - slot_row[None]  # query minus key, (W^2, S)
    delta_col = inner_col[:, None] - slot_col[None]
    is_local = slot_global[None] == -1
    allowed = is_local | (slot_global[None] >= 0)
    if exact:
        allowed = allowed & (~is_local | ((delta_row.abs() <= w) & (delta_col.abs() <= w)))
    span = 2 * w - 1
    bias_row = relative_bias_index(delta_row.clamp(-span, span), delta_col.clamp(-span, span), w)
    bias_row = torch.where(is_local, bias_row, 0)
    return bias_row.to(device), allowed.to(device), slot_global.to(device)


def _shared_scores_bias(
    window, neighbor, num_global, exact, heads, dtype, device, relative_bias_table, local_to_global_bias
):
    """(H, W^2, S) additive term shared by every chunk: relative bias, l2g bias and -inf masks.

    It depends on the window, not on the map size; under torch.compile / torch.export it is built
    in the traced graph rather than taken from the cache.
    """
    geometry = _slot_geometry.__wrapped__ if torch.compiler.is_compiling() else _slot_geometry
    bias_row, allowed, slot_global = geometry(window, neighbor, num_global, bool(exact), str(device))
    w2, s = bias_row.shape
    if relative_bias_table is not None:
        shared = relative_bias_table.to(dtype)[bias_row].permute(2, 0, 1)  # (H, W^2, S)
        shared = torch.where(slot_global[None, None] == -1, shared, 0.0)
    else:
        shared = torch.zeros(heads, w2, s, dtype=dtype, device=device)
    if local_to_global_bias is not None and num_global:
        to_global = local_to_global_bias.to(dtype)[:, slot_global.clamp(min=0)]  # (H, S)
        shared = shared + torch.where(slot_global >= 0, to_global, 0.0)[:, None, :]
    return shared.masked_fill(~allowed, float("-inf")).contiguous()


class _RunScratch(NamedTuple):
    """A run's views into the workspace's ``_Scratch``: keys (n, S, M+1), values (n, S, M), scores and
    grad_scores (n, slots, S) in float32."""

    keys: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    grad_scores: torch.Tensor


class _Scratch:
    """Buffers of one run of chunks in reduced precision (bfloat16, float16), made once per workspace.

    ``keys``/``values``: the run's key and value windows copied out of the overlapping buffer views. A CPU
    ``bmm`` of bfloat16 inputs copies a transposed operand that overlaps itself before every product, more
    slowly than this one plain copy (the score product with the copy 18-31% faster here; float32's ``bmm``
    reads the views in place, and faster than after a copy). ``scores``/``grad_scores``: float32 scores, to
    which the bias is added and whose softmax (and, in the backward, dS) is computed in float32: more
    accurate than in bfloat16, and faster (the add and softmax over the copy took 0.82-0.85x the time of
    bfloat16's own). The products still round their scores to the inputs' dtype, as any bfloat16 attention.
    """

    def __init__(self, most_chunks: int, most_scores: int, layout: _Layout, head_dim: int, dtype, device):
        s = layout.window_keys
        self.keys = torch.empty(most_chunks, s, head_dim + 1, dtype=dtype, device=device)
        self.values = torch.empty(most_chunks, s, head_dim, dtype=dtype, device=device)
        self.scores = torch.empty(most_scores, dtype=torch.float32, device=device)
        self.grad_scores = torch.empty(most_scores, dtype=torch.float32, device=device)
        self.window_keys = s
        self._views: dict[tuple[int, int], _RunScratch] = {}

    def views(self, count: int, slots: int) -> _RunScratch:
        """This scratch cut to a run of ``count`` chunks with ``slots`` queries each (made once per size)."""
        run = self._views.get((count, slots))
        if run is None:
            size, shape = count * slots * self.window_keys, (count, slots, self.window_keys)
            run = _RunScratch(
                self.keys[:count],
                self.values[:count],
                self.scores[:size].view(shape),
                self.grad_scores[:size].view(shape),
            )
            self._views[count, slots] = run
        return run


def _probabilities(queries, key_windows_t, bias, scores, scratch: _RunScratch | None) -> torch.Tensor:
    """softmax(queries . keys + bias) of one run, into ``scores`` (n, slots, S) in the inputs' dtype.

    queries (n, slots, M+1); key_windows_t (n, M+1, S), overlapping views into the key buffer, transposed; bias
    (1, slots, S) in float32 or wider. Returns the probabilities at float32 precision or better: ``scores``
    itself, or in reduced precision the scratch's float32 copy (the one that ``scores`` was rounded from).
    """
    if scratch is None:
        # bmm then add: cheaper than baddbmm, which first copies the broadcast bias into its output
        torch.bmm(queries, key_windows_t, out=scores)
        scores.add_(bias)
        return torch.softmax(scores, -1, out=scores)
    keys = scratch.keys.copy_(key_windows_t.transpose(1, 2))
    torch.bmm(queries, keys.transpose(1, 2), out=scores)
    probabilities = scratch.scores.copy_(scores).add_(bias)
    torch.softmax(probabilities, -1, out=probabilities)
    scores.copy_(probabilities)
    return probabilities


class _Workspace:
    """Query chunks and key/value buffers of a group of heads, refilled per group, reused across calls.

    Fresh multi-megabyte buffers cost page faults and zero-filling on every call; here the padding
    parts (zeros, the padding flags, the queries' constant feature) are written once, when the
    workspace is made, and each group only overwrites the parts that hold map tokens. Small maps
    take several heads per group, so the copies are few and large rather than many and small.
    """

    def __init__(self, layout: _Layout, head_dim: int, group: int, dtype: torch.dtype, device: torch.device):
        w, mx, my, m, g = layout.window, layout.chunk_rows, layout.chunk_cols, head_dim, layout.num_global
        self.layout, self.head_dim = layout, m
        # queries with one extra feature 1; queries in the padding are all ones (their outputs are
        # dropped and their gradients are zero)
        self.query_chunks = torch.ones(group, mx * my, w * w, m + 1, dtype=dtype, device=device)
        # keys with one extra feature: 0 on map tokens and globals, a huge negative flag on padding,
        # so that q' . k' = q . k + flag masks the padding inside the product
        self.key_buffer = torch.zeros(group, layout.num_blocks, layout.block_keys, m + 1, dtype=dtype, device=device)
        self.flag = flag = torch.finfo(dtype).min / 4  # finite: no 0 * inf inside the product; exp() of it is 0
        self.key_buffer[:, :, : layout.block_keys - g, m] = flag
        on_map = torch.zeros(group, layout.height * layout.width, 1, dtype=dtype, device=device)
        for grid, first_row, first_col in _key_grids(self.key_buffer[..., m:], layout):
            _exchange(on_map, grid, first_row, first_col, layout, "to_grid")
        self.value_buffer = torch.zeros(group, layout.num_blocks, layout.block_keys, m, dtype=dtype, device=device)
        self.output_chunks = torch.empty(group, mx * my, w * w, m, dtype=dtype, device=device)
        # (first query chunk, first buffer block, chunks, query slots) of each run of a head, and one run's
        # scores at a time, for the forward and the backward alike
        self.runs = list(_runs(layout, dtype))
        most_scores = max(count * slots for _, _, count, slots in self.runs) * layout.window_keys
        self.scores = torch.empty(most_scores, dtype=dtype, device=device)
        self.scratch = None  # float32 and float64 need none
        if dtype.itemsize < 4:
            most_chunks = max(count for _, _, count, _ in self.runs)
            self.scratch = _Scratch(most_chunks, most_scores, layout, m, dtype, device)
        self._forward_runs = None
        self._key_extent = None  # (rows, cols) of the map keys currently not flagged; None: all of them

    def set_key_extent(self, extent: tuple[int, int] | None) -> None:
        """Flag the map keys at or beyond (rows, cols) like the padding (one image's extent); None: none.

        The flags live in the keys' extra feature, which ``load`` never touches, so they hold for
        every group of heads until changed; callers restore None before the workspace is reused.
        """
        if extent == self._key_extent:
            return
        layout, m = self.layout, self.head_dim
        flags = self.key_buffer.new_zeros(self.key_buffer.shape[0], layout.height, layout.width, 1)
        if extent is not None:
            rows, cols = extent
            flags[:, rows:] = self.flag
            flags[:, :, cols:] = self.flag
        for grid, first_row, first_col in _key_grids(self.key_buffer[..., m:], layout):
            _exchange(flags.flatten(1, 2), grid, first_row, first_col, layout, "to_grid")
        self._key_extent = extent

    def forward_runs(self) -> list[list[tuple]]:
        """Per head of the group, per run: the views its forward reads and writes.

        (query chunks (n, slots, M+1), key windows transposed (n, M+1, S), value windows (n, S, M), output chunks
        (n, slots, M), scores (n, slots, S), the run's reduced-precision scratch or None). Made once: the
        views alias buffers that every call refills, and building them per call cost ~10% of the kernel's
        time.
        """
        if self._forward_runs is None:
            layout, m = self.layout, self.head_dim
            scores = self.scores
            self._forward_runs = [
                [
                    (
                        self.query_chunks[k, first : first + count, :slots],
                        _windows(self.key_buffer[k], layout, block, count, m + 1).transpose(1, 2),
                        _windows(self.value_buffer[k], layout, block, count, m),
                        self.output_chunks[k, first : first + count, :slots],
                        scores[: count * slots * layout.window_keys].view(count, slots, layout.window_keys),
                        None if self.scratch is None else self.scratch.views(count, slots),
                    )
                    for first, block, count, slots in self.runs
                ]
                for k in range(self.query_chunks.shape[0])
            ]
        return self._forward_runs

    def load(self, queries, keys, values, global_keys, global_values):
        """Fill the buffers with a group of heads: (g, L, M) tokens and (g, G, M) globals."""
        layout, m, g, size = self.layout, self.head_dim, self.layout.num_global, queries.shape[0]
        q_chunks, k_buffer, v_buffer = self.query_chunks[:size], self.key_buffer[:size], self.value_buffer[:size]
        grid = q_chunks.unflatten(1, (layout.chunk_rows, layout.chunk_cols)).unflatten(3, (layout.window,) * 2)
        _exchange(queries, grid[..., :m], 0, 0, layout, "to_grid")
        for grid, first_row, first_col in _key_grids(k_buffer[..., :m], layout):
            _exchange(keys, grid, first_row, first_col, layout, "to_grid")
        for grid, first_row, first_col in _key_grids(v_buffer, layout):
            _exchange(values, grid, first_row, first_col, layout, "to_grid")
        if g:
            k_buffer[:, :, -g:, :m] = global_keys[:, None]
            v_buffer[:, :, -g:] = global_values[:, None]
        return q_chunks, k_buffer, v_buffer


def release_workspaces() -> None:
    """Free this thread's cached buffers (about 180 MB after ViL-Small at 800x1216 in float32)."""
    _workspaces.cache = OrderedDict()


def _heads_per_group(layout: _Layout, head_dim: int, heads: int, element_size: int) -> int:
    """Heads loaded together: as many as fit in _GROUP_BYTES of buffers, in groups of equal size."""
    per_head = layout.chunk_rows * layout.chunk_cols * layout.window**2 + 2 * layout.num_blocks * layout.block_keys
    per_head *= (head_dim + 1) * element_size
    most = max(1, min(heads, _GROUP_BYTES // per_head))
    groups = -(-heads // most)
    return -(-heads // groups)


_workspaces = threading.local()


def _workspace(layout: _Layout, head_dim: int, group: int, dtype: torch.dtype, device: torch.device) -> _Workspace:
    """This thread's workspace for these sizes (the few most recent are kept: one per stage)."""
    cache = getattr(_workspaces, "cache", None)
    if cache is None:
        cache = _workspaces.cache = OrderedDict()
    key = (layout, head_dim, group, dtype, str(device))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    cache[key] = workspace = _Workspace(layout, head_dim, group, dtype, device)
    while len(cache) > _CACHED_WORKSPACES:
        cache.popitem(last=False)
    return workspace


def _key_grids(buffer: torch.Tensor, layout: _Layout):
    """Chunk grids (..., rows, cols, W, W, F) inside key buffers (..., num_blocks, block_keys, F), each
    with the map chunk of its grid chunk (0, 0).

    3x3 windows: block (i, c) holds padded chunks (i + di, c), di = 0..2, that is map chunks
    (i + di - 1, c - 1). Random shifting: block (i, j) holds map chunks (i, j) and (i + dr, j + dc).
    """
    w, mx = layout.window, layout.chunk_rows
    blocks = buffer.unflatten(-3, (mx, layout.block_pitch))  # (..., mx, pitch, block_keys, F)
    if layout.neighbor is None:
        stacked = blocks[..., : 3 * w * w, :].unflatten(-2, (3, w, w))  # (..., mx, pitch, 3, W, W, F)
        return [(stacked.select(-4, di), di - 1, -1) for di in range(3)]
    dr, dc = NEIGHBOR_OFFSETS[layout.neighbor]
    pairs = blocks[..., : 2 * w * w, :].unflatten(-2, (2, w, w))
    return [(pairs.select(-4, 0), 0, 0), (pairs.select(-4, 1), dr, dc)]


def _exchange(tokens: torch.Tensor, grid: torch.Tensor, first_row: int, first_col: int, layout: _Layout, how: str):
    """Move data between maps (..., L, F) and chunk grids (..., rows, cols, W, W, F), one copy per piece.

    Grid chunk (a, b) is map chunk (a + first_row, b + first_col); only the parts that hold map tokens
    are touched (whole chunks in one piece, the partial last chunk row and column in others).
    ``how``: "to_grid", "from_grid" (overwrite the map) or "add_from_grid" (accumulate into it).
    """
    w = layout.window
    height, width = layout.height, layout.width
    image = tokens.unflatten(-2, (height, width))  # (..., height, width, F)
    grid_rows, grid_cols = grid.shape[-5], grid.shape[-4]
    rows = range(max(0, -first_row), min(grid_rows, -(-height // w) - first_row))
    cols = range(max(0, -first_col), min(grid_cols, -(-width // w) - first_col))
    if not rows or not cols:
        return
    top, left = (rows.start + first_row) * w, (cols.start + first_col) * w
    bottom, right = min(height, (rows.stop + first_row) * w), min(width, (cols.stop + first_col) * w)
    image = image[..., top:bottom, left:right, :]
    # (..., rows, W, cols, W, F)
    grid = grid[..., rows.start : rows.stop, cols.start : cols.stop, :, :, :].transpose(-4, -3)
    for image_rows, image_cols, chunk_rows, inner_rows, chunk_cols, inner_cols in _chunk_pieces(
        bottom - top, right - left, w
    ):
        target = grid[..., chunk_rows, inner_rows, chunk_cols, inner_cols, :]
        source = image[..., image_rows, image_cols, :].view(target.shape)
        if how == "to_grid":
            target.copy_(source)
        elif how == "from_grid":
            source.copy_(target)
        else:
            source.add_(target)


def _chunk_pieces(height: int, width: int, window: int):
    """Slices pairing a map with its chunk grid: whole chunks first, then the partial last row/column.

    Yields (image rows, image cols, chunk rows, inner rows, chunk cols, inner cols), so that a map
    (height, width, F) and chunks (rows, W, cols, W, F) exchange data with one copy per piece.
    """
    full_rows, full_cols = height // window, width // window
    row_parts = [(slice(0, full_rows * window), slice(0, full_rows), slice(None))] if full_rows else []
    if height % window:
        row_parts.append((slice(full_rows * window, height), full_rows, slice(0, height % window)))
    col_parts = [(slice(0, full_cols * window), slice(0, full_cols), slice(None))] if full_cols else []
    if width % window:
        col_parts.append((slice(full_cols * window, width), full_cols, slice(0, width % window)))
    for image_rows, chunk_rows, inner_rows in row_parts:
        for image_cols, chunk_cols, inner_cols in col_parts:
            yield image_rows, image_cols, chunk_rows, inner_rows, chunk_cols, inner_cols


def _fold_key_buffer(grad: torch.Tensor, layout: _Layout, out: torch.Tensor, out_global: torch.Tensor) -> None:
    """Adjoint of loading key buffers (..., blocks, keys, M): into ``out`` (..., L, M), ``out_global`` (..., G, M)."""
    g = layout.num_global
    grids = _key_grids(grad, layout)
    # the grid that holds every map chunk overwrites, the others add: 3x3 windows: the middle
    # row of each block (di = 1); random shifting: the own chunk
    covering = 1 if layout.neighbor is None else 0
    _exchange(out, *grids[covering], layout, "from_grid")
    for index, grid in enumerate(grids):
        if index != covering:
            _exchange(out, *grid, layout, "add_from_grid")
    if g:
        out_global.copy_(grad[..., layout.block_keys - g :, :].sum(-3))


def _runs(layout: _Layout, dtype: torch.dtype):
    """Runs of query chunks within one chunk row, each small enough for its scores to stay in cache.

    Yields (first query chunk, first buffer block of its window, number of chunks, query slots).
    The query slots of a chunk are row-major, so where the last chunk row holds only r map rows,
    its queries are the first r * W slots and the rest (padding) is not computed at all.
    """
    # sized by the scores in the inputs' dtype; reduced precision's float32 copy of them (see _Scratch) is
    # not counted: runs half as long, to keep both in the same bytes, measured slower (more, smaller products)
    per_run = max(1, _BLOCK_BYTES // (layout.window**2 * layout.window_keys * dtype.itemsize))
    my, w = layout.chunk_cols, layout.window
    last_rows = layout.height - (layout.chunk_rows - 1) * w
    for i in range(layout.chunk_rows):
        slots = w * (last_rows if i == layout.chunk_rows - 1 else w)
        for j in range(0, my, per_run):
            yield i * my + j, i * layout.block_pitch + j, min(per_run, my - j), slots


def _windows(buffer: torch.Tensor, layout: _Layout, first_block: int, count: int, features: int) -> torch.Tensor:
    """(count, S, features) overlapping key windows of ``count`` chunks, a view into the buffer."""
    rows, cols = buffer.stride(0), buffer.stride(1)
    return buffer.as_strided(
        (count, layout.window_keys, features), (rows, cols, 1), buffer.storage_offset() + first_block * rows
    )


def _image_extent(key_extents, b: int, layout: _Layout) -> tuple[int, int] | None:
    """Image b's key extent, or None where every key of the map is its own."""
    if key_extents is None or key_extents[b] == (layout.height, layout.width):
        return None
    return key_extents[b]


def _blocked_forward(queries, keys, values, global_keys, global_values, shared, layout, key_extents):
    """Forward, a group of heads at a time; key_extents: per image (rows, cols), or None."""
    # queries, keys, values: (B, H, L, M); global_*: (B, H, G, M); shared: (H, W^2, S)
    batch, heads, length, head_dim = queries.shape
    group = _heads_per_group(layout, head_dim, heads, queries.element_size())
    # (B, L, H, M) storage: what the output projection reads, so its reshape needs no copy
    output = queries.new_empty(batch, length, heads, head_dim).permute(0, 2, 1, 3)
    workspace = _workspace(layout, head_dim, group, queries.dtype, queries.device)
    full_slots = layout.window**2
    try:
        for b, start in ((b, h) for b in range(batch) for h in range(0, heads, group)):
            workspace.set_key_extent(_image_extent(key_extents, b, layout))
            heads_here = range(start, min(start + group, heads))
            inputs = (
                t[b, heads_here.start : heads_here.stop] for t in (queries, keys, values, global_keys, global_values)
            )
            workspace.load(*inputs)
            for h, runs in zip(heads_here, workspace.forward_runs()):
                head_bias = shared[h, None]  # (1, W^2, S)
                for q_chunks, k_windows, v_windows, out_chunks, scores, scratch in runs:
                    slots = q_chunks.shape[1]
                    bias = head_bias if slots == full_slots else head_bias[:, :slots]
                    _probabilities(q_chunks, k_windows, bias, scores, scratch)  # (n, slots, S)
                    torch.bmm(scores, v_windows, out=out_chunks)
            out_grid = _chunk_grid(workspace.output_chunks[: len(heads_here)], layout)
            _exchange(output[b, heads_here.start : heads_here.stop], out_grid, 0, 0, layout, "from_grid")
    finally:
        workspace.set_key_extent(None)
    return output


def _blocked_backward(
    grad_output,
    queries,
    keys,
    values,
    global_keys,
    global_values,
    shared,
    output,
    layout,
    key_extents,
    needs_grad_shared,
):
    """Gradients of the five inputs and of ``shared`` (None unless asked), recomputing each run's scores."""
    batch, heads, length, head_dim = queries.shape
    keys_per_block = layout.block_keys
    # dS, delta and the shared bias's gradient (a sum over every run of every image): float32 at least
    accumulate = torch.promote_types(queries.dtype, torch.float32)
    group = _heads_per_group(layout, head_dim, heads, queries.element_size())
    chunks = layout.chunk_rows * layout.chunk_cols
    workspace = _workspace(layout, head_dim, group, queries.dtype, queries.device)
    # softmax backward: dS = P * (dP - sum(dO * O)) per query, in float32 at least
    delta = (grad_output * output.to(accumulate)).sum(-1, keepdim=True)  # (B, H, L, 1)

    grads = [t.new_empty(t.shape) for t in (queries, keys, values, global_keys, global_values)]
    grad_shared = torch.zeros(shared.shape, dtype=accumulate, device=shared.device) if needs_grad_shared else None
    grad_q = queries.new_empty(group, chunks, layout.window**2, head_dim)
    grad_k_buffer = queries.new_empty(group, layout.num_blocks, keys_per_block, head_dim)
    grad_v_buffer = torch.empty_like(grad_k_buffer)
    grad_chunks = queries.new_zeros(group, chunks, layout.window**2, head_dim)  # padding stays 0
    delta_chunks = delta.new_zeros(group, chunks, layout.window**2, 1)
    scores, window_keys = workspace.scores, layout.window_keys
    try:
        for b, start in ((b, h) for b in range(batch) for h in range(0, heads, group)):
            workspace.set_key_extent(_image_extent(key_extents, b, layout))
            heads_here = range(start, min(start + group, heads))
            size, here = len(heads_here), slice(heads_here.start, heads_here.stop)
            # rebuilt rather than saved: a copy each, cheaper than keeping them alive between passes
            q_chunks, k_buffer, v_buffer = workspace.load(
                *(t[b, here] for t in (queries, keys, values, global_keys, global_values))
            )
            _exchange(grad_output[b, here], _chunk_grid(grad_chunks[:size], layout), 0, 0, layout, "to_grid")
            _exchange(delta[b, here], _chunk_grid(delta_chunks[:size], layout), 0, 0, layout, "to_grid")
            grad_k_buffer.zero_()
            grad_v_buffer.zero_()
            for k, h in enumerate(heads_here):
                for first, block, count, slots in workspace.runs:
                    q_block = q_chunks[k, first : first + count, :slots]  # (n, slots, M+1)
                    k_block = _windows(k_buffer[k], layout, block, count, head_dim + 1)  # (n, S, M+1)
                    v_block = _windows(v_buffer[k], layout, block, count, head_dim)  # (n, S, M)
                    do_block = grad_chunks[k, first : first + count, :slots]  # (n, slots, M)
                    d_block = delta_chunks[k, first : first + count, :slots]  # (n, slots, 1)
                    probs = scores[: count * slots * window_keys].view(count, slots, window_keys)
                    scratch = None if workspace.scratch is None else workspace.scratch.views(count, slots)
                    # recomputed: a fused softmax is cheaper than exp(S - logsumexp) over masked entries
                    float_probs = _probabilities(
                        q_block, k_block.transpose(1, 2), shared[h, None, :slots], probs, scratch
                    )
                    # windows overlap: slot block s of chunk t's window is buffer block t + s, so each
                    # slot block's gradient is accumulated straight into its (contiguous) buffer blocks
                    for s in range(layout.span):
                        part = slice(s * keys_per_block, (s + 1) * keys_per_block)
                        target = grad_v_buffer[k, block + s : block + s + count]  # (n, keys per block, M)
                        target.baddbmm_(probs[:, :, part].transpose(1, 2), do_block)
                    if scratch is None:
                        grad_scores = torch.bmm(do_block, v_block.transpose(1, 2))  # dP, (n, slots, S)
                        grad_scores.sub_(d_block).mul_(probs)  # dS
                        float_grad_scores, key_features = grad_scores, k_block[..., :head_dim]
                    else:
                        # dP into the rounded probabilities' buffer (read for the last time above); dS in float32
                        torch.bmm(do_block, scratch.values.copy_(v_block).transpose(1, 2), out=probs)
                        float_grad_scores = scratch.grad_scores.copy_(probs).sub_(d_block).mul_(float_probs)
                        grad_scores = probs.copy_(float_grad_scores)
                        key_features = scratch.keys[..., :head_dim]  # the run's keys, copied out by _probabilities
                    if grad_shared is not None:
                        grad_shared[h, :slots] += float_grad_scores.sum(0, dtype=accumulate)
                    torch.bmm(grad_scores, key_features, out=grad_q[k, first : first + count, :slots])
                    for s in range(layout.span):
                        part = slice(s * keys_per_block, (s + 1) * keys_per_block)
                        target = grad_k_buffer[k, block + s : block + s + count]
                        target.baddbmm_(grad_scores[:, :, part].transpose(1, 2), q_block[..., :head_dim])
            _exchange(grads[0][b, here], _chunk_grid(grad_q[:size], layout), 0, 0, layout, "from_grid")
            _fold_key_buffer(grad_k_buffer[:size], layout, grads[1][b, here], grads[3][b, here])
            _fold_key_buffer(grad_v_buffer[:size], layout, grads[2][b, here], grads[4][b, here])
    finally:
        workspace.set_key_extent(None)
    return (*grads, None if grad_shared is None else grad_shared.to(shared.dtype))


class _BlockedLongformerAttention(torch.autograd.Function):
    """Forward and a recomputing backward; no (C, W^2, S) tensor is kept."""

    @staticmethod
    def forward(ctx, queries, keys, values, global_keys, global_values, shared, layout, key_extents):
        with _no_autocast(queries):
            output = _blocked_forward(queries, keys, values, global_keys, global_values, shared, layout, key_extents)
        ctx.save_for_backward(queries, keys, values, global_keys, global_values, shared, output)
        ctx.layout, ctx.key_extents = layout, key_extents
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        with _no_autocast(grad_output):
            grads = _blocked_backward(
                grad_output, *ctx.saved_tensors, ctx.layout, ctx.key_extents, ctx.needs_input_grad[5]
            )
        return (*grads, None, None)


def _no_autocast(tensor: torch.Tensor):
    """Inside the kernel every product runs in the dtype of its (already cast) inputs: under autocast,
    ``bmm`` would otherwise recast them and write lower-precision results into float32 buffers."""
    return torch.autocast(tensor.device.type, enabled=False)


def _chunk_grid(chunks: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """(..., C, W^2, F) -> (..., mx, my, W, W, F) view."""
    return chunks.unflatten(-3, (layout.chunk_rows, layout.chunk_cols)).unflatten(-2, (layout.window,) * 2)


# Under torch.compile and torch.export the kernel runs as one custom operator: opaque to the tracer
# (its Python loops, workspaces and out= products run eagerly at run time, at eager speed), with a
# shape-only fake implementation for tracing and its recomputing backward as a second operator.
@torch.library.custom_op("vil_kernels::longformer_blocked", mutates_args=())
def _blocked_operator(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    global_keys: torch.Tensor,
    global_values: torch.Tensor,
    shared: torch.Tensor,
    height: int,
    width: int,
    window: int,
    neighbor: int | None,
    key_extents: torch.Tensor | None,
) -> torch.Tensor:
    layout = _layout(height, width, window, neighbor, global_keys.shape[-2])
    with _no_autocast(queries):
        return _blocked_forward(
            queries, keys, values, global_keys, global_values, shared, layout, _extents_list(key_extents)
        )


@_blocked_operator.register_fake
def _(queries, keys, values, global_keys, global_values, shared, height, width, window, neighbor, key_extents):
    batch, heads, length, head_dim = queries.shape
    return queries.new_empty(batch, length, heads, head_dim).permute(0, 2, 1, 3)  # as the real output


@torch.library.custom_op("vil_kernels::longformer_blocked_backward", mutates_args=())
def _blocked_backward_operator(
    grad_output: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    global_keys: torch.Tensor,
    global_values: torch.Tensor,
    shared: torch.Tensor,
    output: torch.Tensor,
    height: int,
    width: int,
    window: int,
    neighbor: int | None,
    key_extents: torch.Tensor | None,
    needs_grad_shared: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = _layout(height, width, window, neighbor, global_keys.shape[-2])
    with _no_autocast(queries):
        *grads, grad_shared = _blocked_backward(
            grad_output,
            queries,
            keys,
            values,
            global_keys,
            global_values,
            shared,
            output,
            layout,
            _extents_list(key_extents),
            needs_grad_shared,
        )
    return (*grads, torch.zeros_like(shared) if grad_shared is None else grad_shared)


@_blocked_backward_operator.register_fake
def _(grad_output, queries, keys, values, global_keys, global_values, shared, output, *geometry):
    return tuple(t.new_empty(t.shape) for t in (queries, keys, values, global_keys, global_values, shared))


def _operator_setup_context(ctx, inputs, output):
    queries, keys, values, global_keys, global_values, shared, height, width, window, neighbor, key_extents = inputs
    ctx.save_for_backward(queries, keys, values, global_keys, global_values, shared, output, key_extents)
    ctx.geometry = (height, width, window, neighbor)


def _operator_backward(ctx, grad_output):
    *tensors, key_extents = ctx.saved_tensors
    grads = torch.ops.vil_kernels.longformer_blocked_backward(
        grad_output, *tensors, *ctx.geometry, key_extents, ctx.needs_input_grad[5]
    )
    return (*grads, None, None, None, None, None)


torch.library.register_autograd(
    "vil_kernels::longformer_blocked", _operator_backward, setup_context=_operator_setup_context
)


def _extents_list(key_extents: torch.Tensor | None) -> list[tuple[int, int]] | None:
    return None if key_extents is None else [tuple(extent) for extent in key_extents.tolist()]


def _common_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values in one dtype: autocast's where it is on (the kernel is a matrix product,
    as ``q @ k`` would be), else the one they share; the bias tables follow the queries' dtype."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) for t in tensors)
    dtypes = [t.dtype for t in tensors]
    if len(set(dtypes)) > 1:
        raise ValueError(
            "local_queries, local_keys, local_values, global_keys and global_values must share one dtype, got "
            f"{', '.join(map(str, dtypes))}; convert them (or run under torch.autocast, which casts them)."
        )
    return tensors


def longformer_attention_blocked(
    local_queries: torch.Tensor,
    local_keys: torch.Tensor,
    local_values: torch.Tensor,
    global_keys: torch.Tensor,
    global_values: torch.Tensor,
    height: int,
    width: int,
    window: int,
    exact: bool = False,
    neighbor: int | None = None,
    relative_bias_table: torch.Tensor | None = None,
    local_to_global_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    key_extents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blocked CPU path. Shapes as in :func:`vil_kernels.longformer_attention`; no attention dropout.

    Keys beyond an image's ``key_extents`` get the padding flag, for that image only.
    """
    if dropout_p > 0:
        raise ValueError(
            "The 'blocked' longformer implementation has no attention dropout; use 'vectorized' (or 'auto', "
            "which picks it) when attention dropout is on."
        )
    chunk_offsets(neighbor)  # validates neighbor
    batch, heads, length, head_dim = local_queries.shape
    if length != height * width:
        raise ValueError(f"local_queries hold {length} tokens, but the map is {height}x{width}.")
    local_queries, local_keys, local_values, global_keys, global_values = _common_dtype(
        local_queries, local_keys, local_values, global_keys, global_values
    )
    num_global = global_keys.shape[-2]
    # float32 in reduced precision, where bias and softmax are added and computed in float32 (see _Scratch)
    shared = _shared_scores_bias(
        window,
        neighbor,
        num_global,
        exact,
        heads,
        torch.promote_types(local_queries.dtype, torch.float32),
        local_queries.device,
        relative_bias_table,
        local_to_global_bias,
    )
    tensors = (local_queries, local_keys, local_values, global_keys, global_values, shared)
    if torch.compiler.is_compiling():
        return torch.ops.vil_kernels.longformer_blocked(*tensors, height, width, window, neighbor, key_extents)
    # Strided inputs (heads split off a fused projection) are fine: each head is read once, by a copy.
    layout = _layout(height, width, window, neighbor, num_global)
    return _BlockedLongformerAttention.apply(*tensors, layout, _extents_list(key_extents))


__all__ = ["longformer_attention_blocked", "release_workspaces"]
