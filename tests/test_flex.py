"""The flex path's chunk-major order, its block mask, and its compile count across map sizes.

FlexAttention's fused kernels need CUDA; on CPU its eager mode and non-inductor torch.compile
backends run the same mask_mod, score_mod and token order, and dynamo's recompilations are the
same whatever the backend, so they are counted here with ``CompileCounter``.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from vil_kernels import longformer_attention_reference
from vil_kernels.longformer import flex
from vil_kernels.longformer.flex import (
    block_mask_tiles,
    bucket_chunks,
    chunk_major_block_mask,
    from_chunk_major,
    longformer_attention_flex,
    to_chunk_major,
)

from .test_kernels import _inputs

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("local_queries", "local_keys", "local_values", "global_keys", "global_values")


def test_chunk_major_order_puts_each_chunk_together_and_round_trips():
    height, width, window = 10, 11, 4  # 3x3 chunks, the last row and column of chunks partly padding
    rows = torch.arange(height).repeat_interleave(width).float()
    cols = torch.arange(width).repeat(height).float()
    tokens = torch.stack([rows, cols], -1)[None, None] + 1  # (1, 1, L, 2), 0 marks padding
    permuted = to_chunk_major(tokens, height, width, window, 3, 3)[0, 0]  # (9 * 16, 2)
    assert permuted.shape == (9 * 16, 2)
    for chunk in range(9):
        block = permuted[chunk * 16 : (chunk + 1) * 16]
        for inner in range(16):
            row, col = chunk // 3 * window + inner // window, chunk % 3 * window + inner % window
            expected = [row + 1, col + 1] if row < height and col < width else [0, 0]
            assert block[inner].tolist() == expected, (chunk, inner)
    # a bucketed grid larger than the map's own chunks round-trips too
    assert torch.equal(
        from_chunk_major(to_chunk_major(tokens, height, width, window, 4, 5), height, width, window, 4, 5), tokens
    )


@pytest.mark.parametrize(
    "chunk_rows,chunk_cols,window,exact,neighbor,num_global",
    [
        (3, 5, 3, False, None, 1),
        (4, 4, 5, True, None, 0),
        (2, 7, 4, False, 3, 2),
        (5, 3, 7, False, None, 0),  # has full tiles
        (6, 6, 3, True, None, 2),
        (3, 3, 2, False, 7, 0),
        (1, 1, 7, False, None, 1),
    ],
)
def test_chunk_major_block_mask_matches_create_block_mask(chunk_rows, chunk_cols, window, exact, neighbor, num_global):
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = chunk_major_block_mask(chunk_rows, chunk_cols, window, exact, neighbor, num_global)
    length = chunk_rows * chunk_cols * window * window
    # the dense construction, on the same mask_mod
    expected = create_block_mask(block_mask.mask_mod, None, None, length, num_global + length, device="cpu")
    assert block_mask.seq_lengths == expected.seq_lengths
    assert torch.equal(block_mask.to_dense(), expected.to_dense())
    assert torch.equal(block_mask.kv_num_blocks, expected.kv_num_blocks)
    assert torch.equal(block_mask.full_kv_num_blocks, expected.full_kv_num_blocks)
    assert torch.equal(block_mask.q_num_blocks, expected.q_num_blocks)  # the backward's view


def test_bucket_chunks_pads_little_and_shares_buckets():
    assert [bucket_chunks(n) for n in range(1, 17)] == list(range(1, 17))
    assert [bucket_chunks(n) for n in (17, 18, 29, 33, 44, 48, 49, 100)] == [18, 18, 30, 36, 44, 48, 52, 104]
    for n in range(1, 300):
        assert n <= bucket_chunks(n) <= n * 9 / 8
    # detection maps of stage 1 (W=7) for images of 480 to 1333 pixels a side: 13 to 48 chunks
    assert len({bucket_chunks(n) for n in range(13, 49)}) == 16  # of 36 sizes


def test_chunk_major_computes_fewer_tiles_than_row_major():
    # (the gap grows with the map: 3 to 4.3 times fewer tiles at 200x304, see the flex module)
    for rule in (dict(), dict(exact=True), dict(neighbor=4)):
        row_major, row_total = block_mask_tiles(84, 112, 7, order="row-major", **rule)
        chunk_major, chunk_total = block_mask_tiles(84, 112, 7, **rule)
        assert chunk_total == row_total  # 12x16 chunks: no padding
        assert chunk_major < 0.7 * row_major, (rule, row_major, chunk_major)


def _flex_inputs(height, width, window, seed, batch=2, num_global=2):
    tensors = _inputs(batch, 3, height, width, num_global, 8, window, torch.float32, seed)
    return {name: tensor.detach() for name, tensor in tensors.items()}


# map sizes of a detection run: five token counts, and two sizes with the same padded grid
SIZES = [(14, 20), (15, 22), (20, 31), (23, 17), (26, 40)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_compiles_once_across_map_sizes(monkeypatch):
    """One compilation for all sizes, where dynamic=False (the previous setting) compiles one per token count."""
    window = 7
    extents = {2: torch.tensor([[20, 31], [13, 25]])}  # one batch with an image smaller than the map

    def run_sizes(backend):
        torch._dynamo.reset()
        for index, (height, width) in enumerate(SIZES):
            tensors = _flex_inputs(height, width, window, index)
            kwargs = dict(
                relative_bias_table=tensors["relative_bias_table"],
                local_to_global_bias=tensors["local_to_global_bias"],
                key_extents=extents.get(index),
            )
            with torch.no_grad():
                actual = longformer_attention_flex(
                    *(tensors[n] for n in NAMES), height, width, window, compiled=backend, **kwargs
                )
                expected = longformer_attention_reference(*(tensors[n] for n in NAMES), height, width, window, **kwargs)
            if index in extents:  # outputs beyond an image's extent are unspecified
                inside = torch.zeros(2, 1, height, width, 1, dtype=torch.bool)
                for image, (rows, cols) in enumerate(extents[index].tolist()):
                    inside[image, :, :rows, :cols] = True
                actual, expected = actual * inside.flatten(2, 3), expected * inside.flatten(2, 3)
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    counter = CompileCounter()
    run_sizes(counter)  # 3 heads: the 14x20 map's 3 tiles would have been specialized with them (duck sizing)
    assert counter.frame_count == 1

    # the same count with dynamic=False sees every new token count
    from torch.nn.attention.flex_attention import flex_attention

    static = CompileCounter()
    monkeypatch.setattr(
        flex, "_compiled_flex_attention", lambda backend: torch.compile(flex_attention, dynamic=False, backend=backend)
    )
    run_sizes(static)
    token_counts = set()
    for height, width in SIZES:
        chunk_rows, chunk_cols = (bucket_chunks(-(-n // window)) for n in (height, width))
        token_counts.add(chunk_rows * chunk_cols)
    assert static.frame_count == len(token_counts) == 4
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_random_shifting_neighbours_share_one_compilation():
    height, width, window = 15, 22, 7
    tensors = _flex_inputs(height, width, window, 0)
    torch._dynamo.reset()
    counter = CompileCounter()
    for neighbor in range(8):
        with torch.no_grad():
            actual = longformer_attention_flex(
                *(tensors[n] for n in NAMES), height, width, window, neighbor=neighbor, compiled=counter
            )
            expected = longformer_attention_reference(
                *(tensors[n] for n in NAMES), height, width, window, neighbor=neighbor
            )
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=f"neighbor {neighbor}")
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_falls_back_to_static_compilation_with_a_warning(caplog):
    """A backend that cannot build dynamic shapes: one warning, then one compilation per size, right outputs."""
    static_graphs = []

    def static_only(graph_module, example_inputs):
        if any(not isinstance(value, torch.Tensor) for value in example_inputs):  # sizes passed as ints: dynamic
            raise RuntimeError("this backend builds static shapes only")
        static_graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    window = 7
    with caplog.at_level("WARNING", logger="vil_kernels.longformer.flex"):
        for index, (height, width) in enumerate(SIZES[:3]):
            tensors = _flex_inputs(height, width, window, index)
            with torch.no_grad():
                actual = longformer_attention_flex(
                    *(tensors[n] for n in NAMES), height, width, window, compiled=static_only
                )
                expected = longformer_attention_reference(*(tensors[n] for n in NAMES), height, width, window)
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert caplog.text.count("failed to compile") == 1
    assert len(static_graphs) == 3
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flex path runs on CUDA; no GPU here")
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_flex_on_cuda_compiles_once_across_map_sizes(dtype, tolerance):
    """Inductor's FlexAttention, forward and backward, on five map sizes: matches the reference, few compilations."""
    from torch._dynamo.utils import counters

    window = 7
    torch._dynamo.reset()
    flex._compiled_flex_attention.cache_clear()
    graphs_before = counters["stats"]["unique_graphs"]
    for index, (height, width) in enumerate(SIZES):
        tensors = {n: t.requires_grad_() for n, t in _flex_inputs(height, width, window, index).items()}
        bias = dict(
            relative_bias_table=tensors["relative_bias_table"], local_to_global_bias=tensors["local_to_global_bias"]
        )
        expected = longformer_attention_reference(*(tensors[n] for n in NAMES), height, width, window, **bias)
        grad_output = torch.randn_like(expected)
        expected_grads = torch.autograd.grad(expected, list(tensors.values()), grad_output)
        on_gpu = {n: t.detach().to("cuda", dtype).requires_grad_() for n, t in tensors.items()}
        actual = longformer_attention_flex(
            *(on_gpu[n] for n in NAMES), height, width, window,
            relative_bias_table=on_gpu["relative_bias_table"], local_to_global_bias=on_gpu["local_to_global_bias"],
        )  # fmt: skip
        torch.testing.assert_close(actual.float().cpu(), expected, rtol=tolerance, atol=tolerance)
        actual_grads = torch.autograd.grad(actual, list(on_gpu.values()), grad_output.to("cuda", dtype))
        for name, got, want in zip(on_gpu, actual_grads, expected_grads):
            torch.testing.assert_close(got.float().cpu(), want, rtol=tolerance * 10, atol=tolerance * 10, msg=name)
    compilations = counters["stats"]["unique_graphs"] - graphs_before
    print(f"flex on cuda ({dtype}): {compilations} compilation(s) for {len(SIZES)} map sizes")
    assert compilations <= 2


def test_gpu_check_script_parses_and_names_what_exists(capsys):
    from vil_hf.benchmark import main as benchmark

    from . import test_kernels

    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    test_files = set(re.findall(r"tests/test_\w+\.py", text))
    assert test_files == {"tests/test_kernels.py", "tests/test_flex.py"}
    # its -k expression selects the CUDA tests of both files
    assert '-k "cuda or gpu"' in text
    selected = {
        name
        for module in (test_kernels, sys.modules[__name__])
        for name in dir(module)
        if name.startswith("test_") and ("cuda" in name or "gpu" in name)
    }
    assert {
        "test_gpu_paths_match_reference",
        "test_gpu_paths_with_key_extents_match_reference",
        "test_flex_on_cuda_compiles_once_across_map_sizes",
    } <= selected
    # every benchmark option it passes is one that scripts/benchmark.py takes
    with pytest.raises(SystemExit):
        benchmark(["--help"])
    help_text = capsys.readouterr().out
    command = re.search(r"scripts/benchmark\.py((?:[^\n]*\\\n)*[^\n]*)", text).group(1)  # with its continuation lines
    options = set(re.findall(r"(--[a-z][a-z-]*)", command))
    assert {"--device", "--only", "--json"} <= options
    for option in options:
        assert option in help_text, option
