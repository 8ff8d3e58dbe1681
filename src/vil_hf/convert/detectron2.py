"""detectron2 detector keys (FPN, RPN, RoI heads, RetinaNet head) -> our detector's keys."""

from __future__ import annotations

import re

import torch

DETECTRON2_BACKBONE_PREFIX = "backbone.bottom_up."
DETECTOR_HEADS = ("mask_rcnn", "retinanet")

# Buffers that some detectron2 versions save and that our models rebuild from the config.
_REBUILT_BUFFERS = re.compile(r"^(pixel_mean|pixel_std|.*anchor_generator\.cell_anchors\.\d+)$")

_MASK_RCNN_RULES = [
    (
        re.compile(r"^proposal_generator\.rpn_head\.(conv|objectness_logits|anchor_deltas)\.(weight|bias)$"),
        lambda m: f"rpn.head.{m[1]}.{m[2]}",
    ),
    (
        re.compile(r"^roi_heads\.box_head\.fc(\d+)\.(weight|bias)$"),
        lambda m: f"roi_heads.box_head.fcs.{int(m[1]) - 1}.{m[2]}",
    ),
    (
        re.compile(r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$"),
        lambda m: f"roi_heads.box_predictor.{m[1]}.{m[2]}",
    ),
    (
        re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_head.convs.{int(m[1]) - 1}.{m[2]}",
    ),
    (
        re.compile(r"^roi_heads\.mask_head\.(deconv|predictor)\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_head.{m[1]}.{m[2]}",
    ),
]

_RETINANET_RULES = [
    # detectron2's subnets are Sequential(conv, ReLU, conv, ReLU, ...): convs sit at even indices.
    (
        re.compile(r"^head\.(cls|bbox)_subnet\.(\d+)\.(weight|bias)$"),
        lambda m: f"detector.head.{m[1]}_convs.{int(m[2]) // 2}.{m[3]}",
    ),
    (re.compile(r"^head\.(cls_score|bbox_pred)\.(weight|bias)$"), lambda m: f"detector.head.{m[1]}.{m[2]}"),
]

_FPN_RULES = [
    (re.compile(r"^backbone\.top_block\.(p6|p7)\.(weight|bias)$"), lambda m: f"fpn.top_block.{m[1]}.{m[2]}"),
]
_FPN_LEVEL = re.compile(r"^backbone\.fpn_(lateral|output)(\d+)\.(weight|bias)$")


def map_detectron2_head_keys(
    state_dict: dict[str, torch.Tensor], head: str
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Map everything but the backbone; returns (mapped, keys we cannot place, buffers deliberately skipped)."""
    rules = _FPN_RULES + (_MASK_RCNN_RULES if head == "mask_rcnn" else _RETINANET_RULES)
    levels = sorted({int(m[2]) for key in state_dict if (m := _FPN_LEVEL.match(key))})
    mapped, unknown, skipped = {}, [], []
    for key, value in state_dict.items():
        if key.startswith(DETECTRON2_BACKBONE_PREFIX):
            continue
        if _REBUILT_BUFFERS.match(key):
            skipped.append(key)
            continue
        if match := _FPN_LEVEL.match(key):
            # fpn_lateral{L}: L is log2 of the stride; ours are indexed from the finest level used.
            kind = "lateral_convs" if match[1] == "lateral" else "output_convs"
            mapped[f"fpn.{kind}.{levels.index(int(match[2]))}.{match[3]}"] = value
            continue
        for pattern, rename in rules:
            if match := pattern.match(key):
                mapped[rename(match)] = value
                break
        else:
            unknown.append(key)
    return mapped, unknown, skipped


def detectron2_num_classes(state_dict: dict[str, torch.Tensor], head: str, anchors_per_location: int) -> int:
    """The object class count a detectron2 checkpoint was trained with."""
    if head == "mask_rcnn":
        weight = state_dict.get("roi_heads.box_predictor.cls_score.weight")
        if weight is None:
            raise KeyError("roi_heads.box_predictor.cls_score.weight")
        return int(weight.shape[0]) - 1  # background is the last row
    weight = state_dict.get("head.cls_score.weight")
    if weight is None:
        raise KeyError("head.cls_score.weight")
    return int(weight.shape[0]) // anchors_per_location


def detectron2_head_sizes(state_dict: dict[str, torch.Tensor], head: str) -> dict[str, int]:
    """Widths and depths of the FPN and heads, read off the weights (detectron2 configs may change them)."""
    sizes: dict[str, int] = {}
    laterals = sorted(k for k in state_dict if re.match(r"^backbone\.fpn_lateral\d+\.weight$", k))
    if laterals:
        sizes["fpn_channels"] = int(state_dict[laterals[0]].shape[0])
    if head == "mask_rcnn":
        fcs = sorted(k for k in state_dict if re.match(r"^roi_heads\.box_head\.fc\d+\.weight$", k))
        if fcs:
            sizes["box_head_fc_layers"] = len(fcs)
            fc1 = state_dict["roi_heads.box_head.fc1.weight"]
            sizes["box_head_fc_dim"] = int(fc1.shape[0])
            if "fpn_channels" in sizes:
                sizes["box_pooler_resolution"] = round((fc1.shape[1] / sizes["fpn_channels"]) ** 0.5)
        convs = [k for k in state_dict if re.match(r"^roi_heads\.mask_head\.mask_fcn\d+\.weight$", k)]
        if convs:
            sizes["mask_head_conv_layers"] = len(convs)
            sizes["mask_head_conv_dim"] = int(state_dict["roi_heads.mask_head.mask_fcn1.weight"].shape[0])
        elif "roi_heads.mask_head.predictor.weight" not in state_dict:
            sizes["mask_on"] = False
        rpn_conv = state_dict.get("proposal_generator.rpn_head.conv.weight")
        if rpn_conv is not None:
            sizes["rpn_conv_channels"] = int(rpn_conv.shape[0])
    else:
        convs = [k for k in state_dict if re.match(r"^head\.cls_subnet\.\d+\.weight$", k)]
        sizes["head_conv_layers"] = len(convs)
    return sizes
