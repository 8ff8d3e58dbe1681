"""The C++ steps of a ViL block's bfloat16 inference (csrc/block_steps.cpp) against PyTorch's ops and float64, and a
whole model with them against its forward without them."""

import pytest
import torch
import torch.nn.functional as F

import vil_hf.modeling_vil as modeling_vil
from vil_hf import ViLModel
from vil_kernels import native

from .test_modeling import randomize, tiny_config
from .test_native import needs_compiler

pytestmark = needs_compiler


@pytest.fixture
def ops(monkeypatch):
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "1")
    return native.native_ops()


def _rows(batch, rows, width, seed, dtype=torch.float32, scale=3.0):
    """(batch, rows, width) rows cut from a wider map: strided in batch and rows, unit stride in width."""
    generator = torch.Generator().manual_seed(seed)
    wide = torch.randn(batch, rows + 7, width, generator=generator) * scale + 1.5
    return wide[:, 4 : 4 + rows].to(dtype)


@pytest.mark.parametrize("shape", [(2, 37, 20), (3, 11, 96), (1, 5, 384), (2, 1, 1)])
@pytest.mark.parametrize("scale", [3.0, 0.003])  # 0.003: a variance near eps, which then counts
def test_layer_norm_in_bfloat16_is_one_rounding_of_the_float32_layer_norm(ops, shape, scale):
    rows = _rows(*shape, seed=0, scale=scale)
    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(shape[-1], generator=generator), torch.randn(shape[-1], generator=generator)
    out = torch.full((shape[0], shape[1] + 3, shape[2]), 7.0, dtype=torch.bfloat16)[:, 1:-2]  # a strided view
    ops.layer_norm_bf16_(rows, weight, bias, 1e-5, out)
    exact = F.layer_norm(rows.double(), shape[-1:], weight.double(), bias.double(), 1e-5)
    aten = F.layer_norm(rows, shape[-1:], weight, bias, 1e-5)
    # one bfloat16 rounding (2^-8 of the value at most) of a float32 layer norm as accurate as PyTorch's
    float32_error = (aten.double() - exact).abs().max()
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 2 * float32_error + 1e-6).all()
    atol = 2 * float32_error.item() + 1e-5  # near zero the two float32 norms' own errors count
    torch.testing.assert_close(out.float(), aten.to(torch.bfloat16).float(), rtol=2**-7, atol=atol)


def test_adding_a_bfloat16_branch_to_a_float32_stream_is_the_widened_sum_exactly(ops):
    residual, branch = _rows(3, 29, 40, seed=2), _rows(3, 29, 40, seed=3, dtype=torch.bfloat16)
    expected = residual + branch.float()
    out = torch.empty(3, 29, 40)
    ops.add_widened_(residual, branch, out)
    assert torch.equal(out, expected)
    ops.add_widened_(residual, branch, residual)  # in place: the stream's own chunk
    assert torch.equal(residual, expected)


def test_the_block_steps_refuse_what_they_do_not_compute(ops):
    rows, branch = torch.zeros(2, 3, 8), torch.zeros(2, 3, 8, dtype=torch.bfloat16)
    parameters = (torch.ones(8), torch.zeros(8))
    with pytest.raises(RuntimeError, match="input must be a Float CPU tensor, got BFloat16"):
        ops.layer_norm_bf16_(branch, *parameters, 1e-5, branch.clone())
    with pytest.raises(RuntimeError, match="weight and bias must be contiguous float32 CPU tensors of 8 values"):
        ops.layer_norm_bf16_(rows, torch.ones(7), parameters[1], 1e-5, branch.clone())
    with pytest.raises(RuntimeError, match="must have unit stride in its last dim"):
        ops.add_widened_(rows, branch, torch.zeros(2, 8, 3).transpose(1, 2))
    with pytest.raises(RuntimeError, match=r"branch must be \(B, R, C\) \[2, 3, 8\], got \[2, 3, 7\]"):
        ops.add_widened_(rows, branch[..., :7], rows)


@pytest.mark.parametrize("attention_type", ["longformer", "performer"])  # stages 3-4: full attention
def test_a_model_under_bfloat16_autocast_runs_its_blocks_with_the_steps(attention_type, ops, monkeypatch):
    """Every block's two layer norms and two residual sums take the C++ steps; the stages' tokens stay within a
    bfloat16 step or two of the forward without them (layer norms rounded once, by another summation order)."""
    model = randomize(ViLModel(tiny_config(chunk_size_feed_forward=11, attention_type=attention_type)))
    pixel_values = torch.randn(2, 3, 80, 64, generator=torch.Generator().manual_seed(1))
    calls = []

    class Recording:
        def __getattr__(self, name):
            return lambda *args: calls.append(name) or getattr(ops, name)(*args)

    steps = modeling_vil._native_block_steps
    monkeypatch.setattr(modeling_vil, "_native_block_steps", lambda tokens: steps(tokens) and Recording())

    def stage_tokens():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(pixel_values, output_hidden_states=True).hidden_states

    with_steps = stage_tokens()
    blocks = sum(len(stage.layers) for stage in model.encoder.stages)
    # per block: the attention's norm (whole map) and residual, then per chunk of 11 tokens a norm and a sum
    assert calls.count("layer_norm_bf16_") == calls.count("add_widened_") > blocks
    monkeypatch.setattr(modeling_vil, "_native_block_steps", lambda hidden_states: None)
    without = stage_tokens()
    for actual, expected in zip(with_steps, without):
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, rtol=0.03, atol=0.03 * expected.abs().max().item())
