"""Optional C++ kernels (``csrc/``), built with the system's C++ compiler on first use.

Where this builds, the blocked longformer kernel's softmax steps run fused in C++ (``softmax.cpp``),
RoIAlign computes its bilinear taps on the fly (``roi_align.cpp``) and NMS runs its greedy loop as written
(``nms.cpp``); otherwise they run as PyTorch ops (the same results, within float rounding where sums are
regrouped; the Python paths stay the references the tests hold the C++ against). The build takes seconds,
once per machine and torch version; torch keeps it in its extensions folder (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``).

``VIL_KERNELS_NATIVE`` chooses: ``auto`` (default) builds and, if that fails, warns once and falls back;
``0`` never builds; ``1`` requires the build and raises if it fails.

On CPUs with AMX (bfloat16 tiles, Linux granting the tile state) the blocked kernel's bfloat16 forward is one C++
call over the whole batch (``attention_amx.cpp``). ``VIL_KERNELS_AMX`` chooses: ``auto`` (default) where available,
``0`` never (the ATen products), ``1`` requires it.
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
AMX_ENVIRONMENT_VARIABLE = "VIL_KERNELS_AMX"
_SOURCES = [
    Path(__file__).parent / "csrc" / name for name in ("softmax.cpp", "attention_amx.cpp", "roi_align.cpp", "nms.cpp")
]
_lock = threading.Lock()
_built: dict[str, object] = {}  # once decided, "ops": the op namespace or None, and "error": why not


def _mode(variable: str = ENVIRONMENT_VARIABLE, never: str = "never build") -> str:
    """The setting of ``variable``: 'auto' (default), '0' or '1'."""
    mode = os.environ.get(variable, "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{variable}={mode!r}: use 'auto' (default), '0' ({never}) or '1' (require).")
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


def amx_ops():
    """The native ops where their AMX attention forward runs here (``VIL_KERNELS_AMX``), else None. The choice and
    its reason are logged when they change."""
    mode = _mode(AMX_ENVIRONMENT_VARIABLE, "never: the ATen products")
    ops = None if mode == "0" else native_ops()
    if mode == "0":
        reason = f"{AMX_ENVIRONMENT_VARIABLE}=0"
    elif ops is None:
        reason = "the C++ kernels are off or did not build"
    elif not _amx_available(ops):
        reason = "this CPU (or its kernel) grants no AMX bfloat16 tiles"
    else:
        reason = None
    if mode == "1" and reason is not None:
        raise RuntimeError(f"{AMX_ENVIRONMENT_VARIABLE}=1 but the AMX attention forward cannot run: {reason}.")
    if _built.get("amx_reason", "") != reason:
        _built["amx_reason"] = reason
        logger.info(
            "blocked longformer, bfloat16 forward: %s",
            "one AMX pass per chunk, one call per layer" if reason is None else f"ATen products ({reason})",
        )
    return ops if reason is None else None


def _amx_available(ops) -> bool:
    if "amx" not in _built:
        _built["amx"] = bool(ops.amx_available())
    return _built["amx"]


__all__ = ["AMX_ENVIRONMENT_VARIABLE", "ENVIRONMENT_VARIABLE", "amx_ops", "native_ops"]
