"""The blocked longformer kernel's native float32 forward (``longformer_forward_f32_`` in csrc/attention_fused.cpp): one
C++ call per layer, its products in AVX-512 registers, against the float32 reference and the ATen path it replaces.

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


def _counting_calls(monkeypatch) -> list:
    """Make blocked.py's float32 forward go through a wrapper that records each call's query shape."""
    real_ops, engine = native.f32_forward()
    calls = []

    class Counting:
        def longformer_forward_f32_(self, *args):
            calls.append(tuple(args[0].shape))
            return real_ops.longformer_forward_f32_(*args)

    monkeypatch.setattr(blocked, "f32_forward", lambda: (Counting(), engine))
    return calls


# Head dims: a lone partial group of 16 features (8), one and a partial (20), whole groups of 16 up to four (32, 48,
# 64): the output's register blocks take 16, 8, 5 and 4 rows for one to four groups.
@pytest.mark.parametrize("head_dim", [8, 20, 32, 48, 64])
@pytest.mark.parametrize("shape,window,num_global,exact,neighbor,extents", NATIVE_CASES)
def test_native_f32_forward_matches_the_float32_reference(
    head_dim, shape, window, num_global, exact, neighbor, extents, monkeypatch
):
    """Output (and, through the ATen backward that recomputes from it, every gradient) within float32's tolerance of
    the reference, on maps that are not multiples of the window, with 0-2 globals, the exact window, random shifting
    and per-image key extents; it must be what ran, once for the batch."""
    use_softmax(monkeypatch, F32_ENGINE)
    calls = _counting_calls(monkeypatch)
    _check_blocked_against_reference(
        "float32", "whole maps", shape, window, num_global, exact, neighbor, extents, head_dim, monkeypatch
    )
    assert calls == [(2, 3, shape[0] * shape[1], head_dim)]


def test_native_f32_forward_agrees_with_the_aten_path(monkeypatch):
    """The same call on the ATen products (the path it replaces) gives the same output to float32 rounding: the sums
    run in another order, and exp is a polynomial of its own."""
    values = _values(2, 3, 20, 23, 1, 32, 7, seed=6)
    geometry = (20, 23, 7, False, None, torch.tensor([[20, 23], [13, 17]]))
    outputs = {}
    for which in ("c++", F32_ENGINE):
        use_softmax(monkeypatch, which)
        outputs[which] = _attention("blocked", values, *geometry)
    scale = outputs["c++"].abs().max().item()
    assert not torch.equal(outputs[F32_ENGINE], outputs["c++"])  # two computations, not one path twice
    torch.testing.assert_close(outputs[F32_ENGINE], outputs["c++"], rtol=0, atol=1e-5 * scale)


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


def test_vil_model_with_the_native_f32_forward_matches_the_aten_path(monkeypatch):
    """A whole ViL (longformer stages at windows 3 and 5, 1-2 globals) in float32, forward and parameter gradients,
    with its attention forward native and on the ATen products."""
    torch.manual_seed(0)
    model = randomize(ViLModel(ViLConfig(arch=TINY_ARCH, image_size=64, longformer_implementation="blocked")))
    pixel_values = torch.randn(2, 3, 64, 80)
    results = {}
    for which in ("c++", F32_ENGINE):
        use_softmax(monkeypatch, which)
        calls = _counting_calls(monkeypatch) if which == F32_ENGINE else []
        output = model(pixel_values).last_hidden_state
        output.pow(2).mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results[which] = output.detach(), grads
        assert (len(calls) > 0) == (which == F32_ENGINE)
    (expected, expected_grads), (actual, actual_grads) = results["c++"], results[F32_ENGINE]
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert set(actual_grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, rtol=0, atol=1e-4 * grad.abs().max().item() + 1e-8)
