"""`accelerated()` / `revert()`: the same TransXNet switched to the fused forwards of `transxnet.fused` and back.

Switching swaps each released module's class for its accelerated subclass in place (the way timm's
`reparameterize_model` swaps modules, without building new ones): parameters, buffers, hooks and the
state dict (keys, order, values) are untouched, and `revert(accelerated(m))` has the original module types.
"""
from __future__ import annotations

from typing import Union

import torch.nn as nn

from .factory import MODELS
from .fused import ACCELERATED, RELEASED, AcceleratedTransXNet
from .model import TransXNet


def accelerated(model_or_name: Union[TransXNet, str], **kwargs) -> TransXNet:
    """Return a TransXNet running the fused path.

    model_or_name: a TransXNet instance (switched in place and returned) or a model
    name ("transxnet_t", "t", ...) plus the constructor's kwargs, `pretrained` included.
    """
    if isinstance(model_or_name, str):
        name = model_or_name if model_or_name.startswith("transxnet_") else f"transxnet_{model_or_name}"
        if name not in MODELS:
            raise ValueError(f"unknown model {model_or_name!r}; expected one of {sorted(MODELS)}")
        model = MODELS[name](**kwargs)
    elif isinstance(model_or_name, TransXNet):
        if kwargs:
            raise TypeError(f"constructor kwargs {sorted(kwargs)} only apply when a model name is given")
        model = model_or_name
    else:
        raise TypeError(f"accelerated() takes a TransXNet or a model name, got {type(model_or_name).__name__}")
    _swap_classes(model, ACCELERATED)
    model._rpe_cache = {}
    return model


def revert(model: TransXNet) -> TransXNet:
    """Switch an accelerated model back to the released eager path (in place)."""
    _swap_classes(model, RELEASED)
    model.__dict__.pop("_rpe_cache", None)
    return model


def is_accelerated(model: nn.Module) -> bool:
    return isinstance(model, AcceleratedTransXNet)


def _swap_classes(model: nn.Module, mapping: dict) -> None:
    for module in model.modules():
        target = mapping.get(type(module))
        if target is not None:
            module.__class__ = target
