"""Linear layers of bfloat16 inference on CPU as oneDNN products, the bias and the MLP's GELU fused into them.

ATen's CPU ``addmm`` copies the broadcast bias into its fresh output, then accumulates the product onto it: one more
pass over the output, and on a large map the pass that faults its pages in. oneDNN's linear adds the same bfloat16
bias to each block of float32 sums before rounding them once (the same value), and applies the MLP's GELU to those
sums in that pass, where ATen rounds the product to bfloat16 and runs GELU as a pass of its own (GELU of the unrounded
sums differs from it by at most a bfloat16 step of the output).

Only without autograd (oneDNN's linear has no backward here) and outside traced graphs (the compiler fuses on its
own terms), and only where ``F.linear`` would run in bfloat16: under CPU bfloat16 autocast, or with bfloat16 inputs
and weights. ``VIL_FUSED_LINEAR=0`` turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

ENVIRONMENT_VARIABLE = "VIL_FUSED_LINEAR"

# transformers' activation names -> oneDNN's post-op (attribute, algorithm) on the float32 sums
_FUSED_ACTIVATIONS = {"gelu": ("gelu", "none")}


@functools.cache
def _onednn_bfloat16() -> bool:
    """oneDNN is built in and runs bfloat16 products on this CPU, and the environment does not turn it off."""
    setting = os.environ.get(ENVIRONMENT_VARIABLE, "1")
    if setting not in ("0", "1"):
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={setting!r}: use 1 (default) or 0")
    if setting == "0" or not torch.backends.mkldnn.is_available():
        return False
    bfloat16_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return hasattr(torch.ops.mkldnn, "_linear_pointwise") and bfloat16_supported is not None and bfloat16_supported()


def runs_fused(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.linear(hidden_states, weight)`` here runs in bfloat16 on CPU with no autograd or tracing, and oneDNN
    can take it."""
    if hidden_states.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled("cpu"):
        narrow = torch.get_autocast_dtype("cpu") == torch.bfloat16
        in_bfloat16 = narrow and {hidden_states.dtype, weight.dtype} <= {torch.float32, torch.bfloat16}
    else:
        in_bfloat16 = hidden_states.dtype == weight.dtype == torch.bfloat16
    return in_bfloat16 and _onednn_bfloat16()


def fusable_activation(name: str) -> bool:
    return name in _FUSED_ACTIVATIONS


def is_plain(layer: nn.Module, kind: type[nn.Module]) -> bool:
    """``layer`` is a ``kind`` itself, with no forward hooks: its parameters are all that calling it computes with, so
    a fused path may take them instead. A subclass or a replacement (a LoRA adapter, a quantised layer) or a hook
    (feature extraction) is called as it is."""
    hooks = (layer._forward_hooks, layer._forward_pre_hooks)
    global_hooks = (module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks)
    return type(layer) is kind and not any(hooks) and not any(global_hooks)


def is_plain_linear(layer: nn.Module) -> bool:
    return is_plain(layer, nn.Linear)


def layer_forward(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``layer(hidden_states)``, through oneDNN where the layer is a plain linear one and ``runs_fused``."""
    if is_plain_linear(layer) and runs_fused(hidden_states, layer.weight):
        return fused_product(hidden_states, layer.weight, layer.bias)
    return layer(hidden_states)


def linear(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """``F.linear`` (then the activation named, one of ``_FUSED_ACTIVATIONS``) in bfloat16 through oneDNN, where
    ``runs_fused``; otherwise plain ``F.linear``, which takes no activation."""
    if not runs_fused(hidden_states, weight):
        if activation is not None:
            raise ValueError(f"activation {activation!r} fuses only where runs_fused(); apply it after F.linear")
        return F.linear(hidden_states, weight, bias)
    return fused_product(hidden_states, weight, bias, activation)


def fused_product(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """``linear``'s oneDNN product, for callers that have found ``runs_fused`` already (once for many calls: the MLP's
    chunks); operands of other dtypes are cast to bfloat16, as autocast would."""
    attribute, algorithm = _FUSED_ACTIVATIONS[activation] if activation else ("none", "")
    narrow = torch.bfloat16
    bias = None if bias is None else bias.to(narrow)
    return _onednn_linear(hidden_states.to(narrow), weight.to(narrow), bias, attribute, algorithm)


def _onednn_linear(hidden_states, weight, bias, attribute: str, algorithm: str) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(hidden_states, weight, bias, attribute, [], algorithm)
