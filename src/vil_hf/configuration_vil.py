"""ViLConfig, and the parser of the original architecture strings."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

# Letters of the original architecture string, their meaning and the original's defaults.
ARCH_LETTERS: dict[str, tuple[str, int]] = {
    "l": ("stage number, 1..N in order", 1),
    "h": ("attention heads", 3),
    "d": ("hidden size", 192),
    "n": ("number of blocks", 1),
    "s": ("1: the model's efficient attention, 0: full attention", 1),
    "g": ("global tokens", 1),
    "p": ("patch size (stride of the stage's patch embedding)", 2),
    "f": (
        "size parameter of the stage's attention: longformer window W, srformer reduction ratio r, "
        "performer random features, linformer projected length k",
        7,
    ),
    "a": ("1: absolute position embedding, 0: relative position bias", 1),
}

# Attention types this package implements; "full" is what `s0` selects. "global" is the original's
# longformer with ONLY_GLOBAL (local queries see only the global tokens); the others are the
# paper's ablations (vil-reference section 3).
EFFICIENT_ATTENTION_TYPES = ("longformer", "global", "srformer", "performer", "linformer")
ATTENTION_TYPES = EFFICIENT_ATTENTION_TYPES + ("full",)
LONGFORMER_IMPLEMENTATIONS = ("auto", "blocked", "dense", "flex", "vectorized", "reference")

# Published backbones (vil-reference section 1). Classification strings use full attention in
# stages 3-4; the "_sparse" detection strings use the longformer everywhere.
_DIMS = {
    "tiny": ((48, 96, 192, 384), (1, 3, 3, 6), (1, 1, 9, 1)),
    "small": ((96, 192, 384, 768), (3, 3, 6, 12), (1, 2, 8, 1)),
    "medium-deep": ((96, 192, 384, 768), (3, 3, 6, 12), (1, 4, 16, 1)),
    "medium-wide": ((192, 384, 512, 768), (3, 6, 8, 12), (1, 2, 8, 1)),
    "base-deep": ((96, 192, 384, 768), (3, 3, 6, 12), (1, 8, 24, 1)),
    "base-wide": ((192, 384, 768, 1024), (3, 6, 12, 16), (1, 2, 8, 1)),
}


def published_arch(name: str, sparse: bool = False, absolute: bool = False) -> str:
    """Architecture string of a published ViL backbone (``tiny``, ``small``, ``medium-deep``, ...).

    ``sparse=True`` gives the detection "_sparse" string (longformer in every stage), otherwise the
    ImageNet string (full attention in stages 3-4). ``absolute`` selects `a1` instead of `a0`.
    """
    if name not in _DIMS:
        raise ValueError(f"Unknown published ViL model {name!r}; choose one of {sorted(_DIMS)}.")
    dims, heads, depths = _DIMS[name]
    stages = []
    for i, (d, h, n) in enumerate(zip(dims, heads, depths)):
        s = 1 if sparse or i < 2 else 0
        stages.append(f"l{i + 1},h{h},d{d},n{n},s{s},g{1 if i < 3 else 0},p{4 if i == 0 else 2},f7,a{int(absolute)}")
    return "_".join(stages)


PUBLISHED_MODELS = tuple(_DIMS)


def parse_arch(arch: str) -> list[dict[str, int]]:
    """Parse an original architecture string into one dict of letters per stage.

    Unlike the original, unknown letters, malformed values and missing or repeated stages are errors.
    """
    if not isinstance(arch, str) or not arch.strip():
        raise ValueError(
            f"arch must be a non-empty architecture string such as {published_arch('small')!r}, got {arch!r}."
        )
    known = ", ".join(f"{k} ({v[0]})" for k, v in ARCH_LETTERS.items())
    stages = []
    for position, stage in enumerate(arch.strip().split("_"), start=1):
        fields: dict[str, int] = {}
        for field in stage.split(","):
            field = field.strip()
            if not field:
                raise ValueError(
                    f"arch: stage {position} ({stage!r}) has an empty field; fields are letter+integer separated by ','."
                )
            letter, value = field[0], field[1:]
            if letter not in ARCH_LETTERS:
                raise ValueError(
                    f"arch: unknown letter {letter!r} in stage {position} ({stage!r}). Known letters: {known}."
                )
            if not value.isdigit():
                raise ValueError(
                    f"arch: field {field!r} in stage {position} needs a non-negative integer after {letter!r}."
                )
            if letter in fields:
                raise ValueError(f"arch: letter {letter!r} appears twice in stage {position} ({stage!r}).")
            fields[letter] = int(value)
        stages.append({letter: fields.get(letter, default) for letter, (_, default) in ARCH_LETTERS.items()})
    numbers = [stage["l"] for stage in stages]
    if numbers != list(range(1, len(stages) + 1)):
        raise ValueError(
            f"arch: stages must be numbered l1, l2, ... in order with none missing or repeated; got {numbers} in {arch!r}."
        )
    if len(stages) not in (3, 4):
        raise ValueError(f"arch: ViL has 3 or 4 stages, got {len(stages)} in {arch!r}.")
    for position, stage in enumerate(stages, start=1):
        for letter in ("s", "a"):
            if stage[letter] not in (0, 1):
                raise ValueError(f"arch: {letter}{stage[letter]} in stage {position} must be {letter}0 or {letter}1.")
    return stages


# The per-stage lists a ViLConfig stores, one entry per stage.
STAGE_FIELDS = (
    "hidden_sizes",
    "num_heads",
    "depths",
    "attention_types",
    "num_global_tokens",
    "patch_sizes",
    "window_sizes",
    "use_absolute_embeddings",
)


def stage_lists_from_arch(arch: str, attention_type: str = "longformer") -> dict[str, list]:
    """The per-stage lists that ViLConfig stores, from an architecture string (`s1` -> attention_type)."""
    stages = parse_arch(arch)
    return {
        "hidden_sizes": [s["d"] for s in stages],
        "num_heads": [s["h"] for s in stages],
        "depths": [s["n"] for s in stages],
        "attention_types": [attention_type if s["s"] else "full" for s in stages],
        "num_global_tokens": [s["g"] for s in stages],
        "patch_sizes": [s["p"] for s in stages],
        "window_sizes": [s["f"] for s in stages],
        "use_absolute_embeddings": [bool(s["a"]) for s in stages],
    }


def _indices_of_legacy_stage_names(
    saved_stage_names: list[str] | None, stage_names: list[str], out_indices: list[int] | None
) -> list[int] | None:
    """`out_indices` in today's numbering, given the `stage_names` a saved config carries.

    Configs written before the stem was added have ``stage_names == ["stage1", ...]`` and count the stages
    from 0; their indices move up by one (negative ones count from the end and stay). Their `out_features`
    name the same stages in both numberings.
    """
    if saved_stage_names is None or list(saved_stage_names) == stage_names:
        return out_indices
    if list(saved_stage_names) != stage_names[1:]:
        raise ValueError(
            f"stage_names {list(saved_stage_names)} do not match this ViL's stages {stage_names}; stage_names "
            "follow from the per-stage lists and need not be given."
        )
    if out_indices is None:
        return None
    return [index + 1 if index >= 0 else index for index in out_indices]


class ViLConfig(BackboneConfigMixin, PretrainedConfig):
    r"""Configuration of a Vision Longformer (ViL, arXiv:2103.15358).

    Build it from an original architecture string (``ViLConfig(arch="l1,h3,d96,...")``) or from the
    explicit per-stage lists below, which are what it stores. Both at once must agree.

    Args:
        arch: original architecture string; parsed at construction into the per-stage lists.
        hidden_sizes, num_heads, depths, num_global_tokens, patch_sizes:
            per stage: letters d, h, n, g and p of the original string.
        window_sizes: per stage, letter f: the size parameter of the stage's attention, which the
            original reuses for every type: the longformer (and global-only) window W, the srformer
            reduction ratio r, the performer's number of random features, the linformer's
            projected length k. Full attention ignores it.
        attention_types: per stage, ``attention_type`` or ``"full"`` (letter s). "Partial X" models
            are X in stages 1-2 and full in stages 3-4.
        use_absolute_embeddings: per stage, letter a: factorised absolute embedding (True) or
            relative position bias (False). As in the original, only longformer, global-only and
            full stages have relative bias tables; srformer, performer and linformer stages with
            a0 get no position information at all.
        attention_type: the efficient attention that `s1` selects (original ``--attn-type``, with
            ``--only-glo`` giving ``"global"``): ``"longformer"``, ``"global"`` (local queries
            attend only to the global tokens), ``"srformer"`` (keys and values from a spatially
            reduced map), ``"performer"`` (FAVOR+ softmax kernel) or ``"linformer"`` (keys and
            values projected along the sequence; fixed input size).
        exact_window: the original's SW_EXACT=1 ((2W+1)^2 window centred on each query) instead of
            the published sliding chunks.
        random_shift: the original's MODE>0: in training, local queries see their own chunk and one
            random neighbour chunk. Evaluation always uses all nine. Switch it off with
            ``model.set_random_shift(False)`` (the original does for the last 25% of epochs).
        average_pool: classify from the mean of all final tokens even when the last stage has
            global tokens (otherwise the first global token is used, as the original does).
        share_global_weights: global queries use the local query/kv/proj weights (every published
            model). False gives them their own `global_*` projections (longformer and global-only).
        performer_redraw_interval: in training, the performer's random projections are redrawn as
            the original does: each training forward first checks a counter; when it has reached
            this interval the projections are redrawn and it restarts from 0, otherwise it is
            incremented (so 1, the original classification setting, redraws every second call).
            ``None`` keeps them fixed. Evaluation never redraws.
        linformer_share_kv: the linformer uses one sequence projection for keys and values
            (original SHARE_KV).
        patch_embed_norm: LayerNorm after each patch embedding (the original's NORM_EMBED).
        image_size: size the absolute tables and full-attention bias tables are built for; like
            the original it is rounded up to a multiple of the total stride (1333 -> 1344).
        longformer_implementation: ``"auto"`` or a name from ``vil_kernels``: ``blocked`` (CPU fast path),
            ``dense`` (one masked attention over the whole map: the CPU fast path for small maps),
            ``flex`` (FlexAttention, CUDA only), ``vectorized``, ``reference`` (plain, for tests).
            ``auto`` picks, per layer call: ``flex`` on CUDA; on CPU ``dense`` when the map has at most
            ``DENSE_MAX_TOKENS_PER_WINDOW`` x 9 W^2 tokens (up to 18x18 at window 7; see
            ``vil_kernels.longformer``), else ``blocked``, or ``vectorized`` when attention dropout is
            on; while torch.compile / torch.export trace, ``blocked``.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        chunk_size_feed_forward: (transformers' standard field) tokens that each block's LayerNorm
            and MLP take at a time; chunks change the speed, not the result. 0, the default, lets
            ViL choose: on CPU, chunks of about 8 MiB of MLP hidden activations (the MLP is
            memory-bound there, and a whole stage-1 map's hidden activations are ~90 MB); on other
            devices, the whole sequence at once.
        layer_norm_eps: every LayerNorm's eps (1e-6, which the original hard-codes).
        out_features, out_indices: feature maps that ViLBackbone returns, named and numbered as in
            ``stage_names``: ``["stem", "stage1", ..., "stage4"]``, as for Swin, ResNet and ConvNeXt. The
            stem is stage 1's patch embedding (stride 4, ``hidden_sizes[0]`` channels, before stage 1's
            blocks), so ``out_indices=[1, 2, 3, 4]`` are the four stages. Folders saved before the stem
            existed (``stage_names`` without ``"stem"``, indices one lower) load with the stages they chose.
    """

    model_type = "vil"
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(
        self,
        arch: str | None = None,
        hidden_sizes: list[int] | None = None,
        num_heads: list[int] | None = None,
        depths: list[int] | None = None,
        attention_types: list[str] | None = None,
        num_global_tokens: list[int] | None = None,
        patch_sizes: list[int] | None = None,
        window_sizes: list[int] | None = None,
        use_absolute_embeddings: list[bool] | None = None,
        attention_type: str = "longformer",
        exact_window: bool = False,
        random_shift: bool = False,
        average_pool: bool = False,
        share_global_weights: bool = True,
        patch_embed_norm: bool = True,
        image_size: int = 224,
        num_channels: int = 3,
        mlp_ratio: float = 4.0,
        hidden_act: str = "gelu",
        qkv_bias: bool = True,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        longformer_implementation: str = "auto",
        performer_redraw_interval: int | None = 1,
        linformer_share_kv: bool = False,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        **kwargs: Any,
    ):
        if attention_type not in EFFICIENT_ATTENTION_TYPES:
            raise ValueError(
                f"attention_type must be one of {list(EFFICIENT_ATTENTION_TYPES)} (the attention `s1` selects), got {attention_type!r}."
            )
        explicit = {
            "hidden_sizes": hidden_sizes,
            "num_heads": num_heads,
            "depths": depths,
            "attention_types": attention_types,
            "num_global_tokens": num_global_tokens,
            "patch_sizes": patch_sizes,
            "window_sizes": window_sizes,
            "use_absolute_embeddings": use_absolute_embeddings,
        }
        if arch is None and all(value is None for value in explicit.values()):
            arch = published_arch("small")
        if arch is not None:
            parsed = stage_lists_from_arch(arch, attention_type)
            for name, value in explicit.items():
                if value is not None and list(value) != parsed[name]:
                    raise ValueError(
                        f"{name}={list(value)} contradicts arch {arch!r}, which gives {parsed[name]}. "
                        "Pass the architecture string or the per-stage lists, not both."
                    )
            explicit = parsed
        missing = [name for name, value in explicit.items() if value is None]
        if missing:
            raise ValueError(f"Without arch, every per-stage list is needed; missing: {', '.join(missing)}.")

        self.attention_type = attention_type
        self.hidden_sizes = [int(v) for v in explicit["hidden_sizes"]]
        self.num_heads = [int(v) for v in explicit["num_heads"]]
        self.depths = [int(v) for v in explicit["depths"]]
        self.attention_types = [str(v) for v in explicit["attention_types"]]
        self.num_global_tokens = [int(v) for v in explicit["num_global_tokens"]]
        self.patch_sizes = [int(v) for v in explicit["patch_sizes"]]
        self.window_sizes = [int(v) for v in explicit["window_sizes"]]
        self.use_absolute_embeddings = [bool(v) for v in explicit["use_absolute_embeddings"]]
        self.exact_window = bool(exact_window)
        self.random_shift = bool(random_shift)
        self.average_pool = bool(average_pool)
        self.share_global_weights = bool(share_global_weights)
        self.patch_embed_norm = bool(patch_embed_norm)
        self.image_size = image_size
        self.num_channels = num_channels
        self.mlp_ratio = mlp_ratio
        self.hidden_act = hidden_act
        self.qkv_bias = qkv_bias
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.longformer_implementation = longformer_implementation
        self.performer_redraw_interval = performer_redraw_interval
        self.linformer_share_kv = bool(linformer_share_kv)
        self._validate()

        self.arch = self.to_arch_string()
        self.num_layers = sum(self.depths)
        self.hidden_size = self.hidden_sizes[-1]
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]
        out_indices = _indices_of_legacy_stage_names(kwargs.pop("stage_names", None), self.stage_names, out_indices)
        super().__init__(**kwargs)
        chunk = self.chunk_size_feed_forward
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ValueError(
                f"chunk_size_feed_forward must be a non-negative number of tokens (0: ViL chooses), got {chunk!r}."
            )
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

    def _validate(self) -> None:
        lists = {name: getattr(self, name) for name in STAGE_FIELDS}
        lengths = {name: len(value) for name, value in lists.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"Per-stage lists must all have one entry per stage; got lengths {lengths}.")
        if lengths["depths"] not in (3, 4):
            raise ValueError(f"ViL has 3 or 4 stages; the per-stage lists have {lengths['depths']}.")
        for stage, (d, h) in enumerate(zip(self.hidden_sizes, self.num_heads), start=1):
            if h < 1 or d < 1 or d % h:
                raise ValueError(
                    f"hidden_sizes[{stage - 1}]={d} must be a positive multiple of num_heads[{stage - 1}]={h} (stage {stage})."
                )
        for name in ("depths", "patch_sizes", "window_sizes"):
            for stage, value in enumerate(lists[name], start=1):
                if value < 1:
                    raise ValueError(f"{name}[{stage - 1}] must be at least 1, got {value} (stage {stage}).")
        for stage, g in enumerate(self.num_global_tokens, start=1):
            if g < 0:
                raise ValueError(f"num_global_tokens[{stage - 1}] must be >= 0, got {g} (stage {stage}).")
        for stage, kind in enumerate(self.attention_types, start=1):
            if kind not in (self.attention_type, "full"):
                raise ValueError(
                    f"attention_types[{stage - 1}]={kind!r}: a stage runs attention_type ({self.attention_type!r}) or 'full'; "
                    f"known types: {list(ATTENTION_TYPES)}."
                )
        for stage, (kind, g) in enumerate(zip(self.attention_types, self.num_global_tokens), start=1):
            if kind == "global" and g < 1:
                raise ValueError(
                    f"attention_types[{stage - 1}]='global' (local queries see only the global tokens) needs global "
                    f"tokens, but num_global_tokens[{stage - 1}]=0 (stage {stage}); give the stage g1 or more, or make it full."
                )
        interval = self.performer_redraw_interval
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 0):
            raise ValueError(
                f"performer_redraw_interval must be a non-negative integer or None (never redraw), got {interval!r}."
            )
        for stage, (absolute, d) in enumerate(zip(self.use_absolute_embeddings, self.hidden_sizes), start=1):
            if absolute and d % 2:
                raise ValueError(
                    f"use_absolute_embeddings[{stage - 1}] needs an even hidden size (rows and columns get d/2 each); "
                    f"hidden_sizes[{stage - 1}]={d}."
                )
        if self.exact_window and self.random_shift:
            raise ValueError(
                "exact_window=True and random_shift=True contradict each other: random shifting samples whole "
                "chunks, the exact window does not use chunks. Switch one off."
            )
        if self.longformer_implementation not in LONGFORMER_IMPLEMENTATIONS:
            raise ValueError(
                f"longformer_implementation must be one of {list(LONGFORMER_IMPLEMENTATIONS)}, got {self.longformer_implementation!r}."
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")
        sizes = self.image_size if isinstance(self.image_size, (list, tuple)) else [self.image_size]
        if len(sizes) not in (1, 2) or any(int(s) < 1 for s in sizes):
            raise ValueError(f"image_size must be a positive int or a (height, width) pair, got {self.image_size!r}.")

    def to_arch_string(self) -> str:
        """The original architecture string of this configuration."""
        stages = []
        for i in range(len(self.depths)):
            stages.append(
                f"l{i + 1},h{self.num_heads[i]},d{self.hidden_sizes[i]},n{self.depths[i]},"
                f"s{int(self.attention_types[i] != 'full')},g{self.num_global_tokens[i]},p{self.patch_sizes[i]},"
                f"f{self.window_sizes[i]},a{int(self.use_absolute_embeddings[i])}"
            )
        return "_".join(stages)

    def table_grid_sizes(self) -> list[tuple[int, int]]:
        """Per stage, the (rows, columns) grid that absolute and full-attention tables are built for.

        As in the original detection backbone, ``image_size`` is first rounded up to a multiple of the
        total stride; for the published 224 and 384 this changes nothing.
        """
        total_stride = 1
        for p in self.patch_sizes:
            total_stride *= p
        size = self.image_size if isinstance(self.image_size, (list, tuple)) else (self.image_size, self.image_size)
        rows, cols = ((int(s) + total_stride - 1) // total_stride * total_stride for s in (size[0], size[-1]))
        grids = []
        for p in self.patch_sizes:
            rows, cols = rows // p, cols // p
            grids.append((rows, cols))
        return grids


__all__ = ["ViLConfig", "parse_arch", "stage_lists_from_arch", "published_arch", "PUBLISHED_MODELS", "ARCH_LETTERS"]
