"""Dependable runs, from the command line (scripts/train.py on a tiny shapes set): a run owns its
folder, a killed or damaged run resumes without losing anything, bad images never stop training,
and the settings are checked before any data work."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vil_hf.data.shapes import make_shapes
from vil_hf.training import ConfigError, list_checkpoints
from vil_hf.training.cli import train_main

from .test_training import ROOT, run_training, tiny_config

TRAIN = ROOT / "scripts" / "train.py"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, num_train=8, num_val=4, image_size=(64, 80), seed=3)
    return out


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def train_cli(config_path: Path, *args: str, cwd: Path | None = None, umask: int | None = None, env=None):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(TRAIN), "--config", str(config_path), *args],
        capture_output=True, text=True, env=environment, cwd=cwd, timeout=600,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )  # fmt: skip


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


def history(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]


def run_id(folder: Path) -> str:
    return json.loads((folder / "run.json").read_text())["run_id"]


@pytest.fixture(scope="module")
def finished(shapes, tmp_path_factory):
    """A 4-iteration run started from the command line with relative data paths, under umask 027."""
    work = tmp_path_factory.mktemp("finished")
    config = tiny_config(shapes, Path("run"), val=False)
    for key in ("train_images", "train_annotations"):
        config["data"][key] = os.path.relpath(config["data"][key], work)
    config_path = write_config(work / "tiny.yaml", config)
    done = train_cli(config_path, cwd=work, umask=0o027)
    assert done.returncode == 0, done.stderr[-3000:]
    return work / "run", config_path, done


def copy_of(finished, tmp_path: Path) -> tuple[Path, Path]:
    """The finished run in a folder of its own, with a config naming that folder."""
    folder, config_path, _ = finished
    shutil.copytree(folder, tmp_path / "run")
    config = yaml.safe_load(config_path.read_text())
    config["run"]["output_dir"] = str(tmp_path / "run")
    for key in ("train_images", "train_annotations"):
        config["data"][key] = str((config_path.parent / config["data"][key]).resolve())
    return tmp_path / "run", write_config(tmp_path / "tiny.yaml", config)


# -- what a run records -----------------------------------------------------------------------


def test_a_run_records_what_ran_with_absolute_paths_the_umask_and_log_lines(finished):
    folder, _, done = finished
    # Without a terminal: one line per run.log_every iterations with each loss, the LR, time and ETA; no bar.
    lines = [line for line in done.stderr.splitlines() if "iteration " in line and " loss " in line]
    assert len(lines) == 4, done.stderr[-3000:]
    assert re.search(
        r"iteration 4/4  loss \d+\.\d{4} \(loss_\w+ \d+\.\d{4}, .*\)  lr 1\.00e-04  \d+\.\d\d s/it  ETA 0:00:00",
        lines[-1],
    )
    assert "training:" not in done.stderr and "\r" not in done.stderr and len(done.stderr) < 20_000
    # Absolute paths, so that the saved configs work from any folder.
    for saved in (folder / "config.yaml", folder / "model" / "training_config.yaml"):
        config = yaml.safe_load(saved.read_text())
        assert config["run"]["output_dir"] == str(folder)
        for key in ("train_images", "train_annotations"):
            assert os.path.isabs(config["data"][key]) and os.path.exists(config["data"][key])
    # One run id in the folder and in every checkpoint.
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-2", "checkpoint-4"]
    for checkpoint in list_checkpoints(folder):
        record = json.loads((checkpoint / "vil_hf_run.json").read_text())
        assert record["run_id"] == run_id(folder) and record["iteration"] == int(checkpoint.name.split("-")[1])
    # The user's umask (027), not tempfile's 0600 / 0700.
    for name in ("config.yaml", "run.json", "history.jsonl", "loss_curve.png", "model/training_config.yaml",
                 "model/config.json", "checkpoints/checkpoint-4/vil_hf_run.json"):  # fmt: skip
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o640, name
    for name in ("model", "checkpoints/checkpoint-4"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o750, name


# -- a run owns its folder ---------------------------------------------------------------------


def test_reusing_a_folder_is_refused_and_overwrite_removes_only_a_run(finished, tmp_path):
    folder, config_path = copy_of(finished, tmp_path)
    before = snapshot(folder)
    done = train_cli(config_path, f"data.train_images={tmp_path / 'nowhere'}")  # refused before the data is read
    assert done.returncode == 2
    assert "is not empty (checkpoints up to iteration 4;" in done.stderr and "--resume" in done.stderr
    assert "--overwrite" in done.stderr and "nowhere" not in done.stderr
    assert snapshot(folder) == before

    (folder / "notes.txt").write_text("mine")
    done = train_cli(config_path, "--overwrite")
    assert done.returncode == 2 and "holds files that training does not write (notes.txt)" in done.stderr
    assert snapshot(folder) == {**before, **{"notes.txt": snapshot(folder)["notes.txt"]}}

    (folder / "notes.txt").unlink()
    old_id = run_id(folder)
    done = train_cli(config_path, "--overwrite", "optim.max_iter=2", "optim.steps=[]")
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_id(folder) != old_id
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-2"]
    assert [r["iteration"] for r in history(folder)] == [1, 2]


def test_resume_refuses_a_finished_run_and_another_model_config_then_extends(finished, tmp_path):
    folder, config_path = copy_of(finished, tmp_path)
    before = snapshot(folder)
    done = train_cli(config_path, "--resume")
    assert done.returncode == 2
    assert "checkpoint-4 is at iteration 4 and optim.max_iter=4" in done.stderr
    assert "To train longer, raise it: --resume optim.max_iter=8" in done.stderr
    done = train_cli(config_path, "--resume", "optim.max_iter=6", "model.detector.fpn_channels=16")
    assert done.returncode == 2
    message = done.stderr.strip().splitlines()[-1]
    assert "trained with another model config (model.detector.fpn_channels: 32 (checkpoint) vs 16 (now))" in message
    assert len(message) < 600 and "Traceback" not in done.stderr
    assert snapshot(folder) == before  # nothing touched, the model folder included

    done = train_cli(config_path, "--resume", "optim.max_iter=6")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "checkpoint-4 at iteration 4" in done.stderr
    assert [r["iteration"] for r in history(folder)] == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((folder / "config.yaml").read_text())["optim"]["max_iter"] == 6
    assert yaml.safe_load((folder / "config-until-iteration-4.yaml").read_text())["optim"]["max_iter"] == 4
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-4", "checkpoint-6"]


def test_resume_skips_a_cut_short_checkpoint(finished, tmp_path):
    folder, config_path = copy_of(finished, tmp_path)
    weights = folder / "checkpoints" / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    done = train_cli(config_path, "--resume", "optim.max_iter=6")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipping checkpoint-4 (model.safetensors is damaged or cut short" in done.stderr
    assert "continuing from checkpoint-2, the newest complete checkpoint" in done.stderr
    assert "SafetensorError" not in done.stderr.split("skipping")[0]  # no raw error before the explanation
    assert [r["iteration"] for r in history(folder)] == [1, 2, 3, 4, 5, 6]


def test_a_killed_run_resumes_where_its_newest_checkpoint_left_it(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path / "run", val=False, optim={"max_iter": 30, "steps": []})
    config_path = write_config(tmp_path / "tiny.yaml", config)
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(TRAIN), "--config", str(config_path)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "checkpoints" / "checkpoint-4").exists():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.05)
        process.kill()  # SIGKILL
        process.wait()
    killed_at = max(r["iteration"] for r in history(tmp_path / "run"))
    assert 4 <= killed_at < 30 and not (tmp_path / "run" / "model").exists()
    done = train_cli(config_path, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"resumed from \S+checkpoint-(\d+) at iteration \1", done.stderr)
    assert [r["iteration"] for r in history(tmp_path / "run")] == list(range(1, 31))
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".partial")]


# -- bad images --------------------------------------------------------------------------------


def _jpeg_set(shapes: Path, root: Path) -> tuple[Path, Path]:
    """The shapes training set as JPEG (quality 90), as COCO is."""
    images = root / "images"
    images.mkdir(parents=True)
    content = json.loads((shapes / "annotations" / "instances_train.json").read_text())
    for image in content["images"]:
        name = image["file_name"].replace(".png", ".jpg")
        Image.open(shapes / "train" / image["file_name"]).convert("RGB").save(images / name, quality=90)
        image["file_name"] = name
    annotations = root / "instances.json"
    annotations.write_text(json.dumps(content))
    return images, annotations


def test_bad_images_never_stop_a_run(shapes, tmp_path):
    images, annotations = _jpeg_set(shapes, tmp_path)
    content = json.loads(annotations.read_text())
    truncated = images / content["images"][0]["file_name"]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    content["images"][1]["width"] += 1  # the annotation disagrees with the file
    annotations.write_text(json.dumps(content))
    config = tiny_config(shapes, tmp_path / "run", val=False)
    config["data"].update(train_images=str(images), train_annotations=str(annotations))
    done = train_cli(write_config(tmp_path / "tiny.yaml", config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped 2 of 8 images (1 unreadable, 1 wrong size)" in done.stderr
    assert "image file is truncated" in done.stderr
    assert sum(r["replaced_images"] for r in history(tmp_path / "run")) == 0

    # A file that breaks after the check (same size and mtime, so the cached check still passes it)
    # is replaced at run time, counted, and the run finishes.
    broken = images / content["images"][2]["file_name"]
    status = broken.stat()
    broken.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, status.st_size, dtype=np.uint8)))
    os.utime(broken, ns=(status.st_atime_ns, status.st_mtime_ns))
    config["run"]["output_dir"] = str(tmp_path / "second")
    done = train_cli(write_config(tmp_path / "second.yaml", config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped 2 of 8 images" in done.stderr  # the broken file passed the cached check
    replaced = sum(r["replaced_images"] for r in history(tmp_path / "second"))
    assert replaced >= 1 and done.stderr.count("could not be read and another took its place") == replaced
    assert f"{replaced} training images could not be read during the run and were replaced" in done.stderr
    assert (tmp_path / "second" / "model" / "model.safetensors").is_file()


# -- checks before any data work ---------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.detector.foo=1"], r"model.detector: \['foo'\] are not MaskRCNNConfig arguments"),
        (["model.backbone=huge", "model.arch=null"], r"model.backbone: Unknown published ViL model 'huge'"),
        (["model.init_from=nowhere"], r"model.init_from=\S+nowhere is not a folder"),
    ],
)
def test_model_settings_are_checked_before_the_data(shapes, tmp_path, capsys, overrides, message):
    config = tiny_config(shapes, tmp_path / "run", val=False)
    config["data"]["train_images"] = str(tmp_path / "no-such-folder")  # the data would fail too
    assert train_main(["--config", str(write_config(tmp_path / "c.yaml", config)), *overrides]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "no-such-folder" not in err
    assert not (tmp_path / "run").exists()


def test_a_missing_hub_token_is_found_before_the_data(shapes, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    from vil_hf.evaluation import model_cards

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_cards, "get_token", lambda: None)
    config = tiny_config(shapes, tmp_path / "run", val=False)
    config["data"]["train_images"] = str(tmp_path / "no-such-folder")
    argv = ["--config", str(write_config(tmp_path / "c.yaml", config)), "--push-to-hub", "someone/m"]
    assert train_main(argv) == 3
    err = capsys.readouterr().err
    assert "--push-to-hub someone/m: no Hugging Face token found" in err and "nothing was started" in err
    assert "no-such-folder" not in err and not (tmp_path / "run").exists()


# -- resuming, through the API -----------------------------------------------------------------


def test_pruning_and_resume_leave_another_runs_checkpoint_alone(shapes, tmp_path):
    run_training(tiny_config(shapes, tmp_path / "run", val=False, optim={"max_iter": 2, "steps": []}))
    folder = tmp_path / "run"
    for number in (3, 100):  # checkpoints of another run, copied in
        foreign = folder / "checkpoints" / f"checkpoint-{number}"
        shutil.copytree(folder / "checkpoints" / "checkpoint-2", foreign)
        record = json.loads((foreign / "vil_hf_run.json").read_text())
        (foreign / "vil_hf_run.json").write_text(json.dumps({**record, "run_id": "another", "iteration": number}))
    config = tiny_config(shapes, folder, val=False, run={"keep_checkpoints": 1, "checkpoint_every": 1})
    result = run_training(config, resume=True)  # from its own checkpoint-2, not the newer checkpoint-100
    assert result.iteration == 4 and [r["iteration"] for r in history(folder)] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-4", "checkpoint-100"]
    # Its own checkpoint-3 did not replace the other run's: that one was kept under another name.
    assert (
        json.loads((folder / "checkpoints" / "checkpoint-3-of-run-another" / "vil_hf_run.json").read_text())[
            "iteration"
        ]
        == 3
    )


def test_a_checkpoint_that_fails_to_load_falls_back_to_the_one_before(shapes, tmp_path, caplog):
    config = tiny_config(shapes, tmp_path / "run", val=False, optim={"max_iter": 4, "steps": []})
    run_training(config)
    # Data with other class names than the run was trained on is refused first.
    content = json.loads(Path(config["data"]["train_annotations"]).read_text())
    for category in content["categories"]:
        category["name"] = category["name"].upper()
    (tmp_path / "renamed.json").write_text(json.dumps(content))
    renamed = {**config, "data": {**config["data"], "train_annotations": str(tmp_path / "renamed.json")}}
    with pytest.raises(ConfigError, match=r"the data's classes \(3: CIRCLE, TRIANGLE, SQUARE\) differ from those"):
        run_training({**renamed, "optim": {**config["optim"], "max_iter": 5}}, resume=True)
    # A whole, well-formed file that does not fit the optimizer: only loading finds out.
    torch.save({"state": {}, "param_groups": []}, tmp_path / "run" / "checkpoints" / "checkpoint-4" / "optimizer.bin")
    config["optim"]["max_iter"] = 5
    with caplog.at_level(logging.INFO, logger="vil_hf"):
        result = run_training(config, resume=True)
    assert result.iteration == 5
    assert "checkpoint-4 could not be loaded (ValueError" in caplog.text and "trying the next older" in caplog.text
    assert "resumed from" in caplog.text and "checkpoint-2 at iteration 2" in caplog.text
    assert [r["iteration"] for r in history(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_weights_of_another_shape_are_reported_in_a_line(shapes, tmp_path):
    """A checkpoint without a run record (earlier vil-hf) and another detector width: a short message,
    not torch's list of every tensor."""
    config = tiny_config(shapes, tmp_path / "run", val=False, optim={"max_iter": 2, "steps": []})
    run_training(config)
    folder = tmp_path / "run"
    for name in ("run.json", "config.yaml", "checkpoints/checkpoint-2/vil_hf_run.json"):
        (folder / name).unlink()
    config["model"]["detector"]["fpn_channels"] = 16
    config["optim"]["max_iter"] = 4
    with pytest.raises(ConfigError, match=r"no run record \(run.json\).*--resume \S+checkpoint-2"):
        run_training(config, resume=True)
    with pytest.raises(ConfigError) as info:
        run_training(config, resume=str(folder / "checkpoints" / "checkpoint-2"))
    message = str(info.value)
    assert re.search(r"do not fit the model of this config \(\d+ tensors of another shape, e\.g\. \S+: ", message)
    assert len(message) < 600


def test_differing_settings_are_described_where_they_differ():
    from vil_hf.training.config import describe_differences

    arch = "l1,h1,d16,n1,s1,g1,p4,f3,a0_l2,h1,d16,n1,s1,g1,p2,f3,a0_l3,h2,d32,n1,s1,g1,p2,f3,a0_l4,h2,d32,n1,s1,g0,p2,f3,a0"
    found = [("model.arch", arch, arch.replace("l4,h2,d32", "l4,h2,d64")), ("model.detector.fpn_channels", 32, 16)]
    assert describe_differences(found, "checkpoint", "now") == (
        "model.arch: ...'_l4,h2,d32,n1,s1,g0,p2,f3,a0' (checkpoint) vs ...'_l4,h2,d64,n1,s1,g0,p2,f3,a0' (now); "
        "model.detector.fpn_channels: 32 (checkpoint) vs 16 (now)"
    )
