"""Model cards: the published results (generated from `vil_hf.published`) and measured evaluations.

Cards carry a ``model-index`` (huggingface_hub `ModelCardData` / `EvalResult`) so the Hub shows
the numbers; `push_to_hub` uploads a folder and, when the Hub cannot be reached, raises
`HubUploadError` saying where the folder is and how to upload it later.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

from ..io_utils import atomic_write_text
from ..published import BASELINES, PAPER, PAPER_URL, PUBLISHED, SCHEDULES, BaselineResult, PublishedResult

if TYPE_CHECKING:
    from .coco_eval import CocoMetrics

LICENSE = "mit"
CITATION = """@inproceedings{zhang2021multi,
  title     = {Multi-Scale Vision Longformer: A New Vision Transformer for High-Resolution Image Encoding},
  author    = {Zhang, Pengchuan and Dai, Xiyang and Yang, Jianwei and Xiao, Bin and Yuan, Lu and Zhang, Lei and Gao, Jianfeng},
  booktitle = {ICCV},
  year      = {2021}
}"""
_TASKS = {
    "bbox": ("object-detection", "Object Detection", "box"),
    "segm": ("instance-segmentation", "Instance Segmentation", "mask"),
}
# The network errors the Hub client raises: offline mode, connection/timeouts, HTTP status errors
# (HfHubHTTPError and the HTTP library's own error base class).
_HUB_ERRORS: tuple[type[BaseException], ...] = (
    OfflineModeIsEnabled,
    HfHubHTTPError,
    HFValidationError,
    ConnectionError,
    TimeoutError,
    *(base for base in HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError"),
)


class HubUploadError(RuntimeError):
    """The upload to the Hub failed, or would (``folder`` None: checked before any work); the folder
    is still complete on disk (``folder``)."""

    def __init__(self, message: str, folder: Path | None, repo_id: str) -> None:
        super().__init__(message)
        self.folder = folder
        self.repo_id = repo_id


def _card(card_data: ModelCardData, body: str) -> ModelCard:
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body.strip()}\n")


def _detection_tags(head: str | None, backbone: tuple[str, ...] = ("vil", "vision-longformer")) -> list[str]:
    tags = ["vision", *backbone, "object-detection", "coco"]
    if head == "mask_rcnn":
        tags += ["mask-rcnn", "instance-segmentation"]
    elif head == "retinanet":
        tags.append("retinanet")
    return tags


# ---------------------------------------------------------------------------------------------- published
def published_model_card(row: PublishedResult, schedule: str) -> ModelCard:
    """The card of a published detector: the paper's numbers (not measured here) and how to reproduce them."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    name = row.card_name(schedule)
    box, mask = row.box_ap(schedule), row.mask_ap(schedule)
    dataset = {"dataset_type": "coco", "dataset_name": "COCO 2017", "dataset_split": "val2017"}
    source = {"source_name": PAPER, "source_url": PAPER_URL}
    eval_results = [
        EvalResult(task_type="object-detection", metric_type="mAP", metric_value=box, metric_name="box AP",
                   **dataset, **source),
    ]  # fmt: skip
    if mask is not None:
        eval_results.append(
            EvalResult(task_type="instance-segmentation", metric_type="mAP", metric_value=mask, metric_name="mask AP",
                       **dataset, **source)
        )  # fmt: skip
    card_data = ModelCardData(
        model_name=name,
        license=LICENSE,
        library_name="transformers",
        pipeline_tag="object-detection",
        tags=_detection_tags(row.head),
        datasets=["coco"],
        eval_results=eval_results,
    )
    config = row.config_path(schedule)
    schedule_text = "1x (90k iterations, shorter side 800)" if schedule == "1x" else (
        "3x multi-scale (270k iterations, shorter side 640-800)"
    )  # fmt: skip
    results = f"{box}" + (f" | {mask}" if mask is not None else "")
    header = "| box AP | mask AP |" if mask is not None else "| box AP |"
    rule = "|---|---|" if mask is not None else "|---|"
    head_option = row.head
    body = f"""
# {name}: {row.title}, {schedule_text}

A Vision Longformer (ViL) {row.size} backbone ({row.pretrain} pretrained) with a {row.title.split(" ", 1)[1]}
detector, trained on COCO 2017 with the {schedule_text} schedule, as published in
[{PAPER}]({PAPER_URL}) (original code: microsoft/vision-longformer). vil-hf implements the model
as transformers models; the numbers below are the **published** ones, not measured by this card's
generator. A card written by `scripts/evaluate.py` reports measured numbers.

## Published results (COCO val2017)

{header}
{rule}
| {results} |

| | |
|---|---|
| parameters (published, with the backbone's unused 1000-class head) | {row.published_params_m}M |
| parameters without the unused head (what the converted model holds) | {row.params_without_head_m:.2f}M |
| GFLOPs (published) | {row.gflops} |
| backbone pretraining | {row.pretrain} |
| drop path | {row.drop_path(schedule)} |
| original config | `{row.original_config(schedule)}` (the original detection repository's naming pattern) |
| this package's config | `{config}` |

Architecture string (relative position bias, longformer attention in every stage):

```
{row.arch}
```

## Convert the original checkpoint

```bash
vil-hf convert model_final.pth {name}/ --head {head_option} --img-size 1333 \\
    --arch "{row.arch}"
```

The folder loads with `AutoModelForObjectDetection.from_pretrained("{name}")` after `import vil_hf`.

## Evaluate it

```bash
accelerate launch scripts/evaluate.py --model {name}/ --config {config}
```

## Train it

```bash
accelerate launch scripts/train.py --config {config} model.init_from=vil-{row.size}/
```

where `vil-{row.size}/` is the {row.pretrain} ImageNet checkpoint of the original code converted with
`vil-hf convert` (its weights go into the detector's backbone; without `model.init_from` the
backbone starts from random weights).

The config mirrors `{row.original_config(schedule)}`: batch 16, AdamW, warmup 1000 iterations,
steps x0.1, drop path {row.drop_path(schedule)}.

## Citation

```bibtex
{CITATION}
```
"""
    return _card(card_data, body)


def baseline_model_card(row: BaselineResult) -> ModelCard:
    """The card of a standard detector on a transformers backbone: the recipe it mirrors and the numbers published
    for it (with their source), or why there is none."""
    dataset = {"dataset_type": "coco", "dataset_name": "COCO 2017", "dataset_split": "val2017"}
    source = {"source_name": row.source.name, "source_url": row.source.url}
    eval_results = []
    for task_type, title, value in (
        ("object-detection", "box AP", row.box_ap),
        ("instance-segmentation", "mask AP", row.mask_ap),
    ):
        if value is not None:
            eval_results.append(
                EvalResult(task_type=task_type, metric_type="mAP", metric_value=value, metric_name=title,
                           **dataset, **source)
            )  # fmt: skip
    card_data = ModelCardData(
        model_name=row.card_name,
        base_model=row.pretrained,
        license=LICENSE,
        library_name="transformers",
        pipeline_tag="object-detection",
        tags=_detection_tags(row.head, (row.backbone_config["model_type"],)),
        datasets=["coco"],
        eval_results=eval_results or None,
    )
    if row.box_ap is None:
        results = f"Not published: {row.not_published}. See the source: [{row.source.name}]({row.source.url})."
    else:
        mask = f", mask AP **{row.mask_ap}**" if row.mask_ap is not None else ""
        results = (
            f"Box AP **{row.box_ap}**{mask}, as published in [{row.source.name}]({row.source.url}) for the recipe "
            "below (not measured by this card's generator)."
        )
    recipe = "\n".join(row.recipe)
    backbone = "\n".join(f"{key}: {value}" for key, value in row.backbone_config.items())
    body = f"""
# {row.card_name}: {row.title}, {_SCHEDULE_TEXT[row.schedule]}

vil-hf's {row.title.split(" ", 1)[1]} on transformers' own {row.backbone_config["model_type"]} backbone
({row.backbone_title}), trained on COCO 2017 with the recipe of `{row.mirrors}`. transformers has no Mask
R-CNN or RetinaNet; these detectors take any transformers backbone and start it from any transformers
checkpoint of it.

## Published results (COCO val2017)

{results}

## Train it

```bash
accelerate launch scripts/train.py --config {row.config_path} model.backbone_from={row.pretrained}
```

`model.backbone_from` is the ImageNet checkpoint in transformers' format: a Hub id (downloaded where there is
a network) or a local copy (`hf download {row.pretrained} --local-dir DIR`, then `model.backbone_from=DIR`).
Its weights go into the detector's backbone through transformers' own loading, whose report (missing,
unexpected, mismatched tensors) is logged.

The recipe (`{row.config_path}`):

```
{recipe}
```

Backbone (`model.backbone_config`):

```yaml
{backbone}
```

## Evaluate it

```bash
accelerate launch scripts/evaluate.py --model outputs/{row.name}/model --config {row.config_path}
```
"""
    return _card(card_data, body)


_SCHEDULE_TEXT = {"1x": "1x schedule (12 COCO epochs)", "3x_ms": "3x schedule (36 COCO epochs), multi-scale"}


def baseline_cards() -> dict[str, ModelCard]:
    """The baselines' cards, keyed by their folder name under ``model_cards/``."""
    return {row.card_name: baseline_model_card(row) for row in BASELINES.values()}


def published_cards() -> dict[str, ModelCard]:
    """Every published card, keyed by its folder name under ``model_cards/``."""
    return {row.card_name(s): published_model_card(row, s) for row in PUBLISHED.values() for s in SCHEDULES}


def model_cards_index() -> str:
    """``model_cards/README.md``: one table row per published card."""
    lines = [
        "# Model cards",
        "",
        "Generated from `vil_hf.published` by `scripts/generate_configs_and_cards.py`: do not edit by hand.",
        f"The numbers are the published ones ([paper]({PAPER_URL}), COCO val2017); parameters include the",
        "backbone's unused 1000-class head, as published. Cards written by evaluation runs report measured numbers.",
        "",
        "| card | backbone | head | schedule | pretrain | box AP | mask AP | params | GFLOPs | config |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in PUBLISHED.values():
        for schedule in SCHEDULES:
            name = row.card_name(schedule)
            mask = row.mask_ap(schedule)
            lines.append(
                f"| [{name}]({name}/README.md) | ViL-{row.size} | {row.head} | {schedule} | {row.pretrain} "
                f"| {row.box_ap(schedule)} | {mask if mask is not None else '-'} | {row.published_params_m}M "
                f"| {row.gflops} | [`{row.config_path(schedule)}`](../{row.config_path(schedule)}) |"
            )
    lines += [
        "",
        "## Baselines on transformers backbones",
        "",
        "The same detectors on transformers' own backbones, each config mirroring the recipe named in its header.",
        "Numbers as published by the source named in each row (not measured here); '-' where none is published.",
        "",
        "| card | backbone | head | schedule | box AP | mask AP | source | config |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in BASELINES.values():
        box = row.box_ap if row.box_ap is not None else "-"
        mask = row.mask_ap if row.mask_ap is not None else "-"
        lines.append(
            f"| [{row.card_name}]({row.card_name}/README.md) | {row.backbone_title} (`{row.pretrained}`) | {row.head} "
            f"| {row.schedule} | {box} | {mask} | [{row.source.name}]({row.source.url}) "
            f"| [`{row.config_path}`](../{row.config_path}) |"
        )
    return "\n".join(lines) + "\n"


def card_files() -> dict[str, str]:
    """Generated card files: path relative to the repository root -> text."""
    cards = {**published_cards(), **baseline_cards()}
    files = {f"model_cards/{name}/README.md": str(card) for name, card in cards.items()}
    files["model_cards/README.md"] = model_cards_index()
    return files


# ---------------------------------------------------------------------------------------------- measured
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "dataset"


def evaluation_model_card(
    model_name: str,
    metrics: CocoMetrics,
    *,
    config_path: str,
    dataset_name: str,
    base_model: str | None = None,
    notes: str = "",
    backbone_type: str | None = "vil",
) -> ModelCard:
    """A card with MEASURED COCO results (box and, if evaluated, mask AP) in its model-index; `backbone_type` is
    the detector's backbone model type (vil by default)."""
    if not model_name or not isinstance(model_name, str):
        raise ValueError("model_name must be a non-empty string (it names the model in the model-index)")
    if not metrics.stats:
        raise ValueError("metrics holds no results; pass the CocoMetrics that evaluate_coco returned")
    eval_results = []
    for iou_type, stats in metrics.stats.items():
        task_type, task_name, title = _TASKS.get(iou_type, (iou_type, iou_type, iou_type))
        for stat in ("AP", "AP50", "AP75"):
            value = stats.get(stat)
            if value is None or math.isnan(value):
                continue
            eval_results.append(
                EvalResult(
                    task_type=task_type,
                    task_name=task_name,
                    dataset_type=_slug(dataset_name),
                    dataset_name=dataset_name,
                    metric_type="mAP" if stat == "AP" else stat.lower(),
                    metric_value=round(value, 3),
                    metric_name=f"{title} {stat}",
                )
            )
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        license=LICENSE,
        library_name="transformers",
        pipeline_tag="object-detection",
        tags=_detection_tags(
            "mask_rcnn" if "segm" in metrics.stats else None,
            ("vil", "vision-longformer") if backbone_type in (None, "vil") else (backbone_type,),
        ),
        eval_results=eval_results,
    )
    base = f"\nStarted from `{base_model}`.\n" if base_model else ""
    extra = f"\n## Notes\n\n{notes.strip()}\n" if notes.strip() else ""
    detector = (
        "A Vision Longformer (ViL) detector (vil-hf)."
        if backbone_type in (None, "vil")
        else f"A vil-hf detector on transformers' {backbone_type} backbone."
    )
    body = f"""
# {model_name}

{detector} The results below were **measured** by this package's
evaluation (pycocotools COCOeval, percent) on {dataset_name}: {metrics.num_images} images,
{metrics.num_detections} detections.
{base}
## Results

{metrics.summary_markdown()}

## Per-class AP

{metrics.per_class_markdown() or "(none)"}

## How it was produced

```bash
accelerate launch scripts/evaluate.py --model MODEL_FOLDER --config {config_path}
```

Config: `{config_path}`.
{extra}
## Citation

```bibtex
{CITATION}
```
"""
    return _card(card_data, body)


# --------------------------------------------------------------------------------------------- write, push
def write_card(card: ModelCard, folder: str | os.PathLike) -> Path:
    """Write ``folder/README.md`` (temporary name, then renamed); returns its path."""
    return atomic_write_text(Path(folder) / "README.md", str(card))


def _upload_later(folder: Path, repo_id: str) -> str:
    return (
        f"The folder is saved locally at {folder}; upload it later with `hf upload {repo_id} {folder}` "
        f"(`huggingface-cli upload {repo_id} {folder}` with older huggingface_hub), after `hf auth login` "
        "or with HF_TOKEN set."
    )


def check_can_upload(repo_id: str, *, token: str | None = None) -> str:
    """Before any work: that an upload to ``repo_id`` could happen (a token, not offline, the token
    accepted by the Hub, whoami); returns the account name. Raises `HubUploadError` saying how to fix it."""
    from huggingface_hub import constants

    def fail(reason: str) -> HubUploadError:
        return HubUploadError(
            f"--push-to-hub {repo_id}: {reason}; nothing was started. Fix that, or drop --push-to-hub and upload "
            f"the model folder later with `hf upload {repo_id} FOLDER`",
            None,
            repo_id,
        )

    if constants.HF_HUB_OFFLINE:
        raise fail("offline mode is on (HF_HUB_OFFLINE=1), so the upload at the end would fail")
    token = token or get_token()
    if not token:
        raise fail("no Hugging Face token found (log in with `hf auth login`, or set HF_TOKEN)")
    try:
        user = HfApi(token=token).whoami()
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise fail("the Hub does not accept the token (HTTP 401): log in again with `hf auth login`") from None
        raise fail(f"the Hub answered {type(error).__name__}: {error}") from None
    except _HUB_ERRORS as error:
        raise fail(f"the Hub cannot be reached ({type(error).__name__}: {error})") from None
    return str(user.get("name", "")) if isinstance(user, dict) else ""


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload ViL model and model card",
) -> Any:
    """Create ``repo_id`` if needed (``exist_ok``) and upload ``folder``; returns the commit info.

    Raises `HubUploadError` (with the local path and how to upload later) when there is no token,
    the Hub is offline (HF_HUB_OFFLINE=1) or unreachable, or it refuses the upload.
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"nothing to upload: folder {folder} does not exist")
    token = token or get_token()
    if not token:
        raise HubUploadError(
            f"cannot upload to the Hub repository {repo_id!r}: no Hugging Face token found. "
            + _upload_later(folder, repo_id),
            folder,
            repo_id,
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    except _HUB_ERRORS as error:
        reason = "offline mode is on (HF_HUB_OFFLINE=1)" if isinstance(error, OfflineModeIsEnabled) else (
            f"{type(error).__name__}: {error}"
        )  # fmt: skip
        raise HubUploadError(
            f"upload of {folder} to the Hub repository {repo_id!r} failed ({reason}). "
            + _upload_later(folder, repo_id),
            folder,
            repo_id,
        ) from error


__all__ = [
    "HubUploadError",
    "baseline_cards",
    "baseline_model_card",
    "card_files",
    "check_can_upload",
    "evaluation_model_card",
    "model_cards_index",
    "published_cards",
    "published_model_card",
    "push_to_hub",
    "write_card",
]
