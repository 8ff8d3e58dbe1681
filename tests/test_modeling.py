"""ViL models: registration, save/load, sizes, attention semantics, training-time behaviour."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    ConvNextConfig,
    ResNetConfig,
    SwinConfig,
)

import vil_hf.modeling_vil as modeling_vil
from vil_hf import (
    PUBLISHED_MODELS,
    MaskRCNNConfig,
    ViLBackbone,
    ViLConfig,
    ViLForImageClassification,
    ViLImageProcessorPil,
    ViLModel,
    published_arch,
)
from vil_hf.attention import ViLFullAttention, ViLLongformerAttention
from vil_hf.configuration_vil import EFFICIENT_ATTENTION_TYPES, STAGE_FIELDS, stage_lists_from_arch
from vil_hf.modeling_vil import ViLLayer
from vil_kernels.longformer.blocked import release_workspaces

# A small model with every feature: longformer stages with 1-2 globals, full attention stages,
# relative bias in 1, 3 and 4, absolute embeddings in 2, windows 3 and 5.
TINY_ARCH = (
    "l1,h2,d16,n1,s1,g2,p4,f3,a0_l2,h2,d16,n2,s1,g1,p2,f5,a1_l3,h2,d32,n1,s0,g1,p2,f7,a0_l4,h4,d32,n1,s0,g0,p2,f7,a0"
)


def tiny_config(**kwargs) -> ViLConfig:
    return ViLConfig(arch=TINY_ARCH, image_size=64, num_labels=5, **kwargs)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Push every parameter away from its init so that a dropped or swapped tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def test_auto_classes_resolve_vil():
    config = AutoConfig.for_model("vil", arch=TINY_ARCH, image_size=64)
    assert isinstance(config, ViLConfig)
    assert isinstance(AutoModel.from_config(config), ViLModel)
    assert isinstance(AutoModelForImageClassification.from_config(config), ViLForImageClassification)
    assert isinstance(AutoBackbone.from_config(config), ViLBackbone)


@pytest.mark.parametrize("model_class", [ViLModel, ViLForImageClassification, ViLBackbone])
def test_save_pretrained_round_trip(model_class, tmp_path):
    config = tiny_config(out_features=["stage2", "stage4"])
    model = randomize(model_class(config))
    pixel_values = torch.randn(2, 3, 70, 90)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = model_class.from_pretrained(tmp_path).eval()
    assert loaded.config.to_arch_string() == TINY_ARCH
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(ours, theirs), name  # the weights come back bit for bit
    with torch.no_grad():
        expected, actual = model(pixel_values), loaded(pixel_values)
    for key in expected:
        a, b = expected[key], actual[key]
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            # the loaded weights sit in unaligned (memory-mapped) storage, so BLAS/oneDNN take other vector
            # paths: float32 outputs differ in the last bits (up to ~3e-6 seen on AMD EPYC)
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


def test_auto_classes_load_saved_folders(tmp_path):
    model = randomize(ViLForImageClassification(tiny_config()))
    model.save_pretrained(tmp_path)
    ViLImageProcessorPil().save_pretrained(tmp_path)
    assert isinstance(AutoModelForImageClassification.from_pretrained(tmp_path), ViLForImageClassification)
    assert isinstance(AutoModel.from_pretrained(tmp_path), ViLModel)
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), ViLImageProcessorPil)


# Published ImageNet-1K counts (vil-reference section 1, 1000 classes). They are those of the
# absolute-embedding models at their training resolution (224; 384 for the Base models).
PUBLISHED_PARAMS = {
    "tiny": (6.7, 224),
    "small": (24.6, 224),
    "medium-deep": (39.7, 224),
    "medium-wide": (39.8, 224),
    "base-deep": (55.7, 384),
    "base-wide": (79.0, 384),
}


@pytest.mark.parametrize("name", PUBLISHED_MODELS)
def test_published_classification_parameter_counts(name):
    millions, image_size = PUBLISHED_PARAMS[name]
    config = ViLConfig(arch=published_arch(name, absolute=True), num_labels=1000, image_size=image_size)
    with torch.device("meta"):
        model = ViLForImageClassification(config)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{name}: {count:.3f}M (published {millions}M)")
    assert abs(count - millions) <= 0.05


def test_published_arch_strings_round_trip():
    for name in PUBLISHED_MODELS:
        for sparse in (False, True):
            arch = published_arch(name, sparse=sparse)
            config = ViLConfig(arch=arch)
            assert config.to_arch_string() == arch
            rebuilt = ViLConfig(
                hidden_sizes=config.hidden_sizes,
                num_heads=config.num_heads,
                depths=config.depths,
                attention_types=config.attention_types,
                num_global_tokens=config.num_global_tokens,
                patch_sizes=config.patch_sizes,
                window_sizes=config.window_sizes,
                use_absolute_embeddings=config.use_absolute_embeddings,
            )
            assert rebuilt.arch == arch
    assert tuple(stage_lists_from_arch(published_arch("small"))) == STAGE_FIELDS
    small = ViLConfig(arch=published_arch("small", sparse=True))
    assert small.attention_types == ["longformer"] * 4 and small.num_global_tokens == [1, 1, 1, 0]


@pytest.mark.parametrize("size", [(64, 64), (100, 150), (250, 190), (33, 47)])
def test_any_input_size(size):
    model = randomize(ViLForImageClassification(tiny_config()))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, *size)).logits
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()


def test_backbone_maps_for_sizes_that_are_not_multiples_of_32():
    config = ViLConfig(arch=TINY_ARCH.replace("s0", "s1"), out_features=["stage1", "stage2", "stage3", "stage4"])
    backbone = randomize(ViLBackbone(config))
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 97, 130)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 16, 24, 32), (2, 16, 12, 16), (2, 32, 6, 8), (2, 32, 3, 4)]
    assert backbone.channels == [16, 16, 32, 32]


def test_backbone_returns_the_local_tokens_of_the_classification_model(tmp_path):
    classifier = randomize(ViLForImageClassification(tiny_config()))
    classifier.save_pretrained(tmp_path)
    backbone = ViLBackbone.from_pretrained(tmp_path, out_features=["stage1", "stage3"]).eval()
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        hidden = classifier.vil(pixel_values, output_hidden_states=True)
        maps = backbone(pixel_values).feature_maps
    # two modules and two runs: float32 results may differ in the last bits (seen up to 2.4e-6 on AMD EPYC)
    torch.testing.assert_close(maps[0], hidden.reshaped_hidden_states[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps[1], hidden.reshaped_hidden_states[3], rtol=1e-5, atol=1e-5)
    # hidden states follow stage_names: the stem (stage 1's patch embedding, local tokens only), then each
    # stage's tokens, global tokens first
    assert hidden.hidden_states[0].shape == (1, 16 * 24, 16)
    assert hidden.hidden_states[1].shape == (1, 2 + 16 * 24, 16)
    torch.testing.assert_close(
        hidden.reshaped_hidden_states[1].flatten(2).transpose(1, 2), hidden.hidden_states[1][:, 2:]
    )


def test_longformer_equals_full_attention_when_the_window_covers_the_map():
    """With one chunk covering the map and no bias, ViL's local/global split is plain attention."""
    config = ViLConfig(arch="l1,h2,d16,n1,s1,g2,p4,f9,a1_l2,h2,d16,n1,s0,g2,p2,f7,a1_l3,h2,d16,n1,s0,g0,p2,f7,a1")
    longformer, full = ViLLongformerAttention(config, 0).eval(), ViLFullAttention(config, 1).eval()
    randomize(longformer)
    with torch.no_grad():
        full.qkv.weight.copy_(torch.cat([longformer.query.weight, longformer.kv.weight]))
        full.qkv.bias.copy_(torch.cat([longformer.query.bias, longformer.kv.bias]))
        full.proj.load_state_dict(longformer.proj.state_dict())
    tokens = torch.randn(2, 2 + 6 * 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(longformer(tokens, 6, 8), full(tokens, 6, 8), rtol=1e-5, atol=1e-5)


def _backward_nodes(output: torch.Tensor) -> list[str]:
    """Names of the autograd nodes behind ``output``."""
    names, seen, todo = [], set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("attention_class", [ViLLongformerAttention, ViLFullAttention])
def test_attention_backward_writes_no_zero_projection_per_view(attention_class):
    """Queries, keys and values (and, for the global queries, each image's) are taken from the projection by
    unbind: the backward of an index ``[i]`` writes a zero tensor the size of the whole projection for every view,
    summed afterwards. The gradient is still the one from plain indexing."""
    config = ViLConfig(arch=TINY_ARCH)
    attention = randomize(attention_class(config, 0)).train()
    tokens = torch.randn(3, 2 + 5 * 6, 16, requires_grad=True)
    output = attention(tokens, 5, 6)
    names = _backward_nodes(output)
    assert "UnbindBackward0" in names
    assert "SelectBackward0" not in names
    (grad,) = torch.autograd.grad(output.pow(2).sum(), tokens)
    (expected,) = torch.autograd.grad(
        torch.cat([attention(tokens[b : b + 1], 5, 6) for b in range(3)]).pow(2).sum(), tokens
    )
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_separate_global_weights_are_used_for_global_queries():
    config = ViLConfig(arch=TINY_ARCH, share_global_weights=False)
    attention = randomize(ViLLongformerAttention(config, 0))
    tokens = torch.randn(1, 2 + 5 * 6, 16)
    with torch.no_grad():
        before = attention(tokens, 5, 6)
        attention.global_query.weight.mul_(3.0)
        after = attention(tokens, 5, 6)
    torch.testing.assert_close(after[:, 2:], before[:, 2:])  # local outputs do not use global_query
    assert not torch.allclose(after[:, :2], before[:, :2])


def test_full_attention_bias_table_is_resized_for_other_grids():
    config = tiny_config()
    attention = randomize(ViLFullAttention(config, 2))
    rows, cols = attention.grid_size
    assert (rows, cols) == (4, 4)
    torch.testing.assert_close(attention._local_bias_table(rows, cols), attention.relative_position_bias_table)
    with torch.no_grad():
        attention.relative_position_bias_table.fill_(0.5)
    resized = attention._local_bias_table(6, 3)
    assert resized.shape == (11 * 5, 2)
    torch.testing.assert_close(resized, torch.full_like(resized, 0.5))
    assert attention.relative_bias(6, 3).shape == (2, 1 + 18, 1 + 18)


def test_absolute_embeddings_slice_smaller_maps_and_stretch_larger_ones():
    config = tiny_config()
    model = randomize(ViLModel(config))
    embeddings = model.encoder.stages[1].position_embeddings  # built for an 8x8 grid
    small = embeddings(5, 7)
    assert small.shape == (1, 1 + 35, 16)
    torch.testing.assert_close(small[0, 1:].view(5, 7, 16)[:, 0, :8], embeddings.row_embeddings[0, :5])
    torch.testing.assert_close(small[0, 1:].view(5, 7, 16)[0, :, 8:], embeddings.column_embeddings[0, :7])
    assert embeddings(12, 9).shape == (1, 1 + 108, 16)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    config = tiny_config(random_shift=True, drop_path_rate=0.0)
    model = randomize(ViLForImageClassification(config)).train()
    pixel_values, labels = torch.randn(2, 3, 64, 80), torch.tensor([1, 3])

    def gradients():
        model.zero_grad()
        torch.manual_seed(123)  # the same random shifts in both runs
        model(pixel_values, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_feed_forward_in_chunks_gives_the_same_outputs_and_gradients():
    """Chunks of 5 tokens (maps of 20x16 and 10x8 plus globals: never a whole number of chunks)."""
    pixel_values, labels = torch.randn(2, 3, 80, 64), torch.tensor([1, 3])
    results = []
    for chunk in (0, 5):
        torch.manual_seed(0)
        model = randomize(ViLForImageClassification(tiny_config(chunk_size_feed_forward=chunk))).train()
        output = model(pixel_values, labels=labels)
        output.loss.backward()
        results.append((output.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (whole, whole_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert whole_grads.keys() == chunked_grads.keys()
    for name in whole_grads:
        torch.testing.assert_close(chunked_grads[name], whole_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_feed_forward_chunks_are_chosen_by_memory_on_cpu_only():
    layer = ViLModel(tiny_config()).encoder.stages[0].layers[0]  # d 16: MLP hidden 64 features
    cpu = torch.zeros(2, 100_000, 16)
    assert layer._feed_forward_chunk(cpu) == 8 * 2**20 // (2 * 64 * 4)  # 8 MiB of float32 hidden activations
    assert layer._feed_forward_chunk(torch.zeros(2, 100_000, 16, device="meta")) == 100_000  # whole off CPU
    layer.chunk_size_feed_forward = 7
    assert layer._feed_forward_chunk(cpu) == 7


@pytest.mark.parametrize("attention_type", sorted(EFFICIENT_ATTENTION_TYPES))  # stages 3-4: full
@pytest.mark.parametrize("precision", ["float32", "bfloat16 autocast", "bfloat16 weights"])
def test_inference_in_place_gives_the_plain_forward_bit_for_bit(attention_type, precision, monkeypatch):
    """Inference normalises the attention's input straight into autocast's dtype and adds the feed-forward into
    the stream, both in chunks of 11 tokens (never a whole number of them in stages 1-3): every stage's tokens,
    the stem's too, are the plain forward's bits, in the plain forward's dtype. (Under autocast, with the C++ kernels
    built, the residual sums are C++ steps, exact; the C++ layer norm, another summation order, is left out here:
    tests/test_block_steps.py holds it.)"""
    monkeypatch.setattr(modeling_vil, "_norms_natively", lambda layer_norm: False)
    model = randomize(ViLModel(tiny_config(chunk_size_feed_forward=11, attention_type=attention_type)))
    size = (64, 64) if attention_type == "linformer" else (80, 64)  # the linformer projects a fixed sequence
    pixel_values = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    if precision == "bfloat16 weights":
        model, pixel_values = model.to(torch.bfloat16), pixel_values.to(torch.bfloat16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16 autocast")
    calls = []
    inference_forward = ViLLayer._inference_forward
    monkeypatch.setattr(ViLLayer, "_inference_forward", lambda *args: calls.append(1) or inference_forward(*args))

    def stage_tokens() -> tuple[torch.Tensor, ...]:
        with torch.no_grad(), autocast:
            return model(pixel_values, output_hidden_states=True).hidden_states

    in_place = stage_tokens()
    assert len(calls) == sum(len(stage.layers) for stage in model.encoder.stages)
    monkeypatch.setattr(ViLLayer, "_runs_in_place", lambda self: False)
    plain = stage_tokens()
    assert len(calls) == sum(len(stage.layers) for stage in model.encoder.stages)
    assert len(in_place) == len(plain) == 5
    for index, (actual, expected) in enumerate(zip(in_place, plain)):
        assert actual.dtype == expected.dtype, index
        assert torch.equal(actual, expected), f"stage output {index}: {(actual - expected).abs().max()}"


def test_blocks_run_in_place_only_in_eager_inference_and_leave_their_input_alone():
    layer = ViLModel(tiny_config(chunk_size_feed_forward=5)).encoder.stages[0].layers[0]
    randomize(layer)
    hidden_states = torch.randn(2, 2 + 20 * 16, 16)
    before = hidden_states.clone()
    with torch.no_grad():
        assert layer._runs_in_place()
        layer(hidden_states, 20, 16)
    assert torch.equal(hidden_states, before)
    assert not layer._runs_in_place()  # autograd keeps what the plain forward's tensors hold
    with torch.no_grad():
        assert not layer.train()._runs_in_place()  # dropout and drop-path draw per call


@pytest.mark.parametrize(
    "implementation, forward_engine", [("auto", "auto"), ("blocked", "aten"), ("dense", "auto"), ("vectorized", "auto")]
)
@pytest.mark.parametrize("autocast", [False, True])
def test_training_runs_after_a_first_call_under_inference_mode(implementation, forward_engine, autocast, monkeypatch):
    """The kernels cache their geometry (index tensors) and the blocked path its workspaces per map size. Built on a
    first call under ``torch.inference_mode()`` (a validation pass before training, as Lightning runs one) they
    were inference tensors, and the next training step on those sizes failed: an index that ``index`` keeps for
    backward, a workspace written in place. A size no other test uses, so that this test's first call builds them."""
    monkeypatch.setenv("VIL_KERNELS_F32_FORWARD", forward_engine)
    monkeypatch.setenv("VIL_KERNELS_BF16_FORWARD", forward_engine)
    release_workspaces()
    model = randomize(ViLForImageClassification(tiny_config(longformer_implementation=implementation)))
    pixel_values, labels = torch.randn(2, 3, 88, 104, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 3])
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.inference_mode(), context:
        first = model(pixel_values).logits
    with context:
        loss = model.train()(pixel_values, labels=labels).loss
    loss.backward()
    assert model.vil.encoder.stages[0].layers[0].attention.query.weight.grad.abs().sum() > 0
    with torch.no_grad(), context:
        again = model.eval()(pixel_values).logits
    assert torch.equal(again, first)  # the same path twice


def test_random_shift_only_in_training_and_can_be_switched_off():
    config = tiny_config(random_shift=True)
    model = randomize(ViLForImageClassification(config))
    pixel_values = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        evaluation = model.eval()(pixel_values).logits
        torch.testing.assert_close(model(pixel_values).logits, evaluation)
        model.train()
        shifted = [model(pixel_values).logits for _ in range(6)]
        assert any(not torch.allclose(s, evaluation, atol=1e-5) for s in shifted)
        model.set_random_shift(False)
        torch.testing.assert_close(model(pixel_values).logits, evaluation)
    assert model.config.random_shift is False


def test_drop_path_rises_linearly_over_all_blocks():
    model = ViLModel(tiny_config(drop_path_rate=0.3))
    rates = [layer.drop_path.drop_prob for stage in model.encoder.stages for layer in stage.layers]
    np.testing.assert_allclose(rates, np.linspace(0, 0.3, 5))


def test_weight_init_follows_the_original():
    model = ViLForImageClassification(ViLConfig(arch=published_arch("tiny"), num_labels=10))
    attention = model.vil.encoder.stages[0].layers[0].attention
    assert attention.query.bias.abs().max() == 0 and 0.015 < attention.kv.weight.std() < 0.025
    assert 0.015 < attention.relative_position_bias_table.std() < 0.025
    assert model.vil.encoder.stages[0].global_tokens.abs().max() > 0
    norm = model.vil.encoder.stages[0].layers[0].layernorm_before
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and norm.eps == 1e-6


def test_pooling_uses_first_global_token_or_the_mean():
    arch = TINY_ARCH.replace("s0,g0", "s0,g2")
    with_global = randomize(ViLModel(ViLConfig(arch=arch, image_size=64)))
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = with_global(pixel_values)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])
    averaged = ViLModel(ViLConfig(arch=arch, image_size=64, average_pool=True))
    averaged.load_state_dict(with_global.state_dict())
    with torch.no_grad():
        out = averaged.eval()(pixel_values)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(1))


def test_classification_loss_and_backward_reach_the_first_stage():
    model = ViLForImageClassification(tiny_config()).train()
    output = model(torch.randn(2, 3, 64, 64), labels=torch.tensor([0, 4]))
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    output.loss.backward()
    assert model.vil.encoder.stages[0].patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert model.vil.encoder.stages[0].global_tokens.grad.abs().sum() > 0


@pytest.mark.parametrize("batch", [1, 2])
def test_gradients_accumulate_over_backward_passes_with_absolute_embeddings_and_globals(batch):
    """Two backward passes without zero_grad give twice one pass's gradient, for every parameter.

    At batch 1 one sum over the (B, G + L, d) sequence once handed global_tokens and
    global_embeddings views of one gradient buffer, which autograd kept as both .grad: the second
    pass added into it twice (3x instead of 2x), so gradient accumulation at batch 1 was wrong.
    """
    arch = "l1,h2,d16,n1,s1,g1,p4,f3,a1_l2,h2,d16,n1,s1,g2,p2,f3,a1_l3,h2,d16,n1,s1,g0,p2,f3,a1"
    model = randomize(ViLModel(ViLConfig(arch=arch, image_size=64))).train()
    pixel_values = torch.randn(batch, 3, 40, 56, generator=torch.Generator().manual_seed(0))

    def backward():
        model(pixel_values).last_hidden_state.square().sum().backward()

    backward()
    once = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert {"encoder.stages.0.global_tokens", "encoder.stages.0.position_embeddings.global_embeddings"} <= set(once)
    backward()
    for name, parameter in model.named_parameters():
        if name in once:
            torch.testing.assert_close(parameter.grad, 2 * once[name], rtol=1e-5, atol=1e-7, msg=name)
    stage = model.encoder.stages[0]
    grads = (stage.global_tokens.grad, stage.position_embeddings.global_embeddings.grad)
    assert grads[0].untyped_storage().data_ptr() != grads[1].untyped_storage().data_ptr()


def test_image_processor_matches_the_original_evaluation_transform():
    processor = ViLImageProcessorPil()
    image = Image.fromarray(np.full((300, 400, 3), (255, 128, 0), dtype=np.uint8))
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = (np.array([255, 128, 0]) / 255.0 - mean) / std
    np.testing.assert_allclose(pixel_values[0, :, 100, 100].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_image_classification_pipeline_runs_on_a_saved_folder(tmp_path):
    from transformers import pipeline

    config = tiny_config(id2label={i: f"shape{i}" for i in range(5)}, label2id={f"shape{i}": i for i in range(5)})
    randomize(ViLForImageClassification(config)).save_pretrained(tmp_path)
    ViLImageProcessorPil().save_pretrained(tmp_path)
    classify = pipeline("image-classification", model=str(tmp_path))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (180, 260, 3), dtype=np.uint8))
    predictions = classify(image, top_k=5)
    assert sorted(p["label"] for p in predictions) == [f"shape{i}" for i in range(5)]
    assert abs(sum(p["score"] for p in predictions) - 1.0) < 1e-4


@pytest.mark.parametrize("exact_window,random_shift", [(False, False), (True, False), (False, True)])
def test_longformer_implementations_agree_in_the_model(exact_window, random_shift):
    """The config field picks the kernel; every CPU path gives the reference's logits and gradients."""
    pixel_values, labels = torch.randn(2, 3, 64, 80), torch.tensor([1, 3])
    results = {}
    for implementation in ("reference", "vectorized", "blocked", "dense", "auto"):
        torch.manual_seed(0)
        config = tiny_config(
            exact_window=exact_window, random_shift=random_shift, longformer_implementation=implementation
        )
        model = randomize(ViLForImageClassification(config)).train()
        torch.manual_seed(7)  # the same random shifts for every implementation
        output = model(pixel_values, labels=labels)
        output.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[implementation] = output.logits.detach(), grads
    expected_logits, expected_grads = results.pop("reference")
    for implementation, (logits, grads) in results.items():
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5, msg=implementation)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=f"{implementation} {name}")


def test_gpu_implementation_on_cpu_is_a_clear_error():
    model = ViLBackbone(tiny_config(longformer_implementation="flex"))
    with pytest.raises(ValueError, match="'flex' longformer implementation runs on CUDA tensors only"):
        model(torch.randn(1, 3, 64, 64))


def test_stage_names_and_out_indices_mean_what_they_mean_for_swin_resnet_and_convnext():
    vil = ViLConfig(arch=TINY_ARCH, out_indices=[1, 2, 3, 4])
    assert vil.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert vil.out_features == ["stage1", "stage2", "stage3", "stage4"]
    for other in (
        SwinConfig(out_indices=[1, 2, 3, 4]),
        ResNetConfig(out_indices=[1, 2, 3, 4]),
        ConvNextConfig(out_indices=[1, 2, 3, 4]),
    ):
        assert other.stage_names == vil.stage_names and other.out_features == vil.out_features
    assert ViLConfig(arch=TINY_ARCH, out_indices=[1, 2, 3]).out_features == ["stage1", "stage2", "stage3"]
    assert ViLConfig(arch=TINY_ARCH).out_features == ["stage4"]


def test_backbone_returns_the_stem_as_stage_1_patch_embedding():
    backbone = randomize(ViLBackbone(ViLConfig(arch=TINY_ARCH, out_indices=[0, 1, 2, 3, 4])))
    assert backbone.channels == [16, 16, 16, 32, 32]  # the stem has stage 1's width, as ConvNeXt's stem
    pixel_values = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        maps = backbone(pixel_values).feature_maps
        tokens, height, width = backbone.encoder.stages[0].patch_embeddings(pixel_values)
    assert [tuple(m.shape) for m in maps] == [
        (2, 16, 17, 22),
        (2, 16, 17, 22),
        (2, 16, 8, 11),
        (2, 32, 4, 5),
        (2, 32, 2, 2),
    ]
    # the same modules on the same input: identical
    torch.testing.assert_close(maps[0], tokens.transpose(1, 2).reshape(2, 16, height, width), rtol=0, atol=0)


# config.json exactly as vil-hf wrote it before the stem was added (main at 24ada49) for
# ViLConfig(arch=TINY_ARCH, image_size=64, out_features=["stage2", "stage4"]).
CONFIG_SAVED_BEFORE_THE_STEM = {
    "arch": TINY_ARCH,
    "attention_probs_dropout_prob": 0.0,
    "attention_type": "longformer",
    "attention_types": ["longformer", "longformer", "full", "full"],
    "average_pool": False,
    "depths": [1, 2, 1, 1],
    "drop_path_rate": 0.0,
    "exact_window": False,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 32,
    "hidden_sizes": [16, 16, 32, 32],
    "image_size": 64,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-06,
    "linformer_share_kv": False,
    "longformer_implementation": "auto",
    "mlp_ratio": 4.0,
    "model_type": "vil",
    "num_channels": 3,
    "num_global_tokens": [2, 1, 1, 0],
    "num_heads": [2, 2, 2, 4],
    "num_layers": 5,
    "out_features": ["stage2", "stage4"],
    "out_indices": [1, 3],
    "patch_embed_norm": True,
    "patch_sizes": [4, 2, 2, 2],
    "performer_redraw_interval": 1,
    "qkv_bias": True,
    "random_shift": False,
    "share_global_weights": True,
    "stage_names": ["stage1", "stage2", "stage3", "stage4"],
    "transformers_version": "5.24.0",
    "use_absolute_embeddings": [False, True, False, False],
    "window_sizes": [3, 5, 7, 7],
}


def test_folders_saved_before_the_stem_load_with_the_stages_they_selected(tmp_path):
    backbone = randomize(ViLBackbone(tiny_config(out_features=["stage2", "stage4"])))
    backbone.save_pretrained(tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text(json.dumps(CONFIG_SAVED_BEFORE_THE_STEM))
    loaded = ViLBackbone.from_pretrained(tmp_path / "old").eval()
    assert loaded.config.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert loaded.out_features == ["stage2", "stage4"] and loaded.out_indices == [2, 4]
    assert AutoConfig.from_pretrained(tmp_path / "old").out_indices == [2, 4]
    for (name, ours), (_, theirs) in zip(backbone.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(ours, theirs), name
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for expected, actual in zip(backbone(pixel_values).feature_maps, loaded(pixel_values).feature_maps):
            # loaded weights sit in unaligned storage: other vector paths, last-bit float32 differences
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # saved again, the folder has today's numbering
    loaded.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert saved["stage_names"][0] == "stem" and saved["out_indices"] == [2, 4]
    # a hand-written old dict with indices only: they move up by one
    old_indices = {key: value for key, value in CONFIG_SAVED_BEFORE_THE_STEM.items() if key != "out_features"}
    assert ViLConfig.from_dict({**old_indices, "out_indices": [0, 2, -1]}).out_features == [
        "stage1",
        "stage3",
        "stage4",
    ]
    with pytest.raises(ValueError, match="do not match this ViL's stages"):
        ViLConfig.from_dict({**CONFIG_SAVED_BEFORE_THE_STEM, "stage_names": ["stage1", "stage2", "stage3"]})


def test_detector_configs_saved_before_the_stem_load_their_backbone_stages(tmp_path):
    config = MaskRCNNConfig(backbone_config=ViLConfig(arch=TINY_ARCH, image_size=64), num_labels=3, fpn_channels=16)
    assert config.backbone_features == ["stage1", "stage2", "stage3", "stage4"]
    assert config.backbone_config.out_indices == [1, 2, 3, 4]
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # what the code before the stem wrote for the backbone
    saved["backbone_config"].update(
        stage_names=["stage1", "stage2", "stage3", "stage4"],
        out_features=["stage1", "stage2", "stage3", "stage4"],
        out_indices=[0, 1, 2, 3],
    )
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = MaskRCNNConfig.from_pretrained(tmp_path)
    assert loaded.backbone_features == ["stage1", "stage2", "stage3", "stage4"]
    assert loaded.backbone_config.out_features == ["stage1", "stage2", "stage3", "stage4"]
    assert loaded.backbone_config.out_indices == [1, 2, 3, 4]


@pytest.mark.parametrize("model_class", [ViLModel, ViLForImageClassification, ViLBackbone])
def test_input_embeddings_are_stage_1_patch_projection(model_class):
    model = model_class(tiny_config())
    encoder = model.vil.encoder if model_class is ViLForImageClassification else model.encoder
    assert model.get_input_embeddings() is encoder.stages[0].patch_embeddings.projection
    replacement = torch.nn.Conv2d(3, 16, kernel_size=4, stride=4)
    model.set_input_embeddings(replacement)
    assert encoder.stages[0].patch_embeddings.projection is replacement


def test_frozen_embeddings_and_reentrant_checkpointing_still_train_the_first_blocks():
    """PEFT's recipe: frozen embeddings, enable_input_require_grads(), reentrant checkpointing."""
    torch.manual_seed(0)
    model = ViLForImageClassification(tiny_config()).train()
    stage = model.vil.encoder.stages[0]
    frozen = [*stage.patch_embeddings.parameters(), stage.global_tokens]
    for parameter in frozen:
        parameter.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    pixel_values, labels = torch.randn(2, 3, 64, 80), torch.tensor([1, 3])

    def first_block_gradients():
        model.zero_grad(set_to_none=True)
        model(pixel_values, labels=labels).loss.backward()
        assert all(parameter.grad is None for parameter in frozen)
        return {name: parameter.grad for name, parameter in stage.layers[0].named_parameters()}

    # reentrant checkpointing of a block whose input needs no gradient gives its weights none
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        assert all(grad is None for grad in first_block_gradients().values())
    model.enable_input_require_grads()
    gradients = first_block_gradients()
    assert all(grad is not None for grad in gradients.values())
    for name in ("attention.query.weight", "attention.kv.weight", "attention.proj.weight", "mlp.fc1.weight"):
        assert gradients[name].abs().sum() > 0, name


def test_trainer_passes_no_loss_kwargs_and_scales_the_loss_itself(tmp_path):
    """Without **kwargs in forward, Trainer neither passes num_items_in_batch (which ViL's mean loss would
    ignore) nor skips its own division of the loss under gradient accumulation."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, gradient_accumulation_steps=2)
    trainer = Trainer(model=ViLForImageClassification(tiny_config()), args=args)
    assert trainer.model_accepts_loss_kwargs is False
