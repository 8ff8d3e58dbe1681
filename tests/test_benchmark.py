"""scripts/benchmark.py at a tiny size: it runs, times every contender, and writes the JSON it promises."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from vil_hf.benchmark import QUICK, main, measure_peak_memory

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def test_quick_run_writes_json_with_every_measurement(tmp_path):
    output = tmp_path / "bench.json"
    # a subprocess: the benchmark sets torch's thread count, which must not leak into this test run
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-memory", "--threads", "1", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(output.read_text())
    assert results["setup"]["image"] == [64, 96] and results["setup"]["repeats"] == 3
    for key in ("vil_forward", "swin_forward", "vil_forward_backward", "swin_forward_backward"):
        assert len(results["backbone"][key]["runs_s"]) == 3
        assert results["backbone"][key]["median_s"] > 0
    assert set(results["scaling"]) == {
        "vil_forward_base",
        "vil_forward_4x_pixels",
        "swin_forward_base",
        "swin_forward_4x_pixels",
    }
    groups = (
        ("layer", ("vectorized", "blocked", "dense")),
        ("layer_reference", ("reference", "blocked")),
        ("kernel", ("vectorized", "blocked", "dense")),
    )
    for part, names in groups:
        assert {key.rsplit("_forward", 1)[0] for key in results[part]} == set(names)
        for name in names:
            assert results[part][f"{name}_forward"]["median_s"] > 0
            assert results[part][f"{name}_forward_backward"]["median_s"] > 0
    assert results["layer_skipped"] == {"flex": "CUDA only"}
    assert {
        "vil_over_swin_forward",
        "vil_over_swin_forward_backward",
        "vil_scaling_4x_pixels",
        "layer_reference_over_blocked_forward",
        "layer_vectorized_over_blocked_forward_backward",
        "kernel_vectorized_over_blocked_forward_backward",
    } <= set(results["ratios"])
    assert set(results["detection_batch"]) == {"padded_batch", "each_image_as_alone"}
    assert results["ratios"]["detection_each_image_as_alone_over_padded_batch"] > 0
    assert "| Mask R-CNN eval, batch of 64x96 and ~3/4 of it" in results["markdown"]
    assert "| backbone forward 64x96 (no_grad) |" in results["markdown"]
    assert "| reference (own group, interleaved with blocked: " in results["markdown"]
    assert results["markdown"] in result.stdout


def test_peak_memory_is_measured_in_a_fresh_process():
    memory = measure_peak_memory("vil", replace(QUICK, image=(32, 32)), backward=True, device="cpu")
    assert memory["peak_bytes"] >= memory["before_bytes"] > 0


def test_backbones_in_bfloat16_at_batch_2(tmp_path):
    """The GPU target's setting (bfloat16 autocast, batch 2) runs the same code; here on CPU, tiny."""
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--batch", "2", "--dtype", "bfloat16"]
        + ["--json", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(output.read_text())
    assert (results["setup"]["batch"], results["setup"]["dtype"]) == (2, "bfloat16")
    assert results["memory"]["vil_forward_backward"]["peak_bytes"] > 0
    assert "backbones in bfloat16 at batch 2" in results["markdown"]


def test_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["--repeats", "0"])
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--batch", "0"])
    assert "--batch must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--image-size", "16", "800"])
    assert "images at least 32x32" in capsys.readouterr().err
