"""Training any transformers backbone from the configs: `model.backbone_config`, `model.backbone_from`, their
checks before the data, and the baseline configs end to end with `accelerate launch scripts/train.py`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline

from vil_hf.data.shapes import make_shapes
from vil_hf.training import ConfigError, build_model, config_from_dict, load_config
from vil_hf.training.cli import train_main
from vil_hf.training.models import check_model_config

from .test_backbones import TINY_SWIN, matching_tensors, saved_classifier

ROOT = Path(__file__).resolve().parents[1]
LABELS = {0: "circle", 1: "triangle", 2: "square"}
SMALL_HEADS = {
    "mask_rcnn": {"fpn_channels": 16, "box_head_fc_dim": 32, "mask_head_conv_dim": 16, "rpn_batch_size_per_image": 32,
                  "roi_batch_size_per_image": 32, "rpn_post_nms_topk_test": 50, "detections_per_image": 20},
    "retinanet": {"fpn_channels": 16, "head_conv_layers": 1, "topk_candidates": 100, "detections_per_image": 20},
}  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, num_train=6, num_val=3, image_size=(64, 80), seed=5)
    return out


def detection_config(**model) -> dict:
    heads = SMALL_HEADS[model.get("head", "mask_rcnn")]
    return {
        "task": "detection",
        "model": {"backbone": None, "num_labels": 3, "drop_path_rate": 0.0, "detector": heads, **model},
    }


# -- the config ---------------------------------------------------------------------------------


def test_a_folder_alone_gives_the_architecture_and_a_config_must_agree_with_it(tmp_path):
    classifier = saved_classifier("swin", tmp_path / "swin")
    config = config_from_dict(detection_config(backbone_from=str(tmp_path / "swin"), drop_path_rate=0.3))
    detector = build_model(config, LABELS)
    backbone_config = detector.config.backbone_config
    assert backbone_config.model_type == "swin" and backbone_config.embed_dim == TINY_SWIN["embed_dim"]
    assert backbone_config.drop_path_rate == 0.3  # the recipe's, not the folder's
    assert backbone_config.out_features == ["stage1", "stage2", "stage3", "stage4"]  # the detector's choice
    assert set(backbone_config.id2label) != set(classifier.config.id2label)  # the classifier's labels are left behind
    for name, (expected, actual) in matching_tensors(classifier, detector.backbone).items():
        assert torch.equal(expected, actual), name
    # The same architecture spelled out agrees; another one is refused, naming the difference and the fix.
    agreeing = {"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1]}
    check_model_config(
        config_from_dict(detection_config(backbone_from=str(tmp_path / "swin"), backbone_config=agreeing))
    )
    with pytest.raises(ConfigError, match=r"embed_dim: 16 in the folder vs 96 in model.backbone_config.*"
                                          r"model.backbone_config=null"):  # fmt: skip
        check_model_config(
            config_from_dict(
                detection_config(
                    backbone_from=str(tmp_path / "swin"), backbone_config={"model_type": "swin", "embed_dim": 96}
                )
            )
        )
    with pytest.raises(ConfigError, match="holds a swin model but model.backbone_config says model_type 'convnext'"):
        check_model_config(
            config_from_dict(
                detection_config(backbone_from=str(tmp_path / "swin"), backbone_config={"model_type": "convnext"})
            )
        )


def config_without_data(tmp_path, **model) -> Path:
    """A config file whose data does not exist: a run that reaches the data fails on it."""
    config = detection_config(**model)
    config["data"] = {"train_images": str(tmp_path / "no-such-folder"), "train_annotations": str(tmp_path / "x.json")}
    config["run"] = {"output_dir": str(tmp_path / "run"), "trackers": []}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "model, message",
    [
        ({"backbone": "small", "backbone_config": {"model_type": "swin"}},
         r"the ViL settings must be left out: model.backbone='small'"),
        ({"backbone_config": {"model_type": "swin"}, "image_size": 800},
         r"the ViL settings must be left out: model.image_size=800"),
        ({"backbone_config": {"embed_dim": 96}}, r"model.backbone_config needs a model_type"),
        ({"backbone_config": {"model_type": "swim"}}, r"model_type 'swim' is not a transformers model type"),
        ({"backbone_config": {"model_type": "vit"}}, r"'vit' has no backbone class in transformers"),
        ({"backbone_config": {"model_type": "swin", "embed_dims": 8}}, r"embed_dims is not a field of SwinConfig; did you mean embed_dim"),
        ({"backbone_config": {"model_type": "swin", "out_features": ["stage4"]}}, r"set model.detector.backbone_features"),
        ({"backbone_config": {"model_type": "swin", "drop_path_rate": 0.1}}, r"set model.drop_path_rate"),
        ({"backbone_config": {"model_type": "resnet"}, "drop_path_rate": 0.1}, r"a resnet backbone has no drop path"),
        ({"backbone_config": {"model_type": "swin"}, "frozen_batch_norm": True}, r"SwinBackbone backbone has no BatchNorm"),
        ({"backbone_config": {"model_type": "resnet"}, "freeze_at": 6}, r"freeze_at can be 0 \(nothing\) to 5"),
        ({"backbone_from": "nowhere/at/all"}, r"neither a local folder nor a Hub model id"),
    ],
    ids=["vil-backbone", "vil-setting", "no-model-type", "unknown-type", "no-backbone-class", "unknown-field",
         "out-features", "drop-path-field", "no-drop-path", "no-batch-norm", "freeze-at", "bad-source"],
)  # fmt: skip
def test_backbone_settings_are_checked_before_the_data(shapes, tmp_path, capsys, model, message):
    assert train_main(["--config", str(config_without_data(tmp_path, **model))]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "no-such-folder" not in err and not (tmp_path / "run").exists()


def test_a_hub_id_offline_fails_before_the_data_saying_how_to_get_it(tmp_path):
    path = config_without_data(tmp_path, backbone_from="microsoft/swin-tiny-patch4-window7-224")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "model.backbone_from='microsoft/swin-tiny-patch4-window7-224' is not a local folder" in done.stderr
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in done.stderr
    assert "hf download microsoft/swin-tiny-patch4-window7-224 --local-dir DIR" in done.stderr
    assert "no-such-folder" not in done.stderr and not (tmp_path / "run").exists()


def test_a_plain_backbone_trains_from_the_config_with_gradient_checkpointing(shapes, tmp_path, caplog):
    """DINOv2 (patch 14) through the simple feature pyramid, described in model.backbone_config, with
    run.gradient_checkpointing: trains, evaluates and writes a folder that loads."""
    from accelerate.state import AcceleratorState

    from vil_hf.training import train

    from .test_backbones import TINY_DINOV2

    config = detection_config(backbone_config={"model_type": "dinov2", **TINY_DINOV2}, drop_path_rate=0.1)
    config["data"] = {
        "train_images": str(shapes / "train"),
        "train_annotations": str(shapes / "annotations" / "instances_train.json"),
        "val_images": str(shapes / "val"),
        "val_annotations": str(shapes / "annotations" / "instances_val.json"),
        "train_shortest_edge": [48, 64],
        "test_shortest_edge": 64,
        "longest_edge": 96,
        "num_workers": 0,
    }
    config["optim"] = {"batch_size": 2, "max_iter": 2, "steps": [], "warmup_iters": 1, "lr": 1e-4}
    config["run"] = {"output_dir": str(tmp_path / "run"), "trackers": [], "log_every": 1, "eval_batch_size": 3,
                     "num_visualized": 1, "gradient_checkpointing": True}  # fmt: skip
    AcceleratorState._reset_state(True)
    try:
        with caplog.at_level("INFO", logger="vil_hf"):
            result = train(config_from_dict(config))
    finally:
        AcceleratorState._reset_state(True)
    assert "gradient checkpointing on" in caplog.text
    assert [record["iteration"] for record in result.history] == [1, 2]
    assert result.metrics["stats"]["bbox"]["AP"] >= 0
    detector = AutoModelForObjectDetection.from_pretrained(result.model_dir)
    assert detector.config.uses_simple_feature_pyramid and detector.simple_feature_pyramid is not None


# -- the baseline configs end to end ------------------------------------------------------------


def _train_baseline(config: str, classifier_folder: Path, shapes: Path, out: Path, head: str, *extra: str):
    """`accelerate launch scripts/train.py --config CONFIG model.backbone_from=FOLDER` on the tiny shapes set, its
    whole backbone frozen so that the written model must hold the folder's backbone weights."""
    overrides = [
        f"model.backbone_from={classifier_folder}",
        "model.backbone_config=null",  # the folder's (tiny) architecture, with the config's recipe
        "model.num_labels=3",
        "model.freeze_at=5",  # the stem and the 4 stages
        *(f"model.detector.{k}={v}" for k, v in SMALL_HEADS[head].items()),
        f"data.train_images={shapes / 'train'}",
        f"data.train_annotations={shapes / 'annotations' / 'instances_train.json'}",
        f"data.val_images={shapes / 'val'}",
        f"data.val_annotations={shapes / 'annotations' / 'instances_val.json'}",
        "data.train_shortest_edge=[48,64]",
        "data.test_shortest_edge=64",
        "data.longest_edge=96",
        "data.num_workers=0",
        "optim.batch_size=2",
        "optim.max_iter=2",
        "optim.steps=[]",
        "optim.warmup_iters=1",
        f"run.output_dir={out}",
        "run.trackers=[]",
        "run.log_every=1",
        "run.eval_batch_size=3",
        "run.num_visualized=1",
        *extra,
    ]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / config), *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, kind, head",
    [
        ("configs/swin_t_mask_rcnn_1x.yaml", "swin", "mask_rcnn"),
        ("configs/convnext_t_mask_rcnn_1x.yaml", "convnext", "mask_rcnn"),
        ("configs/resnet50_retinanet_1x.yaml", "resnet", "retinanet"),
    ],
    ids=["swin", "convnext", "resnet"],
)
def test_a_baseline_config_trains_from_a_classifier_folder_and_writes_a_loadable_detector(
    shapes, tmp_path, config, kind, head
):
    classifier = saved_classifier(kind, tmp_path / f"{kind}-classifier")
    out = tmp_path / "run"
    done = _train_baseline(config, tmp_path / f"{kind}-classifier", shapes, out, head)
    # transformers' load report and ours are in the log.
    assert "LOAD REPORT" in done.stderr and f"backbone weights from {tmp_path / f'{kind}-classifier'}" in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stats"]["bbox"]["AP"] >= 0
    resolved = load_config(out / "config.yaml")
    assert resolved.model.backbone_from == str(tmp_path / f"{kind}-classifier")
    assert resolved.mirrors == load_config(ROOT / config).mirrors  # the baseline's recipe ran
    model_dir = out / "model"
    detector = AutoModelForObjectDetection.from_pretrained(model_dir).eval()
    assert detector.config.backbone_config.model_type == kind
    # The backbone started from the folder's weights: frozen, it still holds them after training.
    pairs = matching_tensors(classifier, detector.backbone)
    assert pairs and all("hidden_states_norms" in n for n in detector.backbone.state_dict() if n not in pairs)
    for name, (expected, actual) in pairs.items():
        assert torch.equal(expected, actual), name
    processor = AutoImageProcessor.from_pretrained(model_dir)
    image = Image.open(next((shapes / "val").iterdir())).convert("RGB")
    results = pipeline("object-detection", model=detector, image_processor=processor)(image, threshold=0.0)
    assert all(r["label"] in LABELS.values() for r in results)
    assert (model_dir / "README.md").is_file() and f"{kind} backbone" in (model_dir / "README.md").read_text()
