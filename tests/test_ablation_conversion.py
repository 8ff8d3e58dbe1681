"""Original-format checkpoints of every ablation type convert with `vil-hf convert` and reproduce the model."""

from __future__ import annotations

import re

import pytest
import torch

import vil_hf
from vil_hf import ViLConfig, ViLForImageClassification
from vil_hf.cli import main

# Three stages at 64 px: maps 16x16, 8x8, 4x4. Letter f and the attention options per case.
CASES = {
    "srformer": ("f4", "f2", ["--attn-type", "srformer"], {}),
    "performer": ("f12", "f6", ["--attn-type", "performer"], {}),
    "linformer": ("f10", "f5", ["--attn-type", "linformer"], {}),
    "linformer-shared": ("f10", "f5", ["--attn-type", "linformer"], {"linformer_share_kv": True}),
    "global": ("f3", "f3", ["--only-glo", "--avg-pool"], {"average_pool": True}),
}


def case_config(case: str, absolute: bool) -> ViLConfig:
    f1, f2, _, extra = CASES[case]
    a = int(absolute)
    arch = f"l1,h2,d16,n1,s1,g2,p4,{f1},a{a}_l2,h2,d32,n2,s1,g1,p2,{f2},a{a}_l3,h4,d32,n1,s0,g1,p2,f3,a{a}"
    attention_type = "global" if case == "global" else case.split("-")[0]
    return ViLConfig(arch=arch, attention_type=attention_type, num_labels=4, image_size=64, **extra)


def to_original_state_dict(model: ViLForImageClassification) -> dict[str, torch.Tensor]:
    """Our classifier's weights under the original MsViT names (test-only inverse of the converter)."""
    config, state = model.config, model.state_dict()
    original = {}
    embedding_names = {
        "patch_embeddings.projection": "0.proj",
        "patch_embeddings.norm": "0.norm_embed",
        "global_tokens": "0.cls_token",
        "position_embeddings.global_embeddings": "0.cls_pos_embed",
        "position_embeddings.row_embeddings": "0.x_pos_embed",
        "position_embeddings.column_embeddings": "0.y_pos_embed",
    }
    attention_names = {
        "relative_position_bias_table": "local_relative_position_bias_table",
        "global_to_global_bias": "g2g_relative_position_bias",
        "spatial_reduction.weight": "proj_sr.weight",
        "projection_matrix": "fast_attention.projection_matrix",
        "key_projection": "proj_k",
        "value_projection": "proj_v",
    }
    for key, value in state.items():
        if key == "vil.encoder.calls_since_last_redraw":
            original["calls_since_last_redraw"] = value
            continue
        if key.startswith("vil.layernorm."):
            original["norm." + key.split(".")[-1]] = value
            continue
        if key.startswith("classifier."):
            original["head." + key.split(".")[-1]] = value
            continue
        stage, rest = re.fullmatch(r"vil\.encoder\.stages\.(\d+)\.(.+)", key).groups()
        stage = int(stage)
        prefix = f"layer{stage + 1}."
        for ours, theirs in embedding_names.items():
            if rest.startswith(ours):
                original[prefix + theirs + rest[len(ours) :]] = value
                break
        else:
            block, name = re.fullmatch(r"layers\.(\d+)\.(.+)", rest).groups()
            attn, mlp = f"{prefix}{2 * int(block) + 1}.", f"{prefix}{2 * int(block) + 2}."
            if name.startswith("layernorm_before."):
                original[attn + "norm." + name.split(".", 1)[1]] = value
            elif name.startswith("layernorm_after."):
                original[mlp + "norm." + name.split(".", 1)[1]] = value
            elif name.startswith("mlp."):
                original[mlp + name] = value
            elif name == "attention.global_to_local_bias":
                twin = state[key.replace("global_to_local_bias", "local_to_global_bias")]
                original[attn + "attn.g2l_relative_position_bias"] = torch.stack([value, twin])
            elif name == "attention.local_to_global_bias":
                continue
            else:
                module = name[len("attention.") :]
                original[attn + "attn." + attention_names.get(module, module)] = value
                kind = config.attention_types[stage]
                if module == "key_projection" and config.linformer_share_kv:
                    original[attn + "attn.proj_v"] = value  # the original ties proj_v to proj_k
                if kind in ("longformer", "global") and config.num_global_tokens[stage]:
                    head, _, param = module.partition(".")
                    if head in ("query", "kv", "proj"):  # the original stores the global copies too
                        original[attn + f"attn.{head}_global.{param}"] = value.clone()
    return original


def perturbed_model(config: ViLConfig) -> ViLForImageClassification:
    model = ViLForImageClassification(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


@pytest.mark.parametrize("absolute", [True, False], ids=["a1", "a0"])
@pytest.mark.parametrize("case", list(CASES))
def test_original_checkpoint_round_trip(case, absolute, tmp_path):
    config = case_config(case, absolute)
    model = perturbed_model(config)
    original = to_original_state_dict(model)
    if case == "performer":
        model.vil.encoder.calls_since_last_redraw.fill_(1)  # a mid-training counter travels with the file
        original["calls_since_last_redraw"] = torch.tensor(1)
    torch.save({"net": original, "arch": config.arch}, tmp_path / "model_best.pth")

    out_dir = tmp_path / "converted"
    assert main(["convert", str(tmp_path / "model_best.pth"), str(out_dir), "--img-size", "64", *CASES[case][2]]) == 0
    converted = ViLForImageClassification.from_pretrained(out_dir).eval()
    assert converted.config.attention_types == config.attention_types
    assert converted.config.linformer_share_kv == config.linformer_share_kv
    assert converted.config.average_pool == config.average_pool
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # the converted weights sit in unaligned (memory-mapped) storage after from_pretrained, so BLAS/oneDNN
        # take other vector paths: float32 logits differ in the last bits
        torch.testing.assert_close(converted(pixel_values).logits, model(pixel_values).logits, rtol=1e-5, atol=1e-5)
    if case == "performer":
        assert int(converted.vil.encoder.calls_since_last_redraw) == 1


def test_detectron2_performer_backbone_round_trip(tmp_path):
    """The detection path: backbone under `backbone.bottom_up.`, redraw counter and projections included."""
    config = case_config("performer", absolute=True)
    model = perturbed_model(config)
    state = {"backbone.bottom_up." + k: v for k, v in to_original_state_dict(model).items()}
    state["backbone.fpn_lateral2.weight"] = torch.zeros(256, 16, 1, 1)
    torch.save({"model": state}, tmp_path / "model_final.pth")
    out_dir = tmp_path / "converted"
    argv = ["convert", str(tmp_path / "model_final.pth"), str(out_dir), "--head", "backbone", "--arch", config.arch]
    assert main([*argv, "--attn-type", "performer", "--img-size", "64"]) == 0
    backbone = vil_hf.ViLBackbone.from_pretrained(out_dir).eval()
    pixel_values = torch.randn(1, 3, 96, 128)  # performer takes any size
    with torch.no_grad():
        expected = model.vil.encoder(pixel_values).feature_maps[1:]  # the stages, after the stem
        for ours, theirs in zip(backbone(pixel_values).feature_maps, expected):
            # loaded weights sit in unaligned storage: other vector paths, last-bit float32 differences
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_linformer_conversion_at_the_wrong_image_size_names_the_length(tmp_path, capsys):
    config = case_config("linformer", absolute=True)
    torch.save({"net": to_original_state_dict(perturbed_model(config)), "arch": config.arch}, tmp_path / "m.pth")
    assert main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "out"), "--attn-type", "linformer"]) == 2
    err = capsys.readouterr().err
    assert "attention.key_projection: checkpoint (258, 10) vs model (3138, 10)" in err
    assert "--img-size" in err and not (tmp_path / "out").exists()


def test_global_only_checkpoint_without_only_glo_is_refused(tmp_path, capsys):
    """Read as a plain longformer, a global-only file loads (same weights) but computes something else:
    the 256-global strings cannot tell them apart, so the option is the user's, as in the original."""
    config = case_config("global", absolute=True)
    torch.save({"net": to_original_state_dict(perturbed_model(config)), "arch": config.arch}, tmp_path / "m.pth")
    assert main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "out"), "--only-glo", "--attn-type", "full"]) == 2
    assert "--only-glo is an option of the longformer" in capsys.readouterr().err
