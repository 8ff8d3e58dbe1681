"""Classification data laid out as `root/<class>/<image>` (class names sorted -> labels 0..K-1)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import datasets

from ._images import check_image_files, report_skipped
from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

IMAGE_FOLDER_FEATURES = datasets.Features({"file_name": datasets.Value("string"), "label": datasets.Value("int64")})


@dataclass
class ImageFolderData:
    """`dataset` rows are `file_name` (absolute path) and `label` (index into `classes`)."""

    dataset: datasets.Dataset
    classes: list[str]
    root: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.classes))


def load_image_folder(
    root: str | os.PathLike, *, verify_images: bool = True, skip_corrupt_images: bool = True
) -> ImageFolderData:
    """Every image file (by extension) in each sub-folder of `root`; sub-folders are the classes, sorted.

    Files that do not decode in full are left out with one logged warning (with `verify_images`), or raise
    DataError when `skip_corrupt_images=False`.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.exists(root):
        raise DataError(f"image folder {root} does not exist; give a folder laid out as ROOT/<class>/<image>")
    if not os.path.isdir(root):
        raise DataError(f"{root} is not a folder; give a folder laid out as ROOT/<class>/<image>")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders; lay the images out as {root}/<class>/<image>")
    files, labels, empty = [], [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        found = sorted(
            entry.name
            for entry in os.scandir(folder)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS) and not entry.name.startswith(".")
        )
        if not found:
            empty.append(name)
        files += [os.path.join(folder, file_name) for file_name in found]
        labels += [label] * len(found)
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(empty)} in {root} hold no images ({'/'.join(IMAGE_EXTENSIONS)}); "
            "add images or remove the folder(s), since every sub-folder is a class"
        )
    problems = check_image_files(files, verify=verify_images, what="image-folder", base_dir=root)
    skipped = report_skipped(problems, len(files), skip=skip_corrupt_images, source=root, base_dir=root)
    if skipped:
        bad = {path for path, _ in skipped}
        kept = [(path, label) for path, label in zip(files, labels) if path not in bad]
        files, labels = [path for path, _ in kept], [label for _, label in kept]
    dataset = datasets.Dataset.from_dict({"file_name": files, "label": labels}, features=IMAGE_FOLDER_FEATURES)
    return ImageFolderData(dataset=dataset, classes=classes, root=root, skipped=skipped)


__all__ = ["IMAGE_EXTENSIONS", "ImageFolderData", "load_image_folder"]
