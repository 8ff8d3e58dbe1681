"""`vil-hf demo`: the whole product on a laptop CPU, with nothing downloaded.

It writes the synthetic shapes set, trains a small ViL Mask R-CNN on it through the same loop as
`scripts/train.py` (`vil_hf.training.train`), evaluates box and mask AP with pycocotools, and
leaves a model folder (safetensors, config, image processor, a card with the measured AP) and a
picture of its detections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .training.config import TrainConfig, config_from_dict

# A small ViL: the published layout (4 stages, strides 4/8/16/32, window 7, one global token in
# stages 1-3, relative position bias) at a width and depth that train in minutes on 2 cores.
DEMO_ARCH = (
    "l1,h2,d32,n1,s1,g1,p4,f7,a0_l2,h2,d64,n1,s1,g1,p2,f7,a0_l3,h4,d128,n2,s1,g1,p2,f7,a0_l4,h4,d128,n1,s1,g0,p2,f7,a0"
)

# Heads narrowed to the backbone's width and anchors to the 128-pixel images (objects of 17-85 px).
DEMO_DETECTOR = {
    "fpn_channels": 64,
    "anchor_sizes": [16, 32, 64, 128, 256],
    "rpn_pre_nms_topk_train": 1000,
    "rpn_post_nms_topk_train": 300,
    "rpn_pre_nms_topk_test": 500,
    "rpn_post_nms_topk_test": 100,
    "rpn_batch_size_per_image": 128,
    "roi_batch_size_per_image": 64,
    "box_head_fc_dim": 256,
    "mask_head_conv_dim": 64,
    "detections_per_image": 30,
}


@dataclass
class DemoSettings:
    output_dir: str = "vil-demo"
    num_train: int = 600
    num_val: int = 100
    image_size: int = 128
    max_iter: int = 1150
    batch_size: int = 8
    lr: float = 1.5e-3
    seed: int = 0
    num_workers: int = 0


def demo_config(settings: DemoSettings, data_dir: Path) -> TrainConfig:
    size = settings.image_size
    max_iter = settings.max_iter
    return config_from_dict(
        {
            "task": "detection",
            "mirrors": "none: a demo on synthetic shapes, trained from scratch",
            "model": {
                "head": "mask_rcnn",
                "backbone": None,
                "arch": DEMO_ARCH,
                "image_size": size,
                "drop_path_rate": 0.0,
                "num_labels": None,
                "detector": DEMO_DETECTOR,
            },
            "data": {
                "train_images": str(data_dir / "train"),
                "train_annotations": str(data_dir / "annotations" / "instances_train.json"),
                "val_images": str(data_dir / "val"),
                "val_annotations": str(data_dir / "annotations" / "instances_val.json"),
                "train_shortest_edge": [size - 32, size - 16, size],
                "test_shortest_edge": size,
                "longest_edge": 2 * size,
                "aspect_grouping": False,
                "num_workers": settings.num_workers,
            },
            "optim": {
                "batch_size": settings.batch_size,
                "lr": settings.lr,
                "weight_decay": 0.05,
                "warmup_iters": min(200, max_iter // 10),
                "max_iter": max_iter,
                "steps": [int(max_iter * 0.7), int(max_iter * 0.9)],
                "clip_grad_norm": 1.0,
            },
            "run": {
                "output_dir": str(Path(settings.output_dir) / "run"),
                "seed": settings.seed,
                "checkpoint_every": max(max_iter // 3, 1),
                "keep_checkpoints": 1,
                "eval_every": max_iter + 1,
                "log_every": 10,
                "eval_batch_size": 8,
                "num_visualized": 6,
                "trackers": [],
            },
        }
    )


@dataclass
class DemoResult:
    box_ap: float
    mask_ap: float
    model_dir: Path
    picture: Path
    loss_curve: Path
    seconds: float


def run_demo(settings: DemoSettings) -> DemoResult:
    """Makes the shapes set, trains, evaluates; everything lands under `settings.output_dir`."""
    import time

    from .data.shapes import make_shapes
    from .training.loop import train

    start = time.perf_counter()
    root = Path(settings.output_dir)
    data_dir = root / "shapes"
    size = settings.image_size
    make_shapes(
        data_dir, num_train=settings.num_train, num_val=settings.num_val, image_size=(size, size), seed=settings.seed
    )
    # A demo run starts over in its folder (which --overwrite refuses to do if anything but a run is there).
    result = train(demo_config(settings, data_dir), overwrite=True)
    stats = result.metrics["stats"]
    return DemoResult(
        box_ap=stats["bbox"]["AP"],
        mask_ap=stats["segm"]["AP"],
        model_dir=result.model_dir,
        picture=result.output_dir / "eval" / "final" / "detections.png",
        loss_curve=result.output_dir / "loss_curve.png",
        seconds=time.perf_counter() - start,
    )
