"""The blocked longformer kernel's native float32 forward and backward (``longformer_forward_f32_`` and
``longformer_backward_`` in csrc/attention_fused.cpp): one C++ call per layer each, their products in AVX-512
registers, against the float32 reference and the ATen path they replace. (The native backward of bfloat16 tokens:
tests/test_kernels_bf16.py.)

Every test here requires the engine (``use_softmax(monkeypatch, F32_ENGINE)``) and skips, saying so, on CPUs without
AVX-512; the float32 tests of the ATen path run everywhere (``use_softmax`` "c++" and "pytorch")."""

import pytest
import torch

from vil_hf import ViLConfig, ViLModel
from vil_kernels import native
from vil_kernels.longformer import blocked

from .test_kernels_bf16 import NATIVE_CASES, _attention, _check_blocked_against_reference, _values
from .test_modeling import TINY_ARCH, randomize
from .test_native import F32_ENGINE, _fused_forward_inputs, use_softmax


def counting_calls(monkeypatch) -> list:
    """Make blocked.py's native float32 forward and native backward go through a wrapper that records each call:
    ("forward" or "backward", the query shape)."""
    real_ops, engine = native.native_ops(), "avx512"
    calls = []

    class Counting:
        def longformer_forward_f32_(self, *args):
            calls.append(("forward", tuple(args[0].shape)))
            return real_ops.longformer_forward_f32_(*args)

        def longformer_backward_(self, *args):
            calls.append(("backward", tuple(args[1].shape)))
            return real_ops.longformer_backward_(*args)

    monkeypatch.setattr(blocked, "f32_forward", lambda: (Counting(), engine))
    monkeypatch.setattr(blocked, "native_backward", lambda: (Counting(), engine))
    return calls


# Head dims: a lone partial group of 16 features (8), one and a partial (20), whole groups of 16 up to four (32, 48,
# 64): the output's register blocks take 16, 8, 5 and 4 rows for one to four groups.
@pytest.mark.parametrize("head_dim", [8, 20, 32, 48, 64])
@pytest.mark.parametrize("shape,window,num_global,exact,neighbor,extents", NATIVE_CASES)
def test_native_f32_forward_matches_the_float32_reference(
    head_dim, shape, window, num_global, exact, neighbor, extents, monkeypatch
):
    """Output and every gradient (the native backward's) within float32's tolerance of the reference, on maps that
    are not multiples of the window, with 0-2 globals, the exact window, random shifting and per-image key extents;
    the native forward and backward must be what ran, once each for the batch."""
    use_softmax(monkeypatch, F32_ENGINE)
    calls = counting_calls(monkeypatch)
    _check_blocked_against_reference(
        "float32", "whole maps", shape, window, num_global, exact, neighbor, extents, head_dim, monkeypatch
    )
    queries = (2, 3, shape[0] * shape[1], head_dim)
    assert calls == [("forward", queries), ("backward", queries)]


def _output_and_grads(values, geometry, tables=True):
    """The blocked kernel's output and its inputs' gradients (the bias tables' too where ``tables``)."""
    leaves = {name: t.clone().requires_grad_(tables or "bias" not in name) for name, t in values.items()}
    output = _attention("blocked", leaves, *geometry)
    output.backward(torch.randn(output.shape, generator=torch.Generator().manual_seed(2)))
    return output.detach(), {name: t.grad for name, t in leaves.items() if t.grad is not None}


def test_native_f32_forward_and_backward_agree_with_the_aten_path(monkeypatch):
    """The same call on the ATen products (the path they replace) gives the same output and gradients to float32
    rounding: the sums run in another order, and exp is a polynomial of its own."""
    values = _values(2, 3, 20, 23, 1, 32, 7, seed=6)
    geometry = (20, 23, 7, False, None, torch.tensor([[20, 23], [13, 17]]))
    results = {}
    for which in ("c++", F32_ENGINE):
        use_softmax(monkeypatch, which)
        results[which] = _output_and_grads(values, geometry)
    (expected, expected_grads), (actual, actual_grads) = results["c++"], results[F32_ENGINE]
    scale = expected.abs().max().item()
    assert not torch.equal(actual, expected)  # two computations, not one path twice
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * scale)
    assert set(actual_grads) == set(expected_grads) == set(values)
    for name, grad in expected_grads.items():
        assert not torch.equal(actual_grads[name], grad), name
        torch.testing.assert_close(actual_grads[name], grad, rtol=0, atol=1e-5 * grad.abs().max().item(), msg=name)


def test_native_f32_backward_without_the_bias_gradient(monkeypatch):
    """Bias tables that need no gradient: the op skips the bias's sums and every other gradient is unchanged."""
    use_softmax(monkeypatch, F32_ENGINE)
    calls = counting_calls(monkeypatch)
    values = _values(2, 3, 17, 19, 2, 24, 5, seed=4)
    geometry = (17, 19, 5, False, None, None)
    _, with_tables = _output_and_grads(values, geometry)
    _, without = _output_and_grads(values, geometry, tables=False)
    assert [kind for kind, _ in calls] == ["forward", "backward"] * 2
    assert set(without) == {n for n in values if "bias" not in n}
    for name, grad in without.items():
        torch.testing.assert_close(grad, with_tables[name], rtol=0, atol=0, msg=name)  # the same path, bias sums aside


def test_native_f32_backward_refuses_what_it_cannot_read(monkeypatch):
    use_softmax(monkeypatch, F32_ENGINE)
    backward = native.native_ops().longformer_backward_
    inputs = _fused_forward_inputs(dtype=torch.float32)
    inputs.pop("output")
    grads = {f"grad_{name}": torch.empty_like(inputs[name]) for name in ("queries", "keys", "values")}
    grads |= {f"grad_{name}": torch.empty_like(inputs[name]) for name in ("global_keys", "global_values")}
    good = {
        "grad_output": torch.randn_like(inputs["queries"]),
        **inputs,
        **grads,
        "grad_bias": torch.empty_like(inputs["bias"]),
        "bfloat16_products": False,
    }
    backward(**good)  # the inputs below differ from these in one thing each
    assert good["grad_bias"].abs().sum() > 0

    def refused(match, **change):
        with pytest.raises(RuntimeError, match=match):
            backward(**{**good, **change})

    refused("grad_output must be \\(2, 3, 117, 32\\) with unit stride", grad_output=good["grad_output"][..., :16])
    refused("grad_keys must be a Float CPU tensor, got BFloat16", grad_keys=grads["grad_keys"].bfloat16())
    refused("grad_global_values must be \\(2, 3, 1, 32\\)", grad_global_values=grads["grad_values"])
    refused("grad_bias must be contiguous float32", grad_bias=good["grad_bias"][..., :-1])
    refused("grad_bias must be contiguous float32", grad_bias=good["grad_bias"].double())
    refused("queries hold 117 tokens, not a 9x12 map", width=12)
    refused("grad_output must be a Float CPU tensor, got BFloat16", grad_output=good["grad_output"].bfloat16())
    refused(
        "head dims 1 to 64, got 96",
        **{k: torch.cat([v, v, v], -1) for k, v in good.items() if torch.is_tensor(v) and v.dim() == 4},
    )


def test_native_f32_forward_refuses_what_it_cannot_read(monkeypatch):
    use_softmax(monkeypatch, F32_ENGINE)
    forward = native.native_ops().longformer_forward_f32_
    good = _fused_forward_inputs(dtype=torch.float32)
    forward(**good)  # the inputs below differ from these in one thing each

    def refused(match, **change):
        with pytest.raises(RuntimeError, match=match):
            forward(**{**good, **change})

    tokens = ("queries", "keys", "values", "global_keys", "global_values", "output")
    wide = {k: torch.cat([v, v, v], -1) for k, v in good.items() if k in tokens}  # head dim 96
    refused("head dims 1 to 64, got 96", **wide)
    refused("keys must be a Float CPU tensor, got BFloat16", keys=good["keys"].bfloat16())
    refused("queries hold 117 tokens, not a 9x12 map", width=12)
    refused("values must be \\(2, 3, 117, 32\\) with unit stride", values=good["values"][:1])
    refused("bias must be contiguous float32", bias=good["bias"][..., :-1])
    refused("key_extents must be int64 \\(2, 2\\)", key_extents=torch.tensor([[9, 13]]))


def test_vil_model_with_the_native_f32_attention_matches_the_aten_path(monkeypatch):
    """A whole ViL (longformer stages at windows 3 and 5, 1-2 globals) in float32, forward and parameter gradients,
    with its attention forward and backward native and on the ATen products."""
    torch.manual_seed(0)
    model = randomize(ViLModel(ViLConfig(arch=TINY_ARCH, image_size=64, longformer_implementation="blocked")))
    pixel_values = torch.randn(2, 3, 64, 80)
    results = {}
    for which in ("c++", F32_ENGINE):
        use_softmax(monkeypatch, which)
        calls = counting_calls(monkeypatch) if which == F32_ENGINE else []
        output = model(pixel_values).last_hidden_state
        output.pow(2).mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results[which] = output.detach(), grads
        assert {kind for kind, _ in calls} == ({"forward", "backward"} if which == F32_ENGINE else set())
    (expected, expected_grads), (actual, actual_grads) = results["c++"], results[F32_ENGINE]
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert set(actual_grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, rtol=0, atol=1e-4 * grad.abs().max().item() + 1e-8)


def test_native_f32_backward_is_the_same_on_any_number_of_threads(monkeypatch):
    """Chunks whose key neighbourhoods could meet never run at once, so every key row's gradient adds its chunks'
    parts in one order: the token gradients are bit-identical on 1 and 3 threads; the bias's and globals' (summed per
    worker, then added) agree to rounding."""
    use_softmax(monkeypatch, F32_ENGINE)
    values = _values(1, 2, 31, 26, 1, 20, 5, seed=8)
    geometry = (31, 26, 5, False, None, None)
    threads = torch.get_num_threads()
    try:
        grads = []
        for count in (1, 3):
            torch.set_num_threads(count)
            grads.append(_output_and_grads(values, geometry)[1])
    finally:
        torch.set_num_threads(threads)
    for name, grad in grads[0].items():
        if name in ("local_queries", "local_keys", "local_values"):
            assert torch.equal(grads[1][name], grad), name
        else:
            torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-6 * grad.abs().max().item(), msg=name)
