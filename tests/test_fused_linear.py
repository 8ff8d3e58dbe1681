"""The oneDNN linear layers of bfloat16 CPU inference (vil_hf.fused_linear), against ATen's F.linear."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vil_hf import ViLForImageClassification, fused_linear
from vil_hf.modeling_vil import ViLMLP

from .test_modeling import randomize, tiny_config

onednn = pytest.mark.skipif(
    not fused_linear._onednn_bfloat16(), reason="this torch build or CPU has no oneDNN bfloat16 products"
)
autocast = torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture
def fused_calls(monkeypatch) -> list[str]:
    """The post-op (attribute) of every oneDNN product run."""
    calls, onednn_linear = [], fused_linear._onednn_linear
    monkeypatch.setattr(fused_linear, "_onednn_linear", lambda *args: calls.append(args[3]) or onednn_linear(*args))
    return calls


def _operands(generator, rows=37, features=23, outputs=41):
    # rows of a (3, rows, features) map, every other feature row dropped: neither contiguous nor a multiple of 16
    hidden = torch.randn(3, 2 * rows, features, generator=generator)[:, ::2]
    weight = torch.randn(outputs, features, generator=generator) / features**0.5
    bias = torch.randn(outputs, generator=generator)
    return hidden, weight, bias


@onednn
@pytest.mark.parametrize("precision", ["bfloat16 autocast", "bfloat16 tensors"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_products_are_f_linear_in_bfloat16(precision, with_bias, fused_calls):
    generator = torch.Generator().manual_seed(0)
    hidden, weight, bias = _operands(generator)
    bias = bias if with_bias else None
    reference = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    if precision == "bfloat16 tensors":
        hidden, weight = hidden.bfloat16(), weight.bfloat16()
        bias = None if bias is None else bias.bfloat16()
    context = autocast if precision == "bfloat16 autocast" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), context:
        plain = F.linear(hidden, weight, bias)
        fused = fused_linear.linear(hidden, weight, bias)
    assert fused_calls == ["none"]
    assert fused.dtype == plain.dtype == torch.bfloat16 and fused.shape == plain.shape == (3, 37, 41)
    # both round float32 sums of the same bfloat16 operands once: a bfloat16 step apart at most
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2**-7, atol=1e-3)
    assert (fused.double() - reference).abs().max() <= 1.5 * (plain.double() - reference).abs().max() + 1e-3


@onednn
def test_fused_gelu_is_gelu_of_the_unrounded_product(fused_calls):
    generator = torch.Generator().manual_seed(1)
    hidden, weight, bias = _operands(generator)
    rounded = [t.bfloat16().double() for t in (hidden, weight, bias)]
    reference = F.gelu(F.linear(*rounded))  # the same bfloat16 operands, in float64
    with torch.no_grad(), autocast:
        plain = F.gelu(F.linear(hidden, weight, bias))
        fused = fused_linear.linear(hidden, weight, bias, "gelu")
    assert fused_calls == ["gelu"] and fused.dtype == torch.bfloat16
    fused_error = (fused.double() - reference).abs()
    assert fused_error.max() <= (reference.abs() * 2**-8).max() + 1e-3  # one rounding of the exact value
    assert fused_error.max() <= (plain.double() - reference).abs().max() + 1e-3  # no worse than two


def test_products_run_fused_only_in_bfloat16_cpu_inference(monkeypatch):
    monkeypatch.setattr(fused_linear, "_onednn_bfloat16", lambda: True)
    hidden, weight = torch.zeros(2, 4), torch.zeros(3, 4)
    with torch.no_grad():
        assert not fused_linear.runs_fused(hidden, weight)  # float32: ATen's BLAS
        assert fused_linear.runs_fused(hidden.bfloat16(), weight.bfloat16())
        assert not fused_linear.runs_fused(hidden.bfloat16(), weight)  # F.linear refuses mixed dtypes
        with autocast:
            assert fused_linear.runs_fused(hidden, weight)
            assert not fused_linear.runs_fused(hidden.double(), weight.double())  # autocast leaves float64 alone
        with torch.autocast("cpu", dtype=torch.float16):
            assert not fused_linear.runs_fused(hidden, weight)
        assert not fused_linear.runs_fused(hidden.to("meta", torch.bfloat16), weight.to("meta", torch.bfloat16))
    with autocast:  # autograd on: oneDNN's linear has no backward here
        assert not fused_linear.runs_fused(hidden, weight)
    with torch.inference_mode(), autocast:
        assert fused_linear.runs_fused(hidden, weight)
    monkeypatch.setattr(fused_linear, "_onednn_bfloat16", lambda: False)
    with torch.no_grad(), autocast:
        assert not fused_linear.runs_fused(hidden, weight)
        with pytest.raises(ValueError, match="activation 'gelu' fuses only where runs_fused"):
            fused_linear.linear(hidden, weight, None, "gelu")


def test_the_environment_turns_fused_products_off(monkeypatch):
    fused_linear._onednn_bfloat16.cache_clear()
    try:
        monkeypatch.setenv("VIL_FUSED_LINEAR", "0")
        assert not fused_linear._onednn_bfloat16()
        fused_linear._onednn_bfloat16.cache_clear()
        monkeypatch.setenv("VIL_FUSED_LINEAR", "yes")
        with pytest.raises(ValueError, match="VIL_FUSED_LINEAR='yes': use 1 \\(default\\) or 0"):
            fused_linear._onednn_bfloat16()
    finally:
        fused_linear._onednn_bfloat16.cache_clear()


class _Adapted(nn.Linear):
    """A stand-in for a LoRA-style replacement: its output is not F.linear of its weight and bias."""

    def forward(self, hidden_states):
        return super().forward(hidden_states) + 1.0


def test_layers_other_than_a_plain_linear_are_called(monkeypatch):
    monkeypatch.setattr(fused_linear, "_onednn_bfloat16", lambda: True)
    plain, adapted, hooked = nn.Linear(4, 3), _Adapted(4, 3), nn.Linear(4, 3)
    seen = []
    hooked.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    assert fused_linear.is_plain_linear(plain)
    assert not fused_linear.is_plain_linear(adapted) and not fused_linear.is_plain_linear(hooked)
    hidden = torch.randn(2, 4)
    with torch.no_grad(), autocast:
        assert torch.equal(fused_linear.layer_forward(adapted, hidden), adapted(hidden))
        fused_linear.layer_forward(hooked, hidden)
    assert seen == [(2, 3)]
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not fused_linear.is_plain_linear(plain)  # a global hook sees every module's call
    finally:
        handle.remove()


@onednn
@pytest.mark.parametrize("precision", ["bfloat16 autocast", "bfloat16 weights"])
def test_a_model_in_bfloat16_inference_runs_its_linear_layers_fused(precision, fused_calls, monkeypatch):
    """Every block's query/key/value and output projections and its MLP (chunks of 11 tokens: none whole) on
    oneDNN, GELU fused; the logits within a bfloat16 step or two of ATen's; training untouched."""
    torch.manual_seed(0)
    model = randomize(ViLForImageClassification(tiny_config(chunk_size_feed_forward=11)))
    pixel_values = torch.randn(2, 3, 80, 64, generator=torch.Generator().manual_seed(1))
    if precision == "bfloat16 weights":
        model, pixel_values = model.to(torch.bfloat16), pixel_values.bfloat16()
    context = autocast if precision == "bfloat16 autocast" else torch.autocast("cpu", enabled=False)

    def logits() -> torch.Tensor:
        with torch.no_grad(), context:
            return model(pixel_values).logits

    fused = logits()
    blocks = sum(len(stage.layers) for stage in model.vil.encoder.stages)
    fused_chunks = fused_calls.count("gelu")
    assert fused_chunks >= blocks  # at least one chunk of every MLP
    assert fused_calls.count("none") >= 3 * blocks  # projections in and out, every MLP's fc2
    fused_calls.clear()
    monkeypatch.setattr(fused_linear, "_onednn_bfloat16", lambda: False)
    plain = logits()
    assert fused_calls == []
    torch.testing.assert_close(fused.float(), plain.float(), rtol=0.02, atol=0.02 * plain.abs().max().item())

    monkeypatch.setattr(fused_linear, "_onednn_bfloat16", lambda: True)
    with context:
        model.train()(pixel_values).logits.float().sum().backward()
    assert fused_calls == []  # autograd needs ATen's products
    model.eval()
    model.vil.encoder.stages[0].layers[0].mlp.fc1 = _Adapted(16, 64).to(pixel_values.dtype)
    with torch.no_grad(), context:
        model(pixel_values)
    # the adapted MLP's own layers ran for its 2 + 20 x 16 tokens, the others' as before
    assert fused_calls.count("gelu") == fused_chunks - math.ceil((2 + 20 * 16) / 11)


@onednn
def test_an_mlp_whose_activation_does_not_fuse_applies_it_between_fused_products(fused_calls):
    mlp = randomize(ViLMLP(tiny_config(hidden_act="relu"), 16))
    rows = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), autocast:
        fused = mlp(rows)
        assert fused_calls == ["none", "none"]
        plain = mlp._plain_forward(rows)
    torch.testing.assert_close(fused.float(), plain.float(), rtol=0.02, atol=0.02 * plain.abs().max().item())
