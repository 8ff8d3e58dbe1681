"""vil_kernels: every longformer path against the dense reference (forward and gradients), and the reference itself."""

import itertools
import logging
import zlib

import pytest
import torch

from vil_kernels import (
    LONGFORMER_IMPLEMENTATIONS,
    NEIGHBOR_OFFSETS,
    longformer_attention,
    longformer_attention_flex,
    longformer_attention_reference,
    relative_bias_table_size,
)
from vil_kernels.longformer import allowed_keys, resolve_implementation


def case_seed(*case) -> int:
    """A seed fixed by a test case's parameters. Not hash(): hash(None) changes from process to process before
    Python 3.12, which made every case with neighbor=None draw new inputs (and a new use_bias) on each run."""
    return zlib.crc32(repr(case).encode())


def _inputs(batch, heads, height, width, num_global, head_dim, window, dtype, seed):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=dtype) * scale).requires_grad_()

    length = height * width
    return dict(
        local_queries=rand(batch, heads, length, head_dim),
        local_keys=rand(batch, heads, length, head_dim),
        local_values=rand(batch, heads, length, head_dim),
        global_keys=rand(batch, heads, num_global, head_dim),
        global_values=rand(batch, heads, num_global, head_dim),
        relative_bias_table=rand(relative_bias_table_size(window), heads, scale=2.0),
        local_to_global_bias=rand(heads, num_global, scale=2.0),
    )


def _run(implementation, tensors, height, width, window, exact, neighbor, use_bias):
    return longformer_attention(
        tensors["local_queries"],
        tensors["local_keys"],
        tensors["local_values"],
        tensors["global_keys"],
        tensors["global_values"],
        height,
        width,
        window,
        exact=exact,
        neighbor=neighbor,
        relative_bias_table=tensors["relative_bias_table"] if use_bias else None,
        local_to_global_bias=tensors["local_to_global_bias"] if use_bias else None,
        implementation=implementation,
    )


def _grads(output, tensors, grad_output):
    names = list(tensors)
    grads = torch.autograd.grad(
        output, [tensors[n] for n in names], grad_output, allow_unused=True, materialize_grads=True
    )
    return dict(zip(names, grads))


# Map sizes that are not multiples of the window, maps smaller than one chunk, and one exact fit.
SHAPES = [(9, 13), (10, 11), (3, 4), (15, 9), (14, 10)]
CASES = [
    (shape, window, num_global, exact, neighbor)
    for shape, window, num_global, (exact, neighbor) in itertools.product(
        SHAPES, (5, 7), (0, 1, 2), ((False, None), (True, None), (False, 2), (False, 7))
    )
]


# Paths with forward and backward on CPU; "flex" (CUDA only) is checked below.
CPU_PATHS = sorted(set(LONGFORMER_IMPLEMENTATIONS) - {"reference", "flex"})


@pytest.mark.parametrize("implementation", CPU_PATHS)
@pytest.mark.parametrize("shape,window,num_global,exact,neighbor", CASES)
def test_fast_path_matches_reference_forward_and_backward(implementation, shape, window, num_global, exact, neighbor):
    height, width = shape
    seed = case_seed(shape, window, num_global, exact, neighbor)
    tensors = _inputs(2, 3, height, width, num_global, 8, window, torch.float64, seed)
    use_bias = (seed % 2) == 0 or exact  # cover both with and without relative bias
    expected = _run("reference", tensors, height, width, window, exact, neighbor, use_bias)
    actual = _run(implementation, tensors, height, width, window, exact, neighbor, use_bias)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)

    grad_output = torch.randn_like(expected)
    expected_grads = _grads(expected, tensors, grad_output)
    actual_grads = _grads(actual, tensors, grad_output)
    for name in tensors:
        torch.testing.assert_close(actual_grads[name], expected_grads[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("implementation", ["auto"] + CPU_PATHS)
@pytest.mark.parametrize("exact,neighbor", [(False, None), (True, None), (False, 5)])
def test_fast_path_matches_reference_in_float32(implementation, exact, neighbor):
    check_float32_against_reference(implementation, exact, neighbor)


def check_float32_against_reference(implementation, exact, neighbor):
    """Outputs and every gradient of one float32 case (a 23x31 map at window 7, one global) against the reference."""
    height, width, window = 23, 31, 7
    tensors = _inputs(2, 3, height, width, 1, 32, window, torch.float32, 0)
    expected = _run("reference", tensors, height, width, window, exact, neighbor, True)
    actual = _run(implementation, tensors, height, width, window, exact, neighbor, True)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    grad_output = torch.randn_like(expected)
    expected_grads, actual_grads = _grads(expected, tensors, grad_output), _grads(actual, tensors, grad_output)
    for name in tensors:
        torch.testing.assert_close(actual_grads[name], expected_grads[name], rtol=1e-4, atol=1e-4, msg=name)


def _allowed_by_definition(height, width, window, exact, neighbor):
    """The rule of the spec written pair by pair in plain Python."""
    allowed = torch.zeros(height * width, height * width, dtype=torch.bool)
    for qr, qc, kr, kc in itertools.product(range(height), range(width), range(height), range(width)):
        if exact:
            ok = abs(qr - kr) <= window and abs(qc - kc) <= window
        else:
            dr, dc = kr // window - qr // window, kc // window - qc // window
            if neighbor is None:
                ok = abs(dr) <= 1 and abs(dc) <= 1
            else:
                ok = (dr, dc) in ((0, 0), NEIGHBOR_OFFSETS[neighbor])
        allowed[qr * width + qc, kr * width + kc] = ok
    return allowed


@pytest.mark.parametrize("exact,neighbor", [(False, None), (True, None), (False, 0), (False, 4), (False, 6)])
def test_reference_mask_is_the_spec_rule(exact, neighbor):
    height, width, window = 8, 11, 3
    torch.testing.assert_close(
        allowed_keys(height, width, window, exact, neighbor),
        _allowed_by_definition(height, width, window, exact, neighbor),
    )


def _dense_over_whole_map(tensors, height, width, window, exact, neighbor):
    """The rule over all L x L pairs at once, bias pair by pair: what the reference computes in slabs."""
    q, k, v, gk, gv = (
        tensors[n] for n in ("local_queries", "local_keys", "local_values", "global_keys", "global_values")
    )
    table, to_global = tensors["relative_bias_table"], tensors["local_to_global_bias"]
    span, side, length = 2 * window - 1, 4 * window - 1, height * width
    index = torch.empty(length, length, dtype=torch.long)
    for i, j in itertools.product(range(length), repeat=2):
        dr = max(-span, min(span, i // width - j // width))
        dc = max(-span, min(span, i % width - j % width))
        index[i, j] = (dr + span) * side + dc + span
    local = (q @ k.transpose(-1, -2) + table[index].permute(2, 0, 1)).masked_fill(
        ~_allowed_by_definition(height, width, window, exact, neighbor), float("-inf")
    )
    to_globals = q @ gk.transpose(-1, -2) + to_global[None, :, None, :]
    probs = torch.cat([to_globals, local], -1).softmax(-1)
    num_global = gk.shape[-2]
    return probs[..., :num_global] @ gv + probs[..., num_global:] @ v


@pytest.mark.parametrize("exact,neighbor", [(False, None), (True, None), (False, 3)])
def test_reference_in_slabs_equals_dense_attention_over_the_whole_map(exact, neighbor):
    """The reference takes one chunk row of queries at a time, and recomputes slabs in the backward."""
    height, width, window = 11, 8, 3  # four slabs, the last one partial
    tensors = _inputs(2, 2, height, width, 2, 4, window, torch.float64, 5)
    expected = _dense_over_whole_map(tensors, height, width, window, exact, neighbor)
    actual = _run("reference", tensors, height, width, window, exact, neighbor, True)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    grad_output = torch.randn_like(expected)
    expected_grads, actual_grads = _grads(expected, tensors, grad_output), _grads(actual, tensors, grad_output)
    for name in tensors:
        torch.testing.assert_close(actual_grads[name], expected_grads[name], rtol=1e-10, atol=1e-10, msg=name)


def test_interior_query_sees_nine_chunks_and_its_exact_square():
    window = 3
    allowed = allowed_keys(12, 12, window, exact=False, neighbor=None)
    interior = 4 * 12 + 4  # row 4, column 4: chunk (1, 1), all neighbours inside the map
    assert allowed[interior].sum() == 9 * window**2
    exact = allowed_keys(12, 12, window, exact=True, neighbor=None)
    assert exact[interior].sum() == (2 * window + 1) ** 2
    corner = allowed_keys(12, 12, window, exact=False, neighbor=None)[0]
    assert corner.sum() == 4 * window**2  # chunks (0,0), (0,1), (1,0), (1,1)


def test_reference_uses_the_original_bias_layout():
    """With zero queries and keys the weights are softmax(bias), bias = table[(dr + 2W-1)(4W-1) + dc + 2W-1]."""
    window, height, width = 2, 4, 4  # 2x2 chunks: query 0 in chunk (0, 0) sees the whole map
    table = torch.linspace(-3, 3, relative_bias_table_size(window), dtype=torch.float64)[:, None]
    zeros = torch.zeros(1, 1, height * width, 1, dtype=torch.float64)
    empty = torch.zeros(1, 1, 0, 1, dtype=torch.float64)
    key = 2 * width + 3  # row 2, column 3
    values = torch.zeros_like(zeros)
    values[0, 0, key, 0] = 1.0
    out = longformer_attention_reference(
        zeros, zeros, values, empty, empty, height, width, window, relative_bias_table=table
    )
    span, side = 2 * window - 1, 4 * window - 1
    # query (0, 0) minus key (r, c) is (-r, -c)
    bias = torch.stack([table[(-(k // width) + span) * side + (-(k % width) + span), 0] for k in range(height * width)])
    torch.testing.assert_close(out[0, 0, 0, 0], torch.softmax(bias, 0)[key])


def test_rejects_exact_window_with_random_shift_and_unknown_implementation():
    tensors = _inputs(1, 1, 5, 5, 1, 4, 3, torch.float32, 0)
    with pytest.raises(ValueError, match="exact window and random shifting"):
        _run("auto", tensors, 5, 5, 3, True, 1, False)
    with pytest.raises(ValueError, match="Unknown longformer implementation 'cuda-magic'"):
        _run("cuda-magic", tensors, 5, 5, 3, False, None, False)
    with pytest.raises(ValueError, match="neighbor must be in"):
        _run("vectorized", tensors, 5, 5, 3, False, 8, False)
    assert resolve_implementation("auto")[0] in LONGFORMER_IMPLEMENTATIONS


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("shape,window,num_global,exact,neighbor", CASES[::3])
def test_flex_mask_and_bias_match_reference_on_cpu(shape, window, num_global, exact, neighbor):
    """FlexAttention has no CPU backward; its eager forward checks the block mask and score_mod here."""
    height, width = shape
    tensors = {n: t.detach() for n, t in _inputs(2, 3, height, width, num_global, 8, window, torch.float32, 1).items()}
    with torch.no_grad():
        expected = _run("reference", tensors, height, width, window, exact, neighbor, True)
        actual = longformer_attention_flex(
            *(tensors[n] for n in ("local_queries", "local_keys", "local_values", "global_keys", "global_values")),
            height,
            width,
            window,
            exact=exact,
            neighbor=neighbor,
            relative_bias_table=tensors["relative_bias_table"],
            local_to_global_bias=tensors["local_to_global_bias"],
            compiled=False,
        )
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flex path runs on CUDA; no GPU here")
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_gpu_paths_match_reference(dtype, tolerance):
    for shape, window, num_global, exact, neighbor in CASES[::7]:
        height, width = shape
        tensors = _inputs(2, 3, height, width, num_global, 16, window, torch.float32, 2)
        expected = _run("reference", tensors, height, width, window, exact, neighbor, True)
        grad_output = torch.randn_like(expected)
        expected_grads = _grads(expected, tensors, grad_output)
        on_gpu = {n: t.detach().to("cuda", dtype).requires_grad_() for n, t in tensors.items()}
        for implementation in ("auto", "flex", "blocked"):
            case = f"{implementation} {shape} W{window} G{num_global} exact={exact} neighbor={neighbor}"
            actual = _run(implementation, on_gpu, height, width, window, exact, neighbor, True)
            torch.testing.assert_close(actual.float().cpu(), expected, rtol=tolerance, atol=tolerance, msg=case)
            actual_grads = _grads(actual, on_gpu, grad_output.to("cuda", dtype))
            for name in tensors:
                torch.testing.assert_close(
                    actual_grads[name].float().cpu(),
                    expected_grads[name],
                    rtol=tolerance * 10,
                    atol=tolerance * 10,
                    msg=f"{case} {name}",
                )


def test_auto_picks_blocked_on_cpu_and_logs_why(caplog):
    """On maps too large for `dense` (its rule is tested in test_kernels_dense.py)."""
    tensors = _inputs(1, 2, 23, 31, 1, 8, 5, torch.float32, 0)
    assert resolve_implementation("auto", "cpu") == ("blocked", "auto: cpu tensors")
    assert resolve_implementation("auto", "cuda")[0] == "flex"
    assert resolve_implementation("auto", "cpu", dropout_p=0.1)[0] == "vectorized"
    with caplog.at_level(logging.DEBUG, logger="vil_kernels.longformer"):
        _run("auto", tensors, 23, 31, 5, False, None, True)
    assert "longformer attention: blocked (auto: cpu tensors), map 23x31, window 5" in caplog.text


def test_paths_that_cannot_run_fail_clearly():
    tensors = _inputs(1, 2, 9, 13, 1, 8, 5, torch.float32, 0)
    with pytest.raises(ValueError, match="'flex' longformer implementation runs on CUDA tensors only, got cpu"):
        _run("flex", tensors, 9, 13, 5, False, None, True)
    with pytest.raises(ValueError, match="'blocked' longformer implementation has no attention dropout"):
        longformer_attention(
            *(tensors[n] for n in list(tensors)[:5]), 9, 13, 5, dropout_p=0.1, implementation="blocked"
        )
    with pytest.raises(ValueError, match="the map is 9x12"):
        _run("blocked", tensors, 9, 12, 5, False, None, True)


def _saved_bytes(implementation, tensors, height, width, window):
    """Bytes autograd keeps for the backward of one attention call (inputs already alive not counted)."""
    inputs = {t.data_ptr() for t in tensors.values()}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in inputs:
            saved[tensor.data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = _run(implementation, tensors, height, width, window, False, None, True)
    return sum(saved.values()), output


def test_blocked_backward_keeps_no_score_tensor():
    height, width, window, heads, head_dim = 40, 45, 7, 2, 16
    tensors = _inputs(1, heads, height, width, 1, head_dim, window, torch.float32, 0)
    blocked_bytes, output = _saved_bytes("blocked", tensors, height, width, window)
    vectorized_bytes, _ = _saved_bytes("vectorized", tensors, height, width, window)
    scores_bytes = heads * height * width * 9 * window**2 * 4  # one (L, 9 W^2) float32 score tensor
    # the output, the (H, W^2, S) bias shared by all chunks and the indices that build it from the
    # table (a few times H W^2 S): far less than one score tensor
    shared_bytes = heads * window**2 * (9 * window**2 + 3) * 4
    assert blocked_bytes <= output.numel() * 4 + 4 * shared_bytes
    assert blocked_bytes < scores_bytes / 4
    assert vectorized_bytes > scores_bytes  # what the blocked path avoids


def test_blocked_path_in_head_groups_of_every_size(monkeypatch):
    """Small maps load several heads at once; large ones one by one. Both, and uneven groups, are exact."""
    from vil_kernels.longformer import blocked

    height, width, window = 11, 16, 5
    tensors = _inputs(2, 5, height, width, 2, 8, window, torch.float64, 3)
    expected = _run("reference", tensors, height, width, window, False, None, True)
    grad_output = torch.randn_like(expected)
    expected_grads = _grads(expected, tensors, grad_output)
    layout = blocked._layout(height, width, window, None, 2)
    for budget_heads, group in ((1, 1), (2, 2), (4, 3), (5, 5)):  # 5 heads: groups 1x5, 2+2+1, 3+2, 5
        monkeypatch.setattr(blocked, "_GROUP_BYTES", 0)
        assert blocked._group_shape(layout, 8, 1, 5, 8) == (1, 1)
        per_head = (
            (layout.chunk_rows * layout.chunk_cols * window**2 + 2 * layout.num_blocks * layout.block_keys) * 9 * 8
        )
        monkeypatch.setattr(blocked, "_GROUP_BYTES", budget_heads * per_head)
        assert blocked._group_shape(layout, 8, 1, 5, 8) == (1, group)
        actual = _run("blocked", tensors, height, width, window, False, None, True)
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
        actual_grads = _grads(actual, tensors, grad_output)
        for name in tensors:
            torch.testing.assert_close(actual_grads[name], expected_grads[name], rtol=1e-9, atol=1e-9, msg=name)


# Runs of the blocked kernel on an 11x16 map at window 5 (3x4 chunks; the last chunk row holds one map row):
# how many chunks' scores fit in _BLOCK_BYTES, and the runs that makes. Three images of a padded batch, with
# their own key extents, in groups of two images: the last group is smaller.
RUN_KINDS = {
    1: "single chunks",
    3: "parts of a chunk row",
    4: "whole chunk rows",
    8: "two chunk rows and one",
    12: "whole maps, one per run",
    24: "whole maps, two per run",
}


@pytest.mark.parametrize("chunks_per_run", sorted(RUN_KINDS))
@pytest.mark.parametrize("exact,neighbor", [(False, None), (True, None), (False, 2)])
def test_blocked_runs_of_every_kind_match_reference(chunks_per_run, exact, neighbor, monkeypatch):
    from vil_kernels.longformer import blocked

    height, width, window, heads, num_global = 11, 16, 5, 2, 2
    layout = blocked._layout(height, width, window, neighbor, num_global)
    monkeypatch.setattr(blocked, "_BLOCK_BYTES", chunks_per_run * window**2 * layout.window_keys * 8)
    per_map = (12 * window**2 + 2 * layout.num_blocks * layout.block_keys) * 9 * 8
    monkeypatch.setattr(blocked, "_GROUP_BYTES", 2 * heads * per_map)
    assert blocked._group_shape(layout, 8, 3, heads, 8) == (2, heads)
    runs = list(blocked._runs(layout, torch.float64, 2 * heads))
    shapes = {(run.maps, run.rows, run.cols) for run in runs}
    assert (
        shapes
        == {
            1: {(1, 1, 1)},
            3: {(1, 1, 2)},  # 4 columns in two runs of 2
            4: {(1, 1, 4)},
            8: {(1, 2, 4), (1, 1, 4)},
            12: {(1, 3, 4)},
            24: {(2, 3, 4)},
        }[chunks_per_run]
    ), RUN_KINDS[chunks_per_run]
    assert sum(run.chunks for run in runs) == 2 * heads * 12
    # the last chunk row alone computes only its map row's slots; runs of several rows compute every slot
    assert {run.slots for run in runs if run.first_row + run.rows == 3} == ({5} if chunks_per_run <= 8 else {25})

    blocked.release_workspaces()
    extents = torch.tensor([[height, width], [height - 3, width - 4], [2, 3]])
    tensors = _inputs(3, heads, height, width, num_global, 8, window, torch.float64, chunks_per_run)
    expected = _run_with_extents("reference", tensors, height, width, window, exact, neighbor, extents)
    actual = _run_with_extents("blocked", tensors, height, width, window, exact, neighbor, extents)
    _assert_matches_inside_extents(actual, expected, tensors, extents, height, width)
    blocked.release_workspaces()


@pytest.mark.parametrize(
    "chunks_per_run,says", [(24, "2 whole maps each"), (8, "2 chunk rows each"), (4, "one chunk row each")]
)
def test_blocked_logs_how_it_cuts_a_map_size(chunks_per_run, says, monkeypatch, caplog):
    from vil_kernels.longformer import blocked

    height, width, window = 11, 16, 5
    monkeypatch.setenv("VIL_KERNELS_F32_FORWARD", "aten")  # the ATen forward's runs (the native one has none)
    layout = blocked._layout(height, width, window, None, 1)
    monkeypatch.setattr(blocked, "_BLOCK_BYTES", chunks_per_run * window**2 * layout.window_keys * 4)
    blocked.release_workspaces()
    tensors = _inputs(2, 2, height, width, 1, 8, window, torch.float32, 0)
    with caplog.at_level(logging.DEBUG, logger="vil_kernels.longformer"):
        _run("blocked", tensors, height, width, window, False, None, True)
        _run("blocked", tensors, height, width, window, False, None, True)  # the same workspace: said once
    lines = [record.getMessage() for record in caplog.records if record.name.endswith("blocked")]
    assert len(lines) == 1 and "11x16 map, window 5" in lines[0] and "4 maps" in lines[0] and says in lines[0]
    blocked.release_workspaces()


def test_blocked_workspaces_are_reused_and_can_be_released(monkeypatch):
    from vil_kernels.longformer import blocked

    monkeypatch.setenv("VIL_KERNELS_F32_FORWARD", "aten")  # the ATen forward's workspaces (the native one has none)
    blocked.release_workspaces()
    tensors = _inputs(1, 2, 9, 13, 1, 8, 5, torch.float32, 0)
    first = _run("blocked", tensors, 9, 13, 5, False, None, True)
    assert len(blocked._workspaces.cache) == 1
    second = _run("blocked", tensors, 9, 13, 5, False, None, True)  # the same buffers, refilled
    assert len(blocked._workspaces.cache) == 1
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    blocked.release_workspaces()
    assert len(blocked._workspaces.cache) == 0


# Per-image key extents: in a padded batch each image sees only its own top-left rectangle.
EXTENT_CASES = [
    (shape, window, num_global, exact, neighbor)
    for (shape, window), num_global, (exact, neighbor) in itertools.product(
        [((9, 13), 3), ((15, 11), 5)], (0, 1, 2), ((False, None), (True, None), (False, 6))
    )
]


def _extents_for(height, width):
    """Three images: the whole map, one cut inside a chunk, one of a few tokens (its far windows are empty)."""
    return torch.tensor([[height, width], [height - 3, width - 4], [2, 3]])


def _crop(tokens, b, width, rows, cols):
    """Image b's (1, H, rows*cols, M) tokens out of (B, H, height*width, M)."""
    heads, head_dim = tokens.shape[1], tokens.shape[-1]
    return tokens[b : b + 1].unflatten(2, (-1, width))[:, :, :rows, :cols].reshape(1, heads, rows * cols, head_dim)


def _inside(extents, height, width):
    """(B, 1, L, 1) boolean: the token lies inside its image's extent."""
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None]
    inside = (rows < extents[:, 0, None, None]) & (cols < extents[:, 1, None, None])
    return inside.flatten(1)[:, None, :, None]


def _assert_matches_inside_extents(actual, expected, tensors, extents, height, width):
    """Outputs inside each image's extent, and every gradient of outputs there, equal the reference's (float64)."""
    inside = _inside(extents, height, width)
    torch.testing.assert_close(actual * inside, expected * inside, rtol=1e-10, atol=1e-10)
    grad_output = torch.randn_like(expected) * inside
    expected_grads, actual_grads = _grads(expected, tensors, grad_output), _grads(actual, tensors, grad_output)
    for name in tensors:
        torch.testing.assert_close(actual_grads[name], expected_grads[name], rtol=1e-9, atol=1e-9, msg=name)


def _run_with_extents(implementation, tensors, height, width, window, exact, neighbor, key_extents):
    names = ("local_queries", "local_keys", "local_values", "global_keys", "global_values")
    return longformer_attention(
        *(tensors[n] for n in names),
        height,
        width,
        window,
        exact=exact,
        neighbor=neighbor,
        relative_bias_table=tensors["relative_bias_table"],
        local_to_global_bias=tensors["local_to_global_bias"],
        implementation=implementation,
        key_extents=key_extents,
    )


@pytest.mark.parametrize("shape,window,num_global,exact,neighbor", EXTENT_CASES)
def test_reference_with_key_extents_is_the_reference_on_each_cropped_map(shape, window, num_global, exact, neighbor):
    height, width = shape
    extents = _extents_for(height, width)
    tensors = _inputs(3, 2, height, width, num_global, 4, window, torch.float64, 11)
    batched = _run_with_extents("reference", tensors, height, width, window, exact, neighbor, extents)
    assert torch.isfinite(batched).all()  # queries beyond the extent are don't-care, but finite
    inside = _inside(extents, height, width)
    grad_output = torch.randn_like(batched) * inside  # only the outputs inside the extents count
    batched_grads = _grads(batched, tensors, grad_output)
    for b, (rows, cols) in enumerate(extents.tolist()):
        alone = {n: t.detach().clone().requires_grad_() for n, t in tensors.items()}
        image = {n: _crop(alone[n], b, width, rows, cols) for n in ("local_queries", "local_keys", "local_values")}
        image |= {n: alone[n][b : b + 1] for n in ("global_keys", "global_values")}
        image |= {n: alone[n] for n in ("relative_bias_table", "local_to_global_bias")}
        expected = _run("reference", image, rows, cols, window, exact, neighbor, True)
        torch.testing.assert_close(_crop(batched, b, width, rows, cols), expected, rtol=1e-12, atol=1e-12)
        # gradients of image b alone: its own part of the batched gradient
        image_grad_output = _crop(grad_output, b, width, rows, cols)
        expected.backward(image_grad_output)
        for name in ("local_queries", "local_keys", "local_values"):
            torch.testing.assert_close(
                batched_grads[name][b : b + 1], alone[name].grad[b : b + 1], rtol=1e-10, atol=1e-10, msg=name
            )
        for name in ("global_keys", "global_values"):
            torch.testing.assert_close(batched_grads[name][b], alone[name].grad[b], rtol=1e-10, atol=1e-10, msg=name)


def _fast_paths_with_extents():
    """Every CPU path, and the blocked kernel's custom operator (what torch.compile and torch.export run)."""
    return CPU_PATHS + ["blocked-operator"]


@pytest.mark.parametrize("implementation", _fast_paths_with_extents())
@pytest.mark.parametrize("shape,window,num_global,exact,neighbor", EXTENT_CASES)
def test_fast_paths_with_key_extents_match_reference(
    implementation, shape, window, num_global, exact, neighbor, monkeypatch
):
    height, width = shape
    extents = _extents_for(height, width)
    seed = case_seed(shape, window, num_global, exact, neighbor)
    tensors = _inputs(3, 3, height, width, num_global, 8, window, torch.float64, seed)
    expected = _run_with_extents("reference", tensors, height, width, window, exact, neighbor, extents)
    if implementation == "blocked-operator":
        implementation = "blocked"
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    actual = _run_with_extents(implementation, tensors, height, width, window, exact, neighbor, extents)
    monkeypatch.undo()
    assert torch.isfinite(actual).all()
    _assert_matches_inside_extents(actual, expected, tensors, extents, height, width)


def test_blocked_workspace_forgets_an_images_extent():
    """The extent flags live in cached buffers: a later call without extents must see every key again."""
    from vil_kernels.longformer import blocked

    blocked.release_workspaces()
    height, width, window = 11, 16, 5
    tensors = _inputs(2, 3, height, width, 1, 8, window, torch.float64, 4)
    extents = torch.tensor([[4, 7], [height, 9]])
    expected = _run("reference", tensors, height, width, window, False, None, True)
    grad_output = torch.randn_like(expected)
    expected_grads = _grads(expected, tensors, grad_output)
    masked = _run_with_extents("blocked", tensors, height, width, window, False, None, extents)
    _grads(masked, tensors, torch.randn_like(masked))
    assert len(blocked._workspaces.cache) == 1  # the same workspace serves the next call
    actual = _run("blocked", tensors, height, width, window, False, None, True)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    actual_grads = _grads(actual, tensors, grad_output)
    for name in tensors:
        torch.testing.assert_close(actual_grads[name], expected_grads[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("shape,window,num_global,exact,neighbor", EXTENT_CASES[::2])
def test_flex_with_key_extents_matches_reference_on_cpu(shape, window, num_global, exact, neighbor):
    height, width = shape
    extents = _extents_for(height, width)
    tensors = {n: t.detach() for n, t in _inputs(3, 2, height, width, num_global, 8, window, torch.float32, 2).items()}
    names = ("local_queries", "local_keys", "local_values", "global_keys", "global_values")
    with torch.no_grad():
        expected = _run_with_extents("reference", tensors, height, width, window, exact, neighbor, extents)
        actual = longformer_attention_flex(
            *(tensors[n] for n in names),
            height,
            width,
            window,
            exact=exact,
            neighbor=neighbor,
            relative_bias_table=tensors["relative_bias_table"],
            local_to_global_bias=tensors["local_to_global_bias"],
            key_extents=extents,
            compiled=False,
        )
    inside = _inside(extents, height, width)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual * inside, expected * inside, rtol=1e-5, atol=1e-5)


def test_bad_key_extents_are_clear_errors():
    tensors = _inputs(2, 1, 9, 13, 1, 4, 5, torch.float32, 0)
    with pytest.raises(ValueError, match=r"key_extents must be a \(2, 2\) integer tensor"):
        _run_with_extents("blocked", tensors, 9, 13, 5, False, None, torch.tensor([[9, 13]]))
    with pytest.raises(ValueError, match=r"key_extents must be a \(2, 2\) integer tensor"):
        _run_with_extents("blocked", tensors, 9, 13, 5, False, None, torch.tensor([[9.0, 13.0], [9.0, 13.0]]))
    with pytest.raises(ValueError, match=r"key_extents must lie in \[1, 9\] x \[1, 13\]"):
        _run_with_extents("reference", tensors, 9, 13, 5, False, None, torch.tensor([[9, 13], [10, 13]]))
    with pytest.raises(ValueError, match=r"key_extents must lie in"):
        _run_with_extents("vectorized", tensors, 9, 13, 5, False, None, torch.tensor([[9, 13], [0, 4]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flex path runs on CUDA; no GPU here")
def test_gpu_paths_with_key_extents_match_reference():
    for shape, window, num_global, exact, neighbor in EXTENT_CASES[::5]:
        height, width = shape
        extents = _extents_for(height, width)
        tensors = _inputs(3, 2, height, width, num_global, 16, window, torch.float32, 3)
        expected = _run_with_extents("reference", tensors, height, width, window, exact, neighbor, extents)
        inside = _inside(extents, height, width)
        grad_output = torch.randn_like(expected) * inside
        expected_grads = _grads(expected, tensors, grad_output)
        on_gpu = {n: t.detach().cuda().requires_grad_() for n, t in tensors.items()}
        for implementation in ("flex", "blocked"):
            case = f"{implementation} {shape} W{window} G{num_global} exact={exact} neighbor={neighbor}"
            actual = _run_with_extents(implementation, on_gpu, height, width, window, exact, neighbor, extents.cuda())
            assert torch.isfinite(actual).all(), case
            torch.testing.assert_close(actual.cpu() * inside, expected * inside, rtol=2e-5, atol=2e-5, msg=case)
            actual_grads = _grads(actual, on_gpu, grad_output.cuda())
            for name in tensors:
                torch.testing.assert_close(
                    actual_grads[name].cpu(), expected_grads[name], rtol=2e-4, atol=2e-4, msg=f"{case} {name}"
                )
