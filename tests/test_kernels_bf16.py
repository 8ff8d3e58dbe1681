"""bfloat16 in the blocked longformer kernel (tensors converted to it, and torch.autocast on CPU) and in ViL models.

The fast path runs on bfloat16 values; the reference runs in float32 on the very same values (rounded to
bfloat16, then upcast), so the comparison measures the kernel's own rounding, not the inputs'.
"""

import pytest
import torch

from vil_hf import ViLConfig, ViLModel
from vil_hf.attention.full import ViLFullAttention
from vil_kernels import native, relative_bias_table_size
from vil_kernels.longformer import blocked

from .test_kernels import _run_with_extents, case_seed
from .test_modeling import TINY_ARCH, randomize
from .test_native import ENGINES, F32_ENGINE, HAS_COMPILER, NO_ENGINE, use_softmax

# Largest error allowed, as a fraction of the largest magnitude of the expected tensor.
# - float32: products and softmax accumulate in float32; errors are a few ulps times the number of terms.
# - bfloat16 (8 significant bits, one rounding is up to 2^-9 = 0.2% relative): CPU bmm of bfloat16
#   inputs writes bfloat16 scores, so each score (here up to about 10) is off by up to |score| * 2^-9
#   inside exp(), and dP is rounded likewise in the backward, as in any plain bfloat16 attention: the
#   reference itself run in bfloat16 errs by 1-4% of the scale. Output 5%, gradients 8%.
# - The local-to-global table's gradient (one entry per head) sums the dS of every local query at its global
#   slot, terms that nearly cancel: its own scale is often a small fraction of the terms, whose rounding sets
#   the error. In bfloat16 it is judged against the scale of the relative table's gradient (the same dS values
#   summed by offset): over 150 random draws of the (20, 23) sliding case the kernel's error reached 0.7% of
#   that scale (the plain bfloat16 reference 1.7%), and 0.9% in the draw below, whose own scale is 1.8% of it.
#   Limit 3%; float32 checks the table to 1e-4 of its own scale, where a missing term shows.
TOLERANCES = {
    torch.float32: {"output": 1e-5, "grads": 1e-4, "l2g_grad": 1e-4},
    torch.bfloat16: {"output": 5e-2, "grads": 8e-2, "l2g_grad": 3e-2},
}

INPUTS = ("local_queries", "local_keys", "local_values", "global_keys", "global_values")
TABLES = ("relative_bias_table", "local_to_global_bias")


def _values(batch, heads, height, width, num_global, head_dim, window, seed):
    """float32 tensors holding bfloat16-representable values; queries scaled so that scores reach about +-10."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).bfloat16().float()

    length = height * width
    return {
        "local_queries": rand(batch, heads, length, head_dim, scale=0.6),
        "local_keys": rand(batch, heads, length, head_dim),
        "local_values": rand(batch, heads, length, head_dim),
        "global_keys": rand(batch, heads, num_global, head_dim),
        "global_values": rand(batch, heads, num_global, head_dim),
        "relative_bias_table": rand(relative_bias_table_size(window), heads),
        "local_to_global_bias": rand(heads, num_global),
    }


_attention = _run_with_extents


def _assert_close(actual, expected, tolerance, what, scale=None):
    """Largest error at most ``tolerance`` x ``scale`` (default: the largest magnitude of ``expected``)."""
    assert actual.shape == expected.shape, what
    error = (actual.float() - expected).abs().max().item()
    scale = expected.abs().max().item() if scale is None else scale
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} > {tolerance} x scale {scale:.3g}"


# Maps that are not multiples of the window; sliding chunks, exact window, random shifting; G = 0 and 1;
# images of a padded batch with their own key extents.
CASES = [
    ((9, 13), 5, 0, False, None, None),
    ((9, 13), 5, 1, True, None, None),
    ((20, 23), 7, 1, False, None, None),
    ((20, 23), 7, 0, False, 3, None),
    ((20, 23), 7, 1, False, None, [(20, 23), (13, 17)]),
    ((20, 23), 7, 1, True, None, [(11, 23), (20, 9)]),
]


def _runs_of_one_chunk_row(monkeypatch, height, width, window, num_global, neighbor):
    """Make the blocked kernel's runs one chunk row each (small maps otherwise run whole maps at once)."""
    from vil_kernels.longformer import blocked

    layout = blocked._layout(height, width, window, neighbor, num_global)
    row_bytes = layout.chunk_cols * window**2 * layout.window_keys * 2  # bfloat16 scores
    monkeypatch.setattr(blocked, "_BLOCK_BYTES", row_bytes)
    assert {run.rows for run in blocked._runs(layout, torch.bfloat16, 6)} == {1}


@pytest.mark.parametrize("softmax", ["c++", "pytorch"])
@pytest.mark.parametrize("runs", ["whole maps", "chunk rows"])
@pytest.mark.parametrize("mode", ["float32", "bfloat16", "autocast"])
@pytest.mark.parametrize("shape,window,num_global,exact,neighbor,extents", CASES)
def test_blocked_matches_the_float32_reference(
    mode, runs, softmax, shape, window, num_global, exact, neighbor, extents, monkeypatch
):
    """bfloat16: every tensor converted (a model after .to(bfloat16)); autocast: float32 tensors and
    tables, cast by the kernel as a matrix product is; gradients reach the float32 leaves. Runs of whole maps
    (their windows copied out) and of single chunk rows (windows read in place in float32); the softmax steps
    fused in C++ and as PyTorch ops."""
    use_softmax(monkeypatch, softmax)
    _check_blocked_against_reference(mode, runs, shape, window, num_global, exact, neighbor, extents, 16, monkeypatch)


# two globals; and 36 query slots per chunk: the vector engine's register blocks of 8 rows end in one padded with
# rows that are no slots (the other windows leave one or no row over, which goes alone); and maps with chunks whose
# whole neighbourhood lies inside the image (the C++ forward's rows at fixed offsets, attention_fused.cpp's
# Call::inside): 6 of 30 in the first image and 2 of 30 in the second, whose extents cut the others; with the
# neighbours shifted (a neighbourhood that is not centred), 16 of 25 (the fourth case above: 4 of 12)
NATIVE_CASES = CASES + [
    ((16, 11), 4, 2, False, None, None),
    ((15, 20), 6, 1, False, None, [(15, 20), (10, 13)]),
    ((30, 37), 7, 1, False, None, [(30, 37), (23, 30)]),
    ((33, 35), 7, 0, False, 3, None),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("mode", ["bfloat16", "autocast"])
@pytest.mark.parametrize("shape,window,num_global,exact,neighbor,extents", NATIVE_CASES)
def test_native_bf16_forward_matches_the_float32_reference(
    mode, head_dim, engine, shape, window, num_global, exact, neighbor, extents, monkeypatch
):
    """The bfloat16 forward as one C++ call over the whole batch, reading the tokens in place, its products on AMX
    tiles or in AVX512-BF16 registers, and the native backward (float32 products of the bfloat16 tokens), on the same
    cases and two more; they must be what ran."""
    use_softmax(monkeypatch, engine)
    calls = []
    real_ops, chosen = native.bf16_forward()
    assert chosen == engine

    class Counting:
        def longformer_forward_bf16_(self, *args):
            calls.append((args[0].shape, args[-1]))
            return real_ops.longformer_forward_bf16_(*args)

        def longformer_backward_(self, *args):
            calls.append((args[1].shape, args[1].dtype, args[-1]))
            return real_ops.longformer_backward_(*args)

        def avx512_bf16_available(self):
            return real_ops.avx512_bf16_available()

    monkeypatch.setattr(blocked, "bf16_forward", lambda: (Counting(), engine))
    monkeypatch.setattr(blocked, "native_backward", lambda: (Counting(), "avx512"))
    _check_blocked_against_reference(
        mode, "whole maps", shape, window, num_global, exact, neighbor, extents, head_dim, monkeypatch
    )
    queries = (2, 3, shape[0] * shape[1], head_dim)
    # the last arguments: the forward on tiles; the backward in bfloat16 dot products (a CPU with either engine has them)
    assert calls == [(queries, engine == "amx"), (queries, torch.bfloat16, True)]


@pytest.mark.parametrize("products", ["bfloat16", "float32"])
@pytest.mark.parametrize("mode", ["bfloat16", "autocast"])
@pytest.mark.parametrize("shape,window,num_global,exact,neighbor,extents", NATIVE_CASES)
def test_native_backward_of_bfloat16_matches_the_float32_reference(
    products, mode, shape, window, num_global, exact, neighbor, extents, monkeypatch
):
    """The native backward of bfloat16 tokens, its products in AVX512-BF16 dot products or in float32 multiply-adds
    (head dims other than 32 and 64, and CPUs with AVX-512 but not its BF16 part), from the ATen forward; it must be
    what ran."""
    use_softmax(monkeypatch, F32_ENGINE)  # the native backward
    monkeypatch.setenv(native.BF16_FORWARD_VARIABLE, "aten")
    real_ops = native.native_ops()
    if products == "bfloat16" and not real_ops.avx512_bf16_available():
        pytest.skip(NO_ENGINE["avx512"])
    monkeypatch.setattr(blocked, "_bfloat16_products", lambda queries, ops: products == "bfloat16")
    calls = []

    class Counting:
        def longformer_backward_(self, *args):
            calls.append((args[1].shape, args[1].dtype, args[-1]))
            return real_ops.longformer_backward_(*args)

    monkeypatch.setattr(blocked, "native_backward", lambda: (Counting(), "avx512"))
    _check_blocked_against_reference(
        mode, "whole maps", shape, window, num_global, exact, neighbor, extents, 32, monkeypatch
    )
    assert calls == [((2, 3, shape[0] * shape[1], 32), torch.bfloat16, products == "bfloat16")]


@pytest.mark.parametrize("products", ["bfloat16", "float32"])
@pytest.mark.parametrize("exact", [False, True])
def test_native_backward_of_bfloat16_errs_less_than_the_aten_path(exact, products, monkeypatch):
    """The native backward of bfloat16 tokens sums in float32 (its dot products of bfloat16 pairs, or float32
    products) and rounds each gradient once; the ATen path rounds dP, dS and every window's gradients to bfloat16.
    Against the float32 reference, from the same (ATen) forward, the native gradients err less or no more (within 5%)
    on every input."""
    if products == "bfloat16" and HAS_COMPILER and not native.native_ops().avx512_bf16_available():
        pytest.skip(NO_ENGINE["avx512"])
    monkeypatch.setattr(blocked, "_bfloat16_products", lambda queries, ops: products == "bfloat16")
    values = _values(2, 3, 20, 23, 1, 32, 7, seed=9)
    geometry = (20, 23, 7, exact, None, None)
    expected_leaves = {name: t.clone().requires_grad_() for name, t in values.items()}
    expected = _attention("reference", expected_leaves, *geometry)
    grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(4)).bfloat16()
    expected.backward(grad_output.float())
    errors = {}
    for which in ("c++", F32_ENGINE):
        use_softmax(monkeypatch, which)
        monkeypatch.setenv(native.BF16_FORWARD_VARIABLE, "aten")  # one forward for both: the backward alone differs
        leaves = {name: t.bfloat16().requires_grad_() for name, t in values.items()}
        _attention("blocked", leaves, *geometry).backward(grad_output)
        errors[which] = {n: (leaves[n].grad.float() - expected_leaves[n].grad).abs().max() for n in INPUTS + TABLES}
    for name, aten in errors["c++"].items():
        assert errors[F32_ENGINE][name] <= 1.05 * aten, (
            f"{name}: native errs {errors[F32_ENGINE][name]:.3g}, ATen {aten:.3g}"
        )


@pytest.mark.parametrize("engine", [*ENGINES, F32_ENGINE])
def test_native_forward_reads_inputs_of_any_strides(engine, monkeypatch):
    """Rows of features need unit stride: other layouts are made contiguous first, with the same result (the bfloat16
    engines and the float32 one)."""
    use_softmax(monkeypatch, engine)
    dtype = torch.float32 if engine == F32_ENGINE else torch.bfloat16
    values = {name: t.to(dtype) for name, t in _values(2, 3, 9, 13, 1, 32, 5, seed=4).items()}
    geometry = (9, 13, 5, False, None, None)
    expected = _attention("blocked", values, *geometry)
    strided = {
        name: t.transpose(-1, -2).contiguous().transpose(-1, -2) if name in INPUTS else t for name, t in values.items()
    }
    assert strided["local_keys"].stride(-1) != 1
    assert torch.equal(_attention("blocked", strided, *geometry), expected)


def _check_blocked_against_reference(
    mode, runs, shape, window, num_global, exact, neighbor, extents, head_dim, monkeypatch
):
    height, width = shape
    if runs == "chunk rows":
        _runs_of_one_chunk_row(monkeypatch, height, width, window, num_global, neighbor)
    values = _values(2, 3, height, width, num_global, head_dim, window, seed=case_seed(shape, exact, neighbor))
    key_extents = None if extents is None else torch.tensor(extents)
    geometry = (height, width, window, exact, neighbor, key_extents)

    expected_leaves = {name: t.clone().requires_grad_() for name, t in values.items()}
    expected = _attention("reference", expected_leaves, *geometry)
    grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    expected.backward(grad_output)

    dtype = torch.float32 if mode == "float32" else torch.bfloat16
    leaves = {name: t.to(torch.bfloat16 if mode == "bfloat16" else torch.float32) for name, t in values.items()}
    leaves = {name: t.requires_grad_() for name, t in leaves.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        actual = _attention("blocked", leaves, *geometry)
    assert actual.dtype == dtype
    actual.backward(grad_output.to(dtype))

    tolerance = TOLERANCES[dtype]
    _assert_close(actual, expected, tolerance["output"], "output")
    for name in INPUTS + TABLES:
        if leaves[name].numel() == 0:  # the global tensors when G = 0 (the kernel leaves their grad unset)
            continue
        assert leaves[name].grad.dtype == leaves[name].dtype, name
        kind, scale = "grads", None
        if name == "local_to_global_bias":
            kind = "l2g_grad"
            if dtype == torch.bfloat16:
                scale = expected_leaves["relative_bias_table"].grad.abs().max().item()
        _assert_close(leaves[name].grad, expected_leaves[name].grad, tolerance[kind], f"grad of {name}", scale)


@pytest.mark.parametrize("forward", ["c++", *ENGINES])
@pytest.mark.parametrize("exact", [False, True])
def test_bfloat16_kernel_is_as_accurate_as_plain_bfloat16_attention(exact, forward, monkeypatch):
    """Padding flag, shared bias and chunk buffers add no error of their own in bfloat16: the kernel errs
    no more than the reference run in bfloat16 (scores rounded once, dense masks), forward and backward; with
    its forward on the ATen products and C++ softmax, or in one C++ pass on AMX tiles or AVX512-BF16 registers."""
    use_softmax(monkeypatch, forward)
    height, width, window = 20, 23, 7
    values = _values(2, 3, height, width, 1, 32, window, seed=3)
    geometry = (height, width, window, exact, None, None)
    expected_leaves = {name: t.clone().requires_grad_() for name, t in values.items()}
    expected = _attention("reference", expected_leaves, *geometry)
    grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    expected.backward(grad_output.float())
    errors = {}
    for implementation in ("blocked", "reference"):
        leaves = {name: t.bfloat16().requires_grad_() for name, t in values.items()}
        output = _attention(implementation, leaves, *geometry)
        output.backward(grad_output)
        errors[implementation] = [(output.float() - expected).abs().max()] + [
            (leaves[name].grad.float() - expected_leaves[name].grad).abs().max() for name in INPUTS + TABLES
        ]
    for name, ours, plain in zip(("output",) + INPUTS + TABLES, errors["blocked"], errors["reference"]):
        # the global keys' and values' gradients add up per-block partials that are each rounded to
        # bfloat16 before the (float32) sum over blocks: measured up to 2.4x plain's error
        factor = 3.0 if name in ("global_keys", "global_values") else 1.5
        assert ours <= factor * plain + 1e-6, f"{name}: blocked errs {ours:.3g}, plain bfloat16 {plain:.3g}"


def test_mixed_dtypes_outside_autocast_are_a_clear_error():
    values = {name: t.bfloat16() for name, t in _values(1, 2, 9, 13, 1, 8, 5, seed=0).items()}
    values["local_keys"] = values["local_keys"].float()
    with pytest.raises(ValueError, match="must share one dtype"):
        _attention("blocked", values, 9, 13, 5, False, None, None)


def test_bias_gradient_accumulates_in_float32_over_many_runs(monkeypatch):
    """The table's gradient sums over every run of every image; accumulated in bfloat16 it would stall
    once the running sum dwarfs each run's part. Many runs: a tall map, batch 4, one head."""
    height, width, window = 70, 9, 3  # 24 chunk rows, one run each, x 4 images
    _runs_of_one_chunk_row(monkeypatch, height, width, window, 1, None)
    values = _values(4, 1, height, width, 1, 8, window, seed=5)
    values["local_queries"] = values["local_queries"] * 0  # the same softmax weights everywhere
    expected_table = values["relative_bias_table"].clone().requires_grad_()
    reference_inputs = dict(values, relative_bias_table=expected_table)
    grad_output = torch.ones(4, 1, height * width, 8)
    _attention("reference", reference_inputs, height, width, window, False, None, None).backward(grad_output)
    table = values["relative_bias_table"].bfloat16().requires_grad_()
    bf16_inputs = {name: t.bfloat16() for name, t in values.items()} | {"relative_bias_table": table}
    _attention("blocked", bf16_inputs, height, width, window, False, None, None).backward(grad_output.bfloat16())
    _assert_close(table.grad, expected_table.grad, 2e-2, "table grad")


MODEL_ARCH = TINY_ARCH  # longformer stages with windows 3 and 5 on 16x20 and 8x10 maps, 1-2 globals


def _model_pair():
    torch.manual_seed(0)
    model = randomize(ViLModel(ViLConfig(arch=MODEL_ARCH, image_size=64, longformer_implementation="blocked")))
    pixel_values = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model(pixel_values).last_hidden_state
    return model, pixel_values, expected


# A whole model in bfloat16 rounds every activation and weight (each 2^-9 relative) through a dozen
# layers of products, layer norms and residual sums: measured 0.8% (autocast) and 1.0% (converted) of
# the output's scale. The final layer norm damps kernel bugs, yet a kernel that drops the relative bias
# still errs by 2.3-2.5%: 1.6% tells them apart.
MODEL_TOLERANCE = 1.6e-2


def test_vil_model_under_autocast_matches_float32():
    model, pixel_values, expected = _model_pair()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        actual = model(pixel_values).last_hidden_state
    _assert_close(actual, expected, MODEL_TOLERANCE, "autocast output")


def test_vil_model_converted_to_bfloat16_matches_float32():
    model, pixel_values, expected = _model_pair()
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        actual = model(pixel_values.bfloat16()).last_hidden_state
    assert actual.dtype == torch.bfloat16
    _assert_close(actual, expected, MODEL_TOLERANCE, "bfloat16 output")


@pytest.mark.parametrize("autocast", [False, True])
def test_full_attention_stages_take_the_fused_sdpa_kernel(autocast):
    """ViL's full-attention stages (with relative bias) hand SDPA a mask that its fused CPU kernel takes: 4-D
    and in the queries' dtype. A 3-D mask, or a float32 one under autocast, sent every call to the unfused
    math path (2-3x slower in bfloat16 at the classifier's 14x14 stage)."""
    from torch.profiler import ProfilerActivity, profile

    model, pixel_values, expected = _model_pair()
    assert any(isinstance(m, ViLFullAttention) for m in model.modules())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with profile(activities=[ProfilerActivity.CPU]) as run:
            actual = model(pixel_values).last_hidden_state
    ops = {event.key for event in run.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_safe_softmax" not in ops  # the math path's softmax
    _assert_close(actual, expected, MODEL_TOLERANCE if autocast else 1e-5, "output")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("heads,dim", [(2, 64), (1, 64)])  # head dims 32 and 64
@pytest.mark.parametrize("height,width,num_global", [(14, 14, 1), (5, 7, 1), (6, 4, 0)])
def test_full_attention_inference_runs_on_the_bfloat16_engine(
    engine, heads, dim, height, width, num_global, monkeypatch
):
    """In bfloat16 inference the full-attention stages run on the longformer kernel's native forward, the map one
    chunk (square or not, with and without a global token): within the tolerance of float32, and of SDPA's error
    (the setting at aten) to a factor 2; a bias on the wrong slots errs by the bias's own scale."""
    import copy

    from torch.profiler import ProfilerActivity, profile

    use_softmax(monkeypatch, engine)
    arch = TINY_ARCH.replace("l3,h2,d32,n1,s0,g1", f"l3,h{heads},d{dim},n1,s0,g{num_global}")
    attention = randomize(ViLFullAttention(ViLConfig(arch=arch, image_size=64), 2)).eval()
    assert attention.use_relative_bias
    converted = copy.deepcopy(attention).bfloat16()
    torch.manual_seed(0)
    batch = 2 * torch.get_num_threads()  # enough (image, head) tasks for the engine to be chosen
    tokens = torch.randn(batch, num_global + height * width, dim).bfloat16()
    results = {}
    for setting in (engine, "aten"):
        monkeypatch.setenv(native.BF16_FORWARD_VARIABLE, setting)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as run:
            results[setting] = converted(tokens, height, width)
        ran = {event.key for event in run.key_averages()}
        assert ("vil_kernels_native::longformer_forward_bf16_" in ran) == (setting == engine)
    with torch.no_grad():
        expected = attention(tokens.float(), height, width)
    sdpa_error = (results["aten"].float() - expected).abs().max().item()
    _assert_close(results[engine], expected, TOLERANCES[torch.bfloat16]["output"], "output")
    _assert_close(results[engine], expected, 2.0, "output against SDPA's error", scale=sdpa_error)


def test_full_attention_takes_sdpa_where_the_engine_would_not_pay(monkeypatch):
    """SDPA, not the engine, for maps longer than its one chunk takes, for too few (image, head) tasks to fill the
    threads, and for calls that need a gradient."""
    from vil_hf.attention import full

    use_softmax(monkeypatch, "avx512")
    arch = TINY_ARCH.replace("l3,h2,d32,n1,s0,g1", "l3,h2,d64,n1,s0,g1")
    attention = ViLFullAttention(ViLConfig(arch=arch, image_size=64), 2).eval()
    batch = 2 * torch.get_num_threads()
    side = full._ENGINE_MAX_WINDOW
    queries = torch.zeros(batch, 2, 1 + side * 3, 32, dtype=torch.bfloat16)
    engine = native.bf16_forward()
    assert attention._bfloat16_engine(queries, queries, queries, side, 3) == engine
    longer = torch.zeros(batch, 2, 1 + (side + 1) * 3, 32, dtype=torch.bfloat16)
    assert attention._bfloat16_engine(longer, longer, longer, side + 1, 3) is None
    assert attention._bfloat16_engine(queries[:1], queries[:1], queries[:1], side, 3) is None
    wanting_grad = queries.clone().requires_grad_()
    assert attention._bfloat16_engine(wanting_grad, queries, queries, side, 3) is None


def test_autocast_keeps_a_float32_residual_stream():
    """A block's residual adds never narrow the stream: a float32 stream stays float32 under bfloat16 autocast,
    though both branches come out of bfloat16 linear layers (an in-place add into them rounded it to bfloat16)."""
    from vil_hf.modeling_vil import ViLLayer

    torch.manual_seed(0)
    config = ViLConfig(arch=MODEL_ARCH, image_size=64, longformer_implementation="blocked")
    layer = randomize(ViLLayer(config, stage_index=0, drop_path_rate=0.0)).eval()
    height, width = 9, 13
    hidden_states = torch.randn(2, config.num_global_tokens[0] + height * width, config.hidden_sizes[0])
    with torch.no_grad():
        expected = layer(hidden_states, height, width)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = layer(hidden_states, height, width)
    assert actual.dtype == torch.float32
    _assert_close(actual, expected, MODEL_TOLERANCE, "block output")


def test_residual_add_is_the_plain_sum_in_the_wider_dtype():
    """The residual add widens a bfloat16 branch before adding (a mixed-dtype add is unvectorized): the same bits
    as ``residual + branch``, in place into the branch where their dtypes agree, never narrower than either."""
    from vil_hf.modeling_vil import _add_residual

    torch.manual_seed(0)
    stream = torch.randn(2, 1 + 9 * 13, 24)
    branch = torch.randn(2, 1 + 9 * 13, 24)
    for branch_dtype, stream_dtype in [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]:
        one, other = branch.to(branch_dtype), stream.to(stream_dtype)
        total = _add_residual(one.clone(), other)
        assert total.dtype == torch.float32
        assert torch.equal(total, other + one)
    same = branch.clone()
    total = _add_residual(same, stream)
    assert total.data_ptr() == same.data_ptr()
    assert torch.equal(total, stream + branch)


@pytest.mark.parametrize("num_global", [1, 2])
def test_global_queries_score_bfloat16_keys_from_the_left(num_global):
    """In bfloat16 the global queries' scores take the keys as the left operand (no transposed copy of the map's
    keys): the same scores, to bfloat16 rounding, as the usual product, on the strided views of a fused projection;
    and a global layer's output and gradients under autocast stay within the model's tolerance of float32."""
    from vil_hf.attention.base import _global_scores
    from vil_hf.attention.longformer import ViLLongformerAttention

    torch.manual_seed(0)
    heads, head_dim, length = 3, 16, 9 * 13
    projection = torch.randn(2, num_global + length, 3 * heads * head_dim).bfloat16()
    queries, keys, _ = projection.view(2, num_global + length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    for b in range(2):
        expected = torch.bmm(queries[b, :, :num_global].float(), keys[b].float().transpose(1, 2))
        actual = _global_scores(queries[b, :, :num_global], keys[b])
        assert actual.dtype == torch.bfloat16
        _assert_close(actual, expected, 2**-8, "global scores")

    config = ViLConfig(arch=MODEL_ARCH, image_size=64, longformer_implementation="blocked")
    config.num_global_tokens = [num_global] * len(config.num_global_tokens)
    layer = randomize(ViLLongformerAttention(config, stage_index=0))
    height, width = 9, 13
    hidden_states = torch.randn(2, num_global + height * width, config.hidden_sizes[0], requires_grad=True)
    extents = torch.tensor([[9, 13], [6, 10]])
    results = {}
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = layer(hidden_states, height, width, key_extents=extents)
        output = output.float()
        (grad,) = torch.autograd.grad(output[:, :num_global].pow(2).sum(), hidden_states)
        results[autocast] = output[:, :num_global].detach(), grad
    _assert_close(results[True][0], results[False][0], MODEL_TOLERANCE, "global output")
    _assert_close(results[True][1], results[False][1], TOLERANCES[torch.bfloat16]["grads"], "input grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, heads", [(3, 2), (2, 3)])
def test_global_queries_attend_per_head_or_per_image_as_one_product_would(batch, heads, dtype):
    """The global queries' attention loops over heads where they are fewer than the images (else over images):
    either way the float64 product's output and gradients (queries, keys and values through the strided views of a
    fused projection, and the bias), with a bias, hidden keys and two global queries; hidden keys change nothing."""
    from vil_hf.attention.base import attend_from_global_queries

    torch.manual_seed(0)
    num_global, head_dim, length = 2, 16, 2 + 9 * 13
    projection = torch.randn(batch, length, 3 * heads * head_dim, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(heads, num_global, length, dtype=torch.float64, requires_grad=True)
    hidden_keys = torch.rand(batch, length) < 0.3
    hidden_keys[:, :num_global] = False  # every query sees the globals

    def attend(projection, bias, dtype):
        queries, keys, values = projection.to(dtype).view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        return attend_from_global_queries(queries[:, :, :num_global] * 0.25, keys, values, bias, hidden_keys)

    queries, keys, values = projection.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    scores = (queries[:, :, :num_global] * 0.25) @ keys.transpose(-1, -2) + bias
    weights = scores.masked_fill(hidden_keys[:, None, None], float("-inf")).softmax(dim=-1)
    expected = weights @ values
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (projection, bias), upstream)

    actual = attend(projection, bias.float(), dtype)
    assert actual.dtype == dtype and actual.shape == (batch, heads, num_global, head_dim)
    actual_grads = torch.autograd.grad(actual, (projection, bias), upstream.to(dtype))
    _assert_close(actual.double(), expected, TOLERANCES[dtype]["output"], "output")
    for name, got, want in zip(("projection", "bias"), actual_grads, expected_grads):
        _assert_close(got.double(), want, TOLERANCES[dtype]["grads"], f"{name} grad")
    noisy = projection.detach().clone()
    noisy[hidden_keys] = 100 * torch.randn_like(noisy[hidden_keys])  # the hidden tokens' keys and values
    assert torch.equal(attend(noisy, bias.detach().float(), dtype), actual.detach())


def _training_step(model, pixel_values, autocast):
    """Output and parameter gradients of one backward pass (of the output's mean square)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = model(pixel_values).last_hidden_state
    output.float().pow(2).mean().backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return output.detach().float(), grads


def _through_sdpa(self, queries, keys, values, relative_bias):
    """What ViLFullAttention ran before it took its own products: SDPA, whose CPU math path gives the bias
    gradient."""
    return self._sdpa(queries, keys, values, relative_bias.to(queries.dtype)[None])


@pytest.mark.parametrize("autocast", [False, True])
def test_full_attention_trains_its_bias_without_sdpas_math_path(autocast, monkeypatch):
    """In training, ViL's full-attention stages run their own products (float32 bias add and softmax) rather than
    SDPA's unfused math path: the same output and gradients as SDPA in float32. Under autocast their products
    round the scores to bfloat16 as the longformer kernel's do, where SDPA's math path computes in float32: every
    gradient (the bias tables' included) errs by at most 2x what SDPA's path errs under autocast (measured up to
    1.8x, stage 3's relative table 4.5% against 3.6% of its scale), the output within the model's tolerance."""
    from torch.profiler import ProfilerActivity, profile

    model, pixel_values, _ = _model_pair()
    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as run:
        actual, actual_grads = _training_step(model, pixel_values, autocast)
    ops = {event.key for event in run.key_averages()}
    assert "aten::_safe_softmax" not in ops  # the math path's softmax
    monkeypatch.setattr(ViLFullAttention, "_attend_with_bias_gradient", _through_sdpa)
    expected, expected_grads = _training_step(model, pixel_values, autocast=False)
    assert set(actual_grads) == set(expected_grads)
    assert any(name.endswith("attention.relative_position_bias_table") for name in expected_grads)
    if not autocast:
        _assert_close(actual, expected, 1e-5, "output")
        for name, grad in expected_grads.items():
            _assert_close(actual_grads[name], grad, 1e-4, f"grad of {name}")
        return
    _, sdpa_grads = _training_step(model, pixel_values, autocast=True)
    _assert_close(actual, expected, MODEL_TOLERANCE, "output")
    for name, grad in expected_grads.items():
        sdpa_error = (sdpa_grads[name] - grad).abs().max().item()
        _assert_close(actual_grads[name], grad, 1.0, f"grad of {name}", scale=2 * sdpa_error + 1e-6)
