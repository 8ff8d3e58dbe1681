"""The `vil-hf` command line: `demo`, `convert`, `info`, `make-shapes` and `predict`."""

from __future__ import annotations

import argparse
import sys
import time


def _convert(args: argparse.Namespace) -> None:
    from .convert import ConversionOptions, convert_checkpoint

    options = ConversionOptions(
        arch=args.arch,
        attn_type=args.attn_type,
        sw_exact=args.sw_exact,
        mode=args.mode,
        only_glo=args.only_glo,
        avg_pool=args.avg_pool,
        img_size=args.img_size,
        num_classes=args.num_classes,
        head=args.head,
        num_detection_classes=args.num_detection_classes,
    )
    report = convert_checkpoint(args.source, args.out_dir, options, overwrite=args.overwrite)
    print(f"converted {report.kind} checkpoint -> {report.model_class} in {args.out_dir}")
    print(f"  parameters: {report.num_parameters / 1e6:.3f}M")
    if report.folded_global_copies:
        print(f"  folded {report.folded_global_copies} global projection copies equal to the local ones")
    if report.dropped:
        print(f"  left out {len(report.dropped)} tensors the target does not use (first: {report.dropped[0]})")


def _info(args: argparse.Namespace) -> None:
    import torch

    from . import ViLBackbone, ViLConfig, published_arch

    arch = args.arch or published_arch(args.model, sparse=args.sparse)
    config = ViLConfig(arch=arch)
    stages = config.stage_names[1:]  # every stage after the stem
    config.out_features = stages
    model = ViLBackbone(config).eval()
    print(f"arch: {config.arch}")
    print(f"{'stage':<7}{'dim':>6}{'heads':>7}{'blocks':>8}{'attention':>12}{'window':>8}{'globals':>9}{'stride':>8}")
    stride = 1
    for i in range(len(config.depths)):
        stride *= config.patch_sizes[i]
        print(
            f"{stages[i]:<7}{config.hidden_sizes[i]:>6}{config.num_heads[i]:>7}{config.depths[i]:>8}"
            f"{config.attention_types[i]:>12}{config.window_sizes[i]:>8}{config.num_global_tokens[i]:>9}{stride:>8}"
        )
    print(f"backbone parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M")
    height, width = args.image_size
    pixel_values = torch.randn(1, config.num_channels, height, width)
    start = time.perf_counter()
    with torch.no_grad():
        maps = model(pixel_values).feature_maps
    elapsed = time.perf_counter() - start
    shapes = ", ".join(f"{name} {tuple(m.shape[1:])}" for name, m in zip(model.out_features, maps))
    print(f"forward of a random {height}x{width} image on {torch.get_num_threads()} CPU threads: {elapsed:.2f} s")
    print(f"feature maps: {shapes}")


def _make_shapes(args: argparse.Namespace) -> None:
    from .data.shapes import make_shapes

    start = time.perf_counter()
    paths = make_shapes(
        args.out_dir,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=tuple(args.image_size),
        seed=args.seed,
        overwrite=args.overwrite,
    )
    elapsed = time.perf_counter() - start
    print(f"wrote {args.num_train} training and {args.num_val} validation images to {paths['root']} in {elapsed:.1f} s")
    for split in ("train", "val"):
        print(f"  {split}: images {paths[split + '_images']}, annotations {paths[split + '_annotations']}")


def _demo(args: argparse.Namespace) -> None:
    import logging

    from .demo import DemoSettings, run_demo
    from .training.cli import setup_logging

    setup_logging()
    logging.getLogger("vil_hf.data").setLevel(logging.WARNING)
    settings = DemoSettings(
        output_dir=args.output_dir,
        num_train=args.num_train,
        num_val=args.num_val,
        max_iter=args.max_iter,
        seed=args.seed,
    )
    result = run_demo(settings, backbone=args.backbone)
    name = "ViL" if args.backbone == "vil" else f"{args.backbone} (transformers)"
    print(
        f"\n{name} Mask R-CNN on the shapes val set ({settings.num_val} images), {result.seconds / 60:.1f} min in all:"
    )
    print(f"  box AP  {result.box_ap:5.1f}")
    print(f"  mask AP {result.mask_ap:5.1f}")
    print(f"  model folder (safetensors, config, image processor, card): {result.model_dir}")
    print(f"  detections on val images: {result.picture}")
    print(f"  loss curve: {result.loss_curve}")


def _predict(args: argparse.Namespace) -> None:
    from .predict import predict

    report = predict(
        args.model,
        args.inputs,
        args.output_dir,
        threshold=args.threshold,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        recursive=args.recursive,
        min_side=args.min_side,
    )
    print(f"images: {report.images}, video frames: {report.frames}, detections: {report.detections}")
    if report.skipped:
        print(f"  skipped {len(report.skipped)} unreadable input(s): {', '.join(path for path, _ in report.skipped)}")
    print(f"  drawn: {len(report.outputs)} file(s) in {args.output_dir}")
    print(f"  COCO results: {report.results_file} (image ids and file names: {report.images_file})")


def _add_predict_parser(commands) -> None:
    from .predict import DTYPES

    predict = commands.add_parser(
        "predict",
        help="run a detector folder on images, folders of images or videos; draw and save COCO results",
        description="Draws the detections on every image (PNG) and video (MP4) and writes detections.json (COCO "
        "results) and images.json (image ids, file names, sizes). Unreadable files are skipped and counted.",
    )
    predict.add_argument("model", help="detector folder (save_pretrained, `vil-hf convert --head ...`, the demo's)")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, video files")
    predict.add_argument("--output-dir", required=True, metavar="DIR", help="where the pictures and JSON go")
    predict.add_argument("--threshold", type=float, default=0.5, help="keep detections scoring above (default 0.5)")
    predict.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: cuda when available, else cpu)")
    predict.add_argument(
        "--dtype", choices=list(DTYPES), default="float32", help="autocast precision (default float32)"
    )
    predict.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    predict.add_argument("--recursive", action="store_true", help="read folders at every depth (default: one level)")
    predict.add_argument(
        "--min-side",
        type=int,
        default=320,
        metavar="PIXELS",
        help="draw smaller images enlarged by a whole factor to reach this (default 320; 0: original size)",
    )
    predict.set_defaults(handler=_predict)


def build_parser() -> argparse.ArgumentParser:
    from .configuration_vil import PUBLISHED_MODELS

    parser = argparse.ArgumentParser(
        prog="vil-hf", description="Vision Longformer (ViL) for Hugging Face transformers."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    from .demo import DEMO_BACKBONES, DemoSettings

    defaults = DemoSettings()
    demo = commands.add_parser(
        "demo",
        help="make the synthetic shapes set, train a small ViL Mask R-CNN on the CPU, evaluate it",
        description="The whole product in 8-16 minutes on 2 CPU cores (the CPU decides), with nothing downloaded.",
    )
    demo.add_argument("--output-dir", default=defaults.output_dir, help=f"default {defaults.output_dir}/")
    demo.add_argument(
        "--max-iter", type=int, default=defaults.max_iter, help=f"training iterations (default {defaults.max_iter})"
    )
    demo.add_argument("--num-train", type=int, default=defaults.num_train, help=f"default {defaults.num_train}")
    demo.add_argument("--num-val", type=int, default=defaults.num_val, help=f"default {defaults.num_val}")
    demo.add_argument("--seed", type=int, default=defaults.seed, help=f"default {defaults.seed}")
    demo.add_argument(
        "--backbone",
        choices=list(DEMO_BACKBONES),
        default="vil",
        help="the same recipe on a transformers backbone of about the demo ViL's size (default vil); "
        "scripts/compare_backbones.py runs them all side by side",
    )
    demo.set_defaults(handler=_demo)

    convert = commands.add_parser(
        "convert",
        help="convert an original ViL checkpoint into a folder the Auto classes load",
        description="Options take the original code's names, so they can be copied from its configs.",
    )
    convert.add_argument("source", help="original checkpoint: classification {'net': ...} or detectron2 {'model': ...}")
    convert.add_argument("out_dir", help="folder to write (save_pretrained, safetensors)")
    convert.add_argument("--arch", help="architecture string (default: the one stored in the checkpoint, if any)")
    convert.add_argument(
        "--attn-type",
        default="longformerhand",
        help="ATTN_TYPE: longformerhand (default), srformer, performer, linformer, or full (every stage dense)",
    )
    convert.add_argument("--sw-exact", type=int, default=0, help="SW_EXACT: 0 sliding chunks (default), 1 exact window")
    convert.add_argument("--mode", type=int, default=0, help="MODE: 0 all chunks, >0 random shifting in training")
    convert.add_argument(
        "--only-glo",
        action="store_true",
        help="ONLY_GLOBAL: with longformerhand, local tokens attend only to the global tokens (global-only ablation)",
    )
    convert.add_argument("--avg-pool", action="store_true", help="AVG_POOL: classify from the mean of all tokens")
    convert.add_argument(
        "--img-size", type=int, help="image size the tables were built for (224 classification, 1333 detection)"
    )
    convert.add_argument(
        "--num-classes", type=int, help="classes of the classification head (default: from the checkpoint)"
    )
    convert.add_argument(
        "--head", choices=["backbone", "mask_rcnn", "retinanet"], help="what to take from a detectron2 file"
    )
    convert.add_argument("--num-detection-classes", type=int, help="object classes of a detectron2 detector")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    convert.set_defaults(handler=_convert)

    info = commands.add_parser("info", help="show a ViL architecture, its size, and run it once on a random image")
    group = info.add_mutually_exclusive_group()
    group.add_argument(
        "--model", choices=PUBLISHED_MODELS, default="small", help="a published backbone (default small)"
    )
    group.add_argument("--arch", help="an architecture string instead")
    info.add_argument(
        "--sparse", action="store_true", help="the detection '_sparse' string (longformer in every stage)"
    )
    info.add_argument("--image-size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    info.set_defaults(handler=_info)

    shapes = commands.add_parser(
        "make-shapes",
        help="write a small synthetic COCO instance-segmentation set (circles, triangles, squares)",
        description="Deterministic: the same arguments give byte-identical files.",
    )
    shapes.add_argument("out_dir", metavar="DIR", help="folder to write (train/, val/, annotations/)")
    shapes.add_argument("--num-train", type=int, default=600, metavar="N", help="training images (default 600)")
    shapes.add_argument("--num-val", type=int, default=100, metavar="N", help="validation images (default 100)")
    shapes.add_argument(
        "--image-size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"), help="default 128 128"
    )
    shapes.add_argument("--seed", type=int, default=0, metavar="S", help="default 0")
    shapes.add_argument("--overwrite", action="store_true", help="write into a non-empty DIR that is not a shapes set")
    shapes.set_defaults(handler=_make_shapes)

    _add_predict_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"vil-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
