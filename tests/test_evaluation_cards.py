"""Model cards: published numbers in the model-index, measured cards round-trip, Hub upload and its failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import OfflineModeIsEnabled

from vil_hf.evaluation import CocoMetrics, model_cards
from vil_hf.evaluation.model_cards import (
    HubUploadError,
    evaluation_model_card,
    published_model_card,
    push_to_hub,
    write_card,
)
from vil_hf.published import PUBLISHED, published_result

ROOT = Path(__file__).resolve().parents[1]


def results_by_name(card: ModelCard) -> dict[str, tuple[str, float]]:
    return {r.metric_name: (r.task_type, r.metric_value) for r in card.data.eval_results}


@pytest.mark.parametrize("size, head", [("small", "mask_rcnn"), ("base-deep", "retinanet")])
def test_published_cards_hold_the_published_numbers(size, head):
    row = published_result(size, head)
    for schedule in ("1x", "3x_ms"):
        path = ROOT / "model_cards" / row.card_name(schedule) / "README.md"
        card = ModelCard.load(path)
        assert card.data.model_name == row.card_name(schedule)
        expected = {"box AP": ("object-detection", row.box_ap(schedule))}
        if head == "mask_rcnn":
            expected["mask AP"] = ("instance-segmentation", row.mask_ap(schedule))
        assert results_by_name(card) == expected
        assert all("Vision Longformer" in r.source_name and r.dataset_type == "coco" for r in card.data.eval_results)
        text = card.text
        assert f"{row.published_params_m}M" in text and f"{row.params_without_head_m:.2f}M" in text
        assert str(row.gflops) in text and row.arch in text
        assert row.original_config(schedule) in text and row.config_path(schedule) in text
        assert f"--head {head} --img-size 1333" in text
        name = row.card_name(schedule)
        assert f"accelerate launch scripts/evaluate.py --model {name}/ --config {row.config_path(schedule)}" in text
    assert (
        published_model_card(row, "1x").content
        == (ROOT / "model_cards" / row.card_name("1x") / "README.md").read_text()
    )


def test_card_index_lists_every_card():
    index = (ROOT / "model_cards" / "README.md").read_text()
    for row in PUBLISHED.values():
        for schedule in ("1x", "3x_ms"):
            assert f"[{row.card_name(schedule)}]({row.card_name(schedule)}/README.md)" in index
    assert "| 44.9 | 41.1 | 45.0M | 218.3 |" in index and "| 40.8 | - | 16.64M | 182.7 |" in index


def measured() -> CocoMetrics:
    stats = {name: 10.0 + i for i, name in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl"))}
    stats.update({name: 50.0 for name in ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")})
    stats["APs"] = float("nan")
    return CocoMetrics(
        stats={"bbox": dict(stats), "segm": {**stats, "AP": 8.5, "AP75": float("nan")}},
        per_class={"bbox": {"circle": 12.5, "square": float("nan")}, "segm": {"circle": 9.25, "square": float("nan")}},
        num_images=100,
        num_detections=321,
    )


def test_evaluation_card_round_trips(tmp_path):
    card = evaluation_model_card(
        "vil-tiny-shapes",
        measured(),
        config_path="configs/shapes.yaml",
        dataset_name="Shapes val",
        base_model="vil-tiny-imagenet",
        notes="Trained 10 minutes on 2 CPU cores.",
    )
    path = write_card(card, tmp_path / "card")
    assert path == tmp_path / "card" / "README.md" and not list(path.parent.glob(".*tmp"))
    loaded = ModelCard.load(path)
    assert loaded.data.model_name == "vil-tiny-shapes" and loaded.data.base_model == "vil-tiny-imagenet"
    assert results_by_name(loaded) == {
        "box AP": ("object-detection", 10.0),
        "box AP50": ("object-detection", 11.0),
        "box AP75": ("object-detection", 12.0),
        "mask AP": ("instance-segmentation", 8.5),
        "mask AP50": ("instance-segmentation", 11.0),  # mask AP75 is NaN: left out
    }
    assert all(r.dataset_name == "Shapes val" and r.dataset_type == "shapes-val" for r in loaded.data.eval_results)
    assert "| circle | 12.50 | 9.25 |" in loaded.text and "| square | n/a | n/a |" in loaded.text
    assert "configs/shapes.yaml" in loaded.text and "100 images" in loaded.text
    assert "Trained 10 minutes on 2 CPU cores." in loaded.text
    with pytest.raises(ValueError, match="no results"):
        evaluation_model_card("x", CocoMetrics(stats={}), config_path="c.yaml", dataset_name="d")


def test_push_uploads_the_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kw: calls.append(("create_repo", kw)) or "url")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", kw)) or "commit")
    write_card(evaluation_model_card("m", measured(), config_path="c.yaml", dataset_name="d"), tmp_path)
    result = push_to_hub(tmp_path, "someone/m", token="hf_test", private=True, commit_message="upload")
    assert result == "commit"
    assert calls == [
        ("create_repo", {"repo_id": "someone/m", "private": True, "exist_ok": True, "repo_type": "model"}),
        ("upload_folder", {"repo_id": "someone/m", "folder_path": str(tmp_path.resolve()), "commit_message": "upload"}),
    ]


def test_push_failures_say_where_the_folder_is(tmp_path, monkeypatch):
    monkeypatch.setattr(model_cards, "get_token", lambda: None)
    with pytest.raises(HubUploadError, match="no Hugging Face token") as info:
        push_to_hub(tmp_path, "someone/m")
    assert str(tmp_path.resolve()) in str(info.value) and f"hf upload someone/m {tmp_path.resolve()}" in str(info.value)

    def offline(self, **kw):
        raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(HubUploadError, match="offline mode") as info:
        push_to_hub(tmp_path, "someone/m", token="hf_test")
    assert info.value.folder == tmp_path.resolve()

    def unreachable(self, **kw):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    with pytest.raises(HubUploadError, match="no route to host"):
        push_to_hub(tmp_path, "someone/m", token="hf_test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_to_hub(tmp_path / "missing", "someone/m", token="hf_test")


def test_upload_is_checked_before_any_work(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    from vil_hf.evaluation.model_cards import check_can_upload

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_cards, "get_token", lambda: None)
    with pytest.raises(HubUploadError, match=r"--push-to-hub someone/m: no Hugging Face token found .*hf auth login"):
        check_can_upload("someone/m")
    monkeypatch.setattr(HfApi, "whoami", lambda self, **kw: {"name": "someone"})
    assert check_can_upload("someone/m", token="hf_test") == "someone"

    def refused(self, **kw):
        raise HfHubHTTPError(
            "401 Unauthorized", response=type("R", (), {"status_code": 401, "headers": {}, "request": None})()
        )

    monkeypatch.setattr(HfApi, "whoami", refused)
    with pytest.raises(HubUploadError, match="does not accept the token") as info:
        check_can_upload("someone/m", token="hf_bad")
    assert info.value.folder is None and "nothing was started" in str(info.value)

    def unreachable(self, **kw):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(HfApi, "whoami", unreachable)
    with pytest.raises(HubUploadError, match=r"cannot be reached \(ConnectionError: no route to host\)"):
        check_can_upload("someone/m", token="hf_test")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUploadError, match="offline mode is on"):
        check_can_upload("someone/m", token="hf_test")


def test_push_offline_for_real(tmp_path):
    """HF_HUB_OFFLINE=1 in a fresh process: the real client refuses, and we say how to upload later."""
    code = (
        "import sys\n"
        "from huggingface_hub.errors import OfflineModeIsEnabled\n"
        "from vil_hf.evaluation.model_cards import HubUploadError, push_to_hub\n"
        "try:\n"
        "    push_to_hub(sys.argv[1], 'someone/vil-test', token='hf_not_a_real_token')\n"
        "except HubUploadError as error:\n"
        "    assert isinstance(error.__cause__, OfflineModeIsEnabled), repr(error.__cause__)\n"
        "    print(error)\n"
        "else:\n"
        "    raise SystemExit('uploaded?')\n"
    )
    (tmp_path / "README.md").write_text("card")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'kernels'}",
    }
    env.pop("HF_TOKEN", None)
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in run.stdout
    assert f"saved locally at {tmp_path.resolve()}" in run.stdout
