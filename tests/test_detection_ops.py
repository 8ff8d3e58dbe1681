"""vil_kernels.ops: box IoU, NMS and RoIAlign against stored torchvision outputs and plain loop references."""

import importlib
import json
import math

import numpy as np
import pytest
import torch

from vil_kernels.ops import (
    batched_nms,
    box_area,
    box_iou,
    nms,
    nms_blocked,
    nms_greedy,
    nms_native,
    roi_align,
    roi_align_gather,
    roi_align_maps,
)

from .test_native import HAS_COMPILER, needs_compiler

roi_align_module = importlib.import_module("vil_kernels.ops.roi_align")

ROI_ALIGN_IMPLEMENTATIONS = {
    "embedding_bag": lambda *args, **kwargs: roi_align(*args, **kwargs, implementation="embedding_bag"),
    "gather": roi_align_gather,
    "gather_bucketed": lambda *args, **kwargs: roi_align_gather(*args, bucketed=True, **kwargs),
}
# the C++ kernel (vil_kernels.native) where a compiler builds it, as in CI; its own tests below say when it cannot
if HAS_COMPILER:
    ROI_ALIGN_IMPLEMENTATIONS["native"] = lambda *args, **kwargs: roi_align(*args, **kwargs, implementation="native")
# roi_align_maps' implementations (gather is the plain reference)
MAPS_IMPLEMENTATIONS = ["embedding_bag", "gather"] + (["native"] if HAS_COMPILER else [])
# NMS's fast paths, each held to nms_greedy and the loop below
FAST_NMS = [nms_blocked] + ([nms_native] if HAS_COMPILER else [])


@pytest.fixture(autouse=True)
def _native_kernels_required(monkeypatch):
    """Where a compiler is, the C++ paths above must build (``VIL_KERNELS_NATIVE=1``) whatever the caller's
    environment says: the PyTorch paths are tested by name, and the tests of ``auto`` set it themselves."""
    if HAS_COMPILER:
        monkeypatch.setenv("VIL_KERNELS_NATIVE", "1")


@pytest.fixture(scope="module")
def tv(fixtures_dir):
    from safetensors.torch import load_file

    folder = fixtures_dir / "torchvision_ops"
    if not (folder / "reference.safetensors").is_file():
        pytest.skip(f"torchvision_ops fixtures not found in {folder}")
    meta = json.loads((folder / "meta.json").read_text())
    return meta, load_file(str(folder / "reference.safetensors"))


# --- plain references, written for clarity, not speed ---------------------------------------------------


def nms_loop(boxes, scores, threshold, idxs=None):
    """O(n^2) greedy NMS on float32 scalars, the arithmetic order of torchvision's CPU kernel."""
    b = boxes.numpy().astype(np.float32)
    s = scores.tolist()
    cls = None if idxs is None else idxs.tolist()
    order = sorted(range(len(s)), key=lambda i: -s[i])  # Python's sort is stable
    area = [(r[2] - r[0]) * (r[3] - r[1]) for r in b]
    suppressed = [False] * len(s)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[pos + 1 :]:
            if suppressed[j] or (cls is not None and cls[i] != cls[j]):
                continue
            w = max(np.float32(0), min(b[i][2], b[j][2]) - max(b[i][0], b[j][0]))
            h = max(np.float32(0), min(b[i][3], b[j][3]) - max(b[i][1], b[j][1]))
            inter = w * h
            if float(inter / (area[i] + area[j] - inter)) > threshold:
                suppressed[j] = True
    return torch.tensor(keep, dtype=torch.long)


def _bilinear(image, y, x):
    """One sample of image (C, H, W) with torchvision's boundary rules."""
    height, width = image.shape[1:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(image.shape[0], dtype=image.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * image[:, y0, x0]
        + hy * lx * image[:, y0, x1]
        + ly * hx * image[:, y1, x0]
        + ly * lx * image[:, y1, x1]
    )


def roi_align_loop(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """Per RoI, per bin, per sample point: RoIAlign as the reference kernel states it."""
    out_h, out_w = output_size
    out = features.new_zeros(rois.shape[0], features.shape[1], out_h, out_w)
    offset = 0.5 if aligned else 0.0
    for k, (batch, x1, y1, x2, y2) in enumerate(rois.tolist()):
        start_x, start_y = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w = x2 * spatial_scale - offset - start_x
        roi_h = y2 * spatial_scale - offset - start_y
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        count = max(grid_h * grid_w, 1)
        image = features[int(batch)]
        for ph in range(out_h):
            for pw in range(out_w):
                total = torch.zeros(features.shape[1], dtype=features.dtype)
                for iy in range(grid_h):
                    y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_x + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        total = total + _bilinear(image, y, x)
                out[k, :, ph, pw] = total / count
    return out


def _random_boxes(n, generator, size=100.0, max_side=40.0, dtype=torch.float32):
    xy = torch.rand(n, 2, generator=generator, dtype=dtype) * size
    wh = torch.rand(n, 2, generator=generator, dtype=dtype) * max_side
    return torch.cat([xy, xy + wh], dim=1)


def _random_rois(n, generator, num_images, height, width, spatial_scale, dtype):
    """Boxes in image coordinates: mostly inside, some hanging off any edge, some tiny or reversed."""
    span_x, span_y = width / spatial_scale, height / spatial_scale
    x1 = torch.rand(n, generator=generator, dtype=dtype) * span_x * 1.4 - 0.2 * span_x
    y1 = torch.rand(n, generator=generator, dtype=dtype) * span_y * 1.4 - 0.2 * span_y
    w = torch.rand(n, generator=generator, dtype=dtype) * span_x * 0.8
    h = torch.rand(n, generator=generator, dtype=dtype) * span_y * 0.8
    w[::5] = 0.3 / spatial_scale  # smaller than a feature pixel
    h[1::7] = -0.2 / spatial_scale  # reversed: aligned=True gives it no samples
    batch = torch.randint(0, num_images, (n,), generator=generator).to(dtype)
    return torch.stack([batch, x1, y1, x1 + w, y1 + h], dim=1)


# --- stored torchvision outputs --------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.5, 0.7])
@pytest.mark.parametrize("implementation", [nms, nms_greedy, *FAST_NMS])
def test_nms_matches_torchvision(tv, implementation, threshold):
    _, ref = tv
    keep = implementation(ref["nms.boxes"], ref["nms.scores"], threshold)
    assert keep.dtype == torch.long
    assert torch.equal(keep, ref[f"nms.keep_iou{threshold}"])


def test_nms_fixture_has_a_score_tie_kept_in_input_order(tv):
    # the tie is what pins the stable sort: both boxes survive at 0.7 and torchvision lists the lower index first
    _, ref = tv
    values, counts = ref["nms.scores"].unique(return_counts=True)
    tied = (ref["nms.scores"] == values[counts > 1][0]).nonzero()[:, 0].tolist()
    keep = ref["nms.keep_iou0.7"].tolist()
    assert [keep.index(i) for i in tied] == [keep.index(tied[0]), keep.index(tied[0]) + 1]


def test_batched_nms_matches_torchvision(tv):
    _, ref = tv
    keep = batched_nms(ref["nms.boxes"], ref["nms.scores"], ref["nms.classes"], 0.5)
    assert torch.equal(keep, ref["batched_nms.keep_iou0.5"])


def test_box_iou_matches_torchvision(tv):
    _, ref = tv
    torch.testing.assert_close(box_iou(ref["box_iou.a"], ref["box_iou.b"]), ref["box_iou.iou"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("implementation", sorted(ROI_ALIGN_IMPLEMENTATIONS))
def test_roi_align_matches_torchvision(tv, implementation):
    meta, ref = tv
    fn = ROI_ALIGN_IMPLEMENTATIONS[implementation]
    features, rois = ref["roi_align.features"], ref["roi_align.rois"]
    cases = [name for name in meta["tensors"] if name.startswith("roi_align.out_")]
    assert len(cases) == 8
    for name in cases:
        scale, ratio, size = name.removeprefix("roi_align.out_").split("_")
        out = fn(features, rois, int(size[1:]), float(scale[1:]), int(ratio[2:]), aligned=True)
        torch.testing.assert_close(out, ref[name], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


# --- NMS against the plain loop --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_against_loop_with_duplicate_scores(seed, threshold):
    generator = torch.Generator().manual_seed(seed)
    boxes = _random_boxes(150, generator, size=80.0)
    # few distinct scores: many ties, broken by input order
    scores = torch.randint(0, 20, (150,), generator=generator).float() / 20
    expected = nms_loop(boxes, scores, threshold)
    assert torch.equal(nms_greedy(boxes, scores, threshold), expected)
    assert torch.equal(nms(boxes, scores, threshold), expected)
    for block_size in (1, 7, 64, 1000):
        assert torch.equal(nms_blocked(boxes, scores, threshold, block_size=block_size), expected)
    for fast in FAST_NMS:
        assert torch.equal(fast(boxes, scores, threshold), expected)
        assert torch.equal(fast(boxes.double(), scores, threshold), nms_loop(boxes.double(), scores, threshold))


def test_nms_fast_path_against_plain_on_many_boxes():
    generator = torch.Generator().manual_seed(3)
    boxes = _random_boxes(1200, generator, size=400.0, max_side=120.0)
    scores = torch.rand(1200, generator=generator)
    scores[::3] = scores[1::3]  # ties across blocks
    classes = torch.randint(0, 5, (1200,), generator=generator)
    for threshold in (0.5, 0.7):
        plain = nms_greedy(boxes, scores, threshold)
        assert torch.equal(nms_blocked(boxes, scores, threshold, block_size=100), plain)  # many blocks
        assert torch.equal(nms(boxes, scores, threshold), plain)
        for fast in FAST_NMS:
            assert torch.equal(fast(boxes, scores, threshold), plain)
    per_class = nms_greedy(boxes, scores, 0.5, idxs=classes)
    assert torch.equal(batched_nms(boxes, scores, classes, 0.5), per_class)
    for fast in FAST_NMS:
        assert torch.equal(fast(boxes, scores, 0.5, idxs=classes), per_class)


def test_nms_max_kept_is_the_first_kept_of_the_plain_nms():
    # The early stop (RPN post-NMS top-k) must give exactly the plain result's prefix: per category and not,
    # with quotas that end inside a block, on a block boundary, past the end, and zero.
    generator = torch.Generator().manual_seed(5)
    boxes = _random_boxes(700, generator, size=300.0, max_side=120.0)
    scores = torch.rand(700, generator=generator)
    scores[::4] = scores[2::4]  # ties across blocks
    classes = torch.randint(0, 4, (700,), generator=generator)
    for idxs in (None, classes):
        plain = nms_greedy(boxes, scores, 0.6, idxs=idxs)
        assert 100 < plain.numel() < 700
        for max_kept in (0, 1, 37, 64, 100, plain.numel(), 10_000):
            for block_size in (16, 64, 256):
                fast = nms_blocked(boxes, scores, 0.6, idxs=idxs, block_size=block_size, max_kept=max_kept)
                assert torch.equal(fast, plain[:max_kept]), (max_kept, block_size)
            if HAS_COMPILER:
                assert torch.equal(nms_native(boxes, scores, 0.6, idxs=idxs, max_kept=max_kept), plain[:max_kept])
    expected = nms_greedy(boxes, scores, 0.6, classes)[:50]
    assert torch.equal(batched_nms(boxes, scores, classes, 0.6, max_kept=50), expected)
    for fast in FAST_NMS:
        with pytest.raises(ValueError, match="max_kept"):
            fast(boxes, scores, 0.6, max_kept=-1)


def test_nms_long_suppression_chain_inside_one_block():
    # box i overlaps only its neighbours: greedy keeps every other box, a chain as deep as the block
    x = torch.arange(40, dtype=torch.float32) * 0.3
    boxes = torch.stack([x, torch.zeros(40), x + 1.0, torch.ones(40)], dim=1)
    scores = torch.linspace(1.0, 0.1, 40)
    expected = nms_loop(boxes, scores, 0.5)
    assert torch.equal(expected, torch.arange(0, 40, 2))
    assert torch.equal(nms_blocked(boxes, scores, 0.5, block_size=64), expected)
    for fast in FAST_NMS:
        assert torch.equal(fast(boxes, scores, 0.5), expected)


def test_batched_nms_is_nms_per_category():
    generator = torch.Generator().manual_seed(4)
    boxes = _random_boxes(300, generator)
    scores = torch.randint(0, 30, (300,), generator=generator).float()
    classes = torch.randint(0, 4, (300,), generator=generator)
    kept = []
    for c in classes.unique():
        members = (classes == c).nonzero()[:, 0]
        kept.append(members[nms_loop(boxes[members], scores[members], 0.5)])
    kept = torch.cat(kept).sort().values
    expected = kept[torch.sort(scores[kept], descending=True, stable=True).indices]
    assert torch.equal(batched_nms(boxes, scores, classes, 0.5), expected)
    assert torch.equal(nms_loop(boxes, scores, 0.5, idxs=classes), expected)


def test_nms_threshold_compared_in_double_like_torchvision():
    # IoU = 30/100 is float32(0.3), which lies above 0.3: torchvision suppresses; a float32 compare would not
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 3.0]])
    scores = torch.tensor([0.9, 0.8])
    for implementation in (nms, nms_greedy, *FAST_NMS):
        assert implementation(boxes, scores, 0.3).tolist() == [0]
        assert implementation(boxes.double(), scores, 0.3).tolist() == [0, 1]  # in float64 the IoU is 0.3: not above
    # IoU exactly 0.5 is not > 0.5: both stay
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])
    for implementation in (nms, nms_greedy, *FAST_NMS):
        assert implementation(boxes, scores, 0.5).tolist() == [0, 1]
        assert implementation(boxes.double(), scores.double(), 0.5).tolist() == [0, 1]


@needs_compiler
def test_nms_takes_the_native_loop_where_it_runs(monkeypatch):
    nms_module = importlib.import_module("vil_kernels.ops.nms")
    generator = torch.Generator().manual_seed(6)
    boxes = _random_boxes(300, generator, size=200.0, max_side=80.0)
    scores = torch.rand(300, generator=generator)
    classes = torch.randint(0, 3, (300,), generator=generator)
    taken = []
    for name in ("nms_native", "nms_blocked"):
        real = getattr(nms_module, name)
        monkeypatch.setattr(nms_module, name, lambda *a, real=real, name=name, **k: taken.append(name) or real(*a, **k))
    monkeypatch.setenv("VIL_KERNELS_NATIVE", "auto")
    expected = nms_greedy(boxes, scores, 0.5, idxs=classes)
    assert torch.equal(batched_nms(boxes, scores, classes, 0.5), expected)
    assert torch.equal(nms(boxes.int(), scores, 0.5), nms_greedy(boxes.int(), scores, 0.5))  # integer boxes: float32
    assert taken == ["nms_native", "nms_native"]
    monkeypatch.setenv("VIL_KERNELS_NATIVE", "0")  # the C++ kernels off: the blocked PyTorch loop, same result
    assert torch.equal(batched_nms(boxes, scores, classes, 0.5), expected)
    assert taken[-1] == "nms_blocked"
    with pytest.raises(ValueError, match="nms_native runs on CPU boxes where vil_kernels' C\\+\\+ kernels build"):
        nms_native(boxes, scores, 0.5)
    monkeypatch.setenv("VIL_KERNELS_NATIVE", "1")
    ops = nms_module.native_ops()
    coords, area = boxes.t().contiguous(), (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    with pytest.raises(RuntimeError, match="coords must be a contiguous \\(4, N\\)"):
        ops.nms_sorted(boxes, area, None, 0.5, 10)
    with pytest.raises(RuntimeError, match="category must be a contiguous \\(300,\\) int64"):
        ops.nms_sorted(coords, area, classes.int(), 0.5, 10)


def test_box_iou_and_area():
    generator = torch.Generator().manual_seed(5)
    a, b = _random_boxes(9, generator, dtype=torch.float64), _random_boxes(6, generator, dtype=torch.float64)
    iou = box_iou(a, b)
    assert iou.shape == (9, 6)
    for i in range(9):
        for j in range(6):
            w = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            h = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            union = box_area(a[i : i + 1])[0] + box_area(b[j : j + 1])[0] - w * h
            assert iou[i, j].item() == pytest.approx(float(w * h / union), abs=1e-12)
    # integer boxes are upcast to float32, as torchvision does
    iou = box_iou(torch.tensor([[0, 0, 2, 2]]), torch.tensor([[1, 1, 3, 3]]))
    assert iou.dtype == torch.float32 and iou.item() == pytest.approx(1 / 7)


def test_box_iou_and_nms_take_tensors_that_require_grad():
    """Boxes decoded by a head carry gradients: the IoU must differentiate (out of place) and give the same values
    as the in-place path, and NMS (indices only) must accept them."""
    generator = torch.Generator().manual_seed(6)
    a, b = _random_boxes(9, generator, dtype=torch.float64), _random_boxes(6, generator, dtype=torch.float64)
    expected = box_iou(a, b)
    a.requires_grad_(True)
    iou = box_iou(a, b)
    assert iou.requires_grad
    torch.testing.assert_close(iou, expected, rtol=0, atol=1e-15)
    shifted = a.detach() + 0.25
    torch.autograd.gradcheck(lambda boxes: box_iou(boxes, shifted), (a,))
    scores = torch.rand(9, generator=generator, dtype=torch.float64).requires_grad_(True)
    assert torch.equal(nms(a, scores, 0.3), nms(a.detach(), scores.detach(), 0.3))
    with torch.no_grad():
        assert torch.equal(box_iou(a, b), expected)


# --- RoIAlign against the plain loop ---------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 3])
def test_roi_align_against_loop(aligned, sampling_ratio):
    generator = torch.Generator().manual_seed(10 + sampling_ratio + 7 * aligned)
    features = torch.randn(2, 3, 11, 17, generator=generator, dtype=torch.float64)
    rois = _random_rois(14, generator, 2, 11, 17, 0.5, torch.float64)
    expected = roi_align_loop(features, rois, (3, 4), 0.5, sampling_ratio, aligned)
    for name, fn in ROI_ALIGN_IMPLEMENTATIONS.items():
        out = fn(features, rois, (3, 4), 0.5, sampling_ratio, aligned)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_roi_align_fast_path_against_plain_random():
    # many RoIs of widely varying size -> many grid buckets, several reduction calls when the budget is small
    generator = torch.Generator().manual_seed(11)
    features = torch.randn(3, 16, 40, 57, generator=generator)
    rois = _random_rois(300, generator, 3, 40, 57, 0.25, torch.float32)
    for aligned in (False, True):
        plain = roi_align_gather(features, rois, 7, 0.25, 0, aligned)
        fast = roi_align(features, rois, 7, 0.25, 0, aligned)
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
        # the same RoIs as the one map of roi_align_maps
        one_map = roi_align_maps([features], rois, torch.zeros(300, dtype=torch.long), 7, [0.25], 0, aligned)
        torch.testing.assert_close(one_map, fast, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            roi_align_gather(features, rois, 7, 0.25, 0, aligned, bucketed=True), plain, rtol=1e-5, atol=1e-5
        )


def test_roi_align_merged_taps_against_plain_forward_and_backward():
    # The fast path merges each axis's taps on the same row/column (fewer taps, same sums): forward and input
    # gradient against the plain gather, on random features, a binary "mask" map and fixed sampling ratios.
    generator = torch.Generator().manual_seed(14)
    features = torch.randn(2, 5, 33, 29, generator=generator, dtype=torch.float64)
    masks = (torch.rand(2, 1, 33, 29, generator=generator) > 0.5).double()
    rois = _random_rois(60, generator, 2, 33, 29, 0.5, torch.float64)
    for values in (features, masks):
        for sampling_ratio in (0, 2, 5):
            fast_input = values.clone().requires_grad_(True)
            plain_input = values.clone().requires_grad_(True)
            fast = roi_align(fast_input, rois, (7, 6), 0.5, sampling_ratio, True)
            plain = roi_align_gather(plain_input, rois, (7, 6), 0.5, sampling_ratio, True)
            torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
            upstream = torch.randn(fast.shape, generator=generator, dtype=torch.float64)
            (fast * upstream).sum().backward()
            (plain * upstream).sum().backward()
            torch.testing.assert_close(fast_input.grad, plain_input.grad, rtol=1e-12, atol=1e-12)
    # and it does merge: a 4x4 adaptive grid's 64 taps per bin become at most 25
    rois = torch.tensor([[0, 1.3, 2.2, 27.9, 26.4]], dtype=torch.float64)  # 26.6 x 24.2 px -> grid 4 x 4 at 7x7
    geometry = roi_align_module._geometry(rois, 1.0, 7, 7, 0, True)
    members = torch.arange(1)
    layout = (torch.zeros(1, dtype=torch.long), *(torch.tensor([v]) for v in (29, 33, 29)))
    plain_index, plain_weight, _ = roi_align_module._bags(geometry, layout, members, (4, 4), (7, 7))
    merged_index, merged_weight, _ = roi_align_module._bags(geometry, layout, members, (4, 4), (7, 7), True)
    assert plain_index.shape[1] == 64 and merged_index.shape[1] <= 25
    table = features[0].permute(1, 2, 0).reshape(-1, 5)
    torch.testing.assert_close(
        (merged_weight[..., None] * table[merged_index]).sum(1), (plain_weight[..., None] * table[plain_index]).sum(1)
    )


def test_bag_sum_backward_against_embedding_bags_own():
    # The fast path's table gradient (a second embedding_bag over the taps sorted by row) against embedding_bag's
    # own backward: bags of different sizes, an empty bag, rows read many times and rows never read.
    generator = torch.Generator().manual_seed(15)
    table = torch.randn(37, 6, generator=generator, dtype=torch.float64)
    sizes = torch.tensor([3, 0, 7, 1, 12, 4, 9])
    index = torch.randint(0, 30, (int(sizes.sum()),), generator=generator)  # rows 30-36 never read
    weight = torch.rand(index.shape[0], generator=generator, dtype=torch.float64)
    offsets = torch.cumsum(sizes, 0) - sizes
    upstream = torch.randn(sizes.shape[0], 6, generator=generator, dtype=torch.float64)
    grads = []
    for ours in (True, False):
        leaf = table.clone().requires_grad_(True)
        if ours:
            out = roi_align_module._BagSum.apply(leaf, index, offsets, weight)
        else:
            out = torch.nn.functional.embedding_bag(index, leaf, offsets, mode="sum", per_sample_weights=weight)
        (out * upstream).sum().backward()
        grads.append((out.detach(), leaf.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-12)
    assert grads[0][1][30:].abs().sum() == 0 and grads[0][1][:30].abs().sum() > 0


def test_roi_align_small_budget_splits_calls(monkeypatch):
    generator = torch.Generator().manual_seed(12)
    features = torch.randn(2, 4, 20, 30, generator=generator, dtype=torch.float64)
    rois = _random_rois(40, generator, 2, 20, 30, 0.5, torch.float64)
    expected = roi_align(features, rois, 5, 0.5, 0, True)
    monkeypatch.setattr(roi_align_module, "_MAX_TAPS_PER_CALL", 1000)
    for fn in ROI_ALIGN_IMPLEMENTATIONS.values():
        torch.testing.assert_close(fn(features, rois, 5, 0.5, 0, True), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("implementation", ["embedding_bag", "gather", "native"])
def test_roi_align_gradcheck(implementation, aligned):
    if implementation not in ROI_ALIGN_IMPLEMENTATIONS:
        pytest.skip("no C++ compiler or ninja here: the native RoIAlign cannot build")
    generator = torch.Generator().manual_seed(13)
    features = torch.randn(2, 2, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 0.5, 1.2, 7.9, 6.1], [1, -1.5, 2.0, 4.0, 9.5], [1, 3.3, 0.2, 3.6, 0.4]], dtype=torch.float64
    )
    fn = ROI_ALIGN_IMPLEMENTATIONS[implementation]
    assert torch.autograd.gradcheck(lambda x: fn(x, rois, (2, 3), 0.7, 0, aligned), (features,))


def test_roi_align_boxes_as_list_and_dtypes():
    generator = torch.Generator().manual_seed(14)
    features = torch.randn(2, 3, 9, 13, generator=generator)
    per_image = [_random_boxes(4, generator, size=20.0, max_side=10.0), _random_boxes(2, generator, 20.0, 10.0)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(per_image)])
    out = roi_align(features, per_image, 4, 0.5, 2, True)
    assert out.dtype == torch.float32 and out.shape == (6, 3, 4, 4) and out.is_contiguous()
    torch.testing.assert_close(out, roi_align(features, rois, 4, 0.5, 2, True))
    out64 = roi_align(features.double(), rois.double(), 4, 0.5, 2, True)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out, rtol=1e-5, atol=1e-6)


# --- several maps in one call ---------------------------------------------------------------------------


def _maps_case(generator, dtype=torch.float64):
    """Three maps of different sizes and batches (an FPN's levels or per-image mask stacks), RoIs spread over them,
    and extents that cut some images' maps (not multiples of anything; one map without extents)."""
    shapes = [(2, 13, 19), (3, 7, 10), (1, 4, 5)]
    maps = [torch.randn(n, 3, h, w, generator=generator, dtype=dtype) for n, h, w in shapes]
    scales = [0.5, 0.25, 0.125]
    extents = [torch.tensor([[13, 19], [9, 14]]), None, torch.tensor([[3, 5]])]
    rois, map_index = [], []
    for index, ((n, h, w), scale) in enumerate(zip(shapes, scales)):
        rois.append(_random_rois(17, generator, n, h, w, scale, dtype))
        map_index.append(torch.full((17,), index))
    order = torch.randperm(51, generator=generator)  # the maps' RoIs interleaved
    return maps, torch.cat(rois)[order], torch.cat(map_index)[order], scales, extents


def _maps_one_by_one(maps, rois, map_index, scales, extents, output_size, sampling_ratio, aligned):
    """The plain way: each RoI alone, on its image's map cut to its extent."""
    rows = []
    for roi, index in zip(rois, map_index.tolist()):
        image = int(roi[0])
        feature = maps[index][image : image + 1]
        if extents is not None and extents[index] is not None:
            height, width = extents[index][image].tolist()
            feature = feature[:, :, :height, :width]
        roi = torch.cat((roi.new_zeros(1), roi[1:]))[None]
        rows.append(roi_align_gather(feature, roi, output_size, scales[index], sampling_ratio, aligned))
    return torch.cat(rows)


@pytest.mark.parametrize("with_extents", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_maps_is_roi_align_on_each_roi_alone(with_extents, sampling_ratio):
    generator = torch.Generator().manual_seed(20 + sampling_ratio + with_extents)
    maps, rois, map_index, scales, extents = _maps_case(generator)
    extents = extents if with_extents else None
    upstream = torch.randn(rois.shape[0], 3, 5, 4, generator=generator, dtype=torch.float64)

    def pooled_and_grads(pool):
        inputs = [m.clone().requires_grad_(True) for m in maps]
        out = pool(inputs)
        (out * upstream).sum().backward()
        return out, [m.grad for m in inputs]

    expected, expected_grads = pooled_and_grads(
        lambda inputs: _maps_one_by_one(inputs, rois, map_index, scales, extents, (5, 4), sampling_ratio, True)
    )
    assert expected.abs().sum() > 0 and all(g.abs().sum() > 0 for g in expected_grads)
    for implementation in MAPS_IMPLEMENTATIONS:
        out, grads = pooled_and_grads(
            lambda inputs, implementation=implementation: roi_align_maps(
                inputs, rois, map_index, (5, 4), scales, sampling_ratio, True, extents, implementation
            )
        )
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@needs_compiler
@pytest.mark.parametrize("aligned", [False, True])
def test_native_roi_align_against_plain_on_detection_shapes(aligned):
    # The demo's shapes in float32, not multiples of anything: four FPN-like maps of 8 images cut by extents,
    # 600 RoIs of 2-150 px (adaptive grids of 1 to 6 points per axis, some reversed or off the image), 64 channels;
    # forward and the maps' gradients against the plain gather and the embedding_bag path.
    generator = torch.Generator().manual_seed(30 + aligned)
    shapes = [(8, 33, 30), (8, 17, 15), (8, 9, 8), (8, 5, 4)]
    maps = [torch.randn(n, 64, h, w, generator=generator) for n, h, w in shapes]
    scales = [0.25, 0.125, 0.0625, 0.03125]
    extents = [torch.tensor([[max(1, h - i), max(1, w - 2 * i)] for i in range(8)]) for _, h, w in shapes]
    rois = torch.cat([_random_rois(150, generator, 8, 33, 30, 0.25, torch.float32) for _ in range(4)])
    map_index = torch.randint(0, 4, (600,), generator=generator)
    upstream = torch.randn(600, 64, 7, 7, generator=generator)
    results = {}
    for implementation in ("native", "embedding_bag", "gather"):
        inputs = [m.clone().requires_grad_(True) for m in maps]
        out = roi_align_maps(inputs, rois, map_index, 7, scales, 0, aligned, extents, implementation)
        (out * upstream).sum().backward()
        results[implementation] = (out, [m.grad for m in inputs])
    expected, expected_grads = results["gather"]
    assert expected.abs().sum() > 0 and all(g.abs().sum() > 0 for g in expected_grads)
    for implementation in ("native", "embedding_bag"):
        out, grads = results[implementation]
        assert out.shape == (600, 64, 7, 7) and out.is_contiguous()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_auto_roi_align_takes_the_native_kernel_where_it_runs(monkeypatch):
    generator = torch.Generator().manual_seed(31)
    features = torch.randn(2, 6, 12, 19, generator=generator)
    rois = _random_rois(40, generator, 2, 12, 19, 0.5, torch.float32)
    taken = []
    real_native, real_bags = roi_align_module._NativeRoIAlign.apply, roi_align_module._reduce_embedding_bag
    monkeypatch.setattr(roi_align_module._NativeRoIAlign, "apply", lambda *a: taken.append("native") or real_native(*a))
    monkeypatch.setattr(
        roi_align_module, "_reduce_embedding_bag", lambda *a: taken.append("embedding_bag") or real_bags(*a)
    )
    monkeypatch.setenv("VIL_KERNELS_NATIVE", "auto")
    native_out = roi_align(features, rois, 5, 0.5, 0, True)
    assert taken == ["native"]
    # bfloat16 (the heads under autocast) has no C++ kernel: auto takes embedding_bag
    roi_align(features.bfloat16(), rois.bfloat16(), 5, 0.5, 0, True)
    assert taken == ["native", "embedding_bag"]
    with pytest.raises(ValueError, match="'native' RoIAlign runs on CPU float32/float64"):
        roi_align(features.bfloat16(), rois.bfloat16(), 5, 0.5, 0, True, implementation="native")
    # the C++ kernels switched off: auto falls back to embedding_bag, with the same numbers
    monkeypatch.setenv("VIL_KERNELS_NATIVE", "0")
    torch.testing.assert_close(roi_align(features, rois, 5, 0.5, 0, True), native_out, rtol=1e-5, atol=1e-6)
    assert taken == ["native", "embedding_bag", "embedding_bag"]
    with pytest.raises(ValueError, match="Unknown RoIAlign implementation 'fast'"):
        roi_align(features, rois, 5, 0.5, 0, True, implementation="fast")


@needs_compiler
def test_native_roi_align_ops_check_their_inputs(monkeypatch):
    monkeypatch.setenv("VIL_KERNELS_NATIVE", "1")
    ops = roi_align_module.native_ops()
    table = torch.randn(20, 3)
    geometry = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    layout = torch.tensor([[2, 2, 0, 5, 4, 5]])  # a 4 x 5 map at row 0: fits 20 rows
    assert ops.roi_align_forward(table, geometry, layout, 2, 2).shape == (1, 3, 2, 2)
    with pytest.raises(RuntimeError, match="does not fit the table's 19 rows"):
        ops.roi_align_forward(table[:19], geometry, layout, 2, 2)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.roi_align_forward(table.bfloat16(), geometry.bfloat16(), layout, 2, 2)
    with pytest.raises(RuntimeError, match=r"\(K, 6\) int64"):
        ops.roi_align_forward(table, geometry, layout.int(), 2, 2)
    with pytest.raises(RuntimeError, match="does not fit the table's 19 rows"):
        ops.roi_align_backward(torch.randn(1, 3, 2, 2), geometry, layout, 19)


def test_roi_align_maps_bad_inputs_raise_clear_errors():
    generator = torch.Generator().manual_seed(24)
    maps, rois, map_index, scales, extents = _maps_case(generator)
    with pytest.raises(ValueError, match="share channels"):
        roi_align_maps([maps[0], maps[1][:, :2]], rois, map_index % 2, 7, scales[:2])
    with pytest.raises(ValueError, match="one per map"):
        roi_align_maps(maps, rois, map_index, 7, scales[:2])
    with pytest.raises(ValueError, match=r"map_index must lie in \[0, 3\)"):
        roi_align_maps(maps, rois, map_index + 1, 7, scales)
    with pytest.raises(ValueError, match="one map per RoI"):
        roi_align_maps(maps, rois, map_index[:-1], 7, scales)
    with pytest.raises(ValueError, match="batch indices must lie within"):
        roi_align_maps(maps, rois, torch.full_like(map_index, 2), 7, scales)  # map 2 holds one image
    with pytest.raises(ValueError, match="within the map"):
        roi_align_maps(maps, rois, map_index, 7, scales, extents=[extents[0] + 1, None, None])
    with pytest.raises(ValueError, match="extents for 3 maps"):
        roi_align_maps(maps, rois, map_index, 7, scales, extents=[None])
    with pytest.raises(ValueError, match="spatial_scale must be a positive"):
        roi_align_maps(maps, rois, map_index, 7, [0.5, 0.0, 1.0])
    assert roi_align_maps(maps, rois[:0], map_index[:0], 7, scales).shape == (0, 3, 7, 7)


# --- empty and bad inputs --------------------------------------------------------------------------------


def test_empty_inputs():
    empty = torch.zeros(0, 4)
    for fn in (nms, nms_greedy):
        keep = fn(empty, torch.zeros(0), 0.5)
        assert keep.dtype == torch.long and keep.shape == (0,)
    assert batched_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)
    assert box_iou(empty, torch.ones(3, 4)).shape == (0, 3)
    features = torch.randn(2, 5, 8, 8, requires_grad=True)
    for fn in ROI_ALIGN_IMPLEMENTATIONS.values():
        assert fn(features, torch.zeros(0, 5), 7, 0.25, 0, True).shape == (0, 5, 7, 7)
        assert fn(features, [torch.zeros(0, 4), torch.zeros(0, 4)], (7, 3)).shape == (0, 5, 7, 3)


def test_bad_inputs_raise_clear_errors():
    features = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms(torch.zeros(3, 4), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="idxs"):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, dtype=torch.long), 0.5)
    with pytest.raises(TypeError, match="integer"):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match=r"boxes1 must have shape \(N, 4\)"):
        box_iou(torch.zeros(4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        roi_align(features, torch.zeros(3, 4), 7)
    with pytest.raises(ValueError, match="per-image box tensors"):
        roi_align(features, [torch.zeros(1, 4)], 7)
    with pytest.raises(ValueError, match=r"boxes\[1\]"):
        roi_align(features, [torch.zeros(1, 4), torch.zeros(1, 5)], 7)
    with pytest.raises(ValueError, match="batch indices"):
        roi_align(features, torch.tensor([[2.0, 0, 0, 4, 4]]), 7)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        roi_align(features[0], torch.zeros(1, 5), 7)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(features, torch.zeros(1, 5), (7, 0))
    with pytest.raises(TypeError, match="floating point"):
        roi_align(features.long(), torch.zeros(1, 5), 7)
