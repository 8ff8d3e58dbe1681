"""torch.compile and torch.export of the ViL models with the default longformer kernel.

On CPU the default kernel is ``blocked``; traced, it is one custom operator (``vil_kernels::
longformer_blocked``, with a fake implementation and its backward as a second operator) that runs
the same eager code at run time. Its results against the reference are in test_kernels.py (the
``blocked-operator`` cases); here the models must trace whole and match eager.
"""

import pytest
import torch

from vil_hf import ViLBackbone, ViLConfig, ViLForImageClassification, ViLModel

from .test_modeling import TINY_ARCH, randomize
from .test_padded_batch import RPE_ARCH, SIZES, _padded_batch

# As the published models, one block per stage: relative bias, longformer stages 1-2 (2 and 1
# global tokens), full attention stages 3-4.
COMPILE_ARCH = TINY_ARCH.replace("a1", "a0").replace("n2", "n1")
MODEL_CLASSES = [ViLModel, ViLBackbone, ViLForImageClassification]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(model_class, arch=COMPILE_ARCH, **kwargs):
    config = ViLConfig(
        arch=arch, image_size=64, num_labels=5, out_features=["stage1", "stage2", "stage3", "stage4"], **kwargs
    )
    return randomize(model_class(config))


def _tensors(output) -> list[torch.Tensor]:
    """Every tensor of a model output, in order (nested tuples of maps included)."""
    tensors = []
    for value in output.values() if hasattr(output, "values") else output:
        tensors += list(value) if isinstance(value, (tuple, list)) else [value]
    return tensors


def _assert_same(actual, expected, tolerance=1e-5):
    actual, expected = _tensors(actual), _tensors(expected)
    assert len(actual) == len(expected) > 0
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_compile_fullgraph_matches_eager(model_class):
    """One graph (fullgraph=True), traced through AOTAutograd as Inductor would take it."""
    model = _model(model_class)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    pixel_values = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        _assert_same(compiled(pixel_values), model(pixel_values))


def test_compiled_training_step_matches_eager():
    """The blocked kernel's backward operator inside AOTAutograd's joint graph."""
    model = _model(ViLForImageClassification).train()
    pixel_values, labels = torch.randn(2, 3, 64, 80), torch.tensor([1, 3])
    results = []
    for run in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.zero_grad()
        output = run(pixel_values, labels=labels)
        output.loss.backward()
        results.append((output.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_logits, eager_grads), (compiled_logits, compiled_grads) = results
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-5, atol=1e-5)
    attention = "vil.encoder.stages.0.layers.0.attention"
    assert compiled_grads[f"{attention}.relative_position_bias_table"].abs().sum() > 0
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_inductor_compile_fullgraph_matches_eager():
    """The default backend, as users call it (about two minutes of C++ compilation on a 2-core CPU)."""
    model = _model(ViLForImageClassification)
    compiled = torch.compile(model, fullgraph=True)
    pixel_values = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values).logits, model(pixel_values).logits, rtol=1e-4, atol=1e-5)


def _uses_blocked_operator(program) -> bool:
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    return torch.ops.vil_kernels.longformer_blocked.default in targets


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_export_with_static_shapes_matches_eager(model_class):
    model = _model(model_class)
    # 64 px: the full-attention stages run on the grid their bias tables were built for, which eager
    # takes as is and the traced graph resizes to its own size (exactly the same table)
    pixel_values = torch.randn(1, 3, 64, 64)
    program = torch.export.export(model, (pixel_values,))
    assert _uses_blocked_operator(program)
    with torch.no_grad():
        _assert_same(program.module()(pixel_values), model(pixel_values))


def _export_dynamic(model, pixel_values):
    height, width = torch.export.Dim("height", min=64, max=1024), torch.export.Dim("width", min=64, max=1024)
    return torch.export.export(model, (pixel_values,), dynamic_shapes={"pixel_values": {2: height, 3: width}})


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_export_with_dynamic_height_and_width_matches_eager_at_another_size(model_class):
    model = _model(model_class)
    program = _export_dynamic(model, torch.randn(1, 3, 64, 80))
    assert _uses_blocked_operator(program)
    # no map a multiple of its window; then a stage-1 map of 44k tokens, which eager runs through
    # the feed-forward in chunks (the traced graph must not depend on that)
    for size in ((100, 131), (840, 850)):
        pixel_values = torch.randn(1, 3, *size)
        with torch.no_grad():
            _assert_same(program.module()(pixel_values), model(pixel_values))


OTHER_ARCH = (
    "l1,h2,d16,n1,s1,g1,p4,f2,a1_l2,h2,d16,n1,s1,g1,p2,f2,a1_l3,h2,d32,n1,s1,g1,p2,f2,a1_l4,h2,d32,n1,s1,g0,p2,f1,a1"
)
OTHER_CASES = {
    # absolute tables for 64 px: the second size stretches them, the first uses their first rows
    "absolute-tables": dict(arch=TINY_ARCH.replace("n2", "n1").replace("a0", "a1")),
    "global-only": dict(arch=COMPILE_ARCH.replace("s0", "s1").replace("g0", "g1"), attention_type="global"),
    "srformer": dict(arch=OTHER_ARCH, attention_type="srformer"),
    "performer": dict(arch=OTHER_ARCH, attention_type="performer"),
}


@pytest.mark.filterwarnings("ignore:.*not a multiple of the reduction ratio")
@pytest.mark.parametrize("case", list(OTHER_CASES))
def test_other_attention_types_export_with_dynamic_sizes(case):
    model = _model(ViLBackbone, **OTHER_CASES[case])
    program = _export_dynamic(model, torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        for size in ((64, 64), (100, 131)):
            pixel_values = torch.randn(1, 3, *size)
            _assert_same(program.module()(pixel_values), model(pixel_values))


def test_linformer_exports_with_static_shapes_and_refuses_dynamic_ones_clearly():
    arch = OTHER_ARCH.replace("f2", "f8").replace("f1", "f8")
    model = _model(ViLBackbone, arch=arch, attention_type="linformer")
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _assert_same(torch.export.export(model, (pixel_values,)).module()(pixel_values), model(pixel_values))
    with pytest.raises(ValueError, match="linformer stage 1 projects a fixed sequence of 257 tokens .* static shapes"):
        _export_dynamic(model, pixel_values)


def test_compile_with_pixel_mask_matches_eager():
    """Padded batches compile with graph breaks (the extents are read as numbers), not as one graph."""
    backbone = _model(ViLBackbone, arch=RPE_ARCH)
    pixel_values, pixel_mask = _padded_batch(SIZES)
    compiled = torch.compile(backbone, backend="aot_eager")
    with torch.no_grad():
        _assert_same(compiled(pixel_values, pixel_mask=pixel_mask), backbone(pixel_values, pixel_mask=pixel_mask))
