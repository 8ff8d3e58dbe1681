"""Fast longformer attention on CPU: batched matrix products over blocks of chunks.

Layout. The query map is zero-padded to whole W x W chunks; chunk (i, j) holds W^2 queries.

Keys. In the sliding-chunk and exact modes a query chunk sees the 3x3 chunks around it. The key map,
zero-padded by one chunk on every side, is copied once into a buffer whose block (i, c) stacks the
three chunks of padded column c in padded rows i, i+1, i+2 (plus the G global keys): 3 copies
instead of 9. The nine chunks of query chunk (i, j) are then blocks (i, j), (i, j+1), (i, j+2), one
contiguous stretch of memory, so the key windows of a run of chunks in one chunk row are a strided
*view* (overlapping windows) and their scores are one ``baddbmm``. Random shifting (own chunk + one
neighbour) copies the two chunks per query chunk instead.

Masks. Which keys a query may see is the product of two simpler rules:
- keys in the zero padding are never seen: every key gets one extra feature, 0 for map tokens and a
  huge negative number for padding, and every query an extra feature 1, so the matrix product itself
  adds the padding mask (no per-chunk mask tensor, no border special cases);
- everything else (relative bias, the exact window's square, local-to-global bias, and the global
  copies in blocks t+1 and t+2 that must not count twice) depends only on (query slot, key slot), so
  it is one additive (H, W^2, S) tensor shared by all chunks, the ``input`` of ``baddbmm``.

Memory. Scores exist for one block of chunks at a time (sized to stay in cache). The backward is a
custom autograd function that keeps only q, k, v, the output and the per-query log-sum-exp, and
recomputes each block's probabilities (as flash attention does), so no (C, W^2, S) tensor is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .geometry import NEIGHBOR_OFFSETS, chunk_offsets, num_chunks, relative_bias_index

# Scores of one block of chunks are kept near this size, so that softmax and the second product
# read them from cache.
_BLOCK_BYTES = 2 * 1024 * 1024


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
def _padding_map(layout: _Layout, device: str) -> torch.Tensor:
    """((mx+2) W, (my+2) W) bool: the zero padding around the map in the padded key image."""
    w = layout.window
    rows = torch.arange((layout.chunk_rows + 2) * w)
    cols = torch.arange((layout.chunk_cols + 2) * w)
    inside_rows = (rows >= w) & (rows < w + layout.height)
    inside_cols = (cols >= w) & (cols < w + layout.width)
    return (~(inside_rows[:, None] & inside_cols[None])).to(device)


@lru_cache(maxsize=64)
def _slot_geometry(layout: _Layout, exact: bool, device: str):
    """Per (query slot, key slot): bias-table row (W^2, S), allowed (W^2, S), global index or -1 (S,)."""
    w, g = layout.window, layout.num_global
    inner_row = torch.arange(w).repeat_interleave(w)
    inner_col = torch.arange(w).repeat(w)
    if layout.neighbor is None:
        # slot order: dj (block t + dj), then [di-th chunk of the block, inner position | global]
        offsets = [(di - 1, dj - 1) for dj in range(3) for di in range(3)]
    else:
        offsets = list(chunk_offsets(layout.neighbor))
    chunks_per_block = len(offsets) // layout.span
    slot_row, slot_col, slot_global = [], [], []
    for block in range(layout.span):
        for dr, dc in offsets[block * chunks_per_block:(block + 1) * chunks_per_block]:
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


def _shared_scores_bias(layout, exact, heads, dtype, device, relative_bias_table, local_to_global_bias):
    """(H, W^2, S) additive term shared by every chunk: relative bias, l2g bias and -inf masks."""
    bias_row, allowed, slot_global = _slot_geometry(layout, bool(exact), str(device))
    w2, s = bias_row.shape
    if relative_bias_table is not None:
        shared = relative_bias_table.to(dtype)[bias_row].permute(2, 0, 1)  # (H, W^2, S)
        shared = torch.where(slot_global[None, None] == -1, shared, 0.0)
    else:
        shared = torch.zeros(heads, w2, s, dtype=dtype, device=device)
    if local_to_global_bias is not None and layout.num_global:
        to_global = local_to_global_bias.to(dtype)[:, slot_global.clamp(min=0)]  # (H, S)
        shared = shared + torch.where(slot_global >= 0, to_global, 0.0)[:, None, :]
    return shared.masked_fill(~allowed, float("-inf")).contiguous()


def _shared_scores_bias(layout, exact, heads, dtype, device, relative_bias_table, local_to_global_bias):
    """(H, W^2, S) additive term shared by every chunk: relative bias, l2g bias and -inf masks."""
    bias_row, allowed, slot_global = _slot_geometry(layout, bool(exact), str(device))
    w2, s = bias_row.shape
    if relative_bias_table is not None:
        shared = relative_bias_table.to(dtype)[bias_row].permute(2, 0, 1)  # (H, W^2, S)
        shared = torch.where(slot_global[None, None] == -1, shared, 0.0)
    else:
        shared = torch.zeros(heads, w2, s, dtype=dtype, device=device)
    if local_to_global_bias is not None and layout.num_global:
        to_global = local_to_global_bias.to(dtype)[:, slot_global.clamp(min=0)]  # (H, S)
        shared = shared + torch.where(slot_global >= 0, to_global, 0.0)[:, None, :]
    return shared.masked_fill(~allowed, float("-inf")).contiguous()


class _Workspace:
    """Buffers of one call, allocated once and refilled for every head.

    Fresh multi-megabyte allocations cost page faults on every use; reusing them across heads (and
    keeping the zero padding, which never changes) leaves only the copies that move data.
    """

    def __init__(self, layout: _Layout, head_dim: int, dtype: torch.dtype, device: torch.device):
        w, mx, my, m = layout.window, layout.chunk_rows, layout.chunk_cols, head_dim
        self.layout, self.head_dim = layout, m
        # query chunks with one extra feature 1; queries in the padding are all ones (their outputs
        # are dropped and their gradients are zero)
        self.query_chunks = torch.ones(mx * my, w * w, m + 1, dtype=dtype, device=device)
        # keys and values padded by one chunk on every side; the keys' extra feature is the flag
        # that masks the padding: q' . k' = q . k + flag there
        self.key_image = torch.zeros((mx + 2) * w, (my + 2) * w, m + 1, dtype=dtype, device=device)
        flag = torch.finfo(dtype).min / 4  # finite: no 0 * inf inside the product; exp() of it is 0
        self.key_image[..., m] = _padding_map(layout, str(device)).to(dtype) * flag
        self.value_image = torch.zeros((mx + 2) * w, (my + 2) * w, m, dtype=dtype, device=device)
        self.key_buffer = torch.empty(layout.num_blocks, layout.block_keys, m + 1, dtype=dtype, device=device)
        self.value_buffer = torch.empty(layout.num_blocks, layout.block_keys, m, dtype=dtype, device=device)
        if layout.num_global:
            self.key_buffer[:, -layout.num_global :, m] = 0.0  # globals are never masked

    def load(self, queries, keys, values, global_keys, global_values):
        """Fill the buffers with one head: (L, M) tokens and (G, M) globals."""
        layout, m = self.layout, self.head_dim
        h, w, win = layout.height, layout.width, layout.window
        _exchange(queries, self.query_chunks, layout, to_chunks=True)
        self.key_image[win : win + h, win : win + w, :m] = keys.reshape(h, w, m)
        self.value_image[win : win + h, win : win + w] = values.reshape(h, w, m)
        _stack_chunks(self.key_image, global_keys, layout, self.key_buffer)
        _stack_chunks(self.value_image, global_values, layout, self.value_buffer)
        return self.query_chunks, self.key_buffer, self.value_buffer


def _image_chunks(image: torch.Tensor, window: int) -> torch.Tensor:
    """(a W, b W, F) -> (a, b, W, W, F) view."""
    rows, cols, features = image.shape
    return image.view(rows // window, window, cols // window, window, features).transpose(1, 2)


def _stack_chunks(image: torch.Tensor, global_tokens: torch.Tensor, layout: _Layout, buffer: torch.Tensor) -> None:
    """Padded key image ((mx+2) W, (my+2) W, F) -> buffer blocks (num_blocks, block_keys, F).

    Block (i, c) holds padded chunks (i, c), (i+1, c), (i+2, c) (3x3 windows), or the own chunk and the
    drawn neighbour (random shifting); then the G globals. Whole W x W x F chunks move in each copy.
    """
    w, mx, my, g = layout.window, layout.chunk_rows, layout.chunk_cols, layout.num_global
    features = image.shape[-1]
    padded = _image_chunks(image, w)  # (mx+2, my+2, W, W, F)
    blocks = buffer.view(mx, layout.block_pitch, layout.block_keys, features)
    if layout.neighbor is None:
        stacked = blocks[:, :, : 3 * w * w].view(mx, my + 2, 3, w, w, features)
        for di in range(3):
            stacked[:, :, di] = padded[di : di + mx]
    else:
        dr, dc = NEIGHBOR_OFFSETS[layout.neighbor]
        pairs = blocks[:, :, : 2 * w * w].view(mx, my, 2, w, w, features)
        pairs[:, :, 0] = padded[1 : 1 + mx, 1 : 1 + my]
        pairs[:, :, 1] = padded[1 + dr : 1 + dr + mx, 1 + dc : 1 + dc + my]
    if g:
        buffer[:, -g:, : global_tokens.shape[-1]] = global_tokens


def _chunk_pieces(height: int, width: int, window: int):
    """Slices pairing the map with the chunk grid: whole chunks first, then the partial last row/column.

    Yields (image rows, image cols, chunk rows, inner rows, chunk cols, inner cols) as slices, so that
    a map (height, width, F) and chunks (mx, W, my, W, F) exchange data with one copy per piece.
    """
    full_rows, full_cols = height // window, width // window
    row_parts = [(slice(0, full_rows * window), slice(0, full_rows), slice(None))]
    if height % window:
        row_parts.append((slice(full_rows * window, height), full_rows, slice(0, height % window)))
    col_parts = [(slice(0, full_cols * window), slice(0, full_cols), slice(None))]
    if width % window:
        col_parts.append((slice(full_cols * window, width), full_cols, slice(0, width % window)))
    for image_rows, chunk_rows, inner_rows in row_parts:
        for image_cols, chunk_cols, inner_cols in col_parts:
            yield image_rows, image_cols, chunk_rows, inner_rows, chunk_cols, inner_cols


def _exchange(image: torch.Tensor, chunks: torch.Tensor, layout: _Layout, to_chunks: bool) -> None:
    """Copy a map (L, F) into chunks (mx * my, W^2, >= F) or back, without touching the padding."""
    w, mx, my = layout.window, layout.chunk_rows, layout.chunk_cols
    features = image.shape[-1]
    image = image.view(layout.height, layout.width, features)
    grid = chunks.view(mx, my, w, w, -1)[..., :features].transpose(1, 2)  # (mx, W, my, W, F)
    for image_rows, image_cols, chunk_rows, inner_rows, chunk_cols, inner_cols in _chunk_pieces(
        layout.height, layout.width, w
    ):
        target = grid[chunk_rows, inner_rows, chunk_cols, inner_cols]
        source = image[image_rows, image_cols].view(target.shape)
        if to_chunks:
            target.copy_(source)
        else:
            source.copy_(target)


def _fold_key_buffer(grad: torch.Tensor, layout: _Layout, out: torch.Tensor, out_global: torch.Tensor) -> None:
    """Adjoint of :func:`_key_buffer` (without the flag): grads into ``out`` (L, M) and ``out_global`` (G, M)."""
    m, g = grad.shape[-1], layout.num_global
    w, mx, my = layout.window, layout.chunk_rows, layout.chunk_cols
    padded = grad.new_zeros(mx + 2, my + 2, w, w, m)
    blocks = grad.view(mx, layout.block_pitch, layout.block_keys, m)
    if layout.neighbor is None:
        stacked = blocks[:, :, : 3 * w * w].reshape(mx, my + 2, 3, w, w, m)
        for di in range(3):
            padded[di : di + mx] += stacked[:, :, di]
    else:
        dr, dc = NEIGHBOR_OFFSETS[layout.neighbor]
        pairs = blocks[:, :, : 2 * w * w].reshape(mx, my, 2, w, w, m)
        padded[1 : 1 + mx, 1 : 1 + my] += pairs[:, :, 0]
        padded[1 + dr : 1 + dr + mx, 1 + dc : 1 + dc + my] += pairs[:, :, 1]
    image = padded.transpose(1, 2).reshape((mx + 2) * w, (my + 2) * w, m)
    out.view(layout.height, layout.width, m).copy_(image[w : w + layout.height, w : w + layout.width])
    if g:
        out_global.copy_(grad[:, layout.block_keys - g :].sum(0))


def _runs(layout: _Layout, element_size: int):
    """Runs of query chunks within one chunk row, each small enough for its scores to stay in cache.

    Yields (first query chunk, first buffer block of its window, number of chunks).
    """
    per_run = max(1, _BLOCK_BYTES // (layout.window**2 * layout.window_keys * element_size))
    my = layout.chunk_cols
    for i in range(layout.chunk_rows):
        for j in range(0, my, per_run):
            yield i * my + j, i * layout.block_pitch + j, min(per_run, my - j)


def _windows(buffer: torch.Tensor, layout: _Layout, first_block: int, count: int, features: int) -> torch.Tensor:
    """(count, S, features) overlapping key windows of ``count`` chunks, a view into the buffer."""
    rows, cols = buffer.stride(0), buffer.stride(1)
    return buffer.as_strided(
        (count, layout.window_keys, features), (rows, cols, 1), buffer.storage_offset() + first_block * rows
    )


class _BlockedLongformerAttention(torch.autograd.Function):
    """Forward and a recomputing backward, one head at a time (small buffers, no (C, W^2, S) tensor)."""

    @staticmethod
    def forward(ctx, queries, keys, values, global_keys, global_values, shared, layout):
        # queries, keys, values: (B, H, L, M); global_*: (B, H, G, M); shared: (H, W^2, S)
        batch, heads, length, head_dim = queries.shape
        w2 = layout.window**2
        # (B, L, H, M) storage: what the output projection reads, so its reshape needs no copy
        output = queries.new_empty(batch, length, heads, head_dim).permute(0, 2, 1, 3)
        out = queries.new_empty(layout.chunk_rows * layout.chunk_cols, w2, head_dim)
        workspace = _Workspace(layout, head_dim, queries.dtype, queries.device)
        for b, h in ((b, h) for b in range(batch) for h in range(heads)):
            inputs = (t[b, h] for t in (queries, keys, values, global_keys, global_values))
            q_chunks, k_buffer, v_buffer = workspace.load(*inputs)
            bias = shared[h][None]  # (1, W^2, S)
            for first, block, count in _runs(layout, queries.element_size()):
                k_windows = _windows(k_buffer, layout, block, count, head_dim + 1)  # (n, S, M+1)
                # bmm then add: cheaper than baddbmm, which first copies the broadcast bias into its output
                scores = torch.bmm(q_chunks[first : first + count], k_windows.transpose(1, 2)).add_(bias)
                torch.softmax(scores, -1, out=scores)  # (n, W^2, S)
                v_windows = _windows(v_buffer, layout, block, count, head_dim)
                torch.bmm(scores, v_windows, out=out[first : first + count])
            _exchange(output[b, h], out, layout, to_chunks=False)

        ctx.save_for_backward(queries, keys, values, global_keys, global_values, shared, output)
        ctx.layout = layout
        return output

    @staticmethod
    def backward(ctx, grad_output):
        queries, keys, values, global_keys, global_values, shared, output = ctx.saved_tensors
        layout = ctx.layout
        batch, heads, length, head_dim = queries.shape
        w2, keys_per_block = layout.window**2, layout.block_keys
        # softmax backward: dS = P * (dP - sum(dO * O)) per query
        delta = (grad_output * output).sum(-1, keepdim=True)  # (B, H, L, 1)
        grad_output = grad_output.contiguous() if grad_output.stride(-1) != 1 else grad_output

        grads = [torch.empty_like(t) for t in (queries, keys, values, global_keys, global_values)]
        grad_shared = torch.zeros_like(shared) if ctx.needs_input_grad[5] else None
        grad_q = queries.new_empty(layout.chunk_rows * layout.chunk_cols, w2, head_dim)
        workspace = _Workspace(layout, head_dim, queries.dtype, queries.device)
        grad_k_buffer = queries.new_empty(layout.num_blocks, keys_per_block, head_dim)
        grad_v_buffer = torch.empty_like(grad_k_buffer)
        grad_chunks = queries.new_zeros(layout.chunk_rows * layout.chunk_cols, w2, head_dim)
        delta_chunks = queries.new_zeros(layout.chunk_rows * layout.chunk_cols, w2, 1)
        for b, h in ((b, h) for b in range(batch) for h in range(heads)):
            # rebuilt rather than saved: a copy each, cheaper than keeping them alive between passes
            inputs = (t[b, h] for t in (queries, keys, values, global_keys, global_values))
            q_chunks, k_buffer, v_buffer = workspace.load(*inputs)
            _exchange(grad_output[b, h], grad_chunks, layout, to_chunks=True)  # (C, W^2, M), padding 0
            _exchange(delta[b, h], delta_chunks, layout, to_chunks=True)  # (C, W^2, 1)
            grad_k_buffer.zero_()
            grad_v_buffer.zero_()
            bias = shared[h][None]
            for first, block, count in _runs(layout, queries.element_size()):
                q_block = q_chunks[first : first + count]  # (n, W^2, M+1)
                k_block = _windows(k_buffer, layout, block, count, head_dim + 1)  # (n, S, M+1)
                do_block = grad_chunks[first : first + count]  # (n, W^2, M)
                # recomputed: a fused softmax is cheaper than exp(S - logsumexp) over masked entries
                probs = torch.bmm(q_block, k_block.transpose(1, 2)).add_(bias)
                torch.softmax(probs, -1, out=probs)  # (n, W^2, S)
                grad_values = torch.bmm(probs.transpose(1, 2), do_block)  # (n, S, M)
                grad_scores = torch.bmm(do_block, _windows(v_buffer, layout, block, count, head_dim).transpose(1, 2))
                grad_scores.sub_(delta_chunks[first : first + count]).mul_(probs)  # dS, (n, W^2, S)
                if grad_shared is not None:
                    grad_shared[h] += grad_scores.sum(0)
                torch.bmm(grad_scores, k_block[..., :head_dim], out=grad_q[first : first + count])
                grad_keys = torch.bmm(grad_scores.transpose(1, 2), q_block[..., :head_dim])  # (n, S, M)
                # windows overlap: slot block s of chunk t's window is buffer block t + s
                for s in range(layout.span):
                    part = slice(s * keys_per_block, (s + 1) * keys_per_block)
                    grad_k_buffer[block + s : block + s + count] += grad_keys[:, part]
                    grad_v_buffer[block + s : block + s + count] += grad_values[:, part]
            _exchange(grads[0][b, h], grad_q, layout, to_chunks=False)
            _fold_key_buffer(grad_k_buffer, layout, grads[1][b, h], grads[3][b, h])
            _fold_key_buffer(grad_v_buffer, layout, grads[2][b, h], grads[4][b, h])
        return (*grads, grad_shared, None)


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
) -> torch.Tensor:
    """Blocked CPU path. Shapes as in :func:`vil_kernels.longformer_attention`; no attention dropout."""
    if dropout_p > 0:
        raise ValueError(
            "The 'blocked' longformer implementation has no attention dropout; use 'vectorized' (or 'auto', "
            "which picks it) when attention dropout is on."
        )
    chunk_offsets(neighbor)  # validates neighbor
    batch, heads, length, head_dim = local_queries.shape
    if length != height * width:
        raise ValueError(f"local_queries hold {length} tokens, but the map is {height}x{width}.")
    layout = _layout(height, width, window, neighbor, global_keys.shape[-2])
    shared = _shared_scores_bias(
        layout, exact, heads, local_queries.dtype, local_queries.device, relative_bias_table, local_to_global_bias
    )
    # Strided inputs (heads split off a fused projection) are fine: each head is read once, by a copy.
    return _BlockedLongformerAttention.apply(
        local_queries, local_keys, local_values, global_keys, global_values, shared, layout
    )


__all__ = ["longformer_attention_blocked"]

