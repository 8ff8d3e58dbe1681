"""The backbone comparison: the demo's recipe on each backbone, sized alike, side by side."""

import json

import pytest

from vil_hf.compare import compare_backbones
from vil_hf.demo import DEMO_BACKBONES, DemoSettings, demo_config
from vil_hf.training import build_model
from vil_hf.training.models import check_model_config


def test_demo_backbones_share_the_recipe_and_are_sized_like_the_demo_vil(tmp_path):
    settings = DemoSettings(output_dir=str(tmp_path), max_iter=100)
    configs = {name: demo_config(settings, tmp_path / "shapes", name) for name in DEMO_BACKBONES}
    labels = {0: "circle", 1: "triangle", 2: "square"}
    counts = {}
    for name, config in configs.items():
        check_model_config(config)
        # Everything but the backbone is the demo's: data, schedule, heads, run.
        for section in ("data", "optim", "run"):
            assert getattr(config, section) == getattr(configs["vil"], section), (name, section)
        assert config.model.detector == configs["vil"].model.detector
        model = build_model(config, labels)
        counts[name] = (
            sum(p.numel() for p in model.backbone.parameters()),
            sum(p.numel() for p in model.parameters()),
        )
    vil_backbone, vil_total = counts["vil"]
    assert 0.75e6 < vil_backbone < 0.8e6 and 1.85e6 < vil_total < 1.95e6
    for name, (backbone, total) in counts.items():
        assert abs(backbone / vil_backbone - 1) < 0.15 and abs(total / vil_total - 1) < 0.06, (name, counts)
    with pytest.raises(ValueError, match="unknown demo backbone 'vit'"):
        demo_config(settings, tmp_path, "vit")


@pytest.mark.slow
def test_a_short_comparison_writes_the_table(tmp_path):
    settings = DemoSettings(max_iter=4, num_train=16, num_val=4)
    result = compare_backbones(tmp_path, ["vil", "resnet"], settings, log=lambda *_: None)
    rows = {row["backbone"]: row for row in result["rows"]}
    assert set(rows) == {"vil", "resnet"} and rows["vil"]["data_digest"] == rows["resnet"]["data_digest"]
    for row in rows.values():
        assert 0 <= row["box_ap"] <= 100 and 0 <= row["mask_ap"] <= 100
        assert row["seconds_per_iteration"] > 0 and 1.75e6 < row["parameters"] < 1.95e6
        history = (tmp_path / row["backbone"] / "run" / "history.jsonl").read_text().splitlines()
        assert json.loads(history[-1])["iteration"] == 4
    table = (tmp_path / "comparison.md").read_text()
    assert "| ViL (the demo model) |" in table and "| ResNet (ResNet-18 layout) |" in table
    assert table.splitlines()[2].endswith("| 1.00 |")  # ViL's own ratio
    assert "4 iterations of 8 images, 16 training and 4 validation images; load average" in table
    assert json.loads((tmp_path / "comparison.json").read_text()) == result
