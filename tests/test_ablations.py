"""The paper's attention ablations: each type against a plain reference, and the nine rows' sizes."""

from __future__ import annotations

import math

import pytest
import torch

import vil_hf
from vil_hf import ViLConfig, ViLForImageClassification
from vil_hf.ablations import ABLATIONS, CLASSIFICATION_HEAD_PARAMS
from vil_hf.attention import (
    ATTENTION_CLASSES,
    ViLGlobalOnlyAttention,
    ViLLinformerAttention,
    ViLPerformerAttention,
    ViLSRAttention,
)
from vil_hf.attention.performer import gaussian_orthogonal_random_matrix


def stage_config(attention_type: str, f: int, globals_: int = 2, absolute: bool = True, **kwargs) -> ViLConfig:
    """Three stages, d 16 and 2 heads in the first; `f` and `globals_` for stage 1."""
    a = int(absolute)
    arch = f"l1,h2,d16,n1,s1,g{globals_},p4,f{f},a{a}_l2,h2,d16,n1,s1,g1,p2,f{f},a{a}_l3,h2,d16,n1,s0,g1,p2,f{f},a{a}"
    return ViLConfig(arch=arch, attention_type=attention_type, **kwargs)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def heads(tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(N, d) -> (H, N, M)"""
    return tokens.view(tokens.shape[0], num_heads, -1).transpose(0, 1)


def test_every_type_is_registered():
    assert set(ATTENTION_CLASSES) == {"longformer", "global", "srformer", "performer", "linformer", "full"}
    assert set(vil_hf.configuration_vil.EFFICIENT_ATTENTION_TYPES) == set(ATTENTION_CLASSES) - {"full"}


# --------------------------------------------------------------------------------------------
# srformer
# --------------------------------------------------------------------------------------------


def srformer_reference(attn: ViLSRAttention, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One sample (N, d), written out: windowed sums, instance norm, then a softmax per query."""
    r, dim, num_heads = attn.reduction_ratio, attn.dim, attn.num_heads
    num_global = tokens.shape[0] - height * width
    local_map = tokens[num_global:].T.reshape(dim, height, width)
    kernel = attn.spatial_reduction.weight  # (d, d, r, r)
    rows, cols = height // r, width // r
    reduced = torch.zeros(dim, rows, cols)
    for i in range(rows):
        for j in range(cols):
            window = local_map[:, i * r : (i + 1) * r, j * r : (j + 1) * r]  # the incomplete tail is never read
            reduced[:, i, j] = (kernel * window[None]).sum(dim=(1, 2, 3))
    flat = reduced.reshape(dim, -1)
    mean, var = flat.mean(dim=1, keepdim=True), flat.var(dim=1, unbiased=False, keepdim=True)
    normalised = ((flat - mean) / torch.sqrt(var + 1e-5)).T  # (K, d)
    key_tokens = torch.cat([tokens[:num_global], normalised])
    keys, values = attn.kv(key_tokens).chunk(2, dim=-1)
    queries = heads(attn.query(tokens), num_heads) * attn.head_dim**-0.5
    keys, values = heads(keys, num_heads), heads(values, num_heads)
    out = torch.empty_like(queries)
    for h in range(num_heads):
        for n in range(tokens.shape[0]):
            weights = torch.softmax(keys[h] @ queries[h, n], dim=0)
            out[h, n] = weights @ values[h]
    return attn.proj(out.transpose(0, 1).reshape(tokens.shape[0], dim))


@pytest.mark.parametrize("height, width, ratio", [(8, 12, 4), (9, 10, 4), (5, 7, 2), (6, 6, 1)])
def test_srformer_matches_reference(height, width, ratio):
    attn = ViLSRAttention(stage_config("srformer", ratio), 0).eval()
    randomise(attn)
    tokens = torch.randn(2, 2 + height * width, 16)
    with torch.no_grad():
        ours = attn(tokens, height, width)
        for b in range(2):
            torch.testing.assert_close(
                ours[b], srformer_reference(attn, tokens[b], height, width), rtol=1e-4, atol=1e-5
            )


def test_srformer_norm_is_instance_norm_without_affine_or_running_stats():
    attn = ViLSRAttention(stage_config("srformer", 2), 0)
    assert not list(attn.reduction_norm.parameters()) and not list(attn.reduction_norm.buffers())
    assert attn.spatial_reduction.bias is None and attn.spatial_reduction.stride == (2, 2)
    assert not hasattr(attn, "relative_position_bias_table")
    assert not hasattr(attn, "global_to_local_bias")  # no relative bias even with a0
    assert not hasattr(ViLSRAttention(stage_config("srformer", 2, absolute=False), 0), "global_to_local_bias")


def test_srformer_map_smaller_than_ratio_is_a_clear_error():
    attn = ViLSRAttention(stage_config("srformer", 8), 0)
    with pytest.raises(ValueError, match=r"srformer stage 1: the 5x12 map is smaller than the reduction ratio r=8"):
        attn(torch.randn(1, 2 + 60, 16), 5, 12)


def test_srformer_map_not_a_multiple_of_ratio_warns_once(caplog):
    attn = ViLSRAttention(stage_config("srformer", 4), 0)
    tokens = torch.randn(1, 2 + 9 * 10, 16)
    with caplog.at_level("WARNING"):
        attn(tokens, 9, 10)
        attn(tokens, 9, 10)
    messages = [r.getMessage() for r in caplog.records if "reduction ratio" in r.getMessage()]
    assert len(messages) == 1 and "last 1 rows and 2 columns" in messages[0]


# --------------------------------------------------------------------------------------------
# performer
# --------------------------------------------------------------------------------------------


def performer_reference(attn: ViLPerformerAttention, batch_tokens: torch.Tensor) -> torch.Tensor:
    """Per token: phi(x) = F^-1/2 (exp(w.x/M^1/4 - |x|^2/(2 sqrt M) - m) + 1e-4), out_i = sum_j phi_i.phi_j v_j / sum_j phi_i.phi_j.

    m: per query row, the max over its features; for keys, the max over every key of every sample and head.
    """
    projection = attn.projection_matrix  # (F, M)
    num_features, head_dim = projection.shape
    batch, length, dim = batch_tokens.shape
    q, k, v = (
        t.view(batch, length, attn.num_heads, head_dim).transpose(1, 2) for t in attn.qkv(batch_tokens).chunk(3, dim=-1)
    )
    c = head_dim**-0.25
    projected_keys = torch.einsum("bhnm,fm->bhnf", c * k, projection)
    key_max = projected_keys.max()
    out = torch.empty_like(q)
    for b in range(batch):
        for h in range(attn.num_heads):
            key_features = []
            for j in range(length):
                wx = projection @ (c * k[b, h, j])
                key_features.append(
                    (torch.exp(wx - (k[b, h, j] ** 2).sum() * c**2 / 2 - key_max) + 1e-4) / math.sqrt(num_features)
                )
            key_features = torch.stack(key_features)  # (N, F)
            for i in range(length):
                wx = projection @ (c * q[b, h, i])
                query_feature = (torch.exp(wx - (q[b, h, i] ** 2).sum() * c**2 / 2 - wx.max()) + 1e-4) / math.sqrt(
                    num_features
                )
                weights = key_features @ query_feature  # (N,)
                out[b, h, i] = (weights @ v[b, h]) / weights.sum()
    return attn.proj(out.transpose(1, 2).reshape(batch, length, dim))


def test_performer_matches_reference():
    attn = ViLPerformerAttention(stage_config("performer", 12), 0).eval()
    randomise(attn)
    tokens = torch.randn(2, 2 + 3 * 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(tokens, 3, 4), performer_reference(attn, tokens), rtol=1e-4, atol=1e-5)


def test_performer_approximates_softmax_attention_with_many_features():
    """FAVOR+ is an unbiased estimate of softmax(q.k / sqrt(M)) attention: with many features it is close."""
    torch.manual_seed(0)
    attn = ViLPerformerAttention(stage_config("performer", 4096), 0).eval()
    tokens = torch.randn(1, 2 + 4 * 4, 16) * 0.5
    with torch.no_grad():
        q, k, v = (t.view(1, -1, 2, 8).transpose(1, 2) for t in attn.qkv(tokens).chunk(3, dim=-1))
        exact = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
        exact = attn.proj(exact.transpose(1, 2).reshape(1, -1, 16))
        approximate = attn(tokens, 4, 4)
    assert (approximate - exact).abs().max() < 0.05 * exact.abs().max()


def test_performer_key_stabiliser_spans_the_batch_as_in_the_original():
    """The key features' max runs over the whole key tensor, so a sample's output depends on the others
    in its batch through the +1e-4 (strongly when a partner's keys are much larger: its own features
    then sink below the 1e-4); the per-row query maxima cancel exactly."""
    attn = ViLPerformerAttention(stage_config("performer", 12), 0).eval()
    randomise(attn)
    tokens = torch.randn(2, 2 + 3 * 4, 16)
    with torch.no_grad():
        alone = attn(tokens[:1], 3, 4)
        together = attn(torch.cat([tokens[:1], tokens[1:] * 4]), 3, 4)[:1]
    assert (alone - together).abs().max() > 1e-2


def test_projection_matrix_rows_come_in_orthogonal_blocks():
    generator = torch.Generator().manual_seed(0)
    matrix = gaussian_orthogonal_random_matrix(20, 8, generator)  # blocks of 8, 8, 4 rows
    assert matrix.shape == (20, 8)
    directions = matrix / matrix.norm(dim=1, keepdim=True)
    for start, stop in ((0, 8), (8, 16), (16, 20)):
        block = directions[start:stop]
        torch.testing.assert_close(block @ block.T, torch.eye(stop - start), atol=1e-5, rtol=0)
    # across blocks the directions are independent, not orthogonal
    assert (directions[:8] @ directions[8:16].T).abs().max() > 0.1


def test_performer_redraws_on_the_original_schedule():
    """Interval 1 (the original classification setting): no redraw on the 1st training call, a redraw
    on the 2nd, none on the 3rd, ...; evaluation never redraws."""
    model = ViLForImageClassification(stage_config("performer", 6, num_labels=3))
    pixel_values = torch.randn(1, 3, 64, 64)
    attention = model.vil.encoder.stages[0].layers[0].attention

    def snapshot():
        return attention.projection_matrix.clone()

    model.eval()
    before = snapshot()
    model(pixel_values)
    assert torch.equal(before, snapshot())
    model.train()
    changed = []
    for _ in range(4):
        before = snapshot()
        model(pixel_values)
        changed.append(not torch.equal(before, snapshot()))
    assert changed == [False, True, False, True]

    fixed = ViLForImageClassification(
        stage_config("performer", 6, num_labels=3, performer_redraw_interval=None)
    ).train()
    before = fixed.vil.encoder.stages[0].layers[0].attention.projection_matrix.clone()
    fixed(pixel_values)
    fixed(pixel_values)
    assert torch.equal(before, fixed.vil.encoder.stages[0].layers[0].attention.projection_matrix)


def test_performer_projection_survives_save_and_load(tmp_path):
    model = ViLForImageClassification(stage_config("performer", 6, num_labels=3)).eval()
    model.save_pretrained(tmp_path)
    loaded = ViLForImageClassification.from_pretrained(tmp_path).eval()
    for ours, theirs in zip(model.buffers(), loaded.buffers()):
        assert torch.equal(ours, theirs)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # the buffers and weights are equal (above), but loaded ones sit in unaligned storage, so BLAS takes
        # other vector paths: float32 logits differ in the last bits
        torch.testing.assert_close(model(pixel_values).logits, loaded(pixel_values).logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# linformer
# --------------------------------------------------------------------------------------------


def linformer_reference(attn: ViLLinformerAttention, tokens: torch.Tensor) -> torch.Tensor:
    """One sample (N, d): keys/values mixed along the sequence by E (N, k), then dense softmax attention."""
    keys, values = attn.kv(tokens).chunk(2, dim=-1)  # (N, d)
    value_projection = attn.key_projection if attn.share_kv else attn.value_projection
    keys, values = attn.key_projection.T @ keys, value_projection.T @ values  # (k, d)
    q = heads(attn.query(tokens), attn.num_heads) * attn.head_dim**-0.5
    k, v = heads(keys, attn.num_heads), heads(values, attn.num_heads)
    out = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
    return attn.proj(out.transpose(0, 1).reshape(tokens.shape[0], -1))


@pytest.mark.parametrize("share_kv", [False, True])
def test_linformer_matches_reference(share_kv):
    config = stage_config("linformer", 5, image_size=32, linformer_share_kv=share_kv)  # stage 1: 8x8 map
    attn = ViLLinformerAttention(config, 0).eval()
    randomise(attn)
    assert attn.key_projection.shape == (2 + 64, 5)
    assert (attn.value_projection is None) == share_kv
    tokens = torch.randn(2, 2 + 64, 16)
    with torch.no_grad():
        ours = attn(tokens, 8, 8)
        for b in range(2):
            torch.testing.assert_close(ours[b], linformer_reference(attn, tokens[b]), rtol=1e-4, atol=1e-5)


def test_linformer_at_another_size_is_a_clear_error():
    model = ViLForImageClassification(stage_config("linformer", 5, image_size=64, num_labels=3)).eval()
    model(torch.randn(1, 3, 64, 64))
    with pytest.raises(
        ValueError,
        match=r"linformer stage 1 projects a fixed sequence of 258 tokens .*16x16 map.*image_size=64.*got 146 \(12x12 map\)",
    ):
        model(torch.randn(1, 3, 48, 48))


# --------------------------------------------------------------------------------------------
# global-only
# --------------------------------------------------------------------------------------------


def global_only_reference(attn: ViLGlobalOnlyAttention, tokens: torch.Tensor) -> torch.Tensor:
    """One sample (N, d): dense attention where local rows may only see the global columns."""
    num_global, length = attn.num_global_tokens, tokens.shape[0]
    q = heads(attn.query(tokens), attn.num_heads) * attn.scale
    keys, values = attn.kv(tokens).chunk(2, dim=-1)
    scores = q @ heads(keys, attn.num_heads).transpose(1, 2)  # (H, N, N)
    if attn.use_relative_bias:  # global rows only: the original adds nothing to local rows in this mode
        scores[:, :num_global, :num_global] += attn.global_to_global_bias
        scores[:, :num_global, num_global:] += attn.global_to_local_bias[:, :, None]
    allowed = torch.zeros(length, length, dtype=torch.bool)
    allowed[:num_global] = True
    allowed[:, :num_global] = True
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ heads(values, attn.num_heads)
    return attn.proj(out.transpose(0, 1).reshape(length, -1))


@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("num_global", [1, 3])
def test_global_only_matches_reference(absolute, num_global):
    attn = ViLGlobalOnlyAttention(stage_config("global", 3, globals_=num_global, absolute=absolute), 0).eval()
    randomise(attn)
    tokens = torch.randn(2, num_global + 5 * 6, 16)
    with torch.no_grad():
        ours = attn(tokens, 5, 6)
        for b in range(2):
            torch.testing.assert_close(ours[b], global_only_reference(attn, tokens[b]), rtol=1e-4, atol=1e-5)


def test_global_only_model_average_pools_all_tokens():
    config = stage_config("global", 3, num_labels=3, average_pool=True)
    model = ViLForImageClassification(config).eval()
    with torch.no_grad():
        outputs = model.vil(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state.mean(dim=1))


# --------------------------------------------------------------------------------------------
# the nine ablation rows
# --------------------------------------------------------------------------------------------


def test_ablation_rows_parse_to_the_intended_stages():
    for row in ABLATIONS.values():
        config = row.config()
        efficient = config.attention_types[:2]
        assert efficient == [row.attention_type] * 2, row.name
        expected_late = ["full", "full"] if row.name.startswith("Partial") else [row.attention_type] * 2
        if row.name == "srformer/32":
            expected_late = ["srformer", "full"]  # the original's srformer/32 has stage 4 full
        assert config.attention_types[2:] == expected_late, row.name
        assert config.use_absolute_embeddings == [True] * 4 and config.hidden_sizes == [96, 192, 384, 768]
        assert config.average_pool == (row.attention_type == "global"), row.name
    assert ABLATIONS["srformer/64"].config().window_sizes == [16, 8, 4, 2]
    assert ABLATIONS["srformer/32"].config().window_sizes[:3] == [8, 4, 2]
    assert ABLATIONS["global"].config().num_global_tokens == [256, 256, 64, 16]
    assert ABLATIONS["performer"].config().window_sizes == [256] * 4


def mask_rcnn_parameters(backbone_config) -> int:
    """Parameters of our Mask R-CNN (80 classes) on this backbone, counted without allocating weights."""
    with torch.device("meta"):
        model = vil_hf.MaskRCNNForObjectDetection(vil_hf.MaskRCNNConfig(backbone_config=backbone_config, num_labels=80))
    return sum(p.numel() for p in model.parameters())


def ablation_parameter_counts(name: str) -> tuple[int, int]:
    """(ours: Mask R-CNN on the ablation backbone at detection size, published less the unused head)."""
    row = ABLATIONS[name]
    config = row.config(image_size=1333)  # absolute tables for 1344, as the original detection backbone
    return mask_rcnn_parameters(config), round(row.published_params_m * 1e6) - CLASSIFICATION_HEAD_PARAMS


def test_parameter_count_method_reproduces_the_published_vil_row():
    ours, published = ablation_parameter_counts("ViL")  # 45.0M with the head
    print(f"ViL: ours {ours / 1e6:.3f}M vs published less head {published / 1e6:.3f}M")
    assert abs(ours - published) < 0.1e6


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_parameter_counts_match_the_published_ones(name):
    ours, published = ablation_parameter_counts(name)
    print(f"{name}: ours {ours / 1e6:.3f}M vs published less head {published / 1e6:.3f}M")
    assert abs(ours - published) < 0.1e6, f"{name}: {ours / 1e6:.3f}M vs {published / 1e6:.3f}M"


def test_partial_global_typo_would_not_match():
    """The original partial-global file says h6,d384 in stage 4; that string is 5M+ away from 45.1M."""
    typo = ABLATIONS["Partial global"].arch.replace("l4,h12,d768", "l4,h6,d384")
    config = ViLConfig(arch=typo, attention_type="global", image_size=1333)
    assert abs(mask_rcnn_parameters(config) - (45.1e6 - CLASSIFICATION_HEAD_PARAMS)) > 1e6
