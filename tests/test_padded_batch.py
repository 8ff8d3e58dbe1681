"""ViLBackbone on padded batches: with pixel_mask, each image's maps are its maps alone."""

import pytest
import torch

from vil_hf import ViLBackbone, ViLConfig
from vil_hf.modeling_vil import ViLStage

from .test_modeling import TINY_ARCH, randomize

SPARSE_ARCH = TINY_ARCH.replace("s0", "s1")  # longformer in every stage; absolute table in stage 2
RPE_ARCH = SPARSE_ARCH.replace("a1", "a0")  # relative bias everywhere
APE_ARCH = TINY_ARCH.replace("a0", "a1")  # absolute tables everywhere, full attention in stages 3-4
GLOBAL_ARCH = RPE_ARCH.replace("g0", "g1")
OTHER_ARCH = (
    "l1,h2,d16,n1,s1,g1,p4,f2,a1_l2,h2,d16,n1,s1,g1,p2,f2,a1_l3,h2,d32,n1,s1,g1,p2,f2,a1_l4,h2,d32,n1,s1,g0,p2,f1,a1"
)

# Four images padded into 128x128: the largest rows and columns come from different images, two
# images have different pixel sizes but the same map sizes at every stage (one group), and no map
# is a multiple of any window.
SIZES = [(100, 97), (70, 128), (64, 64), (66, 67)]
MASKED, GROUPED, PER_IMAGE = [(4, True)], [(1, False), (1, False), (2, False)], [(1, False)] * 4

# name: (config arguments, how each stage runs: (batch, key extents given) per call)
CASES = {
    "longformer-relative-bias": (dict(arch=RPE_ARCH), [MASKED] * 4),
    "longformer-exact-window": (dict(arch=RPE_ARCH, exact_window=True), [MASKED] * 4),
    "longformer-vectorized": (dict(arch=RPE_ARCH, longformer_implementation="vectorized"), [MASKED] * 4),
    "longformer-reference": (dict(arch=RPE_ARCH, longformer_implementation="reference"), [MASKED] * 4),
    # the stage-2 table (16x16 for 128 px) covers the batch's 12x16 map: its first rows, as alone
    "absolute-table-covers-the-map": (dict(arch=SPARSE_ARCH, image_size=128), [MASKED] * 4),
    # an 8x8 table would be stretched to the batch's map, differently from an image's own
    "absolute-table-smaller-than-the-map": (dict(arch=SPARSE_ARCH, image_size=64), [MASKED, GROUPED, MASKED, MASKED]),
    # full attention fits its bias table to the map: stages 3-4 run each extent alone
    "full-attention-relative-bias": (dict(arch=TINY_ARCH, image_size=128), [MASKED, MASKED, GROUPED, GROUPED]),
    "full-attention-absolute-tables": (dict(arch=APE_ARCH, image_size=128), [MASKED] * 4),
    "global-only": (dict(arch=GLOBAL_ARCH, attention_type="global"), [MASKED] * 4),
    "srformer": (dict(arch=OTHER_ARCH, attention_type="srformer", image_size=128), [GROUPED] * 4),
    # the performer's key stabiliser is a maximum over its batch: each image on its own
    "performer": (dict(arch=OTHER_ARCH, attention_type="performer", image_size=128), [PER_IMAGE] * 4),
}


def _backbone(**kwargs) -> ViLBackbone:
    config = ViLConfig(out_features=["stage1", "stage2", "stage3", "stage4"], **kwargs)
    torch.manual_seed(0)  # the same weights whichever tests ran before
    return randomize(ViLBackbone(config))


def _padded_batch(sizes, height=128, width=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(len(sizes), 3, height, width, generator=generator)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.long)
    for b, (rows, cols) in enumerate(sizes):
        pixel_mask[b, :rows, :cols] = 1
    # what an image processor gives: zeros on the padding
    return pixel_values * pixel_mask[:, None], pixel_mask


def _stage_calls(monkeypatch):
    """Records (stage, batch, key extents given) for every stage call."""
    calls, forward = [], ViLStage.forward

    def spy(stage, feature_map, key_extents=None):
        calls.append((stage, feature_map.shape[0], key_extents is not None))
        return forward(stage, feature_map, key_extents)

    monkeypatch.setattr(ViLStage, "forward", spy)
    return calls


def _assert_each_image_as_alone(backbone, maps, pixel_values, sizes):
    for b, (rows, cols) in enumerate(sizes):
        alone = backbone(pixel_values[b : b + 1, :, :rows, :cols]).feature_maps
        for stage, (batched, own) in enumerate(zip(maps, alone)):
            height, width = own.shape[-2:]
            msg = f"image {b} ({rows}x{cols}) stage {stage + 1}"
            # float32 sums over other batch shapes round differently: about 2e-6 of the map's magnitude
            scale = max(1.0, own.abs().max().item())
            torch.testing.assert_close(
                batched[b : b + 1, :, :height, :width], own, rtol=1e-5, atol=1e-5 * scale, msg=msg
            )
            beyond = batched[b].clone()
            beyond[:, :height, :width] = 0
            assert beyond.abs().max() == 0, f"{msg}: not zero beyond the image's extent"


@pytest.mark.parametrize("case", list(CASES))
def test_padded_batch_gives_each_image_its_maps_alone(case, monkeypatch):
    config, expected_calls = CASES[case]
    backbone = _backbone(**config)
    pixel_values, pixel_mask = _padded_batch(SIZES)
    calls = _stage_calls(monkeypatch)
    with torch.no_grad():
        maps = backbone(pixel_values, pixel_mask=pixel_mask).feature_maps
    # each stage took the expected way: one masked run, or groups of one extent (or one image)
    stages = list(backbone.encoder.stages)
    per_stage = [[(batch, masked) for stage, batch, masked in calls if stage is s] for s in stages]
    assert per_stage == expected_calls
    assert [tuple(m.shape) for m in maps] == [(4, 16, 32, 32), (4, 16, 16, 16), (4, 32, 8, 8), (4, 32, 4, 4)]
    monkeypatch.undo()
    with torch.no_grad():
        _assert_each_image_as_alone(backbone, maps, pixel_values, SIZES)


def test_padded_batch_of_one_size_runs_the_plain_stages_on_the_crop(monkeypatch):
    backbone = _backbone(arch=TINY_ARCH, image_size=128)
    sizes = [(64, 80)] * 3
    pixel_values, pixel_mask = _padded_batch(sizes, 96, 128)
    calls = _stage_calls(monkeypatch)
    with torch.no_grad():
        maps = backbone(pixel_values, pixel_mask=pixel_mask).feature_maps
    assert [(batch, masked) for _, batch, masked in calls] == [(3, False)] * 4
    assert [tuple(m.shape[-2:]) for m in maps] == [(24, 32), (12, 16), (6, 8), (3, 4)]  # the padded input's
    monkeypatch.undo()
    with torch.no_grad():
        _assert_each_image_as_alone(backbone, maps, pixel_values, sizes)


def test_pixel_mask_of_ones_is_the_plain_computation():
    backbone = _backbone(arch=TINY_ARCH, image_size=128)
    pixel_values = torch.randn(2, 3, 96, 100)
    with torch.no_grad():
        plain = backbone(pixel_values).feature_maps
        masked = backbone(pixel_values, pixel_mask=torch.ones(2, 96, 100, dtype=torch.long)).feature_maps
    assert all(torch.equal(a, b) for a, b in zip(plain, masked))


def test_padded_batch_gradients_are_the_sum_of_each_images_own():
    """Training on a padded batch: keys beyond an extent get no weight, so nothing leaks in the backward."""
    # float64: sums of ~1e5 products of float32 differ by ~1e-6 of their scale in any other order
    backbone = _backbone(arch=TINY_ARCH, image_size=128).double()
    sizes = SIZES[:3]
    pixel_values, pixel_mask = _padded_batch(sizes)
    pixel_values = pixel_values.double()
    generator = torch.Generator().manual_seed(3)
    weights = [
        torch.randn(m.shape[1:], generator=generator, dtype=torch.float64)
        for m in backbone(pixel_values[:1]).feature_maps
    ]

    def weighted(maps, b):
        """A weighted sum of image b's maps, over whatever part of them the maps hold."""
        total = 0
        for feature_map, weight in zip(maps, weights):
            height, width = feature_map.shape[-2:]
            total = total + (feature_map[b] * weight[:, :height, :width]).sum()
        return total

    backbone.zero_grad()
    maps = backbone(pixel_values, pixel_mask=pixel_mask).feature_maps
    sum(weighted(maps, b) for b in range(len(sizes))).backward()
    batched = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
    alone = {}
    for b, (rows, cols) in enumerate(sizes):
        # each image's gradients apart, then summed
        backbone.zero_grad()
        weighted(backbone(pixel_values[b : b + 1, :, :rows, :cols]).feature_maps, 0).backward()
        for name, parameter in backbone.named_parameters():
            if parameter.grad is not None:
                alone[name] = alone.get(name, 0) + parameter.grad.clone()
    assert batched.keys() == alone.keys() and len(batched) > 30
    for name in batched:
        scale = alone[name].abs().max().item()
        torch.testing.assert_close(batched[name], alone[name], rtol=1e-9, atol=1e-9 * scale, msg=name)


def test_bad_pixel_masks_are_clear_errors():
    backbone = _backbone(arch=RPE_ARCH)
    pixel_values, pixel_mask = _padded_batch([(64, 64), (40, 50)], 64, 64)
    with pytest.raises(ValueError, match=r"pixel_mask must have shape \(batch, height, width\) = \(2, 64, 64\)"):
        backbone(pixel_values, pixel_mask=pixel_mask[:, :32])
    holed = pixel_mask.clone()
    holed[1, 10, 10] = 0
    with pytest.raises(ValueError, match="pixel_mask of image 1 is not a top-left-anchored rectangle"):
        backbone(pixel_values, pixel_mask=holed)
    with pytest.raises(ValueError, match="pixel_mask of image 1 is all zeros"):
        backbone(pixel_values, pixel_mask=torch.stack([pixel_mask[0], torch.zeros_like(pixel_mask[0])]))
    narrow = _padded_batch([(64, 64), (64, 20)], 64, 64)[1]  # 20 px: 5, 2, 1 columns, then too few for p2
    with pytest.raises(
        ValueError, match=r"Image 1 of the batch \(64x20 pixels by pixel_mask\) has a 4x1 map before stage 4"
    ):
        backbone(pixel_values, pixel_mask=narrow)
