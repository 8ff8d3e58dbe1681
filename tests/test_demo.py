"""`vil-hf demo` end to end, shortened: data, training, evaluation, model folder, card, pictures."""

import json

import pytest
import torch

from vil_hf import ViLConfig, ViLModel
from vil_hf.cli import main
from vil_hf.demo import DEMO_ARCH, DemoSettings, demo_config


def test_demo_config_is_the_training_schema(tmp_path):
    config = demo_config(DemoSettings(output_dir=str(tmp_path), max_iter=100), tmp_path / "shapes")
    assert config.model.head == "mask_rcnn" and config.model.num_labels is None  # classes come from the data
    assert config.optim.steps == [70, 90] and config.optim.warmup_iters == 10
    # scale augmentation below the 128-pixel images: every batch pads to 128 x 128
    assert config.data.train_shortest_edge == [96, 112, 128]


def test_demo_patch_projection_keeps_every_value_of_a_patch():
    # From scratch, stage 1's projection hardly moves from its random start; narrower than a patch, it
    # drops the part of each patch that its draw decides (see DEMO_ARCH).
    projection = ViLModel(ViLConfig(arch=DEMO_ARCH)).get_input_embeddings().weight  # (d, 3, p, p)
    matrix = projection.detach().flatten(1)
    assert matrix.shape[0] >= matrix.shape[1] and torch.linalg.matrix_rank(matrix) == matrix.shape[1]


def test_demo_builds_the_kernels_while_it_draws_the_images(tmp_path, monkeypatch):
    """A first run's C++ build (half a minute) overlaps the data set's drawing, on another thread; training starts
    after both."""
    import threading

    from vil_hf import demo

    drawing, events = threading.Event(), []

    def build():
        # called before the drawing, on the caller's thread, this would wait out the timeout
        assert drawing.wait(timeout=10), "the kernels were not building while the images were drawn"
        events.append(("built", threading.current_thread() is threading.main_thread()))

    def draw(settings, data_dir):
        drawing.set()

    def train(config, overwrite):
        events.append(("train", threading.current_thread() is threading.main_thread()))
        raise KeyboardInterrupt  # stops the demo here

    monkeypatch.setattr(demo, "native_ops", build)
    monkeypatch.setattr(demo, "make_demo_shapes", draw)
    monkeypatch.setattr("vil_hf.training.loop.train", train)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(DemoSettings(output_dir=str(tmp_path)))
    assert events == [("built", False), ("train", True)]


@pytest.mark.slow
def test_short_demo_learns_the_shapes(tmp_path, capsys):
    code = main(["demo", "--output-dir", str(tmp_path), "--max-iter", "150", "--num-train", "160", "--num-val", "24"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "box AP" in printed and "mask AP" in printed
    model_dir = tmp_path / "run" / "model"
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md"):
        assert (model_dir / name).is_file(), name
    stats = json.loads((tmp_path / "run" / "metrics.json").read_text())["stats"]
    card = (model_dir / "README.md").read_text()
    assert f"value: {round(stats['bbox']['AP'], 3)}" in card
    assert (tmp_path / "run" / "eval" / "final" / "detections.png").is_file()
    assert (tmp_path / "run" / "loss_curve.png").is_file()
    # An untrained detector scores about 0 AP; this 150-iteration run reached 4.2 box AP here (the
    # full demo's figures are in the README), so a floor of 1 shows learning with margin to spare.
    assert stats["bbox"]["AP"] > 1.0 and stats["segm"]["AP"] > 1.0
