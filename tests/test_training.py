"""Training: configs, optimisation, checkpoints, exact resumption, more than one process."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from vil_hf import ViLBackbone, ViLConfig
from vil_hf.data.shapes import make_shapes
from vil_hf.training import (
    ConfigError,
    build_model,
    build_optimizer,
    config_from_dict,
    list_checkpoints,
    load_config,
    lr_factor,
    parameter_groups,
    train,
)
from vil_hf.training.config import OptimSection

from .test_detection_models import SMALL_HEADS, TINY_ARCH

ROOT = Path(__file__).resolve().parents[1]
FEW_DETECTIONS = {
    "mask_rcnn": {"rpn_pre_nms_topk_test": 200, "rpn_post_nms_topk_test": 50, "detections_per_image": 20},
    "retinanet": {"topk_candidates": 100, "detections_per_image": 20},
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, num_train=8, num_val=4, image_size=(64, 80), seed=3)
    return out


def tiny_config(shapes_dir: Path, output_dir: Path, head: str = "mask_rcnn", val: bool = True, **sections) -> dict:
    config = {
        "task": "detection",
        "model": {
            "head": head,
            "backbone": None,
            "arch": TINY_ARCH,
            "image_size": 128,
            "drop_path_rate": 0.1,
            "num_labels": 3,
            # Few proposals and detections: an untrained model's evaluation stays quick.
            "detector": {**SMALL_HEADS[head], **FEW_DETECTIONS[head]},
        },
        "data": {
            "train_images": str(shapes_dir / "train"),
            "train_annotations": str(shapes_dir / "annotations" / "instances_train.json"),
            "val_images": str(shapes_dir / "val") if val else None,
            "val_annotations": str(shapes_dir / "annotations" / "instances_val.json") if val else None,
            "train_shortest_edge": [48, 64],
            "test_shortest_edge": 64,
            "longest_edge": 96,
            "num_workers": 0,
        },
        "optim": {"batch_size": 2, "lr": 1e-3, "warmup_iters": 2, "max_iter": 4, "steps": [3], "clip_grad_norm": 1.0},
        "run": {
            "output_dir": str(output_dir),
            "checkpoint_every": 2,
            "keep_checkpoints": 2,
            "eval_every": 1000,
            "log_every": 1,
            "trackers": [],
            "num_visualized": 2,
        },
    }
    for section, values in sections.items():
        config[section].update(values)
    return config


def run_training(config: dict, **kwargs):
    AcceleratorState._reset_state(True)
    try:
        return train(config_from_dict(config), **kwargs)
    finally:
        AcceleratorState._reset_state(True)


# -- configs -----------------------------------------------------------------------------------


def test_config_base_overrides_and_cli_values(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "b.yaml").write_text(
        "model: {backbone: small, drop_path_rate: 0.1}\noptim: {lr: 1.0e-4, steps: [60000, 80000]}\n"
    )
    (tmp_path / "c.yaml").write_text("_base_: base/b.yaml\nmirrors: x.yaml\nmodel: {drop_path_rate: 0.2}\n")
    config = load_config(tmp_path / "c.yaml", ["optim.lr=3e-4", "optim.steps=[10, 20]", "run.trackers=[]"])
    assert config.model.backbone == "small" and config.model.drop_path_rate == 0.2  # mappings merge
    assert config.optim.lr == 3e-4 and config.optim.steps == [10, 20]  # lists replace
    assert config.mirrors == "x.yaml" and config.run.trackers == []
    config.save(tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml").to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "did you mean optim.lr"),
        (["optim.steps=[20, 10]"], "increasing"),
        (["model.arch=l1,h1"], "exclusive"),
        (["optim.batch_size=3", "optim.gradient_accumulation_steps=2"], "not divisible"),
        (["run.mixed_precision=fp8"], "run.mixed_precision"),
        (["optim.lr=fast"], "must be a number"),
        (["task=segmentation"], "task="),
        (["model.head=classification"], "model.head"),
        (["optim.lr"], "key=value"),
    ],
)
def test_config_errors_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_base_cycle_and_missing_base(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml does not exist"):
        load_config(tmp_path / "c.yaml")


def test_detector_options_are_checked():
    config = config_from_dict({"model": {"backbone": None, "arch": TINY_ARCH, "detector": {"fpn_channel": 8}}})
    with pytest.raises(ConfigError, match="fpn_channel"):
        build_model(config, {0: "a"})


# -- optimisation ------------------------------------------------------------------------------


def test_no_weight_decay_on_norms_biases_position_tables_and_global_tokens():
    config = config_from_dict(
        {"model": {"backbone": None, "arch": TINY_ARCH, "num_labels": 3, "detector": SMALL_HEADS["mask_rcnn"]}}
    )
    model = build_model(config, {0: "a", 1: "b", 2: "c"})
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert len(decayed) + len(kept) == len(names)
    for name in kept:
        assert (
            name.endswith(".bias")
            or "norm" in name
            or name.rsplit(".", 1)[-1]
            in {
                "global_tokens",
                "relative_position_bias_table",
                "global_to_local_bias",
                "local_to_global_bias",
                "global_to_global_bias",
            }
        ), name
    assert any(n.endswith("global_tokens") for n in kept)
    assert any(n.endswith("relative_position_bias_table") for n in kept)
    assert any("layernorm" in n.lower() or "norm" in n for n in kept)
    assert all(not n.endswith(".bias") and "norm" not in n for n in decayed)
    assert any(n.endswith("attention.query.weight") or "qkv" in n or "query" in n for n in decayed)


def test_warmup_then_step_decay():
    optim = OptimSection(lr=1.0, warmup_iters=1000, warmup_factor=0.01, steps=[60000, 80000], max_iter=90000)
    assert lr_factor(0, optim) == pytest.approx(0.01)
    assert lr_factor(500, optim) == pytest.approx(0.01 * 0.5 + 0.5)
    assert lr_factor(1000, optim) == 1.0 and lr_factor(59999, optim) == 1.0
    assert lr_factor(60000, optim) == pytest.approx(0.1) and lr_factor(80000, optim) == pytest.approx(0.01)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_optimizer_steps_like_the_per_parameter_loop(name):
    """On the CPU the optimizer is torch's fused one; three steps match the plain loop's, decay groups included."""
    config = config_from_dict(
        {"model": {"backbone": None, "arch": TINY_ARCH, "num_labels": 3, "detector": SMALL_HEADS["mask_rcnn"]}}
    )
    optim = OptimSection(optimizer=name, lr=0.05, weight_decay=0.1, momentum=0.9)
    torch.manual_seed(0)
    fused_model = build_model(config, {0: "a", 1: "b", 2: "c"})
    plain_model = build_model(config, {0: "a", 1: "b", 2: "c"})
    plain_model.load_state_dict(fused_model.state_dict())
    fused, plain = build_optimizer(fused_model, optim, "cpu"), build_optimizer(plain_model, optim)
    assert all(g["fused"] for g in fused.param_groups) and not any(g["fused"] for g in plain.param_groups)
    start = {n: p.detach().clone() for n, p in fused_model.named_parameters()}
    for _ in range(3):
        for fused_p, plain_p in zip(fused_model.parameters(), plain_model.parameters()):
            gradient = torch.randn_like(fused_p)
            fused_p.grad, plain_p.grad = gradient.clone(), gradient.clone()
        fused.step()
        plain.step()
    for (param_name, fused_p), plain_p in zip(fused_model.named_parameters(), plain_model.parameters()):
        assert not torch.equal(fused_p, start[param_name]), param_name
        torch.testing.assert_close(fused_p, plain_p, rtol=1e-5, atol=1e-6, msg=param_name)


# -- the loop ----------------------------------------------------------------------------------


def test_resume_continues_exactly(shapes, tmp_path):
    """4 iterations straight give the same weights as 2, a restart, and 2 more."""
    straight = run_training(tiny_config(shapes, tmp_path / "straight", val=False))
    first = tiny_config(shapes, tmp_path / "resumed", val=False)
    first["optim"]["max_iter"] = 2
    run_training(first)
    resumed = run_training(tiny_config(shapes, tmp_path / "resumed", val=False), resume=True)
    a = load_file(straight.model_dir / "model.safetensors")
    b = load_file(resumed.model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    # ... and the weights did move during the run.
    init = build_model(config_from_dict(tiny_config(shapes, tmp_path / "x", val=False)), {0: "a", 1: "b", 2: "c"})
    assert any(not torch.equal(a[k], v) for k, v in init.state_dict().items() if k in a)


def test_training_writes_checkpoints_model_evaluation_and_pictures(shapes, tmp_path):
    result = run_training(tiny_config(shapes, tmp_path / "run", run={"checkpoint_every": 1, "keep_checkpoints": 2}))
    out = tmp_path / "run"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert not any(p.name.startswith(".partial") for p in (out / "checkpoints").iterdir())
    assert (result.model_dir / "model.safetensors").is_file()
    assert (result.model_dir / "preprocessor_config.json").is_file()
    assert (result.model_dir / "training_config.yaml").is_file()
    for name in ("metrics.json", "metrics.md", "detections.json", "detections.png"):
        assert (out / "eval" / "final" / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())["stats"]
    assert {"bbox", "segm"} <= set(metrics) and 0 <= metrics["bbox"]["AP"] <= 100
    assert (out / "loss_curve.png").is_file()
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in history] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in history)
    assert history[0]["lr"] == pytest.approx(1e-3 * 0.01) and history[3]["lr"] == pytest.approx(1e-4)

    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    import vil_hf  # noqa: F401

    model = AutoModelForObjectDetection.from_pretrained(result.model_dir)
    assert model.config.id2label == {0: "circle", 1: "square", 2: "triangle"} or len(model.config.id2label) == 3
    assert AutoImageProcessor.from_pretrained(result.model_dir).size["shortest_edge"] == 64


def test_retinanet_trains_and_evaluates(shapes, tmp_path):
    result = run_training(
        tiny_config(shapes, tmp_path / "retina", head="retinanet", optim={"max_iter": 2, "steps": []})
    )
    assert set(result.metrics["stats"]) == {"bbox"}


def test_batch_must_split_over_processes_and_accumulation(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path / "bad", val=False, optim={"batch_size": 2, "gradient_accumulation_steps": 2})
    config["optim"]["batch_size"] = 2
    result = run_training(config)  # 2 images = 2 micro-batches of 1
    assert result.iteration == 4
    config["optim"]["gradient_accumulation_steps"] = 4
    config["optim"]["batch_size"] = 4
    config["data"]["train_images"] = str(shapes / "missing")
    config["run"]["output_dir"] = str(tmp_path / "other")
    with pytest.raises(Exception, match="missing"):
        run_training(config)


def test_init_from_a_vil_backbone_folder(shapes, tmp_path):
    backbone = ViLBackbone(
        ViLConfig(arch=TINY_ARCH, image_size=128, out_features=["stage1", "stage2", "stage3", "stage4"])
    )
    backbone.save_pretrained(tmp_path / "backbone")
    config = config_from_dict(tiny_config(shapes, tmp_path / "x") | {})
    config.model.init_from = str(tmp_path / "backbone")
    model = build_model(config, {0: "a", 1: "b", 2: "c"})
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(model.state_dict()["backbone." + name], tensor), name
    config.model.init_from = str(tmp_path)
    with pytest.raises(ConfigError, match="no model.safetensors"):
        build_model(config, {0: "a"})


def test_resume_without_checkpoint_fails_clearly(shapes, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint under .*fresh/checkpoints; train without --resume"):
        run_training(tiny_config(shapes, tmp_path / "fresh", val=False), resume=True)


def run_or_dump_stacks(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run, except that a command still running after `timeout` seconds fails the test with the Python
    stacks of every process it started (the launcher and its workers print them on SIGABRT through faulthandler),
    so that a hang says where it hangs."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "PYTHONFAULTHANDLER": "1"}, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        pytest.fail(
            f"{' '.join(command)[:300]} did not finish in {timeout} s; the stacks of its processes:\n{stderr[-12000:]}"
        )
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_two_processes_train_with_accelerate_launch(shapes, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine runs two gloo processes."""
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(shapes, tmp_path / "ddp", optim={"max_iter": 2, "steps": []})))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "scripts" / "train.py"), "--config", str(config_path),
    ]  # fmt: skip
    done = run_or_dump_stacks(command, env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "ddp"
    assert (out / "model" / "model.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text())["stats"]["bbox"]["AP"] >= 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in history] == [1, 2]


def test_train_script_reports_config_errors(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "none.yaml does not exist" in done.stderr


def test_every_shipped_config_loads_and_describes_its_model():
    from vil_hf.published import BASELINES
    from vil_hf.training.models import DETECTORS, backbone_config

    files = sorted((ROOT / "configs").rglob("*.yaml"))
    rows = [f for f in files if "base" not in f.parts]
    assert len(rows) == 25 + len(BASELINES)
    baselines = {ROOT / row.config_path for row in BASELINES.values()}
    for path in rows:
        config = load_config(path)
        assert config.mirrors and (config.mirrors.startswith("msvit_") or path in baselines), path
        assert config.model.head in DETECTORS
        backbone = backbone_config(config.model)
        assert getattr(backbone, "drop_path_rate", 0.0) == config.model.drop_path_rate
        assert config.model.drop_path_rate > 0 or backbone.model_type == "resnet"
        assert config.optim.steps[-1] < config.optim.max_iter
        if "3x_ms" in path.name and path not in baselines:
            assert config.data.train_shortest_edge == list(range(640, 801, 32))
        if config.model.head == "retinanet" and path not in baselines:
            assert config.optim.clip_grad_norm == 1.0


def test_evaluate_script_writes_metrics_and_card_and_checks_the_push_first(shapes, tmp_path):
    result = run_training(tiny_config(shapes, tmp_path / "run", optim={"max_iter": 2, "steps": []}))
    model_dir = result.model_dir
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def evaluate(*args, **extra_env):
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(model_dir), *args],
            capture_output=True, text=True, env={**env, **extra_env}, timeout=600, cwd=tmp_path,
        )  # fmt: skip

    done = evaluate("run.num_visualized=1")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((model_dir / "eval" / "metrics.json").read_text())["stats"]
    assert (model_dir / "eval" / "detections.png").is_file()
    card = (model_dir / "README.md").read_text()
    assert "model-index" in card
    assert f"value: {round(metrics['bbox']['AP'], 3)}" in card and f"value: {round(metrics['segm']['AP'], 3)}" in card

    # Results elsewhere leave the model folder untouched; the card goes with them.
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    done = evaluate("--output-dir", str(tmp_path / "elsewhere"), "run.num_visualized=0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    assert "model-index" in (tmp_path / "elsewhere" / "README.md").read_text()
    assert (tmp_path / "elsewhere" / "metrics.json").is_file()

    # The upload is checked before anything is evaluated: offline, no token, elsewhere + push.
    offline = evaluate("--push-to-hub", "someone/vil-tiny-shapes", HF_HUB_OFFLINE="1", HF_TOKEN="hf_dummy")
    assert offline.returncode == 3 and "offline mode is on (HF_HUB_OFFLINE=1)" in offline.stderr
    assert "nothing was started" in offline.stderr and "evaluation on" not in offline.stderr
    apart = evaluate("--push-to-hub", "someone/m", "--output-dir", str(tmp_path / "elsewhere"))
    assert apart.returncode == 2 and "drop one of the two options" in apart.stderr
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def _colour_folder(root: Path, per_class: int, seed: int) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for name, channel in (("blue", 2), ("red", 0)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(40, 48, 3, generator=generator) * 80).to(torch.uint8)
            pixels[..., channel] += 150
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.png")


def test_classification_fine_tuning_and_top_k(tmp_path):
    _colour_folder(tmp_path / "train", 6, 0)
    _colour_folder(tmp_path / "val", 3, 1)
    config = {
        "task": "classification",
        "model": {"head": "classification", "backbone": None, "arch": TINY_ARCH, "image_size": 224, "num_labels": None},
        "data": {"train_images": str(tmp_path / "train"), "val_images": str(tmp_path / "val"), "num_workers": 0},
        "optim": {"batch_size": 4, "lr": 1e-3, "warmup_iters": 1, "max_iter": 3, "steps": []},
        "run": {"output_dir": str(tmp_path / "out"), "log_every": 1, "checkpoint_every": 10, "trackers": [],
                "eval_batch_size": 4},
    }  # fmt: skip
    result = run_training(config)
    assert result.metrics["images"] == 6 and result.metrics["top5"] == 100.0
    assert 0.0 <= result.metrics["top1"] <= 100.0
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(result.model_dir)
    assert model.config.id2label == {0: "blue", 1: "red"}


def test_data_that_does_not_fit_the_model_config_stops_before_training(shapes, tmp_path):
    from vil_hf.data import DataError

    config = tiny_config(shapes, tmp_path / "bad", val=False)
    config["model"]["num_labels"] = 2
    with pytest.raises(DataError, match="num_labels=3"):
        run_training(config)
    assert not (tmp_path / "bad" / "checkpoints").exists()
