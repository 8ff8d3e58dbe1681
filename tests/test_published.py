"""The published table, the generated configs (regenerate identically, resolve through _base_) and cards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vil_hf import ViLConfig
from vil_hf.ablations import ABLATIONS
from vil_hf.configuration_vil import published_arch
from vil_hf.published import (
    BASELINES,
    ITERATIONS_PER_EPOCH,
    MULTI_SCALE_SHORTEST_EDGES,
    PUBLISHED,
    SCHEDULES,
    ablation_config_path,
    config_files,
    generated_files,
    published_result,
    write_files,
)
from vil_hf.training.config import read_config_file

ROOT = Path(__file__).resolve().parents[1]
# The detection test's published counts (tests/test_detection_models.py), in millions.
PUBLISHED_PARAMS_M = {
    ("tiny", "mask_rcnn"): 26.9,
    ("small", "mask_rcnn"): 45.0,
    ("medium-deep", "mask_rcnn"): 60.1,
    ("base-deep", "mask_rcnn"): 76.1,
    ("tiny", "retinanet"): 16.64,
    ("small", "retinanet"): 35.68,
    ("medium-deep", "retinanet"): 50.77,
    ("base-deep", "retinanet"): 66.74,
}


# The keys of the agreed YAML schema (the training code reads exactly these).
SCHEMA = {
    "model": {"head", "backbone", "arch", "sparse", "attention_type", "average_pool", "image_size", "backbone_config",
              "backbone_from", "drop_path_rate", "freeze_at", "frozen_batch_norm", "num_labels", "init_from"},
    "data": {"train_images", "train_annotations", "val_images", "val_annotations", "train_shortest_edge",
             "test_shortest_edge", "longest_edge", "flip", "aspect_grouping", "skip_corrupt_images", "num_workers"},
    "optim": {"batch_size", "gradient_accumulation_steps", "optimizer", "lr", "weight_decay", "betas", "momentum",
              "warmup_iters", "warmup_factor", "max_iter", "steps", "gamma", "clip_grad_norm"},
    "run": {"output_dir", "seed", "mixed_precision", "checkpoint_every", "keep_checkpoints", "eval_every", "log_every",
            "eval_batch_size", "num_visualized", "trackers", "gradient_checkpointing"},
}  # fmt: skip


def test_table_rows():
    assert len(PUBLISHED) == 8
    assert {key: row.published_params_m for key, row in PUBLISHED.items()} == PUBLISHED_PARAMS_M
    small = published_result("small", "mask_rcnn")
    assert (small.box_ap("1x"), small.mask_ap("1x"), small.box_ap("3x_ms"), small.mask_ap("3x_ms")) == (
        44.9,
        41.1,
        47.1,
        42.7,
    )
    assert small.arch == published_arch("small", sparse=True)
    assert small.unused_head_params == 768 * 1000 + 1000 + 2 * 768
    assert small.params_without_head_m == 44.23
    assert published_result("tiny", "retinanet").unused_head_params == 384 * 1000 + 1000 + 2 * 384
    assert published_result("small", "retinanet").mask_ap("1x") is None
    assert (
        published_result("small", "retinanet").drop_path("1x"),
        published_result("tiny", "mask_rcnn").drop_path("3x_ms"),
    ) == (0.1, 0.1)
    assert published_result("medium-deep", "retinanet").original_config("3x_ms") == (
        "msvit_retina_fpn_3xms_medium_deep_sparse.yaml"
    )
    assert small.original_config("1x") == "msvit_maskrcnn_fpn_1x_small_sparse.yaml"
    with pytest.raises(ValueError, match="no published result"):
        published_result("huge", "mask_rcnn")
    with pytest.raises(ValueError, match="unknown schedule"):
        small.box_ap("2x")


def test_checked_in_files_regenerate_identically(tmp_path):
    files = generated_files()
    assert len([p for p in files if p.startswith("configs/")]) == 5 + 16 + 9 + len(BASELINES)
    assert len([p for p in files if p.startswith("model_cards/")]) == 16 + len(BASELINES) + 1
    stale = [p for p, text in files.items() if not (ROOT / p).is_file() or (ROOT / p).read_text() != text]
    assert not stale, f"run `python scripts/generate_configs_and_cards.py`; out of date: {stale}"
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")}
    assert on_disk == {p for p in files if p.startswith("configs/")}, "configs/ holds files the generator does not make"
    # The script itself, into an empty folder: same files; a second run changes nothing.
    script = ROOT / "scripts" / "generate_configs_and_cards.py"
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'kernels'}", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, str(script), "--root", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert all((tmp_path / p).read_text() == text for p, text in files.items())
    assert write_files(files, tmp_path) == []
    (tmp_path / "configs/base/coco_detection.yaml").write_text("task: detection\n")
    check = subprocess.run(
        [sys.executable, str(script), "--root", str(tmp_path), "--check"], capture_output=True, text=True, env=env
    )
    assert check.returncode == 1 and "configs/base/coco_detection.yaml" in check.stdout


def test_every_config_resolves_with_its_base():
    for relative in config_files():
        config = read_config_file(ROOT / relative)
        assert "_base_" not in config and config["task"] == "detection"
        raw = yaml.safe_load((ROOT / relative).read_text())
        if relative == "configs/base/coco_detection.yaml":  # shared by both heads: no model.head
            assert "head" not in config["model"]
            continue
        assert {section: set(config[section]) for section in SCHEMA} == SCHEMA, relative
        if relative.startswith("configs/base/") or relative in {row.config_path for row in BASELINES.values()}:
            continue
        assert set(raw) == {"_base_", "mirrors", "model", "run"}  # only overrides
        assert config["mirrors"].startswith("msvit_") and config["mirrors"].endswith(".yaml")
    for row in PUBLISHED.values():
        for schedule in SCHEDULES:
            config = read_config_file(ROOT / row.config_path(schedule))
            model, optim, data = config["model"], config["optim"], config["data"]
            assert (model["head"], model["backbone"], model["arch"]) == (row.head, row.size, None)
            assert model["drop_path_rate"] == row.drop_path(schedule)
            assert config["mirrors"] == row.original_config(schedule)
            three = schedule == "3x_ms"
            assert data["train_shortest_edge"] == ([640, 672, 704, 736, 768, 800] if three else [800])
            assert (optim["max_iter"], optim["steps"]) == (
                (270000, [180000, 240000]) if three else (90000, [60000, 80000])
            )
            assert optim["clip_grad_norm"] == (1.0 if row.head == "retinanet" else 0.5)
            assert optim["lr"] == (2.5e-4 if (row.head, schedule) == ("mask_rcnn", "1x") else 1e-4)
            assert optim["weight_decay"] == 1e-4 and optim["batch_size"] == 16
            assert config["run"]["output_dir"] == f"outputs/{row.config_name(schedule)}"
            assert config["run"]["mixed_precision"] == "no"  # quoted: YAML 1.1 would read a bare no as False
    assert MULTI_SCALE_SHORTEST_EDGES == list(range(640, 801, 32))
    for ablation in ABLATIONS.values():
        config = read_config_file(ROOT / ablation_config_path(ablation))
        model = config["model"]
        assert model["backbone"] is None and model["arch"] == ablation.arch
        assert (model["head"], config["optim"]["lr"]) == ("mask_rcnn", 2.5e-4)
        assert model["attention_type"] == ablation.attention_type
        vil = ViLConfig(arch=model["arch"], attention_type=model["attention_type"], average_pool=model["average_pool"])
        assert vil.attention_type == ablation.attention_type


def test_baseline_configs_name_their_recipe_and_build_their_detector():
    """Each baseline config mirrors a named original recipe; the numbers it cites are the published ones."""
    from vil_hf.training import load_config
    from vil_hf.training.models import model_config

    assert set(BASELINES) == {
        "swin_t_mask_rcnn_1x", "swin_t_mask_rcnn_3x_ms", "resnet50_mask_rcnn_1x", "resnet50_retinanet_1x",
        "convnext_t_mask_rcnn_1x",
    }  # fmt: skip
    published = {name: (row.box_ap, row.mask_ap) for name, row in BASELINES.items()}
    assert published == {
        "swin_t_mask_rcnn_1x": (43.7, 39.8),  # Swin detection repository's table
        "swin_t_mask_rcnn_3x_ms": (46.0, 41.6),
        "resnet50_mask_rcnn_1x": (38.6, 35.2),  # detectron2 MODEL_ZOO.md
        "resnet50_retinanet_1x": (36.5, None),
        "convnext_t_mask_rcnn_1x": (None, None),  # the ConvNeXt authors publish 3x only
    }
    for row in BASELINES.values():
        text = (ROOT / row.config_path).read_text()
        assert f"# Mirrors {row.mirrors}:" in text and row.source.url in text or row.box_ap is None, row.name
        config = load_config(ROOT / row.config_path)
        assert config.mirrors == row.mirrors and config.model.head == row.head
        assert (config.model.backbone, config.model.arch) == (None, None)
        assert config.model.backbone_config == dict(row.backbone_config)
        assert config.optim.steps[-1] < config.optim.max_iter and config.optim.batch_size == 16
        detector = model_config(config, {i: str(i) for i in range(80)})
        assert detector.backbone_config.model_type == row.backbone_config["model_type"]
        assert (
            detector.backbone_features
            == ["stage1", "stage2", "stage3", "stage4"][-(4 if row.head == "mask_rcnn" else 3) :]
        )
    swin_1x, swin_3x = (
        load_config(ROOT / "configs/swin_t_mask_rcnn_1x.yaml"),
        load_config(ROOT / "configs/swin_t_mask_rcnn_3x_ms.yaml"),
    )
    for config, epochs, steps, drop_path in ((swin_1x, 12, (8, 11), 0.1), (swin_3x, 36, (27, 33), 0.2)):
        optim = config.optim
        assert (optim.optimizer, optim.lr, optim.weight_decay, optim.clip_grad_norm) == ("adamw", 1e-4, 0.05, None)
        assert optim.max_iter == epochs * ITERATIONS_PER_EPOCH
        assert optim.steps == [s * ITERATIONS_PER_EPOCH for s in steps]
        assert (optim.warmup_iters, optim.warmup_factor) == (500, 0.001)
        assert config.model.drop_path_rate == drop_path
        assert config.data.train_shortest_edge == list(range(480, 801, 32))
    for name, lr in (("resnet50_mask_rcnn_1x", 0.02), ("resnet50_retinanet_1x", 0.01)):
        config = load_config(ROOT / f"configs/{name}.yaml")
        optim, model = config.optim, config.model
        assert (optim.optimizer, optim.lr, optim.momentum, optim.weight_decay) == ("sgd", lr, 0.9, 1e-4)
        assert (optim.max_iter, optim.steps, optim.warmup_iters, optim.warmup_factor) == (
            90000,
            [60000, 80000],
            1000,
            0.001,
        )
        assert optim.clip_grad_norm is None
        assert (model.freeze_at, model.frozen_batch_norm, model.drop_path_rate) == (2, True, 0.0)
        assert config.data.train_shortest_edge == MULTI_SCALE_SHORTEST_EDGES
    convnext = load_config(ROOT / "configs/convnext_t_mask_rcnn_1x.yaml")
    assert (convnext.optim.optimizer, convnext.optim.lr, convnext.optim.weight_decay) == ("adamw", 1e-4, 0.05)
    assert convnext.model.drop_path_rate == 0.4 and convnext.optim.max_iter == 12 * ITERATIONS_PER_EPOCH


def test_baseline_cards_cite_their_sources():
    from vil_hf.evaluation.model_cards import baseline_cards, model_cards_index

    cards = baseline_cards()
    assert set(cards) == {row.card_name for row in BASELINES.values()}
    for row in BASELINES.values():
        card = cards[row.card_name]
        text = str(card)
        assert row.source.url in text and row.config_path in text and row.pretrained in text
        results = card.data.eval_results or []
        assert [(r.metric_name, r.metric_value, r.source_url) for r in results] == [
            (title, value, row.source.url)
            for title, value in (("box AP", row.box_ap), ("mask AP", row.mask_ap))
            if value is not None
        ]
        if row.box_ap is None:
            assert "Not published" in text and row.not_published in text
    index = model_cards_index()
    assert "## Baselines on transformers backbones" in index
    assert "| 43.7 | 39.8 |" in index and "| 36.5 | - |" in index
