"""Speed and memory of ViL-Small against Swin-T (detection backbone in float32 and bfloat16 autocast, ImageNet
classifier, whole Mask R-CNN), and of the longformer kernels; the cost of batch-invariant detection.

Everything runs in one process, interleaved (each timed run goes round all contenders in turn, so a
change in machine load hits them alike), with warm-up runs first and medians reported. Peak memory
is measured in a fresh subprocess per contender: its maximum resident set size on CPU, or
``torch.cuda.max_memory_allocated`` on GPU.

    python scripts/benchmark.py --json benchmark.json          # the full run (minutes)
    python scripts/benchmark.py --quick --json quick.json      # tiny sizes, a few seconds
    python scripts/benchmark.py --only classifier --json cls.json   # one part (see PARTS)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from vil_kernels.native import backward as native_backward, bf16_forward, f32_forward, native_ops

from .io_utils import atomic_write_text

# ViL-Small detection backbone ("_sparse": longformer in all four stages) and Swin-T. Swin's default stochastic
# depth (0.1, ViL's is 0) would make its train-mode steps do extra work that ViL's do not.
VIL_MODEL = "small"
SWIN_T = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.0)
LAYER_WINDOW = 7  # ViL-Small stage 1, the layer and kernel groups
STAGES = ["stage1", "stage2", "stage3", "stage4"]
DTYPES = ("float32", "bfloat16")  # bfloat16 runs under CPU/CUDA autocast
# What a run can measure, in the order it does; `--only` picks some.
PARTS = ("scaling", "backbone", "classifier", "detector", "detection_batch", "layer", "kernel", "memory")
# Issue 18's targets for the ViL/Swin-T time ratios, by ratio key.
TARGETS = {
    "vil_over_swin_forward": "<= 1.0",
    "vil_over_swin_forward_backward": "<= 1.2",
    "vil_over_swin_forward_bfloat16": "<= 1.0",
    "classifier_vil_over_swin_forward": "<= 1.0",
    "classifier_vil_over_swin_forward_backward": "<= 1.0",
    "classifier_vil_over_swin_forward_bfloat16": "<= 1.0",
    "classifier_vil_over_swin_forward_backward_bfloat16": "<= 1.0",
}


@dataclass
class Sizes:
    image: tuple[int, int]  # backbone and detector input (H, W)
    scaled_image: tuple[int, int]  # for the scaling ratio: 4x the pixels
    layer_map: tuple[int, int]  # stage-1 attention layer map
    repeats: int
    warmup: int
    batch: int = 1  # of the backbone measurements (the layer and kernel run batch 1, the detectors batch 1)
    # of the backbone and classifier measurements; the first is also that of the scaling and memory ones
    dtypes: tuple[str, ...] = DTYPES
    classifier_image: tuple[int, int] = (224, 224)
    classifier_batch: int = 32
    detector_heads: dict = field(default_factory=dict)  # MaskRCNNConfig options (the published heads when empty)


FULL = Sizes(image=(800, 1216), scaled_image=(1600, 2432), layer_map=(200, 304), repeats=3, warmup=1)
QUICK = Sizes(
    image=(64, 96),
    scaled_image=(128, 192),
    layer_map=(16, 24),
    repeats=3,
    warmup=1,
    classifier_image=(64, 64),
    classifier_batch=2,
    # the published heads' RoI work (512 RoIs, 256-channel FPN) would swamp the tiny backbones' share
    detector_heads=dict(
        fpn_channels=32,
        box_head_fc_dim=64,
        mask_head_conv_dim=32,
        rpn_batch_size_per_image=64,
        roi_batch_size_per_image=64,
    ),
)


def build_vil(implementation: str = "auto", device: str = "cpu") -> torch.nn.Module:
    from .configuration_vil import ViLConfig, published_arch
    from .modeling_vil import ViLBackbone

    config = ViLConfig(
        arch=published_arch(VIL_MODEL, sparse=True), out_features=STAGES, longformer_implementation=implementation
    )
    return ViLBackbone(config).to(device)


def build_swin(device: str = "cpu") -> torch.nn.Module:
    from transformers import SwinBackbone, SwinConfig

    return SwinBackbone(SwinConfig(**SWIN_T, out_features=STAGES)).to(device)


def build_classifier(model_name: str, image_size: tuple[int, int], device: str = "cpu") -> torch.nn.Module:
    """ViL-Small's ImageNet classifier (full attention in stages 3-4) or Swin-T's, 1000 classes."""
    if model_name == "vil":
        from .configuration_vil import ViLConfig, published_arch
        from .modeling_vil import ViLForImageClassification

        config = ViLConfig(arch=published_arch(VIL_MODEL), image_size=list(image_size), num_labels=1000)
        return ViLForImageClassification(config).to(device)
    from transformers import SwinConfig, SwinForImageClassification

    # image_size stays at its default: Swin pads other inputs to whole windows (see `_classifier_kwargs`).
    return SwinForImageClassification(SwinConfig(**SWIN_T, num_labels=1000)).to(device)


def build_detector(model_name: str, device: str = "cpu", **heads) -> torch.nn.Module:
    """Mask R-CNN (80 classes; ``heads``: other MaskRCNNConfig options) on ViL-Small's detection backbone or on
    Swin-T."""
    from transformers import SwinConfig

    from .configuration_vil import ViLConfig, published_arch
    from .detection import MaskRCNNConfig, MaskRCNNForObjectDetection

    if model_name == "vil":
        backbone_config = ViLConfig(arch=published_arch(VIL_MODEL, sparse=True))
    else:
        backbone_config = SwinConfig(**SWIN_T, out_features=STAGES)
    config = MaskRCNNConfig(backbone_config=backbone_config, num_labels=80, **heads)
    return MaskRCNNForObjectDetection(config).to(device)


def build_layer(implementation: str, device: str = "cpu") -> torch.nn.Module:
    """Stage 1's attention (d 96, 3 heads, window 7, 1 global, relative bias) with its projections."""
    from .attention import ViLLongformerAttention
    from .configuration_vil import ViLConfig, published_arch

    config = ViLConfig(arch=published_arch(VIL_MODEL, sparse=True), longformer_implementation=implementation)
    layer = ViLLongformerAttention(config, 0).to(device)
    with torch.no_grad():  # a random table rather than zeros, as after training
        layer.relative_position_bias_table.normal_(std=0.02)
    return layer


def detection_batch_steps(sizes: Sizes, device: str = "cpu") -> dict[str, Callable[[], None]]:
    """A ViL-Small Mask R-CNN (80 classes, eval, no_grad) on two images, the second about 3/4 the size of the first:
    detected each as it would be alone (pixel_mask given) and as one padded batch (no pixel_mask: the behaviour
    before detection became batch-invariant)."""
    model = build_detector("vil", device, **sizes.detector_heads).eval()
    height, width = sizes.image
    small_height, small_width = (max(32, size * 3 // 4 // 32 * 32) for size in (height, width))
    pixel_mask = torch.zeros(2, height, width, dtype=torch.int64, device=device)
    pixel_mask[0] = 1
    pixel_mask[1, :small_height, :small_width] = 1
    pixel_values = torch.randn(2, 3, height, width, device=device) * pixel_mask[:, None]

    def step(mask):
        with torch.no_grad():
            model(pixel_values, pixel_mask=mask)

    return {"padded_batch": lambda: step(None), "each_image_as_alone": lambda: step(pixel_mask)}


def random_detection_targets(
    num_images: int, height: int, width: int, num_labels: int, device: str = "cpu", boxes_per_image: int = 4
) -> list[dict[str, torch.Tensor]]:
    """Per image: random (x1, y1, x2, y2) boxes 1/8 to 1/2 of the image's sides, random classes, and each box's
    rectangle as its mask."""
    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(num_images):
        sides = torch.rand(boxes_per_image, 2, generator=generator) * 3 / 8 + 1 / 8  # (N, 2) fractions w, h
        corners = torch.rand(boxes_per_image, 2, generator=generator) * (1 - sides)
        scale = torch.tensor([width, height], dtype=torch.float32)
        boxes = torch.cat([corners * scale, (corners + sides) * scale], dim=1).floor()  # (N, 4)
        masks = torch.zeros(boxes_per_image, height, width, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
            mask[y1:y2, x1:x2] = 1
        labels = torch.randint(num_labels, (boxes_per_image,), generator=generator)
        targets.append({"boxes": boxes.to(device), "class_labels": labels.to(device), "masks": masks.to(device)})
    return targets


def cpu_bfloat16_support() -> tuple[str, bool]:
    """This CPU's vector instruction set as torch dispatches to it, and whether it multiplies bfloat16 natively
    (AVX512-BF16 or AMX). Without, oneDNN emulates bfloat16 products: on a 2-core AVX2 EPYC (Zen 3) the ViL-Small
    backbone at 800x1216 took 27 s under bfloat16 autocast, about 20x its float32 time, so bfloat16 timings
    there say nothing about bfloat16 hardware."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    native = bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return torch.backends.cpu.get_cpu_capability(), native


BF16_FORWARD_WORDS = {
    "amx": "in one C++ pass on AMX tiles",
    "avx512": "in one C++ pass in AVX512-BF16 registers",
    "aten": "on ATen products (no native pass here)",
}
NATIVE_WORDS = {"avx512": "in one C++ pass in AVX-512 registers", "aten": "on ATen products (no native pass here)"}


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device_type: str, dtype: str):
    """bfloat16 (or float16) autocast on the device; float32: a context that changes nothing."""
    return torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=dtype != "float32")


def _suffix(dtype: str) -> str:
    """Keys of float32 measurements carry no precision (as before bfloat16 rows existed); others end in it."""
    return "" if dtype == "float32" else f"_{dtype}"


def _backbone_step(model, pixel_values, backward: bool, dtype: str = "float32"):
    autocast = _autocast(pixel_values.device.type, dtype)
    if not backward:
        with torch.no_grad(), autocast:
            model(pixel_values)
        return
    with autocast:
        maps = model(pixel_values).feature_maps
    sum(m.float().mean() for m in maps).backward()


def _classifier_kwargs(model_name: str, image_size: tuple[int, int]) -> dict:
    """What the classifier's forward needs besides pixels. transformers' Swin classifier shrinks its window to a
    stage map smaller than the window (7) but not its bias table, a shape error for inputs under 224x224 (stage 4
    at 7x7); there it partitions into whole padded windows, as SwinBackbone always does."""
    return {"always_partition": True} if model_name == "swin" and min(image_size) < 32 * SWIN_T["window_size"] else {}


def _classifier_step(model, pixel_values, labels, backward: bool, dtype: str = "float32", **kwargs):
    """Inference (eval, no_grad), or a training step's forward and backward of the cross-entropy (train mode)."""
    model.train(backward)
    with torch.set_grad_enabled(backward), _autocast(pixel_values.device.type, dtype):
        logits = model(pixel_values, **kwargs).logits
    if backward:
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()


def _detector_step(model, pixel_values, targets, training: bool):
    """Inference (eval, no_grad, with post-processing), or a training step's forward and backward of the losses."""
    model.train(training)
    if not training:
        with torch.no_grad():
            model(pixel_values)
        return
    model(pixel_values, labels=targets).loss.backward()


def _layer_step(layer, hidden_states, height, width, backward: bool):
    if not backward:
        with torch.no_grad():
            layer(hidden_states, height, width)
        return
    layer(hidden_states, height, width).float().mean().backward()


def _kernel_inputs(height: int, width: int, device: str) -> dict:
    """Stage 1's attention inputs: (1, 3, L, 32) queries/keys/values, 1 global, bias tables."""
    from vil_kernels import relative_bias_table_size

    generator = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device).requires_grad_()

    length = height * width
    return dict(
        local_queries=rand(1, 3, length, 32, scale=32**-0.5),
        local_keys=rand(1, 3, length, 32),
        local_values=rand(1, 3, length, 32),
        global_keys=rand(1, 3, 1, 32),
        global_values=rand(1, 3, 1, 32),
        relative_bias_table=rand(relative_bias_table_size(7), 3, scale=0.02),
        local_to_global_bias=rand(3, 1, scale=0.02),
    )


def _kernel_step(implementation: str, inputs: dict, height: int, width: int, backward: bool) -> None:
    from vil_kernels import longformer_attention

    with torch.set_grad_enabled(backward):
        output = longformer_attention(
            **inputs, height=height, width=width, window=LAYER_WINDOW, implementation=implementation
        )
        if backward:
            output.mean().backward()


def _steps_per_kind(names, step: Callable[[str, bool], None]) -> dict[str, Callable[[], None]]:
    """{"<name>_forward": ..., then "<name>_forward_backward": ...}: each name's step without, then with, backward."""
    return _steps_per_precision(names, ["float32"], lambda name, backward, dtype: step(name, backward))


def _steps_per_precision(names, dtypes, step: Callable[[str, bool, str], None]) -> dict[str, Callable[[], None]]:
    """{"<name>_<kind><precision suffix>": ...}: per precision, each name's step without, then with, backward."""
    return {
        f"{name}_{kind}{_suffix(dtype)}": lambda name=name, backward=backward, dtype=dtype: step(name, backward, dtype)
        for dtype in dtypes
        for kind, backward in (("forward", False), ("forward_backward", True))
        for name in names
    }


def contender_row(name: str) -> str:
    """The row a step is compared in: its name past the contender (``vil_forward`` and ``swin_forward``: ``forward``;
    ``blocked_forward_backward``: ``forward_backward``)."""
    return name.split("_", 1)[1]


def time_interleaved(
    steps: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    device: str,
    row: Callable[[str], str] | None = None,
):
    """Median seconds of each step over ``repeats`` rounds; each round runs every step once, in turn.

    With ``row`` (step name -> the row it is compared in) each row's steps are warmed up and timed on their own,
    in the opposite order every other round. Interleaving every row in one sequence made each row's first contender
    always the step after another row's heaviest one (a training step that had just freed gigabytes, which the
    next step page-faults back): ViL-Small's bfloat16 classifier forward, which followed Swin-T's float32 training
    step, measured 1.72 s against Swin-T's 1.40 s there and 1.50 s against 1.49 s in its own row (the same code, two
    runs one after the other on a 2-core VM).
    """
    groups: dict[str, list[str]] = {}
    for name in steps:
        groups.setdefault(row(name) if row else "", []).append(name)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for names in groups.values():
        for _ in range(warmup):
            for name in names:
                steps[name]()
        for round_index in range(repeats):
            for name in names if round_index % 2 == 0 or not row else reversed(names):
                _synchronize(device)
                start = time.perf_counter()
                steps[name]()
                _synchronize(device)
                times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(ts), "runs_s": ts} for name, ts in times.items()}


def _child_command(sizes: Sizes, device: str, threads: int) -> list[str]:
    """The options that a measuring subprocess shares with its parent."""
    command = [sys.executable, "-m", "vil_hf.benchmark", "--device", device, "--threads", str(threads)]
    return command + ["--image-size", *map(str, sizes.image), "--batch", str(sizes.batch), "--dtype", sizes.dtypes[0]]


def measure_peak_memory(model: str, sizes: Sizes, backward: bool, device: str, threads: int = 1) -> dict:
    """Peak memory of one forward (+backward) in a fresh subprocess (so nothing else counts)."""
    command = _child_command(sizes, device, threads) + ["--measure-memory", model]
    command += ["--backward"] if backward else []
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {model} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_scaling(model: str, sizes: Sizes, device: str, threads: int) -> dict:
    """Forward times of ``model`` at the base and the 4x-pixel size, in a fresh subprocess."""
    command = _child_command(sizes, device, threads) + ["--measure-scaling", model, "--repeats", str(sizes.repeats)]
    command += ["--scaled-image-size", *map(str, sizes.scaled_image)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"scaling measurement of {model} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _scaling_child(model_name: str, sizes: Sizes, device: str) -> None:
    torch.manual_seed(0)
    model = build_vil(device=device) if model_name == "vil" else build_swin(device=device)
    base = torch.randn(sizes.batch, 3, *sizes.image, device=device)
    scaled = torch.randn(sizes.batch, 3, *sizes.scaled_image, device=device)
    steps = {
        f"{model_name}_forward_base": lambda: _backbone_step(model, base, False, sizes.dtypes[0]),
        f"{model_name}_forward_4x_pixels": lambda: _backbone_step(model, scaled, False, sizes.dtypes[0]),
    }
    print(json.dumps(time_interleaved(steps, sizes.repeats, sizes.warmup, device)))


def _memory_child(model_name: str, sizes: Sizes, backward: bool, device: str) -> None:
    torch.manual_seed(0)
    model = build_vil(device=device) if model_name == "vil" else build_swin(device=device)
    pixel_values = torch.randn(sizes.batch, 3, *sizes.image, device=device)
    # before: the model and the input, so the peak minus it is what the step itself needs
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _resident_peak_bytes()
    _backbone_step(model, pixel_values, backward, sizes.dtypes[0])
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _resident_peak_bytes()
    print(json.dumps({"peak_bytes": peak, "before_bytes": before}))


def _resident_peak_bytes() -> int:
    """This process's peak resident set size.

    Read from /proc (VmHWM) where there is one: getrusage's ru_maxrss survives exec on Linux, so a
    child started from a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def run(
    sizes: Sizes,
    device: str = "cpu",
    threads: int | None = None,
    memory: bool = True,
    log=print,
    parts: tuple[str, ...] = PARTS,
) -> dict:
    """Measure ``parts`` (a selection of PARTS; ``memory=False`` drops "memory") and their ratios."""
    from vil_kernels import LONGFORMER_IMPLEMENTATIONS
    from vil_kernels.longformer import resolve_implementation

    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown benchmark parts {unknown}; choose from {list(PARTS)}")
    parts = tuple(part for part in PARTS if part in parts and (memory or part != "memory"))
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    cpu_capability, native_bfloat16 = cpu_bfloat16_support()
    if device == "cpu" and "bfloat16" in sizes.dtypes and not native_bfloat16:
        log(
            f"warning: this CPU ({cpu_capability}) has no native bfloat16 (AVX512-BF16 or AMX): bfloat16 products "
            "are emulated, many times slower than float32, and the bfloat16 rows do not show what bfloat16 "
            "hardware does"
        )
    torch.manual_seed(0)
    results: dict = {
        "setup": {
            "device": device,
            "threads": threads,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "cpu_capability": cpu_capability,
            "native_bfloat16": native_bfloat16,
            # built here, before any timing, where it builds at all
            "cpu_softmax": ("c++" if native_ops() is not None else "pytorch") if device == "cpu" else None,
            # the native bfloat16 forward's engine: "amx", "avx512", or "aten" (its products on ATen)
            "cpu_bf16_forward": (bf16_forward() or (None, "aten"))[1] if device == "cpu" else None,
            # and its float32 forward's and its backward's: "avx512", or "aten"
            "cpu_f32_forward": (f32_forward() or (None, "aten"))[1] if device == "cpu" else None,
            "cpu_backward": (native_backward() or (None, "aten"))[1] if device == "cpu" else None,
            "parts": list(parts),
            "image": list(sizes.image),
            "scaled_image": list(sizes.scaled_image),
            "layer_map": list(sizes.layer_map),
            "repeats": sizes.repeats,
            "warmup": sizes.warmup,
            "dtypes": list(sizes.dtypes),
            "dtype": sizes.dtypes[0],  # of the scaling and memory measurements
            "batch": sizes.batch,
            "classifier_image": list(sizes.classifier_image),
            "classifier_batch": sizes.classifier_batch,
            "detector_heads": sizes.detector_heads,
        }
    }

    def timed(steps, row=contender_row):
        return time_interleaved(steps, sizes.repeats, sizes.warmup, device, row)

    if "scaling" in parts:
        log(f"scaling: forward at {sizes.scaled_image[0]}x{sizes.scaled_image[1]} against the base size, per model")
        # First, and each model in a fresh subprocess with its two sizes alternating: the 4x-pixel runs
        # allocate gigabytes, and their page faults became ~25% slower for both models (on this VM) while
        # a parent that had already run the other measurements stayed resident.
        scaling = {}
        for name in ("vil", "swin"):
            scaling.update(measure_scaling(name, sizes, device, threads))
        results["scaling"] = scaling

    if "backbone" in parts:
        models = {"vil": build_vil(device=device), "swin": build_swin(device=device)}
        pixel_values = torch.randn(sizes.batch, 3, *sizes.image, device=device)
        log(
            f"backbones at {sizes.image[0]}x{sizes.image[1]} in {', '.join(sizes.dtypes)}: forward and "
            "forward+backward, interleaved"
        )
        results["backbone"] = timed(
            _steps_per_precision(
                models,
                sizes.dtypes,
                lambda name, backward, dtype: _backbone_step(models[name], pixel_values, backward, dtype),
            )
        )
        del models

    if "classifier" in parts:
        (h, w), batch = sizes.classifier_image, sizes.classifier_batch
        log(f"classifiers at {h}x{w}, batch {batch}, in {', '.join(sizes.dtypes)}: inference and training step")
        models = {name: build_classifier(name, sizes.classifier_image, device) for name in ("vil", "swin")}
        images = torch.randn(batch, 3, h, w, device=device)
        labels = torch.randint(1000, (batch,), device=device)
        kwargs = {name: _classifier_kwargs(name, sizes.classifier_image) for name in models}
        results["classifier"] = timed(
            _steps_per_precision(
                models,
                sizes.dtypes,
                lambda name, backward, dtype: _classifier_step(
                    models[name], images, labels, backward, dtype, **kwargs[name]
                ),
            )
        )
        del models

    if "detector" in parts:
        h, w = sizes.image
        log(f"Mask R-CNN on ViL-Small and on Swin-T at {h}x{w}, batch 1, float32: inference and training step")
        torch.manual_seed(0)
        models = {name: build_detector(name, device, **sizes.detector_heads) for name in ("vil", "swin")}
        image = torch.randn(1, 3, h, w, device=device)
        targets = random_detection_targets(1, h, w, num_labels=80, device=device)
        results["detector"] = timed(
            {
                f"{name}_{kind}": lambda m=model, t=training: _detector_step(m, image, targets, t)
                for kind, training in (("inference", False), ("training_step", True))
                for name, model in models.items()
            }
        )
        del models

    if "detection_batch" in parts:
        log("Mask R-CNN on two image sizes: each image as alone (pixel_mask) against one padded batch, interleaved")
        results["detection_batch"] = timed(detection_batch_steps(sizes, device), row=None)

    height, width = sizes.layer_map
    skipped = {} if device.startswith("cuda") else {"flex": "CUDA only"}
    if resolve_implementation("auto", device, 0.0, height, width, LAYER_WINDOW)[0] != "dense":
        # Its (L, L) scores grow with the square of the map (tens of GB per head at the detection map).
        skipped["dense"] = f"for maps auto gives it; {height}x{width} is above its size"
    implementations = [name for name in LONGFORMER_IMPLEMENTATIONS if name not in skipped]
    fast_paths = [name for name in implementations if name != "reference"]
    if "layer" in parts or "kernel" in parts:
        results["layer_skipped"] = skipped

    if "layer" in parts:
        log(f"stage-1 attention layer at {height}x{width}, every implementation")
        hidden_states = torch.randn(1, 1 + height * width, 96, device=device)
        runnable = {}
        for name in implementations:
            torch.manual_seed(0)
            runnable[name] = build_layer(name, device)

        def layer_steps(names):
            return _steps_per_kind(
                names, lambda name, backward: _layer_step(runnable[name], hidden_states, height, width, backward)
            )

        # The reference allocates gigabytes per call; interleaved with the others, the page faults it
        # leaves behind slowed `vectorized` down 2.5x. It is timed in its own group, against `blocked`.
        results["layer"] = timed(layer_steps(fast_paths))
        results["layer_reference"] = timed(layer_steps(["reference", "blocked"]))

    if "kernel" in parts:
        # The reference (about a minute per round at the stage-1 size) is compared on the layer only.
        log(f"the stage-1 layer's attention kernel alone (no projections): {', '.join(fast_paths)}")
        kernel_inputs = _kernel_inputs(height, width, device)
        steps = _steps_per_kind(
            fast_paths, lambda name, backward: _kernel_step(name, kernel_inputs, height, width, backward)
        )
        results["kernel"] = timed(steps)

    if "memory" in parts:
        log("peak memory, one subprocess per measurement")
        results["memory"] = {
            f"{model}_{'forward_backward' if backward else 'forward'}": measure_peak_memory(
                model, sizes, backward, device, threads
            )
            for backward in (False, True)
            for model in ("vil", "swin")
        }
    results["vil_over_swin"] = vil_over_swin_rows(results)
    results["ratios"] = ratios(results)
    return results


def vil_over_swin_rows(results: dict) -> list[dict]:
    """One row per ViL-Small/Swin-T time comparison that ``results`` holds: its ratio key, what it measures, both
    medians, their ratio, and issue 18's target for it ("" where it sets none)."""
    setup = results["setup"]
    h, w = setup["image"]
    ch, cw = setup["classifier_image"]
    # (part, ratio key prefix, subject, size, kinds, precisions)
    groups = (
        ("backbone", "", "backbone", f"{h}x{w}", ("forward", "forward_backward"), setup["dtypes"]),
        (
            "classifier",
            "classifier_",
            "classifier",
            f"{ch}x{cw}, batch {setup['classifier_batch']}",
            ("forward", "forward_backward"),
            setup["dtypes"],
        ),
        ("detector", "detector_", "Mask R-CNN", f"{h}x{w}, batch 1", ("inference", "training_step"), ["float32"]),
    )
    kind_words = {
        "forward": ("forward", " (no_grad)"),
        "forward_backward": ("forward+backward", ""),
        "inference": ("inference", " (eval, no_grad)"),
        "training_step": ("training step", " (losses, backward)"),
    }
    rows = []
    for part, prefix, subject, size, kinds, dtypes in groups:
        table = results.get(part)
        if table is None:
            continue
        for dtype, kind in itertools.product(dtypes, kinds):
            vil, swin = (table[f"{name}_{kind}{_suffix(dtype)}"]["median_s"] for name in ("vil", "swin"))
            key = f"{prefix}vil_over_swin_{kind}{_suffix(dtype)}"
            words, note = kind_words[kind]
            # The backbone's float32 rows keep their names from before it had bfloat16 ones.
            precision = "" if (part, dtype) == ("backbone", "float32") else f", {dtype}"
            precision += " autocast" if dtype != "float32" else ""
            rows.append(
                {
                    "key": key,
                    "measurement": f"{subject} {words} {size}{note}{precision}",
                    "vil_median_s": vil,
                    "swin_median_s": swin,
                    "ratio": vil / swin,
                    "target": TARGETS.get(key, ""),
                }
            )
    return rows


def ratios(results: dict) -> dict:
    """Every ratio the measurements in ``results`` give, by name (the ViL/Swin-T time ratios as in
    `vil_over_swin_rows`)."""

    def med(table, key):
        return table[key]["median_s"]

    out = {row["key"]: row["ratio"] for row in vil_over_swin_rows(results)}
    if "scaling" in results:
        s = results["scaling"]
        for name in ("vil", "swin"):
            out[f"{name}_scaling_4x_pixels"] = med(s, f"{name}_forward_4x_pixels") / med(s, f"{name}_forward_base")
    if "detection_batch" in results:
        d = results["detection_batch"]
        out["detection_each_image_as_alone_over_padded_batch"] = med(d, "each_image_as_alone") / med(d, "padded_batch")
    parts = (
        ("layer", results.get("layer", {})),
        ("layer", results.get("layer_reference", {})),
        ("kernel", results.get("kernel", {})),
    )
    for (part, table), fast in itertools.product(parts, ("blocked", "flex")):
        for baseline in ("reference", "vectorized"):
            for kind in ("forward", "forward_backward"):
                if f"{baseline}_{kind}" in table and f"{fast}_{kind}" in table:
                    ratio = med(table, f"{baseline}_{kind}") / med(table, f"{fast}_{kind}")
                    out[f"{part}_{baseline}_over_{fast}_{kind}"] = ratio
    if "memory" in results:
        m = results["memory"]
        for kind in ("forward", "forward_backward"):
            out[f"vil_over_swin_peak_memory_{kind}"] = m[f"vil_{kind}"]["peak_bytes"] / m[f"swin_{kind}"]["peak_bytes"]
    return out


def _ms(table: dict, key: str) -> str:
    return f"{table[key]['median_s'] * 1e3:.0f} ms"


def _implementation_table(table: dict) -> list[str]:
    lines = ["| implementation | forward | forward+backward |", "|---|---|---|"]
    for name in sorted({k.rsplit("_forward", 1)[0] for k in table}):
        lines.append(f"| {name} | {_ms(table, f'{name}_forward')} | {_ms(table, f'{name}_forward_backward')} |")
    return lines


def markdown(results: dict) -> str:
    setup, r = results["setup"], results["ratios"]
    h, w = setup["image"]
    measured = set(results)
    about = [f"{setup['device']}, {setup['threads']} threads, median of {setup['repeats']} interleaved runs"]
    if setup["device"] == "cpu":
        emulated = "bfloat16" in setup["dtypes"] and not setup["native_bfloat16"]
        about.append(f"CPU {setup['cpu_capability']}" + (" without native bfloat16 (emulated)" if emulated else ""))
        if setup.get("cpu_softmax"):
            about.append(
                f"blocked kernel's softmax steps in {'C++' if setup['cpu_softmax'] == 'c++' else 'PyTorch ops'}"
            )
        if setup.get("cpu_bf16_forward") is not None and "bfloat16" in setup["dtypes"]:
            about.append(f"its bfloat16 forward {BF16_FORWARD_WORDS[setup['cpu_bf16_forward']]}")
        if setup.get("cpu_f32_forward") is not None and "float32" in setup["dtypes"]:
            about.append(f"its float32 forward {NATIVE_WORDS[setup['cpu_f32_forward']]}")
        if setup.get("cpu_backward") is not None:
            about.append(f"its backward {NATIVE_WORDS[setup['cpu_backward']]}")
    if measured & {"backbone", "scaling", "memory"}:
        about.append(
            f"backbones in {' and '.join(setup['dtypes'])} at batch {setup['batch']} (scaling and memory: "
            f"{setup['dtype']})"
        )
    if measured & {"detector", "detection_batch"} and setup.get("detector_heads"):
        about.append(f"Mask R-CNN heads {setup['detector_heads']}")
    if measured & {"layer", "kernel"}:
        about.append("the layer and kernel in float32 at batch 1")
    lines = [", ".join(about)]
    if measured & {"backbone", "classifier", "detector", "memory", "scaling", "detection_batch"}:
        lines += ["", "| measurement | ViL-Small | Swin-T | ratio | target |", "|---|---|---|---|---|"]
    for row in results["vil_over_swin"]:
        lines.append(
            f"| {row['measurement']} | {row['vil_median_s']:.2f} s | {row['swin_median_s']:.2f} s | "
            f"{row['ratio']:.2f} | {row['target']} |"
        )
    if "memory" in results:
        m = results["memory"]
        unit = "max RSS" if setup["device"] == "cpu" else "max allocated"
        for kind, target in (("forward", ""), ("forward_backward", "<= 1.0")):
            vil, swin = (m[f"{x}_{kind}"] for x in ("vil", "swin"))
            cells = [
                f"{x['peak_bytes'] / 2**20:.0f} MiB (+{(x['peak_bytes'] - x['before_bytes']) / 2**20:.0f})"
                for x in (vil, swin)
            ]
            lines.append(
                f"| peak memory ({unit}; + over model and input), {kind.replace('_', '+')} | {cells[0]} | "
                f"{cells[1]} | {r[f'vil_over_swin_peak_memory_{kind}']:.2f} | {target} |"
            )
    if "scaling" in results:
        sh, sw = setup["scaled_image"]
        s = results["scaling"]
        lines.append(
            f"| forward {sh}x{sw} / {h}x{w} (4x pixels) | {r['vil_scaling_4x_pixels']:.2f} "
            f"({s['vil_forward_4x_pixels']['median_s']:.2f} s) | {r['swin_scaling_4x_pixels']:.2f} "
            f"({s['swin_forward_4x_pixels']['median_s']:.2f} s) | | ViL <= 4.4 |"
        )
    if "detection_batch" in results:
        d = results["detection_batch"]
        lines.append(
            f"| Mask R-CNN eval, batch of {h}x{w} and ~3/4 of it: each image as alone / one padded batch | "
            f"{d['each_image_as_alone']['median_s']:.2f} s / {d['padded_batch']['median_s']:.2f} s | | "
            f"{r['detection_each_image_as_alone_over_padded_batch']:.2f} | |"
        )
    lh, lw = setup["layer_map"]
    if "layer" in results:
        lines += [
            "",
            f"Stage-1 attention layer (map {lh}x{lw}, d 96, 3 heads, window 7, 1 global, relative bias), "
            "with projections:",
            "",
            *_implementation_table(results["layer"]),
        ]
        own_group = results["layer_reference"]
        blocked = f"{_ms(own_group, 'blocked_forward')} / {_ms(own_group, 'blocked_forward_backward')}"
        lines.append(
            f"| reference (own group, interleaved with blocked: {blocked}) | {_ms(own_group, 'reference_forward')} | "
            f"{_ms(own_group, 'reference_forward_backward')} |"
        )
        for name, why in results["layer_skipped"].items():
            lines.append(f"| {name} | not run: {why} | |")
    if "kernel" in results:
        lines += [
            "",
            f"The stage-1 attention kernel alone (map {lh}x{lw}, same inputs, no projections):",
            "",
            *_implementation_table(results["kernel"]),
        ]
    lines.append("")
    for key, value in r.items():
        if key.startswith(("layer_", "kernel_")):
            lines.append(f"- {key.replace('_', ' ')}: {value:.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds), for tests")
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, metavar="PART", help=f"measure only these parts, of: {', '.join(PARTS)}"
    )
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="backbone and detector input size")
    parser.add_argument("--layer-map", type=int, nargs=2, metavar=("H", "W"), help="stage-1 layer map size")
    parser.add_argument(
        "--classifier-image-size", type=int, nargs=2, metavar=("H", "W"), help="classifier input size (224x224)"
    )
    parser.add_argument("--classifier-batch", type=int, help="classifier batch size (32)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (>= 3 for the medians)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1, help="backbone batch size (the GPU target uses 2)")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=DTYPES,
        help="precisions of the backbone and classifier measurements (default: both; bfloat16 runs under autocast); "
        "the first is also that of the scaling and memory measurements",
    )
    parser.add_argument("--dtype", choices=DTYPES, help="only this precision: the same as --dtypes DTYPE")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", default="benchmark.json", help="where to write the results")
    # internal: one peak-memory measurement in this (fresh) process
    parser.add_argument("--measure-memory", choices=["vil", "swin"], help=argparse.SUPPRESS)
    parser.add_argument("--backward", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure-scaling", choices=["vil", "swin"], help=argparse.SUPPRESS)
    parser.add_argument("--scaled-image-size", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if args.dtype and args.dtypes:
        parser.error("give either --dtype (one precision) or --dtypes (several), not both")
    dtypes = tuple(dict.fromkeys(args.dtypes)) if args.dtypes else (args.dtype,) if args.dtype else DTYPES
    if args.measure_scaling or args.measure_memory:
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        image = tuple(args.image_size or FULL.image)
        scaled = tuple(args.scaled_image_size or (2 * image[0], 2 * image[1]))
        child_sizes = replace(
            FULL,
            image=image,
            scaled_image=scaled,
            repeats=args.repeats or FULL.repeats,
            batch=args.batch,
            dtypes=dtypes[:1],
        )
        if args.measure_scaling:
            _scaling_child(args.measure_scaling, child_sizes, args.device)
        else:
            _memory_child(args.measure_memory, child_sizes, args.backward, args.device)
        return None

    sizes = replace(QUICK if args.quick else FULL, batch=args.batch, dtypes=dtypes)
    if args.image_size:
        h, w = args.image_size
        sizes = replace(sizes, image=(h, w), scaled_image=(2 * h, 2 * w))
    if args.layer_map:
        sizes = replace(sizes, layer_map=tuple(args.layer_map))
    if args.classifier_image_size:
        sizes = replace(sizes, classifier_image=tuple(args.classifier_image_size))
    if args.classifier_batch is not None:
        if args.classifier_batch < 1:
            parser.error(f"--classifier-batch must be at least 1, got {args.classifier_batch}")
        sizes = replace(sizes, classifier_batch=args.classifier_batch)
    if args.repeats is not None:
        sizes = replace(sizes, repeats=args.repeats)
    if sizes.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {sizes.repeats}")
    images = (sizes.image, sizes.classifier_image)
    for h, w in (*images, sizes.layer_map):
        if min(h, w) < 32 and (h, w) in images or min(h, w) < 1:
            parser.error(f"sizes must be positive and images at least 32x32 (four stages of stride 32), got {h}x{w}")

    parts = tuple(args.only) if args.only else PARTS
    results = run(sizes, device=args.device, threads=args.threads, memory=not args.no_memory, log=print, parts=parts)
    results["command"] = " ".join(["python scripts/benchmark.py"] + (argv if argv is not None else sys.argv[1:]))
    table = markdown(results)
    results["markdown"] = table
    atomic_write_text(args.json, json.dumps(results, indent=2))
    print()
    print(table)
    print(f"\nresults written to {args.json}")
    return results


if __name__ == "__main__":
    main()
