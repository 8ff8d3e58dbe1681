"""Bad inputs: every class of invalid configuration, model input and conversion is refused clearly.

Each test checks the exception type *and* that its message names the problem. Conversion
tests also check that a failed conversion leaves nothing behind (no output folder, no
temporary sibling folders).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from vil_hf import ViLConfig, ViLForImageClassification, ViLModel, parse_arch
from vil_hf.cli import main
from vil_hf.configuration_vil import stage_lists_from_arch
from vil_hf.convert import ConversionError, ConversionOptions, convert_checkpoint

from .conftest import FIXTURES

ORIGINALS = FIXTURES / "original_vil"

TINY = "l1,h1,d8,n1,s1,g1,p4,f3,a0_l2,h1,d8,n1,s1,g1,p2,f3,a0_l3,h1,d8,n1,s0,g0,p2,f3,a0"
TINY_LISTS = stage_lists_from_arch(TINY)


# --------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------


def _original_dir(name: str) -> Path:
    folder = ORIGINALS / name
    if not (folder / "original_checkpoint.pth").is_file():
        pytest.skip(
            f"original ViL fixture {name!r} not found under {ORIGINALS} (set VIL_FIXTURES to the fixtures folder)"
        )
    return folder


def _load(name: str) -> dict:
    return torch.load(_original_dir(name) / "original_checkpoint.pth", map_location="cpu", weights_only=True)


def _meta(name: str) -> dict:
    return json.loads((_original_dir(name) / "meta.json").read_text())


@pytest.fixture(scope="module")
def cls_checkpoint() -> dict:
    return _load("cls_rpe_partial")


@pytest.fixture(scope="module")
def det_checkpoint() -> dict:
    return _load("det_rpe_sparse")


@pytest.fixture(scope="module")
def det_arch() -> str:
    return _meta("det_rpe_sparse")["original_constructor_args"]["arch"]


@pytest.fixture
def cls_path() -> Path:
    return _original_dir("cls_rpe_partial") / "original_checkpoint.pth"


@pytest.fixture
def det_path() -> Path:
    return _original_dir("det_rpe_sparse") / "original_checkpoint.pth"


def _save(tmp_path: Path, obj, name: str = "modified.pth") -> Path:
    """Write a modified checkpoint into its own folder, apart from the output's parent."""
    folder = tmp_path / "sources"
    folder.mkdir(exist_ok=True)
    path = folder / name
    torch.save(obj, path)
    return path


def _with_net(checkpoint: dict, net: dict) -> dict:
    return {**checkpoint, "net": net}


def _assert_nothing_left(out_dir: Path) -> None:
    """A failed conversion creates no output folder and leaves no temporary siblings."""
    assert not out_dir.exists(), f"a failed conversion created {out_dir}"
    _assert_no_temporary_siblings(out_dir)


def _assert_no_temporary_siblings(out_dir: Path) -> None:
    leftovers = [
        p.name for p in out_dir.parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
    ]
    assert not leftovers, f"temporary folders left beside {out_dir.name}: {leftovers}"


def _convert_fails(source, out_dir: Path, match: str, **options) -> str:
    """convert_checkpoint must raise ConversionError matching `match`, leaving nothing behind."""
    with pytest.raises(ConversionError, match=match) as info:
        convert_checkpoint(source, out_dir, ConversionOptions(**options))
    _assert_nothing_left(out_dir)
    return str(info.value)


def _cli_fails(argv: list[str], out_dir: Path, capsys, match: str) -> str:
    """`vil-hf convert` must exit with 2 and say `match` on stderr, leaving nothing behind."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert re.search(match, err), f"{match!r} not in stderr: {err}"
    assert "error" in err
    _assert_nothing_left(out_dir)
    return err


def _sections(message: str) -> dict[str, list[str]]:
    """Items listed under `missing (n):`, `unexpected (n):` and `shape mismatch (n):` of a load error."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in message.splitlines():
        header = re.match(r"^\s*(missing|unexpected|shape mismatch) \((\d+)\):\s*$", line)
        if header:
            current = sections.setdefault(header.group(1), [])
        elif current is not None and line.startswith("    "):
            current.append(line.strip())
        else:
            current = None
    return sections


# --------------------------------------------------------------------------------------------
# configuration: architecture strings (parse_arch and ViLConfig(arch=...))
# --------------------------------------------------------------------------------------------

ARCH_BUILDERS = [pytest.param(parse_arch, id="parse_arch"), pytest.param(lambda a: ViLConfig(arch=a), id="ViLConfig")]


@pytest.mark.parametrize("build", ARCH_BUILDERS)
def test_arch_unknown_letter_names_letter_and_stage(build):
    arch = "l1,h1,d8_l2,x3,h1,d8_l3,h1,d8"
    with pytest.raises(ValueError, match=r"unknown letter 'x' in stage 2"):
        build(arch)


@pytest.mark.parametrize("build", ARCH_BUILDERS)
def test_arch_non_integer_value(build):
    with pytest.raises(ValueError, match=r"'hx'.*stage 1.*integer"):
        build("l1,hx,d8_l2,h1,d8_l3,h1,d8")


@pytest.mark.parametrize("build", ARCH_BUILDERS)
def test_arch_negative_value_is_not_an_integer_field(build):
    with pytest.raises(ValueError, match=r"'g-1'.*stage 3.*integer"):
        build("l1,h1,d8_l2,h1,d8_l3,h1,d8,g-1")


@pytest.mark.parametrize("build", ARCH_BUILDERS)
def test_arch_empty_field(build):
    with pytest.raises(ValueError, match=r"stage 1.*empty field"):
        build("l1,,h1,d8_l2,h1,d8_l3,h1,d8")


@pytest.mark.parametrize("build", ARCH_BUILDERS)
def test_arch_letter_repeated_in_stage(build):
    with pytest.raises(ValueError, match=r"letter 'h' appears twice in stage 2"):
        build("l1,h1,d8_l2,h1,d8,h2_l3,h1,d8")


@pytest.mark.parametrize("build", ARCH_BUILDERS)
@pytest.mark.parametrize(
    "arch, numbers",
    [
        pytest.param("l1,h1,d8_l3,h1,d8_l4,h1,d8", "[1, 3, 4]", id="missing-stage"),
        pytest.param("l1,h1,d8_l1,h1,d8_l2,h1,d8", "[1, 1, 2]", id="repeated-stage"),
        pytest.param("l2,h1,d8_l1,h1,d8_l3,h1,d8", "[2, 1, 3]", id="out-of-order"),
    ],
)
def test_arch_stage_numbering(build, arch, numbers):
    with pytest.raises(ValueError, match=r"stages must be numbered l1, l2, \.\.\. in order.*" + re.escape(numbers)):
        build(arch)


@pytest.mark.parametrize("build", ARCH_BUILDERS)
@pytest.mark.parametrize("count", [2, 5])
def test_arch_wrong_number_of_stages(build, count):
    arch = "_".join(f"l{i},h1,d8" for i in range(1, count + 1))
    with pytest.raises(ValueError, match=rf"3 or 4 stages, got {count}"):
        build(arch)


@pytest.mark.parametrize("build", ARCH_BUILDERS)
@pytest.mark.parametrize("letter", ["s", "a"])
def test_arch_binary_letters_must_be_0_or_1(build, letter):
    arch = f"l1,h1,d8_l2,h1,d8,{letter}2_l3,h1,d8"
    with pytest.raises(ValueError, match=rf"{letter}2 in stage 2 must be {letter}0 or {letter}1"):
        build(arch)


def test_arch_empty_string():
    with pytest.raises(ValueError, match=r"arch must be a non-empty architecture string"):
        parse_arch("  ")


# --------------------------------------------------------------------------------------------
# configuration: values and explicit lists
# --------------------------------------------------------------------------------------------


def test_hidden_size_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"hidden_sizes\[1\]=8 .*num_heads\[1\]=3.*stage 2"):
        ViLConfig(arch="l1,h1,d8_l2,h3,d8_l3,h1,d8")


def test_absolute_embedding_needs_even_hidden_size():
    with pytest.raises(ValueError, match=r"use_absolute_embeddings\[0\].*even hidden size.*hidden_sizes\[0\]=9"):
        ViLConfig(arch="l1,h1,d9,a1_l2,h1,d8,a0_l3,h1,d8,a0")


def test_arch_and_disagreeing_list_contradict():
    with pytest.raises(ValueError, match=r"hidden_sizes=\[8, 8, 16\] contradicts arch"):
        ViLConfig(arch=TINY, hidden_sizes=[8, 8, 16])
    with pytest.raises(ValueError, match=r"attention_types=.*contradicts arch"):
        ViLConfig(arch=TINY, attention_types=["longformer"] * 3)


def test_arch_and_agreeing_list_is_accepted():
    config = ViLConfig(
        arch=TINY, hidden_sizes=[8, 8, 8], depths=(1, 1, 1), attention_types=["longformer", "longformer", "full"]
    )
    assert config.hidden_sizes == [8, 8, 8]
    assert config.arch == TINY


def test_explicit_lists_of_different_lengths():
    lists = dict(TINY_LISTS, window_sizes=[3, 3])
    with pytest.raises(ValueError, match=r"one entry per stage.*'window_sizes': 2"):
        ViLConfig(**lists)


def test_explicit_lists_missing_without_arch():
    lists = {k: v for k, v in TINY_LISTS.items() if k != "window_sizes"}
    with pytest.raises(ValueError, match=r"Without arch.*missing: window_sizes"):
        ViLConfig(**lists)


def test_explicit_lists_wrong_number_of_stages():
    lists = {k: v[:2] for k, v in TINY_LISTS.items()}
    with pytest.raises(ValueError, match=r"3 or 4 stages.*2"):
        ViLConfig(**lists)


def test_exact_window_with_random_shift_contradicts():
    with pytest.raises(ValueError, match=r"exact_window=True and random_shift=True contradict"):
        ViLConfig(arch=TINY, exact_window=True, random_shift=True)


def test_unknown_attention_type_in_attention_types():
    lists = dict(TINY_LISTS, attention_types=["longformer", "performer", "full"])
    with pytest.raises(
        ValueError, match=r"attention_types\[1\]='performer': a stage runs attention_type \('longformer'\)"
    ):
        ViLConfig(**lists)


def test_unknown_attention_type():
    with pytest.raises(ValueError, match=r"attention_type must be one of .*'srformer'.*got 'bigbird'"):
        ViLConfig(arch=TINY, attention_type="bigbird")


def test_global_only_stage_without_global_tokens():
    arch = TINY.replace("s0,g0", "s1,g0")
    with pytest.raises(
        ValueError, match=r"attention_types\[2\]='global'.*needs global tokens.*num_global_tokens\[2\]=0"
    ):
        ViLConfig(arch=arch, attention_type="global")


@pytest.mark.parametrize("interval", [-1, 1.5, True])
def test_bad_performer_redraw_interval(interval):
    with pytest.raises(ValueError, match=r"performer_redraw_interval must be a non-negative integer or None"):
        ViLConfig(arch=TINY, attention_type="performer", performer_redraw_interval=interval)


def test_unknown_longformer_implementation():
    with pytest.raises(ValueError, match=r"longformer_implementation must be one of .*'cuda-magic'"):
        ViLConfig(arch=TINY, longformer_implementation="cuda-magic")


@pytest.mark.parametrize("chunk", [-1, True, 2.5])
def test_bad_feed_forward_chunk_size(chunk):
    with pytest.raises(ValueError, match="chunk_size_feed_forward must be a non-negative number of tokens"):
        ViLConfig(chunk_size_feed_forward=chunk)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_drop_path_rate_out_of_range(rate):
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\)"):
        ViLConfig(arch=TINY, drop_path_rate=rate)


@pytest.mark.parametrize("name", ["window_sizes", "patch_sizes", "depths"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_window_patch_depth(name, value):
    lists = dict(TINY_LISTS)
    lists[name] = [lists[name][0], value, lists[name][2]]
    with pytest.raises(ValueError, match=rf"{name}\[1\] must be at least 1, got {value}"):
        ViLConfig(**lists)


def test_non_positive_window_from_arch():
    with pytest.raises(ValueError, match=r"window_sizes\[0\] must be at least 1, got 0"):
        ViLConfig(arch="l1,h1,d8,f0_l2,h1,d8_l3,h1,d8")


def test_negative_global_tokens():
    lists = dict(TINY_LISTS, num_global_tokens=[-1, 1, 0])
    with pytest.raises(ValueError, match=r"num_global_tokens\[0\] must be >= 0, got -1"):
        ViLConfig(**lists)


# --------------------------------------------------------------------------------------------
# model input
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> ViLModel:
    torch.manual_seed(0)
    return ViLModel(ViLConfig(arch=TINY, image_size=32)).eval()


def test_tiny_model_accepts_valid_input(tiny_model):
    with torch.no_grad():
        out = tiny_model(torch.randn(1, 3, 32, 32))
    assert out.pooler_output.shape == (1, 8)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((1, 1, 32, 32), id="one-channel"),
        pytest.param((1, 4, 32, 32), id="four-channels"),
        pytest.param((3, 32, 32), id="3-D"),
        pytest.param((1, 1, 3, 32, 32), id="5-D"),
    ],
)
def test_pixel_values_wrong_shape(tiny_model, shape):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, height, width\)"):
        with torch.no_grad():
            tiny_model(torch.randn(*shape))


@pytest.mark.parametrize("size", [(2, 2), (32, 3), (3, 32)])
def test_image_smaller_than_patch_size(tiny_model, size):
    with pytest.raises(ValueError, match=r"smaller than the patch size 4"):
        with torch.no_grad():
            tiny_model(torch.randn(1, 3, *size))


def test_map_smaller_than_later_patch_size(tiny_model):
    # 8x8 -> 2x2 after stage 1 -> 1x1 after stage 2, smaller than stage 3's patch size 2
    with pytest.raises(ValueError, match=r"smaller than the patch size 2"):
        with torch.no_grad():
            tiny_model(torch.randn(1, 3, 8, 8))


# --------------------------------------------------------------------------------------------
# image processors
# --------------------------------------------------------------------------------------------


def _processors():
    from vil_hf import ViLImageProcessorPil
    from vil_hf.detection import DetectionImageProcessorPil

    return [DetectionImageProcessorPil(shortest_edge=32, longest_edge=64), ViLImageProcessorPil()]


@pytest.mark.parametrize("images", [[], (), None], ids=["empty-list", "empty-tuple", "none"])
def test_processors_refuse_no_images_by_name(images):
    for processor in _processors():
        with pytest.raises(ValueError, match=r"images (is an empty list|is required): pass .*image"):
            processor(images=images, return_tensors="pt")


def test_processors_take_two_dimensional_grayscale_as_the_equal_grey_image():
    import numpy as np
    from PIL import Image

    grey = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    for processor in _processors():
        expected = processor(images=Image.fromarray(grey, mode="L"), return_tensors="pt")["pixel_values"]
        for given in (grey, torch.from_numpy(grey), [grey], [grey, np.stack([grey] * 3, axis=-1)]):
            pixel_values = processor(images=given, return_tensors="pt")["pixel_values"]
            assert pixel_values.shape[1] == 3
            torch.testing.assert_close(pixel_values[:1], expected)
        with pytest.raises(ValueError, match=r"shape \(0, 5\) with no pixels"):
            processor(images=np.zeros((0, 5), dtype=np.uint8), return_tensors="pt")


@pytest.mark.parametrize("head", ["mask_rcnn", "retinanet"])
def test_old_detector_configs_with_pixel_statistics_still_load(tmp_path, head):
    """The image processor normalises; the statistics earlier detector configs carried (never used) are dropped."""
    from transformers import AutoConfig
    from transformers.testing_utils import CaptureLogger

    from vil_hf.detection import MaskRCNNConfig, RetinaNetConfig, configuration_detection

    config_class = MaskRCNNConfig if head == "mask_rcnn" else RetinaNetConfig
    levels = {"anchor_sizes": (32, 64, 128, 256)} if head == "mask_rcnn" else {}  # 3 stages + P6
    config_class(backbone_config=ViLConfig(arch=TINY), num_labels=3, **levels).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "pixel_mean" not in saved and "pixel_std" not in saved
    old = {**saved, "pixel_mean": [123.675, 116.28, 103.53], "pixel_std": [58.395, 57.12, 57.375]}
    (tmp_path / "config.json").write_text(json.dumps(old))
    with CaptureLogger(configuration_detection.logger) as captured:
        loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, config_class) and loaded.num_labels == 3 and captured.out == ""
    assert not hasattr(loaded, "pixel_mean") and "pixel_mean" not in loaded.to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**old, "pixel_mean": [0.0, 0.0, 0.0]}))
    with CaptureLogger(configuration_detection.logger) as captured:
        AutoConfig.from_pretrained(tmp_path)
    assert "pixel_mean=[0.0, 0.0, 0.0], which the model never used" in captured.out
    assert "image_mean / image_std in preprocessor_config.json" in captured.out


# --------------------------------------------------------------------------------------------
# conversion: unreadable sources
# --------------------------------------------------------------------------------------------


def test_missing_source_file(tmp_path):
    out = tmp_path / "out"
    _convert_fails(tmp_path / "nope.pth", out, match=r"nope\.pth.*does not exist")


def test_missing_source_file_cli(tmp_path, capsys):
    out = tmp_path / "out"
    _cli_fails(["convert", str(tmp_path / "nope.pth"), str(out)], out, capsys, match=r"nope\.pth.*does not exist")


def test_random_bytes_file(tmp_path, capsys):
    source = tmp_path / "sources" / "garbage.pth"
    source.parent.mkdir()
    source.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    )
    out = tmp_path / "out"
    _convert_fails(source, out, match=r"Could not read .*garbage\.pth.* as a PyTorch checkpoint")
    err = _cli_fails(["convert", str(source), str(out)], out, capsys, match=r"Could not read .*garbage\.pth")
    assert "weights_only" not in err


def test_truncated_checkpoint(tmp_path, cls_path, capsys):
    data = cls_path.read_bytes()
    source = tmp_path / "sources" / "truncated.pth"
    source.parent.mkdir()
    source.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _convert_fails(source, out, match=r"Could not read .*truncated\.pth.*complete")
    _cli_fails(["convert", str(source), str(out)], out, capsys, match=r"Could not read .*truncated\.pth")


def test_dict_without_net_or_model(tmp_path):
    source = _save(tmp_path, {"state_dict": {"w": torch.zeros(1)}, "epoch": 3})
    _convert_fails(
        source, tmp_path / "out", match=r"neither .*classification .*'net'.* nor .*detectron2.*'model'.*state_dict"
    )


def test_not_a_dict(tmp_path):
    source = _save(tmp_path, [torch.zeros(1)])
    _convert_fails(source, tmp_path / "out", match=r"neither .*'net'.*'model'.*list")


@pytest.mark.parametrize("key", ["net", "model"])
def test_empty_state_dict(tmp_path, key):
    source = _save(tmp_path, {key: {}, "arch": TINY})
    _convert_fails(source, tmp_path / "out", match=r"empty or malformed state dict", head="backbone")


def test_state_dict_with_non_tensor(tmp_path, cls_checkpoint):
    net = dict(cls_checkpoint["net"], epoch=3)
    source = _save(tmp_path, _with_net(cls_checkpoint, net))
    _convert_fails(source, tmp_path / "out", match=r"'epoch'.*int, not a tensor")


# --------------------------------------------------------------------------------------------
# conversion: checkpoint vs model mismatches
# --------------------------------------------------------------------------------------------

REMOVED_KEY = "layer2.0.proj.weight"
REMOVED_AS = "vil.encoder.stages.1.patch_embeddings.projection.weight"
EXTRA_UNMAPPED = "totally_unknown.weight"
EXTRA_IN_BLOCK = "layer1.1.attn.extra_table"


def _wrong_arch(arch: str) -> str:
    """Same structure, different widths (d32 -> d48 in stage 1)."""
    wrong = arch.replace("h2,d32,", "h2,d48,", 1)
    assert wrong != arch
    return wrong


def test_removed_key_listed_as_missing(tmp_path, cls_checkpoint):
    net = {k: v for k, v in cls_checkpoint["net"].items() if k != REMOVED_KEY}
    source = _save(tmp_path, _with_net(cls_checkpoint, net))
    message = _convert_fails(source, tmp_path / "out", match=r"missing \(1\)")
    sections = _sections(message)
    assert sections.get("missing") == [REMOVED_AS], message
    assert "unexpected" not in sections and "shape mismatch" not in sections, message


def test_extra_key_listed_as_unexpected(tmp_path, cls_checkpoint):
    net = dict(cls_checkpoint["net"])
    net[EXTRA_UNMAPPED] = torch.zeros(3)
    net[EXTRA_IN_BLOCK] = torch.zeros(3)
    source = _save(tmp_path, _with_net(cls_checkpoint, net))
    message = _convert_fails(source, tmp_path / "out", match=r"unexpected \(2\)")
    sections = _sections(message)
    unexpected = " ".join(sections.get("unexpected", []))
    assert EXTRA_UNMAPPED in unexpected and "extra_table" in unexpected, message
    assert "missing" not in sections and "shape mismatch" not in sections, message


def test_wrong_arch_listed_as_shape_mismatch(tmp_path, cls_path, cls_checkpoint):
    message = _convert_fails(
        cls_path, tmp_path / "out", match=r"shape mismatch \(\d+\)", arch=_wrong_arch(cls_checkpoint["arch"])
    )
    sections = _sections(message)
    assert any(
        item.startswith(
            "vil.encoder.stages.0.patch_embeddings.projection.weight: checkpoint (32, 3, 4, 4) vs model (48, 3, 4, 4)"
        )
        for item in sections["shape mismatch"]
    ), message
    assert "--arch" in message


def test_all_problems_in_one_message(tmp_path, cls_checkpoint, capsys):
    net = {k: v for k, v in cls_checkpoint["net"].items() if k != REMOVED_KEY}
    net[EXTRA_UNMAPPED] = torch.zeros(3)
    source = _save(tmp_path, _with_net(cls_checkpoint, net))
    out = tmp_path / "out"

    # a removed key and an extra key: both reported by the same error
    message = _convert_fails(source, out, match=r"missing \(1\)(.|\n)*unexpected \(1\)")
    sections = _sections(message)
    assert sections["missing"] == [REMOVED_AS] and sections["unexpected"] == [EXTRA_UNMAPPED], message

    # ... plus a wrong --arch: still one error naming all three kinds of problem
    wrong = _wrong_arch(cls_checkpoint["arch"])
    message = _convert_fails(source, out, match=r"missing(.|\n)*unexpected(.|\n)*shape mismatch", arch=wrong)
    sections = _sections(message)
    assert REMOVED_AS in sections["missing"] and EXTRA_UNMAPPED in sections["unexpected"], message
    assert sections["shape mismatch"], message

    err = _cli_fails(["convert", str(source), str(out), "--arch", wrong], out, capsys, match=r"missing \(1\)")
    assert REMOVED_AS in err and EXTRA_UNMAPPED in err and "shape mismatch" in err


def test_num_classes_differs_from_head(tmp_path, cls_path, capsys):
    out = tmp_path / "out"
    _convert_fails(
        cls_path,
        out,
        match=r"shape mismatch(.|\n)*classifier\.weight: checkpoint \(10, 128\) vs model \(5, 128\)",
        num_classes=5,
    )
    _cli_fails(["convert", str(cls_path), str(out), "--num-classes", "5"], out, capsys, match=r"classifier\.weight")


# --------------------------------------------------------------------------------------------
# conversion: detectron2 files
# --------------------------------------------------------------------------------------------


def test_detectron2_without_head(tmp_path, det_path, det_arch, capsys):
    out = tmp_path / "out"
    _convert_fails(det_path, out, match=r"detectron2 checkpoint.*--head backbone", arch=det_arch, img_size=1333)
    _cli_fails(
        ["convert", str(det_path), str(out), "--arch", det_arch, "--img-size", "1333"],
        out,
        capsys,
        match=r"--head backbone",
    )


def test_detectron2_backbone_file_as_whole_detector(tmp_path, det_path, det_arch, capsys):
    # det_path holds only backbone weights: asking for a whole detector names the missing head.
    out = tmp_path / "out"
    for head, key in (
        ("mask_rcnn", "roi_heads.box_predictor.cls_score.weight"),
        ("retinanet", "head.cls_score.weight"),
    ):
        _convert_fails(det_path, out, match=rf"--head {head}.*no '{key}'.*Check --head", arch=det_arch, head=head)
    _cli_fails(
        ["convert", str(det_path), str(out), "--arch", det_arch, "--head", "mask_rcnn"],
        out,
        capsys,
        match=r"no 'roi_heads.box_predictor.cls_score.weight'",
    )


def test_detectron2_class_count_contradicts_option(tmp_path, det_checkpoint, det_arch):
    model = dict(det_checkpoint["model"])
    model["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 1024)
    path = tmp_path / "with_head.pth"
    torch.save({"model": model}, path)
    _convert_fails(
        path,
        tmp_path / "out",
        match=r"--num-detection-classes 20 contradicts the checkpoint, whose classifier has 80 object classes",
        arch=det_arch,
        head="mask_rcnn",
        num_detection_classes=20,
    )


def test_detectron2_without_backbone_keys(tmp_path, det_checkpoint, det_arch):
    model = {k.replace("backbone.bottom_up.", "backbone.other."): v for k, v in det_checkpoint["model"].items()}
    model["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 4)
    source = _save(tmp_path, {"model": model})
    _convert_fails(source, tmp_path / "out", match=r"No 'backbone\.bottom_up\.\*' keys", head="backbone", arch=det_arch)


def test_detectron2_without_arch(tmp_path, det_path, capsys):
    out = tmp_path / "out"
    _convert_fails(
        det_path, out, match=r"does not record its architecture string.*--arch", head="backbone", img_size=1333
    )
    _cli_fails(
        ["convert", str(det_path), str(out), "--head", "backbone", "--img-size", "1333"],
        out,
        capsys,
        match=r"architecture string.*--arch",
    )


def test_head_option_on_classification_file(tmp_path, cls_path):
    _convert_fails(cls_path, tmp_path / "out", match=r"--head backbone applies to detectron2 files", head="backbone")


# --------------------------------------------------------------------------------------------
# conversion: unsupported options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, match",
    [
        pytest.param(["--sw-exact", "-1"], r"--sw-exact -1.*only 0 .* and 1", id="sw-exact-minus-1"),
        pytest.param(["--sw-exact", "2"], r"--sw-exact 2", id="sw-exact-2"),
        pytest.param(["--mode", "-1"], r"--mode -1", id="mode-minus-1"),
        pytest.param(
            ["--only-glo", "--attn-type", "srformer"],
            r"--only-glo is an option of the longformer",
            id="only-glo-srformer",
        ),
        pytest.param(
            ["--only-glo", "--mode", "1"], r"--mode 1 .*global-only attention does not have", id="only-glo-mode"
        ),
        pytest.param(
            ["--attn-type", "performer", "--sw-exact", "1"], r"--sw-exact 1 .*performer", id="performer-exact"
        ),
        pytest.param(["--attn-type", "bogus"], r"Unknown --attn-type 'bogus'", id="unknown-attn-type"),
        # a longformer checkpoint read as another type: the key report names the difference
        pytest.param(
            ["--attn-type", "performer"], r"(?s)missing.*attention\.qkv\.weight", id="performer-on-longformer"
        ),
        pytest.param(
            ["--attn-type", "linformer"], r"(?s)missing.*attention\.key_projection", id="linformer-on-longformer"
        ),
    ],
)
def test_unsupported_options_cli(tmp_path, cls_path, capsys, args, match):
    out = tmp_path / "out"
    _cli_fails(["convert", str(cls_path), str(out), *args], out, capsys, match=match)


@pytest.mark.parametrize(
    "options, match",
    [
        pytest.param({"sw_exact": -1}, r"--sw-exact -1", id="sw-exact-minus-1"),
        pytest.param({"mode": -1}, r"--mode -1", id="mode-minus-1"),
        pytest.param(
            {"only_glo": True, "attn_type": "full"}, r"--only-glo is an option of the longformer", id="only-glo"
        ),
        pytest.param({"attn_type": "srformer"}, r"(?s)missing.*spatial_reduction", id="srformer-on-longformer"),
        pytest.param({"attn_type": "bogus"}, r"Unknown --attn-type 'bogus'", id="unknown-attn-type"),
    ],
)
def test_unsupported_options_api(tmp_path, cls_path, options, match):
    _convert_fails(cls_path, tmp_path / "out", match=match, **options)


def test_invalid_arch_option_is_a_conversion_error(tmp_path, cls_path, capsys):
    out = tmp_path / "out"
    _convert_fails(cls_path, out, match=r"Invalid options.*unknown letter 'x'", arch="l1,x3_l2_l3")
    _cli_fails(["convert", str(cls_path), str(out), "--arch", "l1,x3_l2_l3"], out, capsys, match=r"unknown letter 'x'")


# --------------------------------------------------------------------------------------------
# conversion: output folder
# --------------------------------------------------------------------------------------------


def test_non_empty_out_dir_without_overwrite(tmp_path, cls_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "nested.bin").write_bytes(b"\x00\x01")

    def snapshot():
        return sorted((str(p.relative_to(out)), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))

    before = snapshot()
    with pytest.raises(ConversionError, match=r"exists and is not empty.*--overwrite"):
        convert_checkpoint(cls_path, out, ConversionOptions())
    assert snapshot() == before
    _assert_no_temporary_siblings(out)

    capsys.readouterr()
    assert main(["convert", str(cls_path), str(out)]) == 2
    assert re.search(r"exists and is not empty.*--overwrite", capsys.readouterr().err)
    assert snapshot() == before
    _assert_no_temporary_siblings(out)


def test_non_empty_out_dir_with_overwrite_is_replaced(tmp_path, cls_path, capsys):
    import os

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    capsys.readouterr()
    old_umask = os.umask(0o027)
    try:
        assert main(["convert", str(cls_path), str(out), "--overwrite"]) == 0, capsys.readouterr().err
    finally:
        os.umask(old_umask)
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    # The folder was written under a temporary name, yet has the mode mkdir gives under the umask (not 0700).
    assert out.stat().st_mode & 0o777 == 0o750
    _assert_no_temporary_siblings(out)


def test_failed_overwrite_keeps_old_content(tmp_path, cls_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ConversionError, match=r"classifier\.weight"):
        convert_checkpoint(cls_path, out, ConversionOptions(num_classes=5), overwrite=True)
    assert (out / "keep.txt").read_text() == "old"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _assert_no_temporary_siblings(out)


def test_out_dir_is_a_file(tmp_path, cls_path, capsys):
    # OUT_DIR names an existing *file*: a ConversionError naming it (exit code 2 from the CLI),
    # not a raw NotADirectoryError traceback; the file is left alone.
    out = tmp_path / "out"
    out.write_text("a file, not a folder")
    with pytest.raises(ConversionError, match=re.escape(str(out))):
        convert_checkpoint(cls_path, out, ConversionOptions())
    assert out.read_text() == "a file, not a folder"
    _assert_no_temporary_siblings(out)

    capsys.readouterr()
    assert main(["convert", str(cls_path), str(out)]) == 2
    assert str(out) in capsys.readouterr().err
    assert out.read_text() == "a file, not a folder"
    _assert_no_temporary_siblings(out)


# --------------------------------------------------------------------------------------------
# not an error: global projections that differ from the local ones
# --------------------------------------------------------------------------------------------

PERTURBED = "layer2.1.attn.query_global.weight"  # stage 2, first of two blocks: reaches the logits
PERTURBED_AS = "vil.encoder.stages.1.layers.0.attention.global_query.weight"


def test_differing_global_projections_are_kept(tmp_path, cls_path, cls_checkpoint):
    net = dict(cls_checkpoint["net"])
    torch.manual_seed(0)
    perturbed = net[PERTURBED].clone() + 0.5 * torch.randn_like(net[PERTURBED])
    net[PERTURBED] = perturbed
    source = _save(tmp_path, _with_net(cls_checkpoint, net))

    report = convert_checkpoint(source, tmp_path / "perturbed", ConversionOptions())
    assert report.folded_global_copies == 0
    reference_report = convert_checkpoint(cls_path, tmp_path / "reference", ConversionOptions())
    assert reference_report.folded_global_copies > 0

    config = json.loads((tmp_path / "perturbed" / "config.json").read_text())
    assert config["share_global_weights"] is False
    assert json.loads((tmp_path / "reference" / "config.json").read_text())["share_global_weights"] is True

    model = ViLForImageClassification.from_pretrained(tmp_path / "perturbed").eval()
    reference = ViLForImageClassification.from_pretrained(tmp_path / "reference").eval()
    assert model.config.share_global_weights is False
    state = model.state_dict()
    assert torch.equal(state[PERTURBED_AS], perturbed)
    # the other global projections are the (unchanged) local ones
    assert torch.equal(
        state["vil.encoder.stages.1.layers.1.attention.global_query.weight"], net["layer2.3.attn.query.weight"]
    )

    pixel_values = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(pixel_values).logits
        reference_logits = reference(pixel_values).logits
    assert logits.shape == reference_logits.shape == (1, 10)
    assert not torch.allclose(logits, reference_logits, atol=1e-5)


def test_num_detection_classes_with_backbone_head_is_refused(det_path, det_arch, tmp_path):
    out_dir = tmp_path / "out"
    _convert_fails(
        det_path,
        out_dir,
        "--num-detection-classes applies to whole detectors",
        arch=det_arch,
        head="backbone",
        num_detection_classes=80,
    )


class _RunsACommand:
    """Unpickling this would run a shell command: what a malicious checkpoint holds."""

    def __reduce__(self):
        import os

        return (os.system, ("echo unpickled > pwned.txt",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")  # torch, on the raw pickle
def test_checkpoint_with_non_tensor_objects_is_refused_without_unsafe_advice(cls_checkpoint, tmp_path, capsys):
    import argparse
    import pickle

    source = _save(tmp_path, {**cls_checkpoint, "args": argparse.Namespace(lr=0.1)})
    message = _convert_fails(source, tmp_path / "out", "is not a plain tensor checkpoint")
    assert "argparse.Namespace" in message and "weights_only=False" not in message
    # A pickle that would run a command, through the command line (the old, non-zip format too).
    for name, payload in (("zip.pth", None), ("raw.pth", pickle.dumps({"net": _RunsACommand()}))):
        path = tmp_path / name
        if payload is None:
            torch.save({"net": _RunsACommand()}, path)
        else:
            path.write_bytes(payload)
        err = _cli_fails(["convert", str(path), str(tmp_path / "out")], tmp_path / "out", capsys, "not a plain tensor")
        assert "weights_only" not in err
        if payload is None:  # the zip format names the object; a raw pickle stops the safe unpickler earlier
            assert "holds pickled Python objects (e.g. posix.system)" in err and "only tensors" in err
    assert not (tmp_path / "pwned.txt").exists() and not Path("pwned.txt").exists()
