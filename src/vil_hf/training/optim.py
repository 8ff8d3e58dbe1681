"""Optimizers (AdamW as vil-reference section 5, SGD with momentum as detectron2), their parameter groups, and
the warm-up + step learning-rate schedule."""

from __future__ import annotations

import bisect

import torch
from torch import nn

from .config import OptimSection

# ViL's position tables and global tokens: the original excludes them from weight decay.
NO_DECAY_NAMES = (
    "row_embeddings",
    "column_embeddings",
    "global_embeddings",
    "global_tokens",
    "relative_position_bias_table",
    "global_to_local_bias",
    "local_to_global_bias",
    "global_to_global_bias",
)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def no_weight_decay(name: str, parameter: nn.Parameter, module: nn.Module) -> bool:
    """Norm parameters, biases, position tables and global tokens are not decayed."""
    leaf = name.rsplit(".", 1)[-1]
    return isinstance(module, _NORMS) or leaf == "bias" or parameter.ndim <= 1 or leaf in NO_DECAY_NAMES


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for leaf, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            name = f"{module_name}.{leaf}" if module_name else leaf
            (no_decay if no_weight_decay(name, parameter, module) else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# Devices where torch has the fused (one kernel per step) AdamW and SGD. The default per-parameter loop costs
# ~16 small ops per tensor: 7.3 ms against 2.3 ms fused for the demo detector's 144 tensors on a 2-core CPU.
_FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(
    model: nn.Module, optim: OptimSection, device: torch.device | str | None = None
) -> torch.optim.Optimizer:
    """`optim.optimizer`: adamw (`optim.betas`) or sgd (`optim.momentum`, no Nesterov, as detectron2); both decay
    the weights of `parameter_groups` only. Frozen parameters (requires_grad False) are left out.

    `device`: where the parameters will train (the model may still be on the CPU); on the CPU and CUDA the step is
    torch's fused one (the same update up to float rounding), elsewhere the per-parameter loop.
    """
    groups = parameter_groups(model, optim.weight_decay)
    fused = device is not None and torch.device(device).type in _FUSED_DEVICES
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=0.0, fused=fused)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), weight_decay=0.0, fused=fused)


def lr_factor(iteration: int, optim: OptimSection) -> float:
    """detectron2's WarmupMultiStepLR: linear warm-up from `warmup_factor`, then x gamma at each step."""
    factor = optim.gamma ** bisect.bisect_right(optim.steps, iteration)
    if iteration < optim.warmup_iters:
        alpha = iteration / optim.warmup_iters
        factor *= optim.warmup_factor * (1 - alpha) + alpha
    return factor


def set_learning_rate(optimizer: torch.optim.Optimizer, optim: OptimSection, iteration: int) -> float:
    """Sets every group's rate for `iteration`; stateless, so resuming needs only the iteration."""
    lr = optim.lr * lr_factor(iteration, optim)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
