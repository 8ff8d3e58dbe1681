"""vil_kernels.native: the C++ softmax steps of the blocked kernel against their PyTorch ops, and how the build is
chosen, required or skipped. The blocked kernel's own tests run with both (``use_softmax``)."""

import logging
import shutil

import pytest
import torch

from vil_kernels import native
from vil_kernels.longformer import blocked

from .test_kernels import check_float32_against_reference

# what torch.utils.cpp_extension needs on PATH to build
HAS_COMPILER = shutil.which("ninja") is not None and (shutil.which("c++") or shutil.which("g++")) is not None
NO_COMPILER = "no C++ compiler or ninja here: vil_kernels.native falls back"
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason=NO_COMPILER)
ENGINES = ("amx", "avx512")  # of the native bfloat16 forward
F32_ENGINE = "float32-avx512"  # the native float32 forward (VIL_KERNELS_F32_FORWARD=avx512)
NO_ENGINE = {
    "amx": "this CPU has no AMX bfloat16 tiles (or Linux does not grant them): not run here",
    "avx512": "this CPU has no AVX512-BF16: not run here",
    F32_ENGINE: "this CPU has no AVX-512: not run here",
}


def use_softmax(monkeypatch, which: str) -> None:
    """Run the blocked kernel's softmax steps in C++ ("c++", required to build) or as PyTorch ops ("pytorch"), between
    ATen products; or its bfloat16 forward as one C++ pass per chunk on AMX tiles ("amx") or AVX512-BF16 registers
    ("avx512"), or its float32 forward in AVX-512 registers (F32_ENGINE), required (skipped where the CPU has not that
    engine). The native choices run the native backward too (in float32 AVX-512 registers: every CPU with either
    bfloat16 engine has them); "c++" and "pytorch" run the float32 forward and every backward on the ATen products."""
    if which != "pytorch" and not HAS_COMPILER:
        pytest.skip(NO_COMPILER)
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "0" if which == "pytorch" else "1")
    monkeypatch.setenv(native.BF16_FORWARD_VARIABLE, which if which in ENGINES else "aten")
    monkeypatch.setenv(native.F32_FORWARD_VARIABLE, "avx512" if which == F32_ENGINE else "aten")
    # the native backward (float32 products, both dtypes) with every native forward
    monkeypatch.setenv(native.BACKWARD_VARIABLE, "aten" if which in ("c++", "pytorch") else "avx512")
    if which in ENGINES and which not in native._engines(native.native_ops()):
        pytest.skip(NO_ENGINE[which])
    if which == F32_ENGINE and not native.native_ops().avx512_available():
        pytest.skip(NO_ENGINE[which])


def _scores_and_bias(dtype, chunks, maps, slots, length, seed):
    """Scores of ``chunks`` chunks (map-major) and a bias of ``maps`` maps cut from a wider tensor (strided maps,
    fewer slots than it holds), with -inf entries as the kernel's masks have."""
    generator = torch.Generator().manual_seed(seed)
    scores = (torch.randn(chunks, slots, length, generator=generator) * 4).to(dtype)
    wide = torch.randn(maps, slots + 3, length, generator=generator) * 2
    wide[..., 5:9] = float("-inf")
    wide[..., -2:] = float("-inf")
    return scores, wide[:, :slots]


def _softmax_in_float64(scores, bias):
    maps = bias.shape[0]
    total = scores.double().view(maps, -1, *scores.shape[1:]) + bias.double()[:, None]
    return total.softmax(-1).view(scores.shape)


# Key slots not a multiple of any vector width, one map or several, single chunks.
SIZES = [(6, 1, 37, 131), (6, 3, 49, 444), (1, 1, 25, 17)]


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks,maps,slots,length", SIZES)
def test_bias_softmax_matches_the_pytorch_ops(dtype, chunks, maps, slots, length, monkeypatch):
    use_softmax(monkeypatch, "c++")
    ops = native.native_ops()
    scores, bias = _scores_and_bias(dtype, chunks, maps, slots, length, seed=chunks * slots)
    expected = _softmax_in_float64(scores, bias)

    fused, fused_float = scores.clone(), torch.full(scores.shape, float("nan"))
    ops.bias_softmax_(fused, bias, fused_float if dtype == torch.bfloat16 else None)
    plain, plain_float = scores.clone(), torch.empty(scores.shape) if dtype == torch.bfloat16 else None
    plain_result = blocked._bias_softmax(plain, bias[:, None], plain_float)

    torch.testing.assert_close(plain_result.double(), expected, rtol=0, atol=1e-6)  # the reference path itself
    if dtype == torch.float32:
        torch.testing.assert_close(fused.double(), expected, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(fused_float.double(), expected, rtol=0, atol=1e-6)
        # rounded once from float32, as the PyTorch path rounds: equal but where the float32 values straddle a
        # rounding boundary (one bfloat16 step of 2^-8 relative)
        assert torch.equal(fused, fused_float.bfloat16())
        differ = fused != plain
        assert differ.float().mean() < 1e-3
        torch.testing.assert_close(fused.float()[differ], plain.float()[differ], rtol=2**-7, atol=0)
    assert (fused.float()[bias.expand(maps, -1, -1).repeat_interleave(chunks // maps, 0) == float("-inf")] == 0).all()


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias_grad", [False, True])
@pytest.mark.parametrize("chunks,maps,slots,length", SIZES)
def test_softmax_grad_matches_the_pytorch_ops(dtype, with_bias_grad, chunks, maps, slots, length, monkeypatch):
    use_softmax(monkeypatch, "c++")
    ops = native.native_ops()
    generator = torch.Generator().manual_seed(length)
    scores, bias = _scores_and_bias(torch.float32, chunks, maps, slots, length, seed=length)
    probs = _softmax_in_float64(scores, bias).float()
    grad_probs = torch.randn(chunks, slots, length, generator=generator).to(dtype)
    # delta as the kernel holds it: a strided (chunks, slots, 1) view into per-chunk rows of more slots
    delta = torch.randn(chunks, slots + 2, 1, generator=generator)[:, :slots]
    start = torch.randn(maps, slots + 3, length, generator=generator)  # the bias gradient adds to what is there
    expected_ds = probs.double() * (grad_probs.double() - delta.double())
    expected_bias_grad = start[:, :slots].double() + expected_ds.view(maps, -1, slots, length).sum(1)

    fused, fused_bias_grad = grad_probs.clone(), start.clone()
    ops.softmax_grad_(fused, probs, delta, fused_bias_grad[:, :slots] if with_bias_grad else None)
    plain, plain_bias_grad = grad_probs.clone(), start.clone()
    float_copy = torch.empty(plain.shape) if dtype == torch.bfloat16 else None
    blocked._softmax_grad(plain, probs, delta, plain_bias_grad[:, :slots] if with_bias_grad else None, float_copy)

    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2**-8}[dtype]
    for actual in (fused, plain):
        torch.testing.assert_close(actual.double(), expected_ds, rtol=tolerance, atol=1e-6)
    if dtype == torch.bfloat16:
        differ = fused != plain  # both round the same float32 dS once
        assert differ.float().mean() < 1e-3
    if with_bias_grad:
        for actual in (fused_bias_grad, plain_bias_grad):
            torch.testing.assert_close(actual[:, :slots].double(), expected_bias_grad, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(fused_bias_grad, start)
    assert torch.equal(fused_bias_grad[:, slots:], start[:, slots:])  # rows beyond the view untouched


@needs_compiler
def test_ops_refuse_tensors_they_cannot_read(monkeypatch):
    use_softmax(monkeypatch, "c++")
    ops = native.native_ops()
    scores, bias = _scores_and_bias(torch.float32, 4, 2, 9, 20, seed=0)
    with pytest.raises(RuntimeError, match="do not split"):
        ops.bias_softmax_(scores[:3], bias, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.bias_softmax_(scores.double(), bias, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.bias_softmax_(scores.transpose(1, 2).contiguous().transpose(1, 2), bias, None)
    with pytest.raises(RuntimeError, match="must be \\(maps, slots, key slots\\)"):
        ops.bias_softmax_(scores, bias[:, :5], None)
    with pytest.raises(RuntimeError, match="delta must be float32"):
        ops.softmax_grad_(scores, scores, torch.zeros(4, 9, 1, dtype=torch.float64), None)


@needs_compiler
@pytest.mark.parametrize("softmax", ["c++", "pytorch"])
@pytest.mark.parametrize("exact,neighbor", [(False, None), (True, None), (False, 5)])
def test_blocked_float32_matches_reference_with_either_softmax(softmax, exact, neighbor, monkeypatch):
    use_softmax(monkeypatch, softmax)
    calls = []
    if softmax == "c++":
        real = native.native_ops()

        class Counting:
            def __getattr__(self, name):
                calls.append(name)
                return getattr(real, name)

        monkeypatch.setattr(blocked, "native_ops", Counting)
    check_float32_against_reference("blocked", exact, neighbor)
    if softmax == "c++":
        assert {"bias_softmax_", "softmax_grad_"} <= set(calls)


def test_zero_never_builds_and_the_kernel_takes_the_pytorch_ops(monkeypatch):
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "0")
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("built although VIL_KERNELS_NATIVE=0"))
    monkeypatch.setattr(native, "_built", {})
    assert native.native_ops() is None
    assert blocked._native_ops(torch.zeros(1)) is None


def test_native_ops_are_for_cpu_float32_and_bfloat16_only(monkeypatch):
    monkeypatch.setattr(native, "_built", {"ops": "the ops", "error": None})
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "auto")
    assert blocked._native_ops(torch.zeros(1)) == "the ops"
    assert blocked._native_ops(torch.zeros(1, dtype=torch.bfloat16)) == "the ops"
    assert blocked._native_ops(torch.zeros(1, dtype=torch.float64)) is None
    assert blocked._native_ops(torch.zeros(1, device="meta")) is None


def _failing_build():
    raise OSError("c++: command not found")


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "auto")
    monkeypatch.setattr(native, "_build", _failing_build)
    monkeypatch.setattr(native, "_built", {})
    with caplog.at_level(logging.WARNING, logger="vil_kernels.native"):
        assert native.native_ops() is None
        assert native.native_ops() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "c++: command not found" in warnings[0] and "VIL_KERNELS_NATIVE=0" in warnings[0]


def test_a_required_build_that_fails_raises(monkeypatch):
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "1")
    monkeypatch.setattr(native, "_build", _failing_build)
    monkeypatch.setattr(native, "_built", {})
    with pytest.raises(RuntimeError, match="VIL_KERNELS_NATIVE=1 but .* did not build: c\\+\\+: command not found"):
        native.native_ops()
    with pytest.raises(RuntimeError, match="did not build"):  # and again, from the remembered failure
        native.native_ops()


def test_an_unknown_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "yes")
    with pytest.raises(ValueError, match="VIL_KERNELS_NATIVE='yes': use 'auto'"):
        native.native_ops()


INPUTS = ("queries", "keys", "values", "global_keys", "global_values")


def _fused_forward_inputs(dim=32, height=9, width=13, num_global=1, dtype=torch.bfloat16):
    """Tokens for ``longformer_forward_bf16_`` (or ``_f32_``, given float32): (B, H, L, M) queries, keys, values;
    globals; window 5, sliding chunks."""
    generator = torch.Generator().manual_seed(0)
    length, heads = height * width, 3

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    offsets, span = blocked._slot_chunks(None)
    slots = span * (len(offsets) // span * 25 + num_global)
    return dict(
        queries=rand(2, heads, length, dim),
        keys=rand(2, heads, length, dim),
        values=rand(2, heads, length, dim),
        global_keys=rand(2, heads, num_global, dim),
        global_values=rand(2, heads, num_global, dim),
        bias=torch.randn(heads, 25, slots, generator=generator),
        chunk_offsets=torch.tensor(offsets),
        chunks_per_block=len(offsets) // span,
        height=height,
        width=width,
        window=5,
        key_extents=None,
        output=torch.empty(2, heads, length, dim, dtype=dtype),
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_forward_refuses_what_it_cannot_read(engine, monkeypatch):
    use_softmax(monkeypatch, engine)
    forward = native.native_ops().longformer_forward_bf16_
    good = _fused_forward_inputs() | {"tiles": engine == "amx"}
    forward(**good)  # the inputs below differ from these in one thing each

    def refused(match, **change):
        with pytest.raises(RuntimeError, match=match):
            forward(**{**good, **change})

    refused("head dims 32 and 64, got 16", **{k: v[..., :16] for k, v in good.items() if k in (*INPUTS, "output")})
    refused("keys must be a BFloat16 CPU tensor, got Float", keys=good["keys"].float())
    refused("queries hold 117 tokens, not a 9x12 map", width=12)
    refused("values must be \\(2, 3, 117, 32\\) with unit stride", values=good["values"][:1])
    refused("output must be .* unit stride", output=good["output"].transpose(2, 3).contiguous().transpose(2, 3))
    refused("bias must be contiguous float32 \\(3, 25, 228\\)", bias=good["bias"][..., :-1])
    refused("chunk_offsets must be int64", chunks_per_block=2)
    refused("key_extents must be int64 \\(2, 2\\)", key_extents=torch.tensor([[9, 13]]))


TOKENS = ("queries", "keys", "values", "global_keys", "global_values")


def _native_forward_and_backward(engine, inputs, bias, grad_output):
    """The engine's forward of ``_fused_forward_inputs`` with ``bias``, then the native backward (bfloat16 products
    for the bfloat16 engines): [output, the tokens' gradients, the bias's]."""
    ops = native.native_ops()
    output = torch.zeros_like(inputs["output"])
    arguments = inputs | {"bias": bias, "output": output}
    if engine == F32_ENGINE:
        ops.longformer_forward_f32_(**arguments)
    else:
        ops.longformer_forward_bf16_(**arguments, tiles=engine == "amx")
    arguments.pop("output")
    grads = [torch.zeros(inputs[name].shape) for name in TOKENS] + [torch.zeros(bias.shape)]
    ops.longformer_backward_(grad_output, *arguments.values(), *grads, engine != F32_ENGINE)
    return [output, *grads]


@pytest.mark.parametrize("engine", [*ENGINES, F32_ENGINE])
def test_neighbour_chunks_wholly_off_the_map_are_left_out(engine, monkeypatch):
    """A map of one chunk: of its nine neighbour chunks only itself lies on the map, and the forward and the
    backward compute its keys and the global's alone. A NaN in the bias columns of the other eight (which every
    chunk read, as padding, before they were left out) reaches no output and no gradient, and their bias gradient
    is zero; the rest is what a finite bias there gives, bit for bit: the same computation."""
    use_softmax(monkeypatch, engine)
    dtype = torch.float32 if engine == F32_ENGINE else torch.bfloat16
    inputs = _fused_forward_inputs(height=4, width=3, dtype=dtype)  # window 5
    heads, area, slots = inputs["bias"].shape
    own_chunk = torch.zeros(slots, dtype=torch.bool)  # and the globals
    slot = 0
    for chunk, offset in enumerate(inputs["chunk_offsets"].tolist()):
        own_chunk[slot : slot + area] = offset == [0, 0]
        slot += area
        if (chunk + 1) % inputs["chunks_per_block"] == 0:
            own_chunk[slot] = True  # the block's global
            slot += 1
    assert slot == slots and own_chunk.sum() == area + 3
    finite = inputs["bias"].masked_fill(~own_chunk, -3.0)
    poisoned = inputs["bias"].masked_fill(~own_chunk, float("nan"))
    grad_output = torch.randn(inputs["output"].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = _native_forward_and_backward(engine, inputs, finite, grad_output)
    actual = _native_forward_and_backward(engine, inputs, poisoned, grad_output)
    for name, want, got in zip(("output", *TOKENS, "bias"), expected, actual):
        assert torch.isfinite(want).all() and want.abs().sum() > 0, name
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert not actual[-1][..., ~own_chunk].any()


@pytest.mark.parametrize("engine", [*ENGINES, F32_ENGINE])
def test_queries_whose_every_key_is_padding_stay_finite(engine, monkeypatch):
    """No globals, and an image of 2x2 tokens padded to 9x13: the chunks from the second chunk row and the third
    chunk column on see no key of their image, so all their neighbour chunks would be left out. They keep them all
    (their outputs are don't-care, as the ATen path's, but finite: a NaN there would reach the image's own tokens
    through the next stage's patch embedding)."""
    use_softmax(monkeypatch, engine)
    dtype = torch.float32 if engine == F32_ENGINE else torch.bfloat16
    inputs = _fused_forward_inputs(num_global=0, dtype=dtype) | {"key_extents": torch.tensor([[9, 13], [2, 2]])}
    grad_output = torch.randn(inputs["output"].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = _native_forward_and_backward(engine, inputs, inputs["bias"], grad_output)
    for name, result in zip(("output", *TOKENS, "bias"), results):
        assert torch.isfinite(result).all(), name
    assert results[0][0].abs().sum() > 0


@pytest.mark.parametrize("engine", [*ENGINES, F32_ENGINE])
def test_every_call_cuts_the_bias_it_is_given(engine, monkeypatch):
    """The bias columns cut for the chunks at the map's edges are kept per thread within a call only: a bias changed
    in place between two calls (one address, other values) gives what a fresh tensor of those values gives."""
    use_softmax(monkeypatch, engine)
    dtype = torch.float32 if engine == F32_ENGINE else torch.bfloat16
    inputs = _fused_forward_inputs(dtype=dtype)  # a 9x13 map, window 5: 2x3 chunks, every one on an edge
    grad_output = torch.randn(inputs["output"].shape, generator=torch.Generator().manual_seed(1)).to(dtype)

    def output_and_bias_grad(bias):
        results = _native_forward_and_backward(engine, inputs, bias, grad_output)
        return results[0], results[-1]

    bias = inputs["bias"]
    first = output_and_bias_grad(bias)
    bias.mul_(-1.5).add_(0.25)
    second, fresh = output_and_bias_grad(bias), output_and_bias_grad(bias.clone())
    for name, was, got, want in zip(("output", "bias gradient"), first, second, fresh):
        assert not torch.equal(got, was), name
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)  # one computation on equal values


def test_bf16_forward_refuses_an_engine_this_cpu_lacks(monkeypatch):
    use_softmax(monkeypatch, "c++")
    ops = native.native_ops()
    lacking = [engine for engine in ENGINES if engine not in native._engines(ops)]
    if not lacking:
        pytest.skip("this CPU has both engines")
    needs = {"amx": "on tiles needs a CPU with AMX-BF16", "avx512": "needs a CPU with AVX512-BF16"}
    for engine in lacking:
        with pytest.raises(RuntimeError, match=needs[engine]):
            ops.longformer_forward_bf16_(**_fused_forward_inputs(), tiles=engine == "amx")


def test_bf16_forward_setting_chooses_and_logs_why(monkeypatch, caplog):
    monkeypatch.setattr(native, "_built", {"ops": None, "error": None})
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "auto")
    bfloat16_queries = torch.zeros(1, 1, 4, 32, dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="vil_kernels.native"):
        monkeypatch.setenv(native.BF16_FORWARD_VARIABLE, "aten")
        assert blocked._bf16_forward(bfloat16_queries) is None
        monkeypatch.setenv(native.BF16_FORWARD_VARIABLE, "auto")
        assert blocked._bf16_forward(bfloat16_queries) is None
        assert blocked._bf16_forward(bfloat16_queries) is None  # the same reason is not logged again
    reasons = [r.getMessage() for r in caplog.records]
    assert reasons == [
        "blocked longformer, bfloat16 forward: ATen products (VIL_KERNELS_BF16_FORWARD=aten)",
        "blocked longformer, bfloat16 forward: ATen products (the C++ kernels are off or did not build)",
    ]
    monkeypatch.setenv(native.BF16_FORWARD_VARIABLE, "avx512")
    with pytest.raises(RuntimeError, match="BF16_FORWARD=avx512 but .* cannot run: the C\\+\\+ kernels are off"):
        blocked._bf16_forward(bfloat16_queries)
    monkeypatch.setenv(native.BF16_FORWARD_VARIABLE, "1")
    with pytest.raises(ValueError, match="VIL_KERNELS_BF16_FORWARD='1': use 'auto'"):
        blocked._bf16_forward(bfloat16_queries)


class _CPU:
    """Native ops as a CPU with these engines would report them (AVX512-BF16 implies AVX-512)."""

    def __init__(self, amx: bool, avx512: bool, avx512_f32: bool | None = None):
        self.amx, self.avx512 = amx, avx512
        self.avx512_f32 = avx512 if avx512_f32 is None else avx512_f32

    def amx_available(self):
        return self.amx

    def avx512_bf16_available(self):
        return self.avx512

    def avx512_available(self):
        return self.avx512_f32


@pytest.mark.parametrize(
    "amx,avx512,auto", [(True, True, "amx"), (False, True, "avx512"), (False, False, None)], ids=["amx", "zen4", "none"]
)
def test_bf16_forward_takes_the_fastest_engine_and_requires_the_one_named(amx, avx512, auto, monkeypatch, caplog):
    cpu = _CPU(amx, avx512)
    monkeypatch.setattr(native, "_built", {"ops": cpu, "error": None})
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "auto")
    queries = torch.zeros(1, 1, 4, 32, dtype=torch.bfloat16)
    monkeypatch.setenv(native.BF16_FORWARD_VARIABLE, "auto")
    with caplog.at_level(logging.INFO, logger="vil_kernels.native"):
        assert blocked._bf16_forward(queries) == (None if auto is None else (cpu, auto))
    expected = {
        "amx": "one C++ pass per chunk on AMX tiles, one call per layer",
        "avx512": "one C++ pass per chunk in AVX512-BF16 registers, one call per layer",
        None: "ATen products (this CPU has neither AMX bfloat16 tiles nor AVX512-BF16)",
    }[auto]
    assert [r.getMessage() for r in caplog.records] == [f"blocked longformer, bfloat16 forward: {expected}"]
    for engine, here in (("amx", amx), ("avx512", avx512)):
        monkeypatch.setenv(native.BF16_FORWARD_VARIABLE, engine)
        if here:
            assert blocked._bf16_forward(queries) == (cpu, engine)
        else:
            with pytest.raises(RuntimeError, match=f"={engine} but .* cannot run: this CPU"):
                blocked._bf16_forward(queries)


def test_bf16_forward_is_for_bfloat16_head_dims_32_and_64_on_the_cpu(monkeypatch):
    cpu = _CPU(amx=False, avx512=True)
    monkeypatch.setattr(native, "_built", {"ops": cpu, "error": None})
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "auto")
    monkeypatch.setenv(native.BF16_FORWARD_VARIABLE, "auto")
    for queries in (
        torch.zeros(1, 1, 4, 32),
        torch.zeros(1, 1, 4, 48, dtype=torch.bfloat16),
        torch.zeros(1, 1, 4, 32, dtype=torch.bfloat16, device="meta"),
    ):
        assert blocked._bf16_forward(queries) is None
    assert blocked._bf16_forward(torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16)) == (cpu, "avx512")


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "avx2"])
@pytest.mark.parametrize("which", ["float32 forward", "backward"])
def test_avx512_settings_choose_and_log_why(which, avx512, monkeypatch, caplog):
    """``VIL_KERNELS_F32_FORWARD`` and ``VIL_KERNELS_BACKWARD``: ``auto`` takes AVX-512 where the CPU has it,
    ``avx512`` requires it, ``aten`` never; CPU tensors of head dims up to 64 only, float32 (the backward: bfloat16
    too); each change of choice logged once, with its reason."""
    forward = which == "float32 forward"
    variable = native.F32_FORWARD_VARIABLE if forward else native.BACKWARD_VARIABLE
    chosen = blocked._f32_forward if forward else blocked._native_backward
    cpu = _CPU(amx=False, avx512=False, avx512_f32=avx512)
    monkeypatch.setattr(native, "_built", {"ops": cpu, "error": None})
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "auto")
    queries = torch.zeros(1, 1, 4, 24)
    bfloat16 = torch.zeros(1, 1, 4, 32, dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="vil_kernels.native"):
        monkeypatch.setenv(variable, "auto")
        assert chosen(queries) == ((cpu, "avx512") if avx512 else None)
        assert chosen(queries) == ((cpu, "avx512") if avx512 else None)  # not logged again
        assert chosen(bfloat16) == (None if forward or not avx512 else (cpu, "avx512"))
        for other in (
            torch.zeros(1, 1, 4, 65),
            torch.zeros(1, 1, 4, 65, dtype=torch.bfloat16),
            torch.zeros(1, 1, 4, 32, dtype=torch.float64),
            torch.zeros(1, 1, 4, 32, device="meta"),
        ):
            assert chosen(other) is None
        monkeypatch.setenv(variable, "aten")
        assert chosen(queries) is None
    if avx512:
        auto = "one C++ pass per chunk in AVX-512 registers, one call per layer"
    else:
        auto = "ATen products (this CPU has no AVX-512)"
    assert [r.getMessage() for r in caplog.records] == [
        f"blocked longformer, {which}: {auto}",
        f"blocked longformer, {which}: ATen products ({variable}=aten)",
    ]
    monkeypatch.setenv(variable, "avx512")
    if avx512:
        assert chosen(queries) == (cpu, "avx512")
    else:
        with pytest.raises(RuntimeError, match=f"{variable}=avx512 but that {which} cannot run: this CPU"):
            chosen(queries)
    monkeypatch.setenv(variable, "amx")
    with pytest.raises(ValueError, match=f"{variable}='amx': use 'auto' .*'avx512' .*'aten'"):
        chosen(queries)


def test_f32_ops_refuse_a_cpu_without_avx512(monkeypatch):
    use_softmax(monkeypatch, "c++")
    ops = native.native_ops()
    if ops.avx512_available():
        pytest.skip("this CPU has AVX-512: the op runs here (tests/test_kernels_f32.py)")
    inputs = _fused_forward_inputs(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="longformer_forward_f32_ needs a CPU with AVX-512"):
        ops.longformer_forward_f32_(**inputs)
    output = inputs.pop("output")
    grads = [torch.empty_like(inputs[n]) for n in ("queries", "keys", "values", "global_keys", "global_values")]
    with pytest.raises(RuntimeError, match="longformer_backward_ needs a CPU with AVX-512"):
        ops.longformer_backward_(output, *inputs.values(), *grads, None, False)
