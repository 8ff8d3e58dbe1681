"""Fast longformer attention on CPU: batched matrix products over blocks of chunks.

Layout. The query map is cut into W x W chunks; query chunk t = i * grid_width + j holds the W^2
queries of chunk row i, column j (``grid_width`` may exceed the number of chunk columns: the extra
"junk" chunks are computed and thrown away, which is what makes the key windows below uniform).

Keys. In the sliding-chunk and exact modes a query chunk sees the 3x3 chunks around it. The key map,
zero-padded by one chunk on every side, is copied once into a buffer whose block t stacks the three
chunks of padded column j in rows i, i+1, i+2 (plus the G global keys): 3 copies instead of 9. With
``grid_width`` = chunk columns + 2, the nine chunks of query chunk t are then blocks t, t+1, t+2, one
contiguous stretch of memory, so every chunk's key window is a strided *view* (overlapping windows)
and the scores are one ``baddbmm`` per block of chunks. Random shifting (own chunk + one neighbour)
copies the two chunks per query chunk instead.

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
import torch.nn.functional as F

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
    grid_width: int  # query chunks per chunk row, junk included
    num_query_chunks: int  # mx * grid_width
    span: int  # buffer blocks one key window covers (3, or 1 for random shifting)
    block_keys: int  # key rows per buffer block: chunks * W^2 + G
    num_blocks: int  # buffer blocks, including the tail only junk chunks read

    @property
    def window_keys(self) -> int:  # S, key slots per query chunk
        return self.span * self.block_keys


def _layout(height: int, width: int, window: int, neighbor: int | None, num_global: int) -> _Layout:
    mx, my = num_chunks(height, width, window)
    w2 = window * window
    if neighbor is None:
        grid_width = my + 2
        return _Layout(height, width, window, None, num_global, mx, my, grid_width, mx * grid_width, 3,
                       3 * w2 + num_global, mx * grid_width + 2)
    return _Layout(height, width, window, neighbor, num_global, mx, my, my, mx * my, 1, 2 * w2 + num_global, mx * my)


@lru_cache(maxsize=64)
def _key_padding(layout: _Layout, device: str) -> torch.Tensor:
    """(num_blocks, block_keys - G) bool: which local key rows of the buffer lie in the zero padding."""
    w, mx, my = layout.window, layout.chunk_rows, layout.chunk_cols
    inner_row = torch.arange(w).repeat_interleave(w)  # (W^2,)
    inner_col = torch.arange(w).repeat(w)
    if layout.neighbor is None:
        # block (i, c) holds padded chunks (i + di, c), di = 0..2; padded chunk (a, b) covers map rows
        # (a - 1) * W .. and columns (b - 1) * W ..
        block = torch.arange(mx * layout.grid_width)
        i, c = block // layout.grid_width, block % layout.grid_width
        di = torch.arange(3)
        rows = (i[:, None, None] + di[None, :, None] - 1) * w + inner_row  # (N, 3, W^2)
        cols = ((c[:, None, None] - 1) * w + inner_col).expand_as(rows)
    else:
        block = torch.arange(mx * my)
        i, j = block // my, block % my
        dr, dc = NEIGHBOR_OFFSETS[layout.neighbor]
        chunk_r = torch.stack([i, i + dr], 1)[:, :, None]  # own chunk, then the neighbour: (N, 2, 1)
        chunk_c = torch.stack([j, j + dc], 1)[:, :, None]
        rows, cols = chunk_r * w + inner_row, chunk_c * w + inner_col
    padding = (rows < 0) | (rows >= layout.height) | (cols < 0) | (cols >= layout.width)
    padding = padding.reshape(padding.shape[0], -1)
    tail = layout.num_blocks - padding.shape[0]  # blocks only junk chunks read: all padding
    padding = torch.cat([padding, padding.new_ones(tail, padding.shape[1])])
    return padding.to(device)


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


def _query_chunks(tensor: torch.Tensor, layout: _Layout, extra_feature: float | None) -> torch.Tensor:
    """(BH, L, M) -> (BH, N, W^2, M [+1]) query chunks in the grid order, junk and padding zero."""
    bh, _, m = tensor.shape
    w, mx = layout.window, layout.chunk_rows
    image = tensor.view(bh, layout.height, layout.width, m)
    image = F.pad(image, (0, 0, 0, layout.grid_width * w - layout.width, 0, mx * w - layout.height))
    chunks = image.view(bh, mx, w, layout.grid_width, w, m).transpose(2, 3)
    out = tensor.new_empty(bh, mx, layout.grid_width, w, w, m + (extra_feature is not None))
    out[..., :m] = chunks
    if extra_feature is not None:
        out[..., m] = extra_feature
    return out.view(bh, layout.num_query_chunks, w * w, -1)


def _from_query_chunks(chunks: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """(BH, N, W^2, M) -> (BH, L, M), dropping junk chunks and padding."""
    bh, _, _, m = chunks.shape
    w, mx = layout.window, layout.chunk_rows
    image = chunks.view(bh, mx, layout.grid_width, w, w, m).transpose(2, 3)
    image = image.reshape(bh, mx * w, layout.grid_width * w, m)[:, : layout.height, : layout.width]
    return image.reshape(bh, layout.height * layout.width, m)


def _padded_key_chunks(tensor: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """(BH, L, M) -> (BH, mx+2, my+2, W, W, M) view of the map zero-padded by one chunk on every side."""
    bh, _, m = tensor.shape
    w, mx, my = layout.window, layout.chunk_rows, layout.chunk_cols
    image = tensor.view(bh, layout.height, layout.width, m)
    image = F.pad(image, (0, 0, w, w + my * w - layout.width, w, w + mx * w - layout.height))
    return image.view(bh, mx + 2, w, my + 2, w, m).transpose(2, 3)


def _key_buffer(local: torch.Tensor, global_: torch.Tensor, layout: _Layout, flag: float | None) -> torch.Tensor:
    """Keys (or values) of every buffer block, (BH, num_blocks, block_keys, M [+1]).

    local: (BH, L, M); global_: (BH, G, M). With ``flag`` set, an extra feature is 0 for map tokens
    and globals and ``flag`` for the zero padding.
    """
    bh, _, m = local.shape
    w2, g = layout.window**2, layout.num_global
    mx, my = layout.chunk_rows, layout.chunk_cols
    padded = _padded_key_chunks(local, layout)
    w = layout.window
    buffer = local.new_empty(bh, layout.num_blocks, layout.block_keys, m + (flag is not None))
    if layout.neighbor is None:
        buffer[:, mx * layout.grid_width :] = 0  # tail blocks, read only by junk chunks
        stacked = buffer[:, : mx * layout.grid_width, : 3 * w2, :m].view(bh, mx, layout.grid_width, 3, w, w, m)
        for di in range(3):
            stacked[:, :, :, di] = padded[:, di : di + mx]
    else:
        dr, dc = NEIGHBOR_OFFSETS[layout.neighbor]
        pairs = buffer[:, :, : 2 * w2, :m].view(bh, mx, my, 2, w, w, m)
        pairs[:, :, :, 0] = padded[:, 1 : 1 + mx, 1 : 1 + my]
        pairs[:, :, :, 1] = padded[:, 1 + dr : 1 + dr + mx, 1 + dc : 1 + dc + my]
    if g:
        buffer[:, :, -g:, :m] = global_[:, None]
    if flag is not None:
        padding = _key_padding(layout, str(local.device))
        buffer[:, :, : buffer.shape[2] - g, m] = padding.to(local.dtype) * flag
        buffer[:, :, buffer.shape[2] - g :, m] = 0.0  # globals are never masked
    return buffer


def _fold_key_buffer(grad: torch.Tensor, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjoint of :func:`_key_buffer` (without the flag): (BH, L, M) local and (BH, G, M) global grads."""
    bh, _, _, m = grad.shape
    w, w2, g = layout.window, layout.window**2, layout.num_global
    mx, my = layout.chunk_rows, layout.chunk_cols
    padded = grad.new_zeros(bh, mx + 2, my + 2, w2, m)
    if layout.neighbor is None:
        stacked = grad[:, : mx * layout.grid_width, : 3 * w2].reshape(bh, mx, layout.grid_width, 3, w2, m)
        for di in range(3):
            padded[:, di : di + mx] += stacked[:, :, :, di]
    else:
        dr, dc = NEIGHBOR_OFFSETS[layout.neighbor]
        pairs = grad[:, :, : 2 * w2].reshape(bh, mx, my, 2, w2, m)
        padded[:, 1 : 1 + mx, 1 : 1 + my] += pairs[:, :, :, 0]
        padded[:, 1 + dr : 1 + dr + mx, 1 + dc : 1 + dc + my] += pairs[:, :, :, 1]
    image = padded.view(bh, mx + 2, my + 2, w, w, m).transpose(2, 3).reshape(bh, (mx + 2) * w, (my + 2) * w, m)
    local = image[:, w : w + layout.height, w : w + layout.width].reshape(bh, layout.height * layout.width, m)
    global_ = grad[:, :, grad.shape[2] - g :].sum(1) if g else grad.new_zeros(bh, 0, m)
    return local, global_


def _windows(buffer: torch.Tensor, layout: _Layout, features: int) -> torch.Tensor:
    """(num_blocks, block_keys, F) buffer of one head -> (N, S, features) key windows, a view."""
    rows, cols = buffer.stride(0), buffer.stride(1)
    return buffer.as_strided(
        (layout.num_query_chunks, layout.window_keys, features), (rows, cols, 1), buffer.storage_offset()
    )


def _chunks_per_block(layout: _Layout, element_size: int) -> int:
    return max(1, _BLOCK_BYTES // (layout.window**2 * layout.window_keys * element_size))


def _flag_value(dtype: torch.dtype) -> float:
    # Finite, so that no 0 * inf can appear inside the matrix product; exp() of it is exactly 0.
    return torch.finfo(dtype).min / 4


def _head_inputs(layout, queries, keys, values, global_keys, global_values):
    """Query chunks (N, W^2, M+1) and key/value buffers of one head; inputs (1, L, M) and (1, G, M)."""
    flag = _flag_value(queries.dtype)
    q_chunks = _query_chunks(queries, layout, 1.0)[0]
    k_buffer = _key_buffer(keys, global_keys, layout, flag)[0]
    v_buffer = _key_buffer(values, global_values, layout, None)[0]
    return q_chunks, k_buffer, v_buffer


class _BlockedLongformerAttention(torch.autograd.Function):
    """Forward and a recomputing backward; heads are processed one at a time to keep buffers small."""

    @staticmethod
    def forward(ctx, queries, keys, values, global_keys, global_values, shared, layout):
        # queries, keys, values: (B, H, L, M); global_*: (B, H, G, M); shared: (H, W^2, S)
        batch, heads, length, head_dim = queries.shape
        flat = [t.reshape(batch * heads, -1, head_dim) for t in (queries, keys, values, global_keys, global_values)]
        n, w2 = layout.num_query_chunks, layout.window**2
        step = _chunks_per_block(layout, queries.element_size())
        output = queries.new_empty(batch * heads, length, head_dim)
        out = queries.new_empty(n, w2, head_dim)
        for index in range(batch * heads):
            q_chunks, k_buffer, v_buffer = _head_inputs(layout, *(t[index : index + 1] for t in flat))
            k_windows = _windows(k_buffer, layout, head_dim + 1)  # (N, S, M+1), overlapping views
            v_windows = _windows(v_buffer, layout, head_dim)  # (N, S, M)
            bias = shared[index % heads][None]  # (1, W^2, S)
            for start in range(0, n, step):
                stop = min(start + step, n)
                scores = torch.baddbmm(bias, q_chunks[start:stop], k_windows[start:stop].transpose(1, 2))
                torch.softmax(scores, -1, out=scores)
                torch.bmm(scores, v_windows[start:stop], out=out[start:stop])
            output[index] = _from_query_chunks(out[None], layout)[0]

        output = output.view(batch, heads, length, head_dim)
        ctx.save_for_backward(queries, keys, values, global_keys, global_values, shared, output)
        ctx.layout = layout
        return output

    @staticmethod
    def backward(ctx, grad_output):
        queries, keys, values, global_keys, global_values, shared, output = ctx.saved_tensors
        layout = ctx.layout
        batch, heads, length, head_dim = queries.shape
        n, w2, g = layout.num_query_chunks, layout.window**2, layout.num_global
        flat = [t.reshape(batch * heads, -1, head_dim) for t in (queries, keys, values, global_keys, global_values)]
        grad_output = grad_output.reshape(batch * heads, length, head_dim)
        # softmax backward: dS = P * (dP - sum(dO * O)) per query
        delta = (grad_output * output.reshape(batch * heads, length, head_dim)).sum(-1, keepdim=True)

        grads = [torch.empty_like(t) for t in flat]  # q, k, v, global k, global v
        grad_shared = torch.zeros_like(shared) if ctx.needs_input_grad[5] else None
        grad_q = queries.new_empty(n, w2, head_dim)
        step = _chunks_per_block(layout, queries.element_size())
        keys_per_block = layout.block_keys
        for index in range(batch * heads):
            # Rebuilt rather than saved: one copy each, cheaper than keeping them alive between passes.
            q_chunks, k_buffer, v_buffer = _head_inputs(layout, *(t[index : index + 1] for t in flat))
            k_windows = _windows(k_buffer, layout, head_dim + 1)
            v_windows = _windows(v_buffer, layout, head_dim)
            grad_chunks = _query_chunks(grad_output[index : index + 1], layout, None)[0]  # (N, W^2, M)
            delta_chunks = _query_chunks(delta[index : index + 1], layout, None)[0]  # (N, W^2, 1)
            grad_k_buffer = queries.new_zeros(layout.num_blocks, keys_per_block, head_dim)
            grad_v_buffer = torch.zeros_like(grad_k_buffer)
            bias = shared[index % heads][None]
            for start in range(0, n, step):
                stop = min(start + step, n)
                q_block = q_chunks[start:stop]  # (n_b, W^2, M+1)
                k_block = k_windows[start:stop]  # (n_b, S, M+1)
                do_block = grad_chunks[start:stop]  # (n_b, W^2, M)
                # recomputed: a fused softmax is cheaper than exp(S - logsumexp) over masked entries
                probs = torch.baddbmm(bias, q_block, k_block.transpose(1, 2))
                torch.softmax(probs, -1, out=probs)  # (n_b, W^2, S)
                grad_values = torch.bmm(probs.transpose(1, 2), do_block)  # (n_b, S, M)
                grad_scores = torch.bmm(do_block, v_windows[start:stop].transpose(1, 2))
                grad_scores.sub_(delta_chunks[start:stop]).mul_(probs)  # dS, (n_b, W^2, S)
                if grad_shared is not None:
                    grad_shared[index % heads] += grad_scores.sum(0)
                torch.bmm(grad_scores, k_block[..., :head_dim], out=grad_q[start:stop])
                grad_keys = torch.bmm(grad_scores.transpose(1, 2), q_block[..., :head_dim])  # (n_b, S, M)
                # windows overlap: slot block b of chunk t's window is buffer block t + b
                for b in range(layout.span):
                    part = slice(b * keys_per_block, (b + 1) * keys_per_block)
                    grad_k_buffer[start + b : stop + b] += grad_keys[:, part]
                    grad_v_buffer[start + b : stop + b] += grad_values[:, part]
            grads[0][index] = _from_query_chunks(grad_q[None], layout)[0]
            grads[1][index], grads[3][index] = (t[0] for t in _fold_key_buffer(grad_k_buffer[None], layout))
            grads[2][index], grads[4][index] = (t[0] for t in _fold_key_buffer(grad_v_buffer[None], layout))

        grad_queries, grad_keys, grad_values, grad_global_keys, grad_global_values = (
            grad.view(batch, heads, -1, head_dim) for grad in grads
        )
        return grad_queries, grad_keys, grad_values, grad_global_keys, grad_global_values, grad_shared, None


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
    return _BlockedLongformerAttention.apply(
        local_queries.contiguous(),
        local_keys.contiguous(),
        local_values.contiguous(),
        global_keys.contiguous(),
        global_values.contiguous(),
        shared,
        layout,
    )


__all__ = ["longformer_attention_blocked"]

