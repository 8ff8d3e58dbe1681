"""Activation checkpointing for the detectors' heavy head parts, switched by transformers' own
`model.gradient_checkpointing_enable()` / `activation_checkpointing_enable()`.

transformers' `GradientCheckpointingLayer` passes a layer's positional arguments to the checkpoint function
as they are; the heads take lists of maps (one per pyramid level), which reentrant checkpointing
(`use_reentrant=True`) would not see as inputs, silently cutting the gradient to the backbone. A
`CheckpointedModule` hands every tensor found in its arguments to the checkpoint function one by one, so
both kinds of checkpointing give the gradients of the plain forward.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten


class CheckpointedModule(nn.Module):
    """An `nn.Module` whose forward is recomputed in the backward when transformers turns checkpointing on.

    transformers' `_set_gradient_checkpointing` sets `gradient_checkpointing` and `_gradient_checkpointing_func`
    on every module that has the attribute; in training, with gradients enabled, the forward then runs inside
    that function (by default `torch.utils.checkpoint.checkpoint(use_reentrant=False)`), keeping only its
    inputs. Arguments and results may be any nesting of lists, tuples and dicts of tensors and other values.
    """

    gradient_checkpointing = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" not in cls.__dict__:
            return
        forward = cls.forward

        @functools.wraps(forward)
        def checkpointed_forward(self, *args, **kwargs):
            # A subclass that overrides forward again is wrapped again: only the outermost wrapper checkpoints.
            outermost = type(self).forward is checkpointed_forward
            if not (outermost and self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
                return forward(self, *args, **kwargs)
            leaves, spec = tree_flatten((args, kwargs))
            tensor_slots = [index for index, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
            output_spec = []

            def run(*tensors):
                filled = list(leaves)
                for index, tensor in zip(tensor_slots, tensors):
                    filled[index] = tensor
                call_args, call_kwargs = tree_unflatten(filled, spec)
                outputs, structure = tree_flatten(forward(self, *call_args, **call_kwargs))
                output_spec[:] = [structure]  # the same on the recomputation
                return tuple(outputs)

            outputs = self._gradient_checkpointing_func(run, *(leaves[index] for index in tensor_slots))
            return tree_unflatten(list(outputs), output_spec[0])

        cls.forward = checkpointed_forward
