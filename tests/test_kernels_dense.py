"""The ``dense`` longformer path (one masked attention over the whole map) and the ``auto`` rule that picks it.

Its forward and gradients against the reference on every case of test_kernels.py run there (it is
one of ``CPU_PATHS``); here: other map sizes, half-precision inputs, dropout, the size rule of
``auto``, and torch.compile of a model that runs it.
"""

import itertools
import logging

import pytest
import torch

from vil_hf import ViLModel
from vil_kernels import longformer_attention_dense
from vil_kernels.longformer import DENSE_MAX_TOKENS_PER_WINDOW, resolve_implementation

from .test_compile import COMPILE_ARCH, _assert_same, _model
from .test_kernels import _grads, _inputs, _inside, _run, _run_with_extents

DENSE_CASES = [
    (shape, num_global, exact, neighbor)
    for shape, num_global, (exact, neighbor) in itertools.product(
        [(9, 13), (16, 16), (5, 3), (20, 23)], (0, 2), ((False, None), (True, None), (False, 1), (False, 6))
    )
]


def _extents(batch, height, width):
    """Each image its own top-left part of the map, the first the whole map (test_kernels' own cuts
    do not fit the 5x3 map)."""
    rows = [height, max(1, height - 4), max(1, height // 2)][:batch]
    cols = [width, max(1, width - 2), max(1, width - 5)][:batch]
    return torch.tensor(list(zip(rows, cols)))


@pytest.mark.parametrize("shape,num_global,exact,neighbor", DENSE_CASES)
def test_dense_matches_reference_with_key_extents_in_float32(shape, num_global, exact, neighbor):
    height, width, window = *shape, 7
    tensors = _inputs(3, 2, height, width, num_global, 16, window, torch.float32, sum(shape) + num_global)
    extents = _extents(3, height, width)
    expected = _run_with_extents("reference", tensors, height, width, window, exact, neighbor, extents)
    actual = _run_with_extents("dense", tensors, height, width, window, exact, neighbor, extents)
    assert torch.isfinite(actual).all()
    inside = _inside(extents, height, width)
    torch.testing.assert_close(actual * inside, expected * inside, rtol=1e-5, atol=1e-5)

    grad_output = torch.randn_like(expected) * inside
    expected_grads, actual_grads = _grads(expected, tensors, grad_output), _grads(actual, tensors, grad_output)
    for name in tensors:
        # the gradient reaches every input, both bias tables included (and is the reference's)
        assert actual_grads[name].numel() == 0 or actual_grads[name].abs().sum() > 0, name
        torch.testing.assert_close(actual_grads[name], expected_grads[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("shape,num_global,exact,neighbor", DENSE_CASES[::3])
def test_dense_without_bias_tables_matches_reference(shape, num_global, exact, neighbor):
    height, width, window = *shape, 5
    tensors = _inputs(2, 3, height, width, num_global, 8, window, torch.float64, 3)
    expected = _run("reference", tensors, height, width, window, exact, neighbor, False)
    actual = _run("dense", tensors, height, width, window, exact, neighbor, False)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


# bf16 keeps 8 bits of mantissa, fp16 11: errors measured ~1.5e-2 and ~1.6e-3 on the outputs, <1.1% and
# <0.2% of the largest gradient entry
@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("exact,neighbor", [(False, None), (True, None), (False, 3)])
def test_dense_in_half_precision_matches_the_float32_reference(dtype, tolerance, exact, neighbor):
    """Against the float32 reference on the same (rounded) inputs: the error is the kernel's own."""
    height, width, window, head_dim = 16, 16, 7, 32
    tensors = _inputs(2, 2, height, width, 1, head_dim, window, torch.float32, 5)
    half = {n: t.detach().to(dtype) for n, t in tensors.items()}
    half["local_queries"] = half["local_queries"] * head_dim**-0.5  # scaled, as the model passes them
    tensors = {n: t.float().requires_grad_() for n, t in half.items()}
    half = {n: t.requires_grad_() for n, t in half.items()}
    expected = _run("reference", tensors, height, width, window, exact, neighbor, True)
    grad_output = torch.randn_like(expected)
    expected_grads = _grads(expected, tensors, grad_output)
    actual = _run("dense", half, height, width, window, exact, neighbor, True)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected, rtol=tolerance, atol=tolerance)
    actual_grads = _grads(actual, half, grad_output.to(dtype))
    for name in tensors:
        assert actual_grads[name].dtype == dtype
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(
            actual_grads[name].float(), expected_grads[name], rtol=tolerance, atol=tolerance * scale, msg=name
        )


def test_dense_attention_dropout_is_unbiased_and_random():
    """Dropout on the attention weights: each draw differs, their mean is the attention without dropout."""
    height, width, window = 5, 3, 2
    tensors = {n: t.detach() for n, t in _inputs(1, 2, height, width, 1, 4, window, torch.float64, 8).items()}
    names = ("local_queries", "local_keys", "local_values", "global_keys", "global_values")

    def attend(dropout_p):
        return longformer_attention_dense(
            *(tensors[n] for n in names),
            height,
            width,
            window,
            relative_bias_table=tensors["relative_bias_table"],
            local_to_global_bias=tensors["local_to_global_bias"],
            dropout_p=dropout_p,
        )

    plain = attend(0.0)
    torch.manual_seed(0)
    draws = torch.stack([attend(0.3) for _ in range(4000)])
    assert not torch.allclose(draws[0], draws[1])
    assert not torch.allclose(draws[0], plain)
    torch.testing.assert_close(draws.mean(0), plain, rtol=0.0, atol=0.15 * plain.abs().max().item())


def test_auto_picks_dense_on_small_maps_and_says_which_rule(caplog):
    slots = int(DENSE_MAX_TOKENS_PER_WINDOW * 9 * 7**2)
    name, reason = resolve_implementation("auto", "cpu", 0.0, 16, 16, 7)
    assert name == "dense"
    assert (
        reason
        == f"auto: map 16x16 has at most {DENSE_MAX_TOKENS_PER_WINDOW:g} x 9W^2 = {slots} tokens (window 7), dense is cheaper"
    )
    # the demo's four stage maps at 128 px, then maps just beyond the rule
    assert [resolve_implementation("auto", "cpu", 0.0, s, s, 7)[0] for s in (4, 8, 16, 32)] == [
        "dense",
        "dense",
        "dense",
        "blocked",
    ]
    assert resolve_implementation("auto", "cpu", 0.0, 20, 23, 7)[0] == "blocked"
    assert resolve_implementation("auto", "cpu", 0.0, 200, 300, 7) == ("blocked", "auto: cpu tensors")
    # dense has dropout: it stays the choice on small maps; large ones go to vectorized as before
    assert resolve_implementation("auto", "cpu", 0.1, 8, 8, 7)[0] == "dense"
    assert resolve_implementation("auto", "cpu", 0.1, 40, 40, 7)[0] == "vectorized"
    assert resolve_implementation("auto", "cuda", 0.0, 8, 8, 7)[0] == "flex"
    assert resolve_implementation("dense", "cpu", 0.1, 40, 40, 7) == ("dense", "requested")

    tensors = _inputs(1, 2, 9, 13, 1, 8, 5, torch.float32, 0)
    with caplog.at_level(logging.DEBUG, logger="vil_kernels.longformer"):
        _run("auto", tensors, 9, 13, 5, False, None, True)
    assert "longformer attention: dense (auto: map 9x13 has at most" in caplog.text


def test_auto_keeps_blocked_while_tracing(monkeypatch):
    """Traced, auto stays on the blocked operator: one graph for every map size, no guard on it."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert resolve_implementation("auto", "cpu", 0.0, 8, 8, 7) == ("blocked", "auto: cpu tensors")


def test_compile_fullgraph_with_dense_matches_eager_in_training():
    """The dense path's in-graph geometry, traced whole through AOTAutograd, forward and backward."""
    torch._dynamo.reset()
    try:
        model = _model(ViLModel, COMPILE_ARCH, longformer_implementation="dense").train()
        pixel_values = torch.randn(2, 3, 64, 80)
        results = []
        for run in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
            model.zero_grad()
            output = run(pixel_values)
            output.last_hidden_state.square().mean().backward()
            results.append((output, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (eager, eager_grads), (compiled, compiled_grads) = results
        _assert_same(compiled, eager)
        bias_table = "encoder.stages.0.layers.0.attention.relative_position_bias_table"
        assert compiled_grads[bias_table].abs().sum() > 0
        assert compiled_grads.keys() == eager_grads.keys()
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    finally:
        torch._dynamo.reset()
