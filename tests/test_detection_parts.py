"""Each detection part against a plain computation of what it should do."""

import math

import pytest
import torch
import torch.nn.functional as F

from vil_hf.detection.anchors import AnchorGenerator
from vil_hf.detection.box_coder import BoxCoder
from vil_hf.detection.fpn import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7
from vil_hf.detection.losses import sigmoid_focal_loss, smooth_l1_loss
from vil_hf.detection.matcher import Matcher, sample_labels
from vil_hf.detection.pooler import MultiScaleRoIAlign, assign_boxes_to_levels
from vil_hf.detection.retinanet import RetinaNetHead
from vil_hf.detection.rpn import RPNHead
from vil_kernels.ops import roi_align


def random_boxes(n, size=100.0, generator=None):
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 2 + 1
    return torch.cat((xy, xy + wh), dim=1)


# ----------------------------------------------------------------------------------------------- box coder
def test_box_coder_known_deltas_and_round_trip():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    reference = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    target = torch.tensor([[5.0, 5.0, 25.0, 25.0]])
    deltas = coder.encode(reference, target)
    # centres (5, 10) -> (15, 15); sizes (10, 20) -> (20, 20)
    expected = torch.tensor([[10 * 10 / 10, 10 * 5 / 20, 5 * math.log(2.0), 5 * math.log(1.0)]])
    torch.testing.assert_close(deltas, expected)
    generator = torch.Generator().manual_seed(0)
    references, targets = random_boxes(50, generator=generator), random_boxes(50, generator=generator)
    torch.testing.assert_close(coder.decode(coder.encode(references, targets), references), targets, atol=1e-4, rtol=0)


def test_box_coder_decodes_several_boxes_per_reference_and_clamps_scale():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0), scale_clamp=math.log(4.0))
    reference = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 100.0, 100.0]])  # two classes
    boxes = coder.decode(deltas, reference)
    assert boxes.shape == (1, 8)
    torch.testing.assert_close(boxes[0, :4], reference[0])
    # dw, dh clamped at log 4: a 40 x 40 box around the centre shifted by 0.1 * 10 in x
    torch.testing.assert_close(boxes[0, 4:], torch.tensor([6.0 - 20.0, 5.0 - 20.0, 6.0 + 20.0, 5.0 + 20.0]))


# ------------------------------------------------------------------------------------------------- anchors
def test_anchor_generator_layout_sizes_and_ratios():
    generator = AnchorGenerator([[32.0], [64.0, 80.0]], [0.5, 1.0, 2.0])
    features = [torch.zeros(1, 1, 3, 5), torch.zeros(1, 1, 2, 3)]
    anchors = generator(features, [8, 16])
    assert [a.shape for a in anchors] == [(3 * 5 * 3, 4), (2 * 3 * 6, 4)]
    level0 = anchors[0].view(3, 5, 3, 4)
    widths, heights = level0[..., 2] - level0[..., 0], level0[..., 3] - level0[..., 1]
    torch.testing.assert_close(widths * heights, torch.full_like(widths, 32.0**2))
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 1.0, 2.0]).expand_as(widths))
    centres = (level0[..., :2] + level0[..., 2:]) / 2
    torch.testing.assert_close(centres[1, 2, 0], torch.tensor([2 * 8.0, 1 * 8.0]))  # (x, y) of row 1, column 2
    level1 = anchors[1].view(2, 3, 6, 4)
    sizes = ((level1[0, 0, :, 2] - level1[0, 0, :, 0]) * (level1[0, 0, :, 3] - level1[0, 0, :, 1])).sqrt()
    torch.testing.assert_close(sizes, torch.tensor([64.0] * 3 + [80.0] * 3))  # size-major, then ratio


# ------------------------------------------------------------------------------------------------- matcher
def test_matcher_bands_and_low_quality_matches():
    quality = torch.tensor(
        [
            [0.9, 0.5, 0.1, 0.2, 0.0],
            [0.1, 0.6, 0.25, 0.1, 0.0],
        ]
    )
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1])(quality)
    assert matches.tolist() == [0, 1, 1, 0, 0]
    assert labels.tolist() == [1, -1, 0, 0, 0]
    _, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(quality)
    assert labels.tolist() == [1, 1, 0, 0, 0]  # prediction 1 is ground truth 1's best match
    matches, labels = Matcher([0.5], [0, 1])(torch.zeros(0, 4))
    assert matches.tolist() == [0, 0, 0, 0] and labels.tolist() == [0, 0, 0, 0]


def test_sample_labels_respects_fraction_and_ignores():
    torch.manual_seed(0)
    labels = torch.tensor([1] * 30 + [0] * 100 + [-1] * 50)
    positive, negative = sample_labels(labels, num_samples=64, positive_fraction=0.25, background_label=0)
    assert len(positive) == 16 and len(negative) == 48
    assert (labels[positive] == 1).all() and (labels[negative] == 0).all()
    assert len(set(positive.tolist())) == 16
    positive, negative = sample_labels(torch.tensor([1, 1, 0, -1]), 64, 0.5, background_label=0)
    assert len(positive) == 2 and len(negative) == 1  # background fills in, up to what exists


# ----------------------------------------------------------------------------------------------------- FPN
def _identity_fpn(channels, top_block):
    fpn = FeaturePyramidNetwork([channels] * 3, channels, top_block)
    with torch.no_grad():
        for conv in fpn.lateral_convs:
            conv.weight.copy_(torch.eye(channels)[:, :, None, None])
            conv.bias.zero_()
        for conv in fpn.output_convs:
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = torch.eye(channels)
            conv.bias.zero_()
    return fpn


def test_fpn_top_down_sums_and_max_pool_level():
    fpn = _identity_fpn(4, LastLevelMaxPool())
    c3, c4, c5 = torch.randn(1, 4, 16, 20), torch.randn(1, 4, 8, 10), torch.randn(1, 4, 4, 5)
    p3, p4, p5, p6 = fpn([c3, c4, c5])
    up = lambda x: x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # noqa: E731
    torch.testing.assert_close(p5, c5)
    torch.testing.assert_close(p4, c4 + up(c5))
    torch.testing.assert_close(p3, c3 + up(c4 + up(c5)))
    torch.testing.assert_close(p6, p5[:, :, ::2, ::2])


def test_retinanet_top_block_reads_the_raw_backbone_map():
    top = LastLevelP6P7(in_channels=4, out_channels=4)
    fpn = _identity_fpn(4, top)
    features = [torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    pyramid = fpn(features)
    assert [p.shape[-1] for p in pyramid] == [16, 8, 4, 2, 1]
    torch.testing.assert_close(pyramid[3], top.p6(features[2]))
    torch.testing.assert_close(pyramid[4], top.p7(F.relu(pyramid[3])))


def test_fpn_and_mask_head_run_channels_last_with_the_nchw_numbers():
    """On CPU the pyramid and the mask head take oneDNN's channels-last convolutions whatever layout the backbone
    gives: their outputs are channels-last and equal, to float32 rounding, the plain NCHW convolutions."""
    from vil_hf.detection.roi_heads import MaskHead

    torch.manual_seed(0)
    fpn = FeaturePyramidNetwork([3, 5, 6], 4, LastLevelMaxPool())
    features = [torch.randn(2, 3, 14, 18), torch.randn(2, 5, 7, 9), torch.randn(2, 6, 4, 5)]  # NCHW, as most give
    pyramid = fpn(features)
    assert all(level.is_contiguous(memory_format=torch.channels_last) for level in pyramid[:3])
    top_down, expected = None, []
    for feature, lateral, output in zip(features[::-1], fpn.lateral_convs[::-1], fpn.output_convs[::-1]):
        top_down_here = F.conv2d(feature.contiguous(), lateral.weight, lateral.bias)
        if top_down is not None:
            top_down_here = top_down_here + F.interpolate(top_down, size=feature.shape[-2:], mode="nearest")
        top_down = top_down_here
        expected.insert(0, F.conv2d(top_down, output.weight, output.bias, padding=1))
    for actual, wanted in zip(pyramid, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)

    head = MaskHead(in_channels=4, num_convs=2, conv_dim=6, num_labels=3)
    pooled = torch.randn(5, 4, 7, 7, requires_grad=True)
    logits = head(pooled)
    assert logits.shape == (5, 3, 14, 14) and logits.is_contiguous(memory_format=torch.channels_last)
    hidden = pooled
    for conv in head.convs:
        hidden = F.relu(F.conv2d(hidden, conv.weight, conv.bias, padding=1))
    hidden = F.relu(F.conv_transpose2d(hidden, head.deconv.weight, head.deconv.bias, stride=2))
    wanted = F.conv2d(hidden, head.predictor.weight, head.predictor.bias)
    torch.testing.assert_close(logits, wanted, rtol=1e-5, atol=1e-5)
    grad_output = torch.randn_like(wanted)
    (actual_grad,) = torch.autograd.grad(logits, pooled, grad_output)
    (wanted_grad,) = torch.autograd.grad(wanted, pooled, grad_output)
    torch.testing.assert_close(actual_grad, wanted_grad, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------------- pooler
def test_level_assignment_follows_the_fpn_rule():
    sizes = torch.tensor([10.0, 111.0, 112.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack((torch.zeros(7), torch.zeros(7), sizes, sizes), dim=1)
    levels = assign_boxes_to_levels(boxes, min_level=2, max_level=5, canonical_box_size=224, canonical_level=4)
    assert levels.tolist() == [0, 0, 1, 2, 2, 3, 3]


def test_multiscale_roi_align_pools_each_box_from_its_level_in_order():
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 3, 64 // s, 64 // s, generator=generator) for s in (1, 2, 4, 8)]
    strides = [4, 8, 16, 32]
    boxes = [random_boxes(5, 256.0, generator) * 1.0, random_boxes(3, 256.0, generator)]
    pooler = MultiScaleRoIAlign(output_size=7, sampling_ratio=0)
    pooled = pooler(features, strides, boxes)
    assert pooled.shape == (8, 3, 7, 7)
    all_boxes = torch.cat(boxes)
    levels = assign_boxes_to_levels(all_boxes, 2, 5, 224, 4)
    image_index = torch.tensor([0] * 5 + [1] * 3, dtype=torch.float32)
    for row, (box, level, image) in enumerate(zip(all_boxes, levels, image_index)):
        roi = torch.cat((image[None], box))[None]
        expected = roi_align(features[level], roi, 7, 1.0 / strides[level], 0, aligned=True)
        torch.testing.assert_close(pooled[row : row + 1], expected)


# -------------------------------------------------------------------------------------------------- losses
def test_losses_against_plain_formulas():
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, generator=generator), torch.randn(40, generator=generator)
    torch.testing.assert_close(smooth_l1_loss(x, y, 0.0), (x - y).abs().sum())
    torch.testing.assert_close(smooth_l1_loss(x, y, 0.5), F.smooth_l1_loss(x, y, beta=0.5, reduction="sum"))
    targets = (torch.rand(40, generator=generator) > 0.7).float()
    bce = F.binary_cross_entropy_with_logits(x, targets, reduction="sum")
    torch.testing.assert_close(sigmoid_focal_loss(x, targets, alpha=-1, gamma=0.0), bce)
    p = torch.sigmoid(x)
    p_t = torch.where(targets > 0, p, 1 - p)
    alpha_t = torch.where(targets > 0, torch.tensor(0.25), torch.tensor(0.75))
    expected = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).sum()
    torch.testing.assert_close(sigmoid_focal_loss(x, targets, 0.25, 2.0), expected)


# ----------------------------------------------------------------------------------------------- head layout
@pytest.mark.parametrize("head_kind", ["rpn", "retinanet"])
def test_head_outputs_are_location_major_like_the_anchors(head_kind):
    torch.manual_seed(3)
    num_anchors, num_labels = 3, 2
    if head_kind == "rpn":
        head = RPNHead(8, num_anchors)
        raw = lambda f: head.objectness_logits(F.relu(head.conv(f)))  # noqa: E731
        columns = 1
    else:
        head = RetinaNetHead(8, num_anchors, num_labels, num_convs=1)
        raw = lambda f: head.cls_score(F.relu(head.cls_convs[0](f)))  # noqa: E731
        columns = num_labels
    feature = torch.randn(2, 8, 3, 5)
    logits, _ = head([feature])
    grid = raw(feature)  # (N, A*k, H, W)
    logits = logits[0].reshape(2, 3, 5, num_anchors, columns)
    for y, x, a, k in [(0, 0, 0, 0), (2, 4, 2, columns - 1), (1, 3, 1, 0)]:
        torch.testing.assert_close(logits[1, y, x, a, k], grid[1, a * columns + k, y, x])
