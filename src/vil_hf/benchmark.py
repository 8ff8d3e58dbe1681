"""Speed and memory of ViL-Small's detection backbone against Swin-T, and of the longformer kernels; the cost of
batch-invariant detection.

Everything runs in one process, interleaved (each timed run goes round all contenders in turn, so a
change in machine load hits them alike), with warm-up runs first and medians reported. Peak memory
is measured in a fresh subprocess per contender: its maximum resident set size on CPU, or
``torch.cuda.max_memory_allocated`` on GPU.

    python scripts/benchmark.py --json benchmark.json          # the full run (minutes)
    python scripts/benchmark.py --quick --json quick.json      # tiny sizes, a few seconds
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
from dataclasses import dataclass, replace

import torch

# ViL-Small detection backbone ("_sparse": longformer in all four stages) and Swin-T.
VIL_MODEL = "small"
SWIN_T = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)
STAGES = ["stage1", "stage2", "stage3", "stage4"]


@dataclass
class Sizes:
    image: tuple[int, int]  # backbone input (H, W)
    scaled_image: tuple[int, int]  # for the scaling ratio: 4x the pixels
    layer_map: tuple[int, int]  # stage-1 attention layer map
    repeats: int
    warmup: int
    batch: int = 1  # of the backbone measurements (the layer and kernel run batch 1)
    dtype: str = "float32"  # of the backbone measurements: "bfloat16" runs them under autocast


FULL = Sizes(image=(800, 1216), scaled_image=(1600, 2432), layer_map=(200, 304), repeats=3, warmup=1)
QUICK = Sizes(image=(64, 96), scaled_image=(128, 192), layer_map=(16, 24), repeats=3, warmup=1)


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
    from .configuration_vil import ViLConfig, published_arch
    from .detection import MaskRCNNConfig, MaskRCNNForObjectDetection

    backbone_config = ViLConfig(arch=published_arch(VIL_MODEL, sparse=True))
    model = MaskRCNNForObjectDetection(MaskRCNNConfig(backbone_config=backbone_config, num_labels=80)).to(device).eval()
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


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _backbone_step(model, pixel_values, backward: bool, dtype: str = "float32"):
    autocast = torch.autocast(pixel_values.device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    if not backward:
        with torch.no_grad(), autocast:
            model(pixel_values)
        return
    with autocast:
        maps = model(pixel_values).feature_maps
    sum(m.float().mean() for m in maps).backward()


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
        output = longformer_attention(**inputs, height=height, width=width, window=7, implementation=implementation)
        if backward:
            output.mean().backward()


def _steps_per_kind(names, step: Callable[[str, bool], None]) -> dict[str, Callable[[], None]]:
    """{"<name>_forward": ..., then "<name>_forward_backward": ...}: each name's step without, then with, backward."""
    return {
        f"{name}_{kind}": lambda name=name, backward=backward: step(name, backward)
        for kind, backward in (("forward", False), ("forward_backward", True))
        for name in names
    }


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str):
    """Median seconds of each step over ``repeats`` rounds; each round runs every step once, in turn."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(ts), "runs_s": ts} for name, ts in times.items()}


def _child_command(sizes: Sizes, device: str, threads: int) -> list[str]:
    """The options that a measuring subprocess shares with its parent."""
    command = [sys.executable, "-m", "vil_hf.benchmark", "--device", device, "--threads", str(threads)]
    return command + ["--image-size", *map(str, sizes.image), "--batch", str(sizes.batch), "--dtype", sizes.dtype]


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
        f"{model_name}_forward_base": lambda: _backbone_step(model, base, False, sizes.dtype),
        f"{model_name}_forward_4x_pixels": lambda: _backbone_step(model, scaled, False, sizes.dtype),
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
    _backbone_step(model, pixel_values, backward, sizes.dtype)
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


def run(sizes: Sizes, device: str = "cpu", threads: int | None = None, memory: bool = True, log=print) -> dict:
    from vil_kernels import LONGFORMER_IMPLEMENTATIONS

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    results: dict = {
        "setup": {
            "device": device,
            "threads": threads,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "image": list(sizes.image),
            "scaled_image": list(sizes.scaled_image),
            "layer_map": list(sizes.layer_map),
            "repeats": sizes.repeats,
            "warmup": sizes.warmup,
            "dtype": sizes.dtype,
            "batch": sizes.batch,
        }
    }
    log(f"scaling: forward at {sizes.scaled_image[0]}x{sizes.scaled_image[1]} against the base size, per model")
    # First, and each model in a fresh subprocess with its two sizes alternating: the 4x-pixel runs
    # allocate gigabytes, and their page faults became ~25% slower for both models (on this VM) while
    # a parent that had already run the other measurements stayed resident.
    scaling = {}
    for name in ("vil", "swin"):
        scaling.update(measure_scaling(name, sizes, device, threads))
    results["scaling"] = scaling

    vil, swin = build_vil(device=device), build_swin(device=device)
    pixel_values = torch.randn(sizes.batch, 3, *sizes.image, device=device)

    log(f"backbones at {sizes.image[0]}x{sizes.image[1]}: forward and forward+backward, interleaved")
    backbone = time_interleaved(
        {
            "vil_forward": lambda: _backbone_step(vil, pixel_values, False, sizes.dtype),
            "swin_forward": lambda: _backbone_step(swin, pixel_values, False, sizes.dtype),
            "vil_forward_backward": lambda: _backbone_step(vil, pixel_values, True, sizes.dtype),
            "swin_forward_backward": lambda: _backbone_step(swin, pixel_values, True, sizes.dtype),
        },
        sizes.repeats,
        sizes.warmup,
        device,
    )
    results["backbone"] = backbone

    log("Mask R-CNN on two image sizes: each image as alone (pixel_mask) against one padded batch, interleaved")
    results["detection_batch"] = time_interleaved(
        detection_batch_steps(sizes, device), sizes.repeats, sizes.warmup, device
    )

    height, width = sizes.layer_map
    log(f"stage-1 attention layer at {height}x{width}, every implementation")
    hidden_states = torch.randn(1, 1 + height * width, 96, device=device)
    runnable, skipped = {}, {}
    for name in LONGFORMER_IMPLEMENTATIONS:
        if name == "flex" and not device.startswith("cuda"):
            skipped[name] = "CUDA only"
            continue
        torch.manual_seed(0)
        runnable[name] = build_layer(name, device)

    def layer_steps(names):
        return _steps_per_kind(
            names, lambda name, backward: _layer_step(runnable[name], hidden_states, height, width, backward)
        )

    # The reference allocates gigabytes per call; interleaved with the others, the page faults it
    # leaves behind slowed `vectorized` down 2.5x. It is timed in its own group, against `blocked`.
    fast_paths = [name for name in runnable if name != "reference"]
    results["layer"] = time_interleaved(layer_steps(fast_paths), sizes.repeats, sizes.warmup, device)
    results["layer_reference"] = time_interleaved(
        layer_steps(["reference", "blocked"]), sizes.repeats, sizes.warmup, device
    )
    results["layer_skipped"] = skipped

    # The reference (about a minute per round at the stage-1 size) is compared on the layer only.
    log(f"the same layer's attention kernel alone (no projections): {', '.join(fast_paths)}")
    kernel_inputs = _kernel_inputs(height, width, device)
    steps = _steps_per_kind(
        fast_paths, lambda name, backward: _kernel_step(name, kernel_inputs, height, width, backward)
    )
    results["kernel"] = time_interleaved(steps, sizes.repeats, sizes.warmup, device)

    if memory:
        log("peak memory, one subprocess per measurement")
        results["memory"] = {
            f"{model}_{'forward_backward' if backward else 'forward'}": measure_peak_memory(
                model, sizes, backward, device, threads
            )
            for backward in (False, True)
            for model in ("vil", "swin")
        }
    results["ratios"] = ratios(results)
    return results


def ratios(results: dict) -> dict:
    b, s, lay = results["backbone"], results["scaling"], results["layer"]

    def med(table, key):
        return table[key]["median_s"]

    out = {
        "vil_over_swin_forward": med(b, "vil_forward") / med(b, "swin_forward"),
        "vil_over_swin_forward_backward": med(b, "vil_forward_backward") / med(b, "swin_forward_backward"),
        "vil_scaling_4x_pixels": med(s, "vil_forward_4x_pixels") / med(s, "vil_forward_base"),
        "swin_scaling_4x_pixels": med(s, "swin_forward_4x_pixels") / med(s, "swin_forward_base"),
    }
    if "detection_batch" in results:
        d = results["detection_batch"]
        out["detection_each_image_as_alone_over_padded_batch"] = med(d, "each_image_as_alone") / med(d, "padded_batch")
    parts = (("layer", lay), ("layer", results.get("layer_reference", {})), ("kernel", results.get("kernel", {})))
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


def markdown(results: dict) -> str:
    setup, r = results["setup"], results["ratios"]
    b, lay = results["backbone"], results["layer"]
    h, w = setup["image"]
    lines = [
        f"{setup['device']}, {setup['threads']} threads, backbones in {setup['dtype']} at batch {setup['batch']}, "
        f"median of {setup['repeats']} interleaved runs (the layer and kernel: float32, batch 1)",
        "",
        "| measurement | ViL-Small | Swin-T | ratio | target |",
        "|---|---|---|---|---|",
        f"| backbone forward {h}x{w} (no_grad) | {b['vil_forward']['median_s']:.2f} s | "
        f"{b['swin_forward']['median_s']:.2f} s | {r['vil_over_swin_forward']:.2f} | <= 1.0 |",
        f"| backbone forward+backward {h}x{w} | {b['vil_forward_backward']['median_s']:.2f} s | "
        f"{b['swin_forward_backward']['median_s']:.2f} s | {r['vil_over_swin_forward_backward']:.2f} | <= 1.2 |",
    ]
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
    lines += [
        "",
        f"Stage-1 attention layer (map {lh}x{lw}, d 96, 3 heads, window 7, 1 global, relative bias), with projections:",
        "",
        "| implementation | forward | forward+backward |",
        "|---|---|---|",
    ]

    def ms(table, name, kind):
        return f"{table[f'{name}_{kind}']['median_s'] * 1e3:.0f} ms"

    for name in sorted({k.rsplit("_forward", 1)[0] for k in lay}):
        lines.append(f"| {name} | {ms(lay, name, 'forward')} | {ms(lay, name, 'forward_backward')} |")
    own_group = results.get("layer_reference", {})
    if own_group:
        blocked = f"{ms(own_group, 'blocked', 'forward')} / {ms(own_group, 'blocked', 'forward_backward')}"
        lines.append(
            f"| reference (own group, interleaved with blocked: {blocked}) | "
            f"{ms(own_group, 'reference', 'forward')} | {ms(own_group, 'reference', 'forward_backward')} |"
        )
    for name, why in results["layer_skipped"].items():
        lines.append(f"| {name} | not run: {why} | |")
    kernel = results.get("kernel", {})
    if kernel:
        lines += [
            "",
            "The attention kernel alone (same inputs, no projections):",
            "",
            "| implementation | forward | forward+backward |",
            "|---|---|---|",
        ]
        for name in sorted({k.rsplit("_forward", 1)[0] for k in kernel}):
            lines.append(f"| {name} | {ms(kernel, name, 'forward')} | {ms(kernel, name, 'forward_backward')} |")
    lines.append("")
    for key, value in r.items():
        if key.startswith(("layer_", "kernel_")):
            lines.append(f"- {key.replace('_', ' ')}: {value:.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds), for tests")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="backbone input size")
    parser.add_argument("--layer-map", type=int, nargs=2, metavar=("H", "W"), help="stage-1 layer map size")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (>= 3 for the medians)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1, help="backbone batch size (the GPU target uses 2)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="backbone precision (bfloat16: autocast)"
    )
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
            dtype=args.dtype,
        )
        if args.measure_scaling:
            _scaling_child(args.measure_scaling, child_sizes, args.device)
        else:
            _memory_child(args.measure_memory, child_sizes, args.backward, args.device)
        return None

    sizes = replace(QUICK if args.quick else FULL, batch=args.batch, dtype=args.dtype)
    if args.image_size:
        h, w = args.image_size
        sizes = replace(sizes, image=(h, w), scaled_image=(2 * h, 2 * w))
    if args.layer_map:
        sizes = replace(sizes, layer_map=tuple(args.layer_map))
    if args.repeats is not None:
        sizes = replace(sizes, repeats=args.repeats)
    if sizes.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {sizes.repeats}")
    for h, w in (sizes.image, sizes.layer_map):
        if min(h, w) < 32 and (h, w) == sizes.image or min(h, w) < 1:
            parser.error(f"sizes must be positive and images at least 32x32 (four stages of stride 32), got {h}x{w}")

    results = run(sizes, device=args.device, threads=args.threads, memory=not args.no_memory, log=print)
    results["command"] = " ".join(["python scripts/benchmark.py"] + (argv if argv is not None else sys.argv[1:]))
    table = markdown(results)
    results["markdown"] = table
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print()
    print(table)
    print(f"\nresults written to {args.json}")
    return results


if __name__ == "__main__":
    main()
