"""`vil-hf predict`: run a detector folder on your own images, folders of images and videos.

For each input the detections (score > threshold) are drawn (boxes, "label score" captions, masks for
Mask R-CNN) and collected in COCO format:

- ``DIR/detections.json``: COCO results, one dict per detection: ``image_id``, ``category_id`` (the
  model's label index, named in ``images.json``), ``bbox`` [x, y, w, h] in the image's pixels,
  ``score`` and, for Mask R-CNN, ``segmentation`` (compressed RLE);
- ``DIR/images.json``: a COCO data set without annotations that maps the ids: ``images`` with ``id``
  (1, 2, ... in input order), ``file_name`` (the input path), ``width``, ``height``, ``output`` (the
  drawn file, relative to DIR) and, for video frames, ``frame_index``; ``categories`` from the model's
  ``id2label``. ``COCO("images.json").loadRes("detections.json")`` opens both with pycocotools;
- one drawn PNG per image, named after the input (a folder's images keep their place below
  ``DIR/<folder name>/``; two inputs of one name become ``name`` and ``name-2``), and one drawn MP4 per
  video (``DIR/<video name>.mp4``). Pictures whose shorter side is under 320 pixels are drawn enlarged
  by a whole factor so that captions stay readable (``min_side``); the JSON is in the input's pixels.

Folders are read one level deep (``recursive=True`` / ``--recursive`` for all levels); in folders,
files whose suffix is neither an image's nor a video's are ignored. Unreadable files are skipped and
counted, never fatal. Videos are read with PyAV (``pip install 'vil-hf[video]'``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .data._images import open_rgb
from .evaluation.coco_eval import detections_to_coco
from .evaluation.detections import detections_per_image, predicts_masks
from .evaluation.visualize import draw_detections
from .io_utils import atomic_save_image, atomic_write_text

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv"})
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def image_suffixes() -> frozenset[str]:
    """Suffixes of the image formats PIL can open here."""
    return frozenset(suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN)


class PredictError(ValueError):
    """`vil-hf predict` cannot run as asked; the message names the problem and the fix."""


class VideoDecoderMissing(ImportError, ValueError):
    """A video was given but PyAV, the video reader, is not installed."""


def _import_av():
    try:
        import av
    except ImportError as error:
        raise VideoDecoderMissing(
            "reading videos needs PyAV, which is not installed: pip install 'vil-hf[video]' (or pip install av)"
        ) from error
    return av


@dataclass(frozen=True)
class Source:
    """One input: an image or a video file, and the name of its drawn output (without suffix)."""

    path: Path
    kind: str  # "image" or "video"
    output_name: str

    def output_file(self, output_dir: Path) -> Path:
        return output_dir / (self.output_name + (".mp4" if self.kind == "video" else ".png"))


def collect_sources(inputs: Sequence[str | os.PathLike], recursive: bool = False) -> list[Source]:
    """Expand the inputs (files and folders) into images and videos, in order; folders sorted."""
    if not inputs:
        raise PredictError("give at least one image, folder or video")
    images = image_suffixes()
    found: list[tuple[Path, str]] = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise PredictError(f"input {path} does not exist; give image files, folders of images or video files")
        if path.is_dir():
            candidates = sorted(p for p in (path.rglob("*") if recursive else path.iterdir()) if p.is_file())
            for file in candidates:
                suffix = file.suffix.lower()
                if suffix in VIDEO_SUFFIXES or suffix in images:
                    name = Path(path.resolve().name) / file.relative_to(path).with_suffix("")
                    found.append((file, name.as_posix()))
        else:
            found.append((path, path.stem))
    if not found:
        raise PredictError(
            f"no images or videos found in {', '.join(str(p) for p in inputs)}"
            + ("" if recursive else " (folders are read one level deep; --recursive reads all levels)")
        )
    sources, taken = [], set()
    for path, name in found:
        unique, number = name, 1
        while unique in taken:  # two inputs with the same name: cat, cat-2, cat-3, ...
            number += 1
            unique = f"{name}-{number}"
        taken.add(unique)
        kind = "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"
        sources.append(Source(path=path, kind=kind, output_name=unique))
    return sources


def resolve_device(device: str | None) -> torch.device:
    """The device to run on (default: CUDA when available, else the CPU), checked to exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise PredictError(f"--device {device!r} is not a device name ({error}); use cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"--device {device}: CUDA is not available here; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise PredictError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise PredictError(f"--device {device}: MPS is not available here; use --device cpu")
    return resolved


def check_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``dtype`` on ``device`` (None for float32), checked to run there."""
    if dtype not in DTYPES:
        raise PredictError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if dtype == "float32":
        return None
    if device.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise PredictError(f"this GPU has no bfloat16; use --dtype float16 or float32 on {device}")
    try:  # a small product under autocast tells whether the device runs this dtype
        with torch.autocast(device.type, dtype=DTYPES[dtype]):
            torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    except (RuntimeError, ValueError) as error:
        raise PredictError(f"--dtype {dtype} does not run on {device} ({error}); use --dtype float32") from error
    return DTYPES[dtype]


def load_detector(model_dir: str | os.PathLike, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The detector and its image processor from a `save_pretrained` / `vil-hf convert` folder."""
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from . import DetectionImageProcessorPil  # noqa: F401  (registers the Auto classes)

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise PredictError(
            f"{folder} is not a model folder (no config.json); give a folder written by save_pretrained, "
            "`vil-hf convert ... --head mask_rcnn|retinanet` or the demo (vil-demo/run/model)"
        )
    try:
        model = AutoModelForObjectDetection.from_pretrained(folder)
    except ValueError as error:
        raise PredictError(f"{folder} does not hold an object detector ({error})") from error
    if (folder / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(folder)
    else:
        logger.warning("%s has no preprocessor_config.json: using DetectionImageProcessorPil()'s defaults", folder)
        processor = DetectionImageProcessorPil()
    return model.to(device).eval(), processor


@dataclass
class PredictionReport:
    images: int = 0
    frames: int = 0
    detections: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    results_file: Path | None = None
    images_file: Path | None = None


@dataclass
class _Item:
    """One picture to run the model on: a still image or a video frame."""

    image: Image.Image
    source: Source
    frame_index: int | None = None


class _VideoWriter:
    """Drawn frames -> an MP4 (H.264 where PyAV has it), written under a temporary name and renamed."""

    def __init__(self, av, path: Path, rate) -> None:
        self.av, self.path, self.rate = av, path, rate
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".mp4")
        os.close(fd)
        self.tmp = Path(tmp)
        self.container = None
        self.stream = None

    def write(self, image: Image.Image) -> None:
        # yuv420p needs even sides: pad odd ones by a pixel.
        width, height = image.width + image.width % 2, image.height + image.height % 2
        if (width, height) != image.size:
            padded = Image.new("RGB", (width, height))
            padded.paste(image)
            image = padded
        if self.container is None:
            self.container = self.av.open(str(self.tmp), mode="w")
            codec = "libx264" if "libx264" in self.av.codecs_available else "mpeg4"
            self.stream = self.container.add_stream(codec, rate=self.rate)
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        frame = self.av.VideoFrame.from_image(image)
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self, keep: bool) -> bool:
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
        if keep and self.container is not None:
            os.replace(self.tmp, self.path)
            return True
        self.tmp.unlink(missing_ok=True)
        return False


def _frames(av, source: Source, report: PredictionReport) -> Iterator[tuple[int, Image.Image, Any]]:
    """(index, RGB frame, frame rate) of a video; decoding problems are reported as skips."""
    try:
        container = av.open(str(source.path))
    except Exception as error:  # PyAV raises its own error types per FFmpeg error
        report.skipped.append((str(source.path), f"unreadable video: {type(error).__name__}: {error}"))
        return
    with container:
        if not container.streams.video:
            report.skipped.append((str(source.path), "no video stream"))
            return
        stream = container.streams.video[0]
        rate = stream.average_rate or 25
        index = -1
        try:
            for index, frame in enumerate(container.decode(stream)):
                yield index, frame.to_image().convert("RGB"), rate
        except Exception as error:
            reason = f"decoding stopped after {index + 1} frames: {type(error).__name__}: {error}"
            report.skipped.append((str(source.path), reason))


def _items(sources: Sequence[Source], out: Path, report: PredictionReport, writers: dict, on_skip) -> Iterator[_Item]:
    av = _import_av() if any(source.kind == "video" for source in sources) else None
    for source in sources:
        if source.kind == "image":
            try:
                image = open_rgb(str(source.path))
            except ValueError as error:  # DataError names the file and the cause
                report.skipped.append((str(source.path), f"unreadable image: {error.__cause__ or error}"))
                on_skip(1)
                continue
            yield _Item(image, source)
        else:
            for index, frame, rate in _frames(av, source, report):
                if source not in writers:
                    writers[source] = _VideoWriter(av, source.output_file(out), rate)
                yield _Item(frame, source, index)


def _batches(items: Iterator[_Item], size: int) -> Iterator[list[_Item]]:
    batch: list[_Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _total(sources: Sequence[Source]) -> int | None:
    """Images plus the frame counts videos declare (None when a video does not say)."""
    total = 0
    for source in sources:
        if source.kind == "image":
            total += 1
            continue
        try:
            import av

            with av.open(str(source.path)) as container:
                frames = container.streams.video[0].frames if container.streams.video else 0
        except Exception:
            return None
        if not frames:
            return None
        total += frames
    return total


def _make_folders(folders) -> list[Path]:
    """Create the folders (and missing parents); returns those this call created, deepest first."""
    made = []
    for folder in folders:
        missing = [parent for parent in (folder, *folder.parents) if not parent.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        made.extend(missing)
    return sorted(set(made), key=lambda path: len(path.parts), reverse=True)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders that are still empty (deepest first), so a run that wrote nothing leaves nothing."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): someone else's files stay
            pass


def predict(
    model_dir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    threshold: float = 0.5,
    device: str | None = None,
    dtype: str = "float32",
    batch_size: int = 4,
    recursive: bool = False,
    min_side: int = 320,
    progress: bool = True,
) -> PredictionReport:
    """Run the detector in ``model_dir`` on ``inputs`` and write pictures and COCO JSON to ``output_dir``.

    Pictures whose shorter side is under ``min_side`` pixels are drawn enlarged by a whole factor (so
    captions stay readable; 0 keeps every size); the JSON is always in the input's pixels.
    """
    from tqdm.auto import tqdm

    if not 0.0 <= threshold < 1.0:
        raise PredictError(f"--threshold must be in [0, 1); got {threshold}")
    if batch_size < 1:
        raise PredictError(f"--batch-size must be at least 1; got {batch_size}")
    sources = collect_sources(inputs, recursive=recursive)
    if any(source.kind == "video" for source in sources):
        _import_av()  # before the model loads: a missing decoder is said at once
    torch_device = resolve_device(device)
    autocast_dtype = check_dtype(dtype, torch_device)
    model, processor = load_detector(model_dir, torch_device)
    with_masks = predicts_masks(model.config)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    identity = {label: label for label in id2label}

    out = Path(output_dir)
    made_folders = _make_folders({source.output_file(out).parent for source in sources})

    report = PredictionReport()
    results: list[dict[str, Any]] = []
    image_entries: list[dict[str, Any]] = []
    writers: dict[Source, _VideoWriter] = {}
    bar = tqdm(total=_total(sources), unit="img", desc="predicting", disable=not progress)
    success = False
    try:
        for batch in _batches(_items(sources, out, report, writers, on_skip=bar.update), batch_size):
            encoded = processor(images=[item.image for item in batch], return_tensors="pt")
            autocast = (
                torch.autocast(torch_device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            )
            with torch.no_grad(), autocast:
                outputs = model(
                    pixel_values=encoded["pixel_values"].to(torch_device),
                    pixel_mask=encoded["pixel_mask"].to(torch_device),
                )
            sizes = [(item.image.height, item.image.width) for item in batch]
            found = detections_per_image(outputs, processor, sizes, threshold=threshold, with_masks=with_masks)
            for item, detections in zip(batch, found):
                image_id = len(image_entries) + 1
                drawn = draw_detections(
                    item.image,
                    detections["boxes"],
                    detections["labels"],
                    detections["scores"],
                    masks=detections.get("masks"),
                    id2label=id2label,
                    score_threshold=0.0,
                    min_side=min_side,
                )
                entry = {
                    "id": image_id,
                    "file_name": str(item.source.path),
                    "width": item.image.width,
                    "height": item.image.height,
                    "output": item.source.output_file(out).relative_to(out).as_posix(),
                }
                if item.frame_index is None:
                    report.outputs.append(atomic_save_image(item.source.output_file(out), drawn))
                    report.images += 1
                else:
                    entry["frame_index"] = item.frame_index
                    writers[item.source].write(drawn)
                    report.frames += 1
                image_entries.append(entry)
                detected = detections_to_coco(
                    image_id,
                    detections["boxes"],
                    detections["scores"],
                    detections["labels"],
                    identity,
                    masks=detections.get("masks"),
                )
                report.detections += len(detected)
                results.extend(detected)
            bar.update(len(batch))
        success = True
    finally:
        bar.close()
        for source, writer in writers.items():
            if writer.close(keep=success):
                report.outputs.append(source.output_file(out))

    if not image_entries:
        _remove_empty(made_folders)
        raise PredictError(
            f"none of the {len(sources)} inputs could be read ("
            + "; ".join(f"{path}: {reason}" for path, reason in report.skipped[:3])
            + "); nothing was written"
        )
    categories = [{"id": label, "name": name} for label, name in sorted(id2label.items())]
    report.images_file = atomic_write_text(
        out / "images.json",
        json.dumps({"images": image_entries, "annotations": [], "categories": categories}, indent=1) + "\n",
    )
    report.results_file = atomic_write_text(out / "detections.json", json.dumps(results) + "\n")
    if report.skipped:
        logger.warning(
            "skipped %d unreadable input(s): %s",
            len(report.skipped),
            "; ".join(f"{path} ({reason})" for path, reason in report.skipped[:10]),
        )
    return report


__all__ = [
    "DTYPES",
    "PredictError",
    "PredictionReport",
    "Source",
    "VideoDecoderMissing",
    "collect_sources",
    "predict",
]
