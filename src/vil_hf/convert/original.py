"""Original ViL checkpoints (classification ``{"net": ...}``, detectron2 ``{"model": ...}``) -> HF folders."""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..configuration_vil import ViLConfig, stage_lists_from_arch
from ..detection import (
    DetectionImageProcessorPil,
    MaskRCNNConfig,
    MaskRCNNForObjectDetection,
    RetinaNetConfig,
    RetinaNetForObjectDetection,
)
from ..image_processing_vil import ViLImageProcessorPil
from ..io_utils import make_temporary_folder
from ..modeling_vil import ViLBackbone, ViLForImageClassification
from .detectron2 import (
    DETECTOR_HEADS,
    DETECTRON2_BACKBONE_PREFIX,
    detectron2_head_sizes,
    detectron2_num_classes,
    map_detectron2_head_keys,
)

logger = logging.getLogger(__name__)

# The original's names of its (hand-written and autograd) longformer implementations.
LONGFORMER_ATTENTION_NAMES = ("longformerhand", "longformerauto", "longformer")
# The original's other --attn-type values, which keep their names here.
ABLATION_ATTENTION_NAMES = ("srformer", "performer", "linformer")
ORIGINAL_ATTENTION_NAMES = LONGFORMER_ATTENTION_NAMES + ABLATION_ATTENTION_NAMES + ("full",)


class ConversionError(ValueError):
    """A checkpoint or an option that cannot be converted; the message says why and what to do."""


@dataclass
class ConversionOptions:
    """The original code's options, under its own names (see ``vil-hf convert --help``)."""

    arch: str | None = None
    attn_type: str = "longformerhand"
    sw_exact: int = 0
    mode: int = 0
    only_glo: bool = False
    avg_pool: bool = False
    img_size: int | None = None
    num_classes: int | None = None
    head: str | None = None
    num_detection_classes: int | None = None


@dataclass
class ConversionReport:
    kind: str
    model_class: str
    num_parameters: int
    folded_global_copies: int = 0
    dropped: list[str] = field(default_factory=list)


def load_original_checkpoint(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor], dict]:
    """Read an original checkpoint safely; returns (kind, state dict without `module.`, the whole file)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"Checkpoint {str(path)!r} does not exist or is not a file.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests weights_only=False, which would run whatever the file holds: it is
        # never repeated; only what the safe unpickler stopped at is.
        text = str(error)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found is not None:
            raise ConversionError(
                f"{str(path)!r} is not a plain tensor checkpoint: besides tensors it holds pickled Python objects "
                f"(e.g. {found.group(1)}), and unpickling those can run arbitrary code, so vil-hf does not load "
                "them. Convert a file that holds only tensors: the original code's released checkpoints are such "
                "files; otherwise ask whoever made this one for its weights alone ({'net': state_dict} or "
                "{'model': state_dict} saved with torch.save)."
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the documentation|$)", text, re.S)
        if detail is None and "weights only load failed" in text.lower():
            detail = re.search(r"trusted source\.\s*(.+?)\s*(?:\n\n|Check the documentation|$)", text, re.S)
        reason = detail.group(1).strip() if detail else text.splitlines()[0]
        if "weights only load failed" in text.lower():
            reason = (
                f"it is not a plain tensor checkpoint that can be read safely; the safe unpickler stopped at: {reason}"
            )
        raise ConversionError(
            f"Could not read {str(path)!r} as a PyTorch checkpoint ({reason}). "
            "Is the file complete, and is it a checkpoint of the original ViL code?"
        ) from None
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ConversionError(
            f"Could not read {str(path)!r} as a PyTorch checkpoint ({type(error).__name__}: {error}). "
            "Is the file complete, and is it a checkpoint of the original ViL code?"
        ) from error
    if not isinstance(checkpoint, dict) or not ({"net", "model"} & set(checkpoint)):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError(
            f"{str(path)!r} is neither an original ViL classification checkpoint ({{'net': state_dict}}) nor a "
            f"detectron2 one ({{'model': state_dict}}); found {found}."
        )
    kind = "classification" if "net" in checkpoint else "detectron2"
    state_dict = checkpoint["net" if kind == "classification" else "model"]
    if not isinstance(state_dict, dict) or not state_dict:
        raise ConversionError(f"The {kind} checkpoint {str(path)!r} holds an empty or malformed state dict.")
    cleaned = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"Entry {key!r} of {str(path)!r} is a {type(value).__name__}, not a tensor.")
        cleaned[key[len("module.") :] if key.startswith("module.") else key] = value
    return kind, cleaned, checkpoint


def _map_block_key(stage: int, rest: str) -> str | None:
    """Map `{sub}.{name}` inside `layer{s}` to our names; None for keys that are skipped (index buffers)."""
    sub, _, name = rest.partition(".")
    base = f"encoder.stages.{stage - 1}"
    if sub == "0":
        embedding_names = {
            "proj.weight": "patch_embeddings.projection.weight",
            "proj.bias": "patch_embeddings.projection.bias",
            "norm_embed.weight": "patch_embeddings.norm.weight",
            "norm_embed.bias": "patch_embeddings.norm.bias",
            "cls_token": "global_tokens",
            "cls_pos_embed": "position_embeddings.global_embeddings",
            "x_pos_embed": "position_embeddings.row_embeddings",
            "y_pos_embed": "position_embeddings.column_embeddings",
        }
        return f"{base}.{embedding_names[name]}" if name in embedding_names else f"{base}.<unknown>.{name}"
    index = int(sub)
    layer = f"{base}.layers.{(index - 1) // 2}"
    if index % 2:  # attention block
        if name.startswith("norm."):
            return f"{layer}.layernorm_before.{name[len('norm.') :]}"
        attn = name[len("attn.") :] if name.startswith("attn.") else f"<unknown>.{name}"
        if attn == "relative_position_index":
            return None
        renames = {
            "local_relative_position_bias_table": "relative_position_bias_table",
            "g2g_relative_position_bias": "global_to_global_bias",
            "proj_sr.weight": "spatial_reduction.weight",  # srformer
            "fast_attention.projection_matrix": "projection_matrix",  # performer
            "proj_k": "key_projection",  # linformer
            "proj_v": "value_projection",
        }
        module, _, param = attn.partition(".")
        module = {"query_global": "global_query", "kv_global": "global_kv", "proj_global": "global_proj"}.get(
            module, module
        )
        attn = renames.get(attn, f"{module}.{param}" if param else module)
        return f"{layer}.attention.{attn}"
    if name.startswith("norm."):
        return f"{layer}.layernorm_after.{name[len('norm.') :]}"
    return f"{layer}.{name}"  # mlp.fc1.*, mlp.fc2.*


def map_original_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an original backbone/classifier state dict to ours (without the `vil.` prefix).

    Returns the renamed tensors and the keys that have no counterpart (reported as unexpected).
    """
    mapped, unknown = {}, []
    for key, value in state_dict.items():
        match = re.fullmatch(r"layer(\d+)\.(\d+\..+)", key)
        if match:
            new_key = _map_block_key(int(match.group(1)), match.group(2))
            if new_key is None:
                continue
            if new_key.endswith("g2l_relative_position_bias"):
                prefix = new_key[: -len("g2l_relative_position_bias")]
                if value.ndim != 3 or value.shape[0] != 2:
                    unknown.append(f"{key} (expected shape (2, heads, globals), got {tuple(value.shape)})")
                    continue
                mapped[prefix + "global_to_local_bias"] = value[0]
                mapped[prefix + "local_to_global_bias"] = value[1]
                continue
            if "<unknown>" in new_key:
                unknown.append(key)
                continue
            mapped[new_key] = value
        elif key.startswith("norm."):
            mapped["layernorm." + key[len("norm.") :]] = value
        elif key.startswith("head."):
            mapped["classifier." + key[len("head.") :]] = value
        elif key == "calls_since_last_redraw":  # the performer model's redraw counter
            mapped["encoder.calls_since_last_redraw"] = value
        else:
            unknown.append(key)
    return mapped, unknown


def fold_global_copies(mapped: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool, int]:
    """Drop `global_*` projections equal to the local ones; keep them all where any differs.

    Returns (state dict, share_global_weights, number of folded tensors).
    """
    global_keys = [k for k in mapped if re.search(r"\.attention\.global_(query|kv|proj)\.", k)]
    differing = [
        k
        for k in global_keys
        if (
            local := k.replace(".global_query.", ".query.")
            .replace(".global_kv.", ".kv.")
            .replace(".global_proj.", ".proj.")
        )
        not in mapped
        or mapped[local].shape != mapped[k].shape
        or not torch.equal(mapped[local], mapped[k])
    ]
    if differing:
        logger.warning(
            "%d global projection tensors differ from their local twins (first: %s); keeping separate global weights.",
            len(differing),
            differing[0],
        )
        return mapped, False, 0
    return {k: v for k, v in mapped.items() if k not in global_keys}, True, len(global_keys)


def fold_shared_linformer_projections(mapped: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Drop linformer value projections when every one equals its key projection (SHARE_KV).

    Returns (state dict, linformer_share_kv).
    """
    value_keys = [k for k in mapped if k.endswith(".attention.value_projection")]
    shared = bool(value_keys) and all(
        torch.equal(mapped[k], mapped.get(k.replace("value_projection", "key_projection"), torch.empty(0)))
        for k in value_keys
    )
    if not shared:
        return mapped, False
    return {k: v for k, v in mapped.items() if k not in value_keys}, True


def attention_type_from_options(options: ConversionOptions) -> str:
    """Our attention_type for the original's --attn-type / --only-glo / --sw-exact / --mode."""
    attn_type = options.attn_type
    if attn_type not in ORIGINAL_ATTENTION_NAMES:
        raise ConversionError(
            f"Unknown --attn-type {attn_type!r}; the original's names are longformerhand (or longformerauto), "
            "srformer, performer, linformer and full."
        )
    longformer = attn_type in LONGFORMER_ATTENTION_NAMES
    if options.only_glo and not longformer:
        raise ConversionError(
            f"--only-glo is an option of the longformer attention (the global-only ablation), but --attn-type is "
            f"{attn_type}, which the original runs without it. Use --attn-type longformerhand --only-glo, or drop --only-glo."
        )
    windowless = "the global-only attention" if options.only_glo else f"--attn-type {attn_type}"
    if options.sw_exact == 1 and (options.only_glo or not longformer):
        raise ConversionError(
            f"--sw-exact 1 selects the longformer's exact window, which {windowless} does not have; drop --sw-exact."
        )
    if options.mode > 0 and (options.only_glo or not longformer):
        raise ConversionError(
            f"--mode {options.mode} is the longformer's random shifting, which {windowless} does not have; drop --mode."
        )
    if options.only_glo:
        return "global"
    return "longformer" if longformer else attn_type


def build_config(options: ConversionOptions, kind: str, checkpoint: dict, state_dict: dict, **overrides) -> ViLConfig:
    if options.sw_exact not in (0, 1):
        raise ConversionError(
            f"--sw-exact {options.sw_exact}: only 0 (sliding chunks) and 1 (exact window) are supported; "
            "-1 (cyclic chunks) has a masking bug in the original and is not offered."
        )
    if options.mode < 0:
        raise ConversionError(f"--mode {options.mode}: use 0 (all nine chunks) or >0 (random shifting in training).")
    attention_type = attention_type_from_options(options)
    arch = options.arch or checkpoint.get("arch")
    if not isinstance(arch, str):
        raise ConversionError(
            "This checkpoint does not record its architecture string; pass it with --arch "
            "(MODEL.TRANSFORMER.MSVIT.ARCH in the original config)."
        )
    try:
        efficient = "longformer" if attention_type == "full" else attention_type
        stages = stage_lists_from_arch(arch, efficient)
        if attention_type == "full":  # the original's attn_type=full makes every stage dense
            stages["attention_types"] = ["full"] * len(stages["depths"])
        return ViLConfig(
            **stages,
            attention_type=efficient,
            exact_window=options.sw_exact == 1,
            random_shift=options.mode > 0,
            average_pool=options.avg_pool,
            patch_embed_norm="layer1.0.norm_embed.weight" in state_dict,
            image_size=options.img_size or (224 if kind == "classification" else 1333),
            **overrides,
        )
    except ValueError as error:
        raise ConversionError(f"Invalid options for this checkpoint: {error}") from error


def _check_and_load(model: torch.nn.Module, mapped: dict[str, torch.Tensor], unknown: list[str], source: str) -> None:
    """Report every missing/unexpected key and shape mismatch at once, then load strictly."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in mapped)
    unexpected = sorted(unknown + [k for k in mapped if k not in expected])
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if k in expected and v.shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the model built from these options:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}):\n    " + "\n    ".join(shown))
        lines.append(
            "Check --arch, --img-size (absolute tables, linformer length), --num-classes, --attn-type and --only-glo "
            "against the original config."
        )
        raise ConversionError("\n".join(lines))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in mapped.items()}, strict=True)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"Output path {str(out_dir)!r} exists and is not a folder; choose another OUT_DIR.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConversionError(
            f"Output folder {str(out_dir)!r} exists and is not empty; pass --overwrite to replace it."
        )


def _write_atomically(out_dir: Path, overwrite: bool, write) -> None:
    """Write into a temporary sibling folder, then rename it into place."""
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temporary_folder(out_dir.parent, f".{out_dir.name}.tmp-")
    try:
        write(staging)
        if out_dir.exists():
            retired = make_temporary_folder(out_dir.parent, f".{out_dir.name}.old-")
            os.replace(out_dir, retired / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _detector_config(head: str, backbone_config: ViLConfig, head_state: dict, options: ConversionOptions):
    """The detector config and its mapped head weights for a detectron2 file."""
    config_class, model_class = (
        (MaskRCNNConfig, MaskRCNNForObjectDetection)
        if head == "mask_rcnn"
        else (RetinaNetConfig, RetinaNetForObjectDetection)
    )
    sizes = detectron2_head_sizes(head_state, head)
    try:
        probe = config_class(backbone_config=backbone_config, **sizes)
    except ValueError as error:
        raise ConversionError(f"--head {head}: the checkpoint's heads do not fit this detector: {error}") from None
    anchors = getattr(probe, "num_anchors_per_location", 1)
    try:
        checkpoint_classes = detectron2_num_classes(head_state, head, anchors)
    except KeyError as error:
        raise ConversionError(
            f"--head {head}: the checkpoint has no {error.args[0]!r}; is it a "
            f"{'RetinaNet' if head == 'retinanet' else 'Mask R-CNN'} checkpoint? Check --head."
        ) from None
    if options.num_detection_classes is not None and options.num_detection_classes != checkpoint_classes:
        raise ConversionError(
            f"--num-detection-classes {options.num_detection_classes} contradicts the checkpoint, whose classifier "
            f"has {checkpoint_classes} object classes (MODEL.ROI_HEADS/RETINANET.NUM_CLASSES); drop the option or "
            "fix it."
        )
    mapped, unknown, _ = map_detectron2_head_keys(head_state, head)
    config = config_class(backbone_config=backbone_config, num_labels=checkpoint_classes, **sizes)
    return model_class, config, mapped, unknown


def convert_checkpoint(
    source: str | os.PathLike, out_dir: str | os.PathLike, options: ConversionOptions, overwrite: bool = False
) -> ConversionReport:
    """Convert an original ViL checkpoint into a folder the Auto classes load.

    A classification file becomes a ViLForImageClassification folder; a detectron2 file a ViLBackbone folder
    (``head="backbone"``) or a whole detector with its image processor (``"mask_rcnn"``, ``"retinanet"``).
    Nothing is left behind on failure.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)  # before the slow part; checked again just before writing
    kind, state_dict, checkpoint = load_original_checkpoint(source)
    dropped: list[str] = []
    head_state: dict[str, torch.Tensor] = {}  # detectron2's FPN and heads, outside the ViL backbone
    if kind == "classification":
        if options.head not in (None, "classification"):
            raise ConversionError(
                f"--head {options.head} applies to detectron2 files; {str(source)!r} is a classification file."
            )
        head = state_dict.get("head.weight")
        checkpoint_classes = int(head.shape[0]) if head is not None else 0
        num_classes = options.num_classes if options.num_classes is not None else checkpoint_classes
        vil_config = build_config(options, kind, checkpoint, state_dict, num_labels=num_classes)
        head_kind = "classification"
    else:
        head_kind = options.head
        if head_kind is None:
            raise ConversionError(
                "This is a detectron2 checkpoint: pass --head mask_rcnn or --head retinanet to convert the whole "
                "detector, or --head backbone to extract the ViL backbone."
            )
        if head_kind not in ("backbone", *DETECTOR_HEADS):
            raise ConversionError(f"--head {head_kind}: choose backbone, mask_rcnn or retinanet for detectron2 files.")
        if head_kind == "backbone" and options.num_detection_classes is not None:
            raise ConversionError("--num-detection-classes applies to whole detectors, not to --head backbone.")
        backbone = {
            k[len(DETECTRON2_BACKBONE_PREFIX) :]: v
            for k, v in state_dict.items()
            if k.startswith(DETECTRON2_BACKBONE_PREFIX)
        }
        if not backbone:
            raise ConversionError(
                f"No '{DETECTRON2_BACKBONE_PREFIX}*' keys in {str(source)!r}: not a ViL detectron2 checkpoint."
            )
        # The original detection backbone still builds the classification norm and head; it never uses them.
        unused = [k for k in backbone if k.startswith(("norm.", "head."))]
        dropped = [DETECTRON2_BACKBONE_PREFIX + k for k in unused]
        head_state = {k: v for k, v in state_dict.items() if not k.startswith(DETECTRON2_BACKBONE_PREFIX)}
        state_dict = {k: v for k, v in backbone.items() if k not in unused}
        vil_config = build_config(options, kind, checkpoint, state_dict)
        if head_kind == "backbone":
            dropped += sorted(head_state)
            head_state = {}
            vil_config.out_features = vil_config.stage_names[1:]  # every stage after the stem

    mapped, unknown = map_original_state_dict(state_dict)
    mapped, vil_config.share_global_weights, folded = fold_global_copies(mapped)
    mapped, vil_config.linformer_share_kv = fold_shared_linformer_projections(mapped)
    if head_kind == "classification":
        model_class, config = ViLForImageClassification, vil_config
        mapped = {(k if k.startswith("classifier.") else "vil." + k): v for k, v in mapped.items()}
    elif head_kind == "backbone":
        model_class, config = ViLBackbone, vil_config
    else:
        model_class, config, head_mapped, head_unknown = _detector_config(head_kind, vil_config, head_state, options)
        mapped = {"backbone." + k: v for k, v in mapped.items()} | head_mapped
        unknown = unknown + head_unknown
    model = model_class(config).eval()
    _check_and_load(model, mapped, unknown, f"{kind} checkpoint {str(source)!r}")

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if kind == "classification":
            ViLImageProcessorPil().save_pretrained(folder)
        elif head_kind in DETECTOR_HEADS:
            DetectionImageProcessorPil().save_pretrained(folder)

    _write_atomically(out_dir, overwrite, write)
    return ConversionReport(
        kind=kind,
        model_class=model_class.__name__,
        num_parameters=sum(p.numel() for p in model.parameters()),
        folded_global_copies=folded,
        dropped=dropped,
    )
