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

Runs. Large maps run a chunk row (or part of one) at a time, reading the windows in place. Small maps
(224x224 classifiers: 4-8 chunks a row, batch 32) would make that a Python loop over thousands of tiny
products, so their runs take several chunk rows, or whole maps of several heads and images loaded
together, and copy those windows out (one copy per run: the rows of the buffer end in two padding
blocks, so no single view spans them). At batch 32 this took the 28x28 and 56x56 maps' forward +
backward to 0.45x and 0.71x of single-row runs in bfloat16, 0.68x and 0.99x in float32.

Reduced precision (bfloat16: tensors converted to it, or cast by autocast on entry). The products
accumulate in float32 inside oneDNN, but a CPU ``bmm`` of bfloat16 inputs can only write bfloat16
(``out_dtype`` is CUDA-only in torch 2.13), so scores are rounded to 8 significant bits, as in any
plain bfloat16 attention. From there the bias, the softmax and the backward's dS run in float32 on a
copy of each run's scores (see ``_Workspace``), and the probabilities are rounded once for the next
product: faster than bfloat16's own add and softmax, and more accurate. Float32 score products
throughout, or a fused CPU flash-attention call per run over the same window views, measured 5-35%
slower. The bias-table gradient, a sum over every run of every image, is accumulated in float32.

Fused softmax steps. Where vil_kernels.native builds (a C++ compiler on first use), the bias add and
softmax of a run, and the backward's dS with its bias-gradient sum, are one C++ pass over the scores
each, in float32 whatever the scores' dtype (no float32 copy in the forward); the PyTorch ops here are
the fallback and the reference they are tested against.

Native forward. Where the CPU has AMX bfloat16 tiles or AVX512-BF16 (``vil_kernels.native.bf16_forward``), the
bfloat16 forward skips all of the above, and so does the float32 forward where it has AVX-512
(``vil_kernels.native.f32_forward``): one C++ call reads every chunk's queries and window keys and values straight
from the input tensors, in the shared bias's slot order (``_slot_chunks``), and runs products, bias, padding flags and
softmax per chunk in cache (``csrc/attention_fused.cpp``): no workspace, no window copies, no Python loop over runs.
Its scores stay in float32 (the products accumulate in float32). On CPUs with AVX-512 the backward is native too, in
float32 and bfloat16 (``vil_kernels.native.backward``): one C++ call recomputes each chunk's probabilities and
writes every gradient in float32 (rounded once to bfloat16 after), chunks whose key windows overlap never at once.
Elsewhere the backward below runs.

Memory. Scores exist for one run of chunks at a time (sized to stay in cache). The backward is a
custom autograd function that keeps only q, k, v, the output and the shared bias, and recomputes
each run's probabilities (as flash attention does; recomputing the fused softmax is cheaper than
exp(S - logsumexp) over masked entries), so no (C, W^2, S) tensor is ever stored.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from ..native import backward as native_backward, bf16_forward, f32_forward, native_ops
from .geometry import NEIGHBOR_OFFSETS, cached_tensors, chunk_offsets, num_chunks, relative_bias_index

logger = logging.getLogger(__name__)

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


def _slot_chunks(neighbor: int | None) -> tuple[list[tuple[int, int]], int]:
    """The (chunk row, chunk column) offsets of the chunks a query chunk's key slots hold, in slot order, and the
    number of blocks they span. 3x3 windows: dj (block t + dj), then the di-th chunk of the block."""
    if neighbor is None:
        return [(di - 1, dj - 1) for dj in range(3) for di in range(3)], 3
    return list(chunk_offsets(neighbor)), 1


@cached_tensors(maxsize=64)
def _slot_geometry(window: int, neighbor: int | None, num_global: int, exact: bool, device: str):
    """Per (query slot, key slot): bias-table row (W^2, S), allowed (W^2, S), global index or -1 (S,)."""
    w, g = window, num_global
    inner_row = torch.arange(w).repeat_interleave(w)
    inner_col = torch.arange(w).repeat(w)
    offsets, span = _slot_chunks(neighbor)
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


class _Run(NamedTuple):
    """Query chunks computed together, with one product per step: chunk columns [first_col, + cols) of chunk
    rows [first_row, + rows) of the group's maps [first_map, + maps). A run of several rows takes whole rows,
    and one of several maps whole maps."""

    first_map: int
    maps: int
    first_row: int
    rows: int
    first_col: int
    cols: int
    slots: int  # query slots per chunk: W^2, or the first r * W where the run is the last chunk row only

    @property
    def chunks(self) -> int:
        return self.maps * self.rows * self.cols

    @property
    def gathered(self) -> bool:
        """The key windows of one chunk row are a single strided view into the buffer; those of several rows
        or maps are not (two padding blocks end each buffer row), so they are copied out ("gathered")."""
        return self.maps > 1 or self.rows > 1

    def first_chunk(self, layout: _Layout) -> int:
        return (self.first_map * layout.chunk_rows + self.first_row) * layout.chunk_cols + self.first_col

    def first_block(self, layout: _Layout) -> int:
        return self.first_map * layout.num_blocks + self.first_row * layout.block_pitch + self.first_col


class _RunViews(NamedTuple):
    """What a run reads and writes, as views into its workspace (made once per workspace and group size).

    queries (n, slots, M+1), outputs (n, slots, M), scores (n, slots, S) in the inputs' dtype; key_windows
    (n, S, M+1) and value_windows (n, S, M), overlapping views into the buffers, or for gathered runs
    (maps, rows, cols, S, F) views to copy out; keys/values: where they are copied to (n, S, F), or None where
    the products read the views themselves; float_scores/float_grad_scores: float32 copies of the scores in
    reduced precision, else None; window_grads (n, S, M): a gathered run's key or value window gradients
    before they are folded into the buffer, else None.
    """

    run: _Run
    queries: torch.Tensor
    outputs: torch.Tensor
    scores: torch.Tensor
    key_windows: torch.Tensor
    value_windows: torch.Tensor
    keys: torch.Tensor | None
    values: torch.Tensor | None
    float_scores: torch.Tensor | None
    float_grad_scores: torch.Tensor | None
    window_grads: torch.Tensor | None


def _gather(target: torch.Tensor | None, windows: torch.Tensor) -> torch.Tensor:
    """The windows as a (n, S, F) tensor: copied into ``target`` where one is given, else the view itself."""
    if target is None:
        return windows
    target.view(windows.shape).copy_(windows)
    return target


def _add_bias(scores: torch.Tensor, bias: torch.Tensor) -> None:
    """scores (n, slots, S) += bias (maps, 1, slots, S), map by map (the run's chunks are map-major)."""
    scores.view(bias.shape[0], -1, *scores.shape[1:]).add_(bias)


def _probabilities(queries, keys, bias, scores, float_scores, native=None, keep_float=False) -> torch.Tensor:
    """softmax(queries . keys + bias) of one run, into ``scores`` (n, slots, S) in the inputs' dtype: queries
    (n, slots, M+1), keys (n, S, M+1), the rest as in ``_bias_softmax``."""
    torch.bmm(queries, keys.transpose(1, 2), out=scores)
    return _bias_softmax(scores, bias, float_scores, native, keep_float)


def _bias_softmax(scores, bias, float_scores, native=None, keep_float=False) -> torch.Tensor:
    """scores (n, slots, S) <- softmax(scores + bias), bias (maps, 1, slots, S) in float32 or wider.

    The bias and the softmax are taken in float32 at least: in reduced precision (``float_scores`` given) on a
    float32 copy of the scores, or fused in C++ (``native``, see vil_kernels.native). Returns the float32
    probabilities where the backward needs them (``keep_float``; always, in the PyTorch ops), else ``scores``.
    """
    if native is not None:
        kept = float_scores if keep_float else None
        native.bias_softmax_(scores, bias[:, 0], kept)
        return scores if kept is None else kept
    if float_scores is None:
        # bmm then add: cheaper than baddbmm, which first copies the broadcast bias into its output
        _add_bias(scores, bias)
        return torch.softmax(scores, -1, out=scores)
    # copy, then add: faster than one add of bfloat16 scores and a float32 bias into float32 (1.04-1.15x the time
    # of the whole kernel, in bfloat16)
    probabilities = float_scores.copy_(scores)
    _add_bias(probabilities, bias)
    torch.softmax(probabilities, -1, out=probabilities)
    scores.copy_(probabilities)
    return probabilities


def _softmax_grad(grad_scores, probs, delta, bias_grad, float_grad_scores, native=None) -> None:
    """dS = P * (dP - delta) of one run, over dP in ``grad_scores`` (n, slots, S); ``bias_grad`` (maps, slots, S),
    if given, += dS summed over each map's chunks. probs and delta (n, slots, 1) in float32 or wider; in reduced
    precision dS is taken on the float32 copy ``float_grad_scores`` (or fused in C++, ``native``)."""
    if native is not None:
        native.softmax_grad_(grad_scores, probs, delta, bias_grad)
        return
    if float_grad_scores is None:
        float_grad = grad_scores.sub_(delta).mul_(probs)
    else:
        float_grad = float_grad_scores.copy_(grad_scores).sub_(delta).mul_(probs)
        grad_scores.copy_(float_grad)
    if bias_grad is not None:
        bias_grad += float_grad.view(bias_grad.shape[0], -1, *grad_scores.shape[1:]).sum(1, dtype=bias_grad.dtype)


def _native_ops(queries: torch.Tensor):
    """The C++ softmax ops for these inputs, or None (other devices, float64, or not built)."""
    if queries.device.type != "cpu" or queries.dtype not in (torch.float32, torch.bfloat16):
        return None
    return native_ops()


def _bf16_forward(queries: torch.Tensor):
    """``(ops, engine)`` whose ``longformer_forward_bf16_`` runs this bfloat16 forward, or None (see
    attention_fused.cpp)."""
    if queries.device.type != "cpu" or queries.dtype != torch.bfloat16 or queries.shape[-1] not in (32, 64):
        return None
    return bf16_forward()


def _f32_forward(queries: torch.Tensor):
    """``(ops, "avx512")`` whose ``longformer_forward_f32_`` runs this float32 forward (head dims up to 64), or
    None."""
    if queries.device.type != "cpu" or queries.dtype != torch.float32 or queries.shape[-1] > 64:
        return None
    return f32_forward()


def _native_backward(queries: torch.Tensor):
    """``(ops, "avx512")`` whose ``longformer_backward_`` runs this backward (float32 or bfloat16, head dims up to
    64), or None."""
    if queries.device.type != "cpu" or queries.dtype not in (torch.float32, torch.bfloat16) or queries.shape[-1] > 64:
        return None
    return native_backward()


def _bfloat16_products(queries: torch.Tensor, ops) -> bool:
    """Whether the native backward runs these tokens' products in AVX512-BF16 dot products (bfloat16, head dims 32
    and 64, on CPUs that have them) rather than in float32 multiply-adds."""
    return queries.dtype == torch.bfloat16 and queries.shape[-1] in (32, 64) and ops.avx512_bf16_available()


def _fused_geometry(layout: _Layout, key_extents) -> tuple:
    """The native ops' arguments after the bias: chunk offsets, chunks per block, map, window, key extents."""
    offsets, span = _slot_chunks(layout.neighbor)
    extents = None if key_extents is None else torch.tensor(key_extents, dtype=torch.long)
    chunk_offsets = torch.tensor(offsets, dtype=torch.long)
    return chunk_offsets, len(offsets) // span, layout.height, layout.width, layout.window, extents


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """The native ops read rows of M features: unit stride in the last dim."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


class _Workspace:
    """Query chunks and key/value buffers of a group of maps (one image's heads, or several images' heads),
    refilled per group and reused across calls.

    Fresh multi-megabyte buffers cost page faults and zero-filling on every call; here the padding
    parts (zeros, the padding flags, the queries' constant feature) are written once, when the
    workspace is made, and each group only overwrites the parts that hold map tokens. Small maps
    take several maps per group, so the copies are few and large rather than many and small.

    Reduced precision (see ``_probabilities``): a CPU ``bmm`` of bfloat16 inputs copies a transposed operand
    that overlaps itself before every product, more slowly than one plain copy of the key windows (the score
    product with the copy 18-31% faster here), so every run's key windows are copied out first, and its value
    windows for the backward's dP; float32 reads single-row windows in place (faster than after a copy).
    The bias and softmax run on a float32 copy of the scores: more accurate than bfloat16's own add and
    softmax and faster (0.82-0.85x their time). The C++ softmax (vil_kernels.native) reads the scores in place
    and fills the float32 copy only where the backward needs the probabilities.
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
        # runs for every group size up to this one (the last group of a batch may be smaller); one run's
        # scores, copies and window gradients at a time, for the forward and the backward alike
        self._runs = {maps: list(_runs(layout, dtype, maps)) for maps in range(1, group + 1)}
        every_run = [run for runs in self._runs.values() for run in runs]
        most_chunks = max(run.chunks for run in every_run)
        most_scores = max(run.chunks * run.slots for run in every_run) * layout.window_keys
        reduced, gathered = dtype.itemsize < 4, any(run.gathered for run in every_run)
        s = layout.window_keys
        self.scores = torch.empty(most_scores, dtype=dtype, device=device)
        self.keys = self.values = self.window_grads = self.float_scores = self.float_grad_scores = None
        if reduced or gathered:
            self.keys = torch.empty(most_chunks, s, m + 1, dtype=dtype, device=device)
            self.values = torch.empty(most_chunks, s, m, dtype=dtype, device=device)
        if gathered:
            self.window_grads = torch.empty(most_chunks, s, m, dtype=dtype, device=device)
        if reduced:
            self.float_scores = torch.empty(most_scores, dtype=torch.float32, device=device)
            self.float_grad_scores = torch.empty(most_scores, dtype=torch.float32, device=device)
        self._run_views: dict[int, list[_RunViews]] = {}
        self._key_extents = None  # per map (rows, cols) of the keys currently not flagged; None: all of them

    def set_key_extents(self, extents: tuple[tuple[int, int], ...] | None) -> None:
        """Flag map m's keys at or beyond extents[m] = (rows, cols) like the padding (its image's extent); None:
        none. The flags live in the keys' extra feature, which ``load`` never touches, so they hold until
        changed; callers restore None before the workspace is reused."""
        if extents == self._key_extents:
            return
        layout, m = self.layout, self.head_dim
        flags = self.key_buffer.new_zeros(self.key_buffer.shape[0], layout.height, layout.width, 1)
        for index, (rows, cols) in enumerate(extents or ()):
            flags[index, rows:] = self.flag
            flags[index, :, cols:] = self.flag
        for grid, first_row, first_col in _key_grids(self.key_buffer[..., m:], layout):
            _exchange(flags.flatten(1, 2), grid, first_row, first_col, layout, "to_grid")
        self._key_extents = extents

    def run_views(self, maps: int) -> list[_RunViews]:
        """The runs of a group of ``maps`` maps, with their views. Made once: the views alias buffers that every
        call refills, and building them per call cost ~10% of the kernel's time."""
        views = self._run_views.get(maps)
        if views is None:
            views = self._run_views[maps] = [self._views(run) for run in self._runs[maps]]
        return views

    def _views(self, run: _Run) -> _RunViews:
        layout, s = self.layout, self.layout.window_keys
        first, n, slots = run.first_chunk(layout), run.chunks, run.slots

        def cut(buffer):
            return None if buffer is None else buffer[: n * slots * s].view(n, slots, s)

        copied = run.gathered or self.float_scores is not None  # the windows the products read are copies
        return _RunViews(
            run,
            self.query_chunks.flatten(0, 1)[first : first + n, :slots],
            self.output_chunks.flatten(0, 1)[first : first + n, :slots],
            cut(self.scores),
            _windows(self.key_buffer, layout, run),
            _windows(self.value_buffer, layout, run),
            self.keys[:n] if copied else None,
            self.values[:n] if copied else None,
            cut(self.float_scores),
            cut(self.float_grad_scores),
            self.window_grads[:n] if run.gathered else None,
        )

    def load(self, queries, keys, values, global_keys, global_values):
        """Fill the buffers with a group of maps: (images, heads, L, M) tokens and (images, heads, G, M) globals."""
        layout, m, g = self.layout, self.head_dim, self.layout.num_global
        images, heads = queries.shape[:2]
        size = images * heads
        q_chunks, k_buffer, v_buffer = self.query_chunks[:size], self.key_buffer[:size], self.value_buffer[:size]
        _exchange(
            queries, _chunk_grid(q_chunks, layout)[..., :m].unflatten(0, (images, heads)), 0, 0, layout, "to_grid"
        )
        for grid, first_row, first_col in _key_grids(k_buffer[..., :m].unflatten(0, (images, heads)), layout):
            _exchange(keys, grid, first_row, first_col, layout, "to_grid")
        for grid, first_row, first_col in _key_grids(v_buffer.unflatten(0, (images, heads)), layout):
            _exchange(values, grid, first_row, first_col, layout, "to_grid")
        if g:
            k_buffer[:, :, -g:, :m] = global_keys.reshape(size, 1, g, m)
            v_buffer[:, :, -g:] = global_values.reshape(size, 1, g, m)
        return q_chunks, k_buffer, v_buffer


def release_workspaces() -> None:
    """Free this thread's cached buffers (about 180 MB after ViL-Small at 800x1216 in float32)."""
    _workspaces.cache = OrderedDict()


def _group_shape(layout: _Layout, head_dim: int, batch: int, heads: int, element_size: int) -> tuple[int, int]:
    """(images, heads) loaded together: as many maps as fit in _GROUP_BYTES of buffers, in groups of equal
    size; all of an image's heads before a second image."""
    per_map = layout.chunk_rows * layout.chunk_cols * layout.window**2 + 2 * layout.num_blocks * layout.block_keys
    per_map *= (head_dim + 1) * element_size
    most = max(1, _GROUP_BYTES // per_map)
    if most < heads or batch == 1:
        groups = -(-heads // min(most, heads))
        return 1, -(-heads // groups)
    groups = -(-batch // min(batch, most // heads))
    return -(-batch // groups), heads


def _groups(batch: int, heads: int, images: int, heads_per_group: int):
    """(first image, images, first head, heads) of each group."""
    for first_image in range(0, batch, images):
        for first_head in range(0, heads, heads_per_group):
            yield first_image, min(images, batch - first_image), first_head, min(heads_per_group, heads - first_head)


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
    with torch.inference_mode(False):  # reused by later calls, with or without autograd (see cached_tensors)
        cache[key] = workspace = _Workspace(layout, head_dim, group, dtype, device)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "blocked: %dx%d map, window %d, %s: %d maps (image x head) loaded together, %s",
            layout.height,
            layout.width,
            layout.window,
            dtype,
            group,
            _describe_runs(layout, workspace.run_views(group)),
        )
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


def _runs(layout: _Layout, dtype: torch.dtype, maps: int):
    """The runs of a group of ``maps`` maps, each small enough for its scores to stay near _BLOCK_BYTES.

    Large maps: runs of chunks within one chunk row. Where a whole chunk row fits, runs of whole rows; where a
    whole map fits, runs of whole maps: few large products instead of a Python loop over many small ones (at
    224x224 a chunk row holds 4-8 chunks). The query slots of a chunk are row-major, so where a run is the last
    chunk row alone and that row holds only r map rows, its queries are the first r * W slots; runs of several
    rows compute every slot (the padding queries' outputs are dropped, their gradients are zero).
    """
    # sized by the scores in the inputs' dtype; reduced precision's float32 copy of them is not counted: runs half
    # as long, to keep both in the same bytes, measured slower (more, smaller products)
    per_run = max(1, _BLOCK_BYTES // (layout.window**2 * layout.window_keys * dtype.itemsize))
    mx, my, w = layout.chunk_rows, layout.chunk_cols, layout.window
    last_slots = w * (layout.height - (mx - 1) * w)
    if mx * my <= per_run and maps > 1:
        per = _balanced(maps, per_run // (mx * my))
        for first in range(0, maps, per):
            yield _Run(first, min(per, maps - first), 0, mx, 0, my, w * w)
        return
    rows_per_run = _balanced(mx, per_run // my) if my <= per_run else 1
    cols_per_run = _balanced(my, per_run)
    for first_map in range(maps):
        for i in range(0, mx, rows_per_run):
            rows = min(rows_per_run, mx - i)
            slots = last_slots if rows == 1 and i == mx - 1 else w * w
            for j in range(0, my, cols_per_run):
                yield _Run(first_map, 1, i, rows, j, min(cols_per_run, my - j), slots)


def _describe_runs(layout: _Layout, views: list[_RunViews]) -> str:
    """How a group's runs cut it, and why, for the log."""
    run = max((view.run for view in views), key=lambda run: run.chunks)
    count = f"{len(views)} runs of up to {run.chunks} chunks"
    if run.maps > 1:
        return f"{count}: {run.maps} whole maps each (a map's scores fit in a run; windows copied out)"
    if run.rows > 1:
        return f"{count}: {run.rows} chunk rows each (a chunk row's scores fit in a run; windows copied out)"
    if run.cols == layout.chunk_cols:
        return f"{count}: one chunk row each (a row's windows are one strided view)"
    return f"{count}: parts of a chunk row (a row's scores exceed a run)"


def _balanced(total: int, most: int) -> int:
    """The size of ceil(total / most) near-equal parts of ``total``."""
    return -(-total // -(-total // max(1, most)))


def _windows(buffer: torch.Tensor, layout: _Layout, run: _Run, keys: int | None = None, block: int = 0):
    """``keys`` key rows (default: the S of a window) of each chunk of the run, from buffer block ``block`` of its
    window on: a view into buffers (group, blocks, block_keys, F), (n, keys, F) for a run within one chunk row,
    (maps, rows, cols, keys, F) otherwise. Windows overlap (chunk t's window is blocks t, t+1, t+2)."""
    keys = layout.window_keys if keys is None else keys
    map_stride, block_stride, key_stride = buffer.stride()[:3]
    windows = buffer.as_strided(
        (run.maps, run.rows, run.cols, keys, buffer.shape[-1]),
        (map_stride, layout.block_pitch * block_stride, block_stride, key_stride, 1),
        buffer.storage_offset() + (run.first_block(layout) + block) * block_stride,
    )
    return windows if run.gathered else windows.flatten(0, 2)


def _map_extents(key_extents, first_image: int, images: int, heads: int, layout: _Layout):
    """Per map of a group, its image's key extent; None where every key of every map is its own."""
    if key_extents is None:
        return None
    whole = (layout.height, layout.width)
    extents = [tuple(key_extents[b]) for b in range(first_image, first_image + images)]
    if all(extent == whole for extent in extents):
        return None
    return tuple(extent for extent in extents for _ in range(heads))


def _map_bias(shared: torch.Tensor, images: int, first_head: int, heads: int) -> torch.Tensor:
    """(maps, W^2, S): the shared bias of each map's head, maps image-major as in the workspace."""
    bias = shared[first_head : first_head + heads]
    return bias if images == 1 else bias.repeat(images, 1, 1)


def _blocked_forward(queries, keys, values, global_keys, global_values, shared, layout, key_extents):
    """Forward, a group of maps at a time; key_extents: per image (rows, cols), or None."""
    # queries, keys, values: (B, H, L, M); global_*: (B, H, G, M); shared: (H, W^2, S)
    batch, heads, length, head_dim = queries.shape
    # (B, L, H, M) storage: what the output projection reads, so its reshape needs no copy
    output = queries.new_empty(batch, length, heads, head_dim).permute(0, 2, 1, 3)
    fused = _bf16_forward(queries) or _f32_forward(queries)
    if fused is not None:  # one C++ call reads the tokens in place: no workspace (see attention_fused.cpp)
        ops, engine = fused
        tokens = (queries, keys, values, global_keys, global_values)
        arguments = (*map(_rows, tokens), shared, *_fused_geometry(layout, key_extents), output)
        if queries.dtype == torch.float32:
            ops.longformer_forward_f32_(*arguments)
        else:
            ops.longformer_forward_bf16_(*arguments, engine == "amx")  # on tiles
        return output
    images, heads_per_group = _group_shape(layout, head_dim, batch, heads, queries.element_size())
    workspace = _workspace(layout, head_dim, images * heads_per_group, queries.dtype, queries.device)
    native = _native_ops(queries)
    inputs = (queries, keys, values, global_keys, global_values)
    try:
        for first_image, group_images, first_head, group_heads in _groups(batch, heads, images, heads_per_group):
            here = (slice(first_image, first_image + group_images), slice(first_head, first_head + group_heads))
            workspace.set_key_extents(_map_extents(key_extents, first_image, group_images, group_heads, layout))
            workspace.load(*(t[here] for t in inputs))
            maps = group_images * group_heads
            bias = _map_bias(shared, group_images, first_head, group_heads)
            for views in workspace.run_views(maps):
                run = views.run
                keys_here = _gather(views.keys, views.key_windows)
                run_bias = bias[run.first_map : run.first_map + run.maps, None, : run.slots]
                _probabilities(views.queries, keys_here, run_bias, views.scores, views.float_scores, native)
                values_here = _gather(views.values, views.value_windows) if run.gathered else views.value_windows
                torch.bmm(views.scores, values_here, out=views.outputs)
            out_grid = _chunk_grid(workspace.output_chunks[:maps], layout).unflatten(0, (group_images, group_heads))
            _exchange(output[here], out_grid, 0, 0, layout, "from_grid")
    finally:
        workspace.set_key_extents(None)
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
    fused = _native_backward(queries)
    if fused is not None:  # one C++ call, as the native forward (see attention_fused.cpp); float32 gradients
        tokens = (queries, keys, values, global_keys, global_values)
        grads = [torch.empty(t.shape) for t in tokens]
        grad_shared = torch.empty(shared.shape) if needs_grad_shared else None
        geometry = _fused_geometry(layout, key_extents)
        ops = fused[0]
        dot_products = _bfloat16_products(queries, ops)
        ops.longformer_backward_(
            _rows(grad_output), *map(_rows, tokens), shared, *geometry, *grads, grad_shared, dot_products
        )
        return (*(grad.to(queries.dtype) for grad in grads), grad_shared)
    batch, heads, length, head_dim = queries.shape
    # dS, delta and the shared bias's gradient (a sum over every run of every image): float32 at least
    accumulate = torch.promote_types(queries.dtype, torch.float32)
    images, heads_per_group = _group_shape(layout, head_dim, batch, heads, queries.element_size())
    group = images * heads_per_group
    chunks, slots_per_chunk = layout.chunk_rows * layout.chunk_cols, layout.window**2
    workspace = _workspace(layout, head_dim, group, queries.dtype, queries.device)
    native = _native_ops(queries)
    # softmax backward: dS = P * (dP - sum(dO * O)) per query, in float32 at least
    delta = (grad_output * output.to(accumulate)).sum(-1, keepdim=True)  # (B, H, L, 1)

    grads = [t.new_empty(t.shape) for t in (queries, keys, values, global_keys, global_values)]
    grad_shared = torch.zeros(shared.shape, dtype=accumulate, device=shared.device) if needs_grad_shared else None
    grad_map_bias = torch.empty(group, *shared.shape[1:], dtype=accumulate, device=shared.device)
    grad_q = queries.new_empty(group, chunks, slots_per_chunk, head_dim)
    grad_k_buffer = queries.new_empty(group, layout.num_blocks, layout.block_keys, head_dim)
    grad_v_buffer = torch.empty_like(grad_k_buffer)
    grad_chunks = queries.new_zeros(group, chunks, slots_per_chunk, head_dim)  # padding stays 0
    delta_chunks = delta.new_zeros(group, chunks, slots_per_chunk, 1)
    inputs = (queries, keys, values, global_keys, global_values)
    try:
        for first_image, group_images, first_head, group_heads in _groups(batch, heads, images, heads_per_group):
            here = (slice(first_image, first_image + group_images), slice(first_head, first_head + group_heads))
            maps, by_map = group_images * group_heads, (group_images, group_heads)
            workspace.set_key_extents(_map_extents(key_extents, first_image, group_images, group_heads, layout))
            # rebuilt rather than saved: a copy each, cheaper than keeping them alive between passes
            workspace.load(*(t[here] for t in inputs))
            _exchange(
                grad_output[here], _chunk_grid(grad_chunks[:maps], layout).unflatten(0, by_map), 0, 0, layout, "to_grid"
            )
            _exchange(
                delta[here], _chunk_grid(delta_chunks[:maps], layout).unflatten(0, by_map), 0, 0, layout, "to_grid"
            )
            grad_k_buffer.zero_()
            grad_v_buffer.zero_()
            grad_map_bias.zero_()
            bias = _map_bias(shared, group_images, first_head, group_heads)
            for views in workspace.run_views(maps):
                run, slots = views.run, views.run.slots
                first, n = run.first_chunk(layout), run.chunks
                do_block = grad_chunks.flatten(0, 1)[first : first + n, :slots]  # (n, slots, M)
                d_block = delta_chunks.flatten(0, 1)[first : first + n, :slots]  # (n, slots, 1)
                q_block = views.queries  # (n, slots, M+1)
                keys_here = _gather(views.keys, views.key_windows)  # (n, S, M+1)
                # recomputed: a fused softmax is cheaper than exp(S - logsumexp) over masked entries
                run_bias = bias[run.first_map : run.first_map + run.maps, None, :slots]
                probs = views.scores
                float_probs = _probabilities(q_block, keys_here, run_bias, probs, views.float_scores, native, True)
                _add_grad_windows(probs.transpose(1, 2), do_block, grad_v_buffer, views, layout)
                values_here = _gather(views.values, views.value_windows)  # (n, S, M)
                if views.float_scores is None:
                    grad_scores = torch.bmm(do_block, values_here.transpose(1, 2))  # dP, (n, slots, S)
                else:
                    # dP into the rounded probabilities' buffer (read for the last time above)
                    grad_scores = torch.bmm(do_block, values_here.transpose(1, 2), out=probs)
                bias_grad = (
                    None if grad_shared is None else grad_map_bias[run.first_map : run.first_map + run.maps, :slots]
                )
                _softmax_grad(grad_scores, float_probs, d_block, bias_grad, views.float_grad_scores, native)  # dS
                torch.bmm(grad_scores, keys_here[..., :head_dim], out=grad_q.flatten(0, 1)[first : first + n, :slots])
                _add_grad_windows(grad_scores.transpose(1, 2), q_block[..., :head_dim], grad_k_buffer, views, layout)
            _exchange(
                grads[0][here], _chunk_grid(grad_q[:maps], layout).unflatten(0, by_map), 0, 0, layout, "from_grid"
            )
            _fold_key_buffer(grad_k_buffer[:maps].unflatten(0, by_map), layout, grads[1][here], grads[3][here])
            _fold_key_buffer(grad_v_buffer[:maps].unflatten(0, by_map), layout, grads[2][here], grads[4][here])
            if grad_shared is not None:
                grad_shared[here[1]] += grad_map_bias[:maps].view(*by_map, *shared.shape[1:]).sum(0)
    finally:
        workspace.set_key_extents(None)
    return (*grads, None if grad_shared is None else grad_shared.to(shared.dtype))


def _add_grad_windows(left, right, grad_buffer, views: _RunViews, layout: _Layout) -> None:
    """grad_buffer (group, blocks, block_keys, M) += the run's window gradients left @ right (n, S, M), the adjoint
    of reading its windows. Slot block s of chunk t's window is buffer block t + s, so each slot block goes to its
    buffer blocks in one step, whose targets are distinct blocks: straight from the product (``baddbmm_``) for a
    run within one chunk row, whose targets are one strided view; through ``window_grads`` for a gathered one."""
    run, keys_per_block = views.run, layout.block_keys
    if run.gathered:
        parts = torch.bmm(left, right, out=views.window_grads).view(
            run.maps, run.rows, run.cols, layout.span, keys_per_block, -1
        )
        for s in range(layout.span):
            _windows(grad_buffer, layout, run, keys_per_block, s).add_(parts[:, :, :, s])
        return
    for s in range(layout.span):
        target = _windows(grad_buffer, layout, run, keys_per_block, s)  # (n, keys per block, M)
        target.baddbmm_(left[:, s * keys_per_block : (s + 1) * keys_per_block], right)


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
    # float32 in reduced precision, where bias and softmax are added and computed in float32 (see _Workspace)
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
