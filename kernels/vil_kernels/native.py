"""Optional C++ kernels (``csrc/``), built with the system's C++ compiler on first use.

Where this builds, the blocked longformer kernel's softmax steps run fused in C++ (``softmax.cpp``),
RoIAlign computes its bilinear taps on the fly (``roi_align.cpp``), NMS runs its greedy loop as written
(``nms.cpp``), and a ViL block's bfloat16 inference writes its layer norms in bfloat16 and widens its residual
branches as it adds them (``block_steps.cpp``); otherwise they run as PyTorch ops (the same results, within float
rounding where sums are regrouped; the Python paths stay the references the tests hold the C++ against). The build
takes seconds, once per machine and torch version; torch keeps it in its extensions folder
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).

``VIL_KERNELS_NATIVE`` chooses: ``auto`` (default) builds and, if that fails, warns once and falls back;
``0`` never builds; ``1`` requires the build and raises if it fails.

On CPUs with AMX (bfloat16 tiles, Linux granting the tile state) or AVX512-BF16 the blocked kernel's bfloat16
forward is one C++ call over the whole batch (``attention_fused.cpp``), its products on AMX tiles or in AVX-512
registers. ``VIL_KERNELS_BF16_FORWARD`` chooses: ``auto`` (default) AMX where the CPU has it, else AVX512-BF16, else
the ATen products; ``amx`` or ``avx512`` require that engine; ``aten`` never runs the C++ forward. Its float32 forward
likewise, in AVX-512 registers on CPUs with AVX-512 (``VIL_KERNELS_F32_FORWARD``: ``auto``, ``avx512`` or ``aten``).
Its backward, float32 or bfloat16, is one C++ call per layer on such CPUs too, bfloat16's products in AVX512-BF16
dot products where the CPU has them (``VIL_KERNELS_BACKWARD``, the same choices).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "VIL_KERNELS_NATIVE"
BF16_FORWARD_VARIABLE = "VIL_KERNELS_BF16_FORWARD"
F32_FORWARD_VARIABLE = "VIL_KERNELS_F32_FORWARD"
BACKWARD_VARIABLE = "VIL_KERNELS_BACKWARD"
_SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in ("softmax.cpp", "attention_fused.cpp", "block_steps.cpp", "roi_align.cpp", "nms.cpp")
]
_lock = threading.Lock()
_built: dict[str, object] = {}  # once decided, "ops": the op namespace or None, and "error": why not


def _mode() -> str:
    """The setting of ``VIL_KERNELS_NATIVE``: 'auto' (default), '0' or '1'."""
    mode = os.environ.get(ENVIRONMENT_VARIABLE, "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={mode!r}: use 'auto' (default), '0' (never build) or '1' (require).")
    return mode


def _build():
    from torch.utils import cpp_extension

    started = time.perf_counter()
    logger.info(
        "loading vil_kernels' C++ kernels (built once per machine and torch version; %s=0 skips them)",
        ENVIRONMENT_VARIABLE,
    )
    cpp_extension.load(
        # one build per torch version: the library links against libtorch
        name="vil_kernels_native_torch" + torch.__version__.split("+")[0].replace(".", "_"),
        sources=[str(source) for source in _SOURCES],
        # -fopenmp: ATen's parallel_for is inline and needs it to use torch's thread pool (the same libgomp)
        # -ffp-contract=off: no fused multiply-adds, so that float sums follow the PyTorch paths' rounding steps
        extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    logger.info("vil_kernels' C++ kernels ready in %.1f s", time.perf_counter() - started)
    return torch.ops.vil_kernels_native


def native_ops():
    """``torch.ops.vil_kernels_native`` (building it the first time), or None where it is off or did not build."""
    mode = _mode()
    if mode == "0":
        return None
    if "ops" not in _built:
        with _lock:
            if "ops" not in _built:
                try:
                    _built["ops"], _built["error"] = _build(), None
                except Exception as error:  # a missing compiler, headers or ninja, or a failed compile
                    _built["ops"], _built["error"] = None, error
                    if mode != "1":
                        logger.warning(
                            "vil_kernels' C++ kernels did not build (%s: %s); using the PyTorch ops, which "
                            "are slower. Install a C++ compiler and ninja, or set %s=0 to silence this.",
                            type(error).__name__,
                            str(error).splitlines()[0] if str(error) else "",
                            ENVIRONMENT_VARIABLE,
                        )
    if _built["ops"] is None and mode == "1":
        error = _built["error"]
        raise RuntimeError(f"{ENVIRONMENT_VARIABLE}=1 but vil_kernels' C++ kernels did not build: {error}") from error
    return _built["ops"]


_ENGINES = {"amx": "on AMX tiles", "avx512": "in AVX512-BF16 registers"}  # of the bfloat16 forward, fastest first
_MISSING = {
    "amx": "this CPU (or its kernel) grants no AMX bfloat16 tiles",
    "avx512": "this CPU has no AVX512-BF16",
}


def _choose(name: str, variable: str, engines: dict[str, str], missing: dict[str, str], available, auto_words: str):
    """``(ops, engine)`` for the native ``name`` pass ("float32 forward", ...) as ``variable`` and this CPU allow, else
    None; the choice and its reason logged when they change. ``available(ops)``: the engines this CPU runs, fastest
    first."""
    setting = os.environ.get(variable, "auto").strip().lower()
    named = " or ".join(f"'{engine}'" for engine in engines)
    if setting not in ("auto", "aten", *engines):
        raise ValueError(
            f"{variable}={setting!r}: use 'auto' (default: {auto_words}), {named} (require that one) or 'aten' "
            "(never: the ATen products)."
        )
    ops = None if setting == "aten" else native_ops()
    here = available(ops) if ops is not None else ()
    engine, reason = None, None
    if setting == "aten":
        reason = f"{variable}=aten"
    elif ops is None:
        reason = "the C++ kernels are off or did not build"
    elif setting == "auto":
        engine = here[0] if here else None
        reason = None if here else missing["auto"]
    elif setting in here:
        engine = setting
    else:
        reason = missing[setting]
    if setting in engines and reason is not None:
        raise RuntimeError(f"{variable}={setting} but that {name} cannot run: {reason}.")
    if _built.get(name, ()) != (engine, reason):
        _built[name] = (engine, reason)
        logger.info(
            "blocked longformer, %s: %s",
            name,
            f"one C++ pass per chunk {engines[engine]}, one call per layer" if engine else f"ATen products ({reason})",
        )
    return None if engine is None else (ops, engine)


def bf16_forward():
    """``(ops, engine)`` where the native bfloat16 attention forward (``ops.longformer_forward_bf16_``) runs here,
    ``engine`` "amx" or "avx512"; None where the ATen products run instead (``VIL_KERNELS_BF16_FORWARD``). The choice
    and its reason are logged when they change."""
    return _choose(
        "bfloat16 forward",
        BF16_FORWARD_VARIABLE,
        _ENGINES,
        _MISSING | {"auto": "this CPU has neither AMX bfloat16 tiles nor AVX512-BF16"},
        _engines,
        "AMX, else AVX512-BF16, where the CPU has them",
    )


def f32_forward():
    """``(ops, "avx512")`` where the native float32 attention forward (``ops.longformer_forward_f32_``) runs here;
    None where the ATen products run instead (``VIL_KERNELS_F32_FORWARD``), logged as ``bf16_forward``'s choice."""
    return _choose_f32("float32 forward", F32_FORWARD_VARIABLE)


def backward():
    """``(ops, "avx512")`` where the native attention backward (``ops.longformer_backward_``, float32 and bfloat16)
    runs here; None where the ATen products run instead (``VIL_KERNELS_BACKWARD``)."""
    return _choose_f32("backward", BACKWARD_VARIABLE)


def _choose_f32(name: str, variable: str):
    return _choose(
        name,
        variable,
        {"avx512": "in AVX-512 registers"},
        {"avx512": "this CPU has no AVX-512", "auto": "this CPU has no AVX-512"},
        lambda ops: ("avx512",) if ops.avx512_available() else (),
        "AVX-512 where the CPU has it",
    )


def _engines(ops) -> tuple[str, ...]:
    """The native bfloat16 forward's engines that this CPU runs, fastest first."""
    if "engines" not in _built:
        available = {"amx": ops.amx_available(), "avx512": ops.avx512_bf16_available()}
        _built["engines"] = tuple(engine for engine in _ENGINES if available[engine])
    return _built["engines"]


__all__ = [
    "BACKWARD_VARIABLE",
    "BF16_FORWARD_VARIABLE",
    "ENVIRONMENT_VARIABLE",
    "F32_FORWARD_VARIABLE",
    "backward",
    "bf16_forward",
    "f32_forward",
    "native_ops",
]
