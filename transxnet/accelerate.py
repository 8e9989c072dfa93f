"""`accelerated()` / `revert()`: the same TransXNet switched to the fused forwards of `transxnet.fused` and back.

Switching swaps each released module's class for its accelerated subclass in place (the way timm's
`reparameterize_model` swaps modules, without building new ones): parameters, buffers, hooks and the
state dict (keys, order, values) are untouched, and `revert(accelerated(m))` has the original module types.
Subclasses of the released modules (timm's `TimmTransXNet`, a user's) get an accelerated subclass of their own.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch.nn as nn

from .factory import MODELS
from .fused import ACCELERATED, AcceleratedTransXNet, drop_inference_constants
from .model import TransXNet

# Accelerated class -> the class it accelerates (the released ones, and subclasses met so far).
_ORIGINAL: Dict[type, type] = {accelerated: released for released, accelerated in ACCELERATED.items()}
_DERIVED: Dict[type, type] = {}  # subclass of a released class -> its accelerated class


def _accelerated_class(cls: type) -> Optional[type]:
    """The accelerated class for modules of class `cls`, or None when `cls` has no fused forward."""
    if cls in ACCELERATED:
        return ACCELERATED[cls]
    if cls in _ORIGINAL or cls in _DERIVED:
        return _DERIVED.get(cls)
    for released, accelerated_cls in ACCELERATED.items():
        if issubclass(cls, released):
            derived = type(f"Accelerated{cls.__name__}", (accelerated_cls, cls), {"__module__": cls.__module__})
            _DERIVED[cls], _ORIGINAL[derived] = derived, cls
            return derived
    return None


def _holds_transxnet(module: object) -> bool:
    return isinstance(module, nn.Module) and any(isinstance(m, TransXNet) for m in module.modules())


def accelerated(model_or_name: Union[nn.Module, str], **kwargs) -> nn.Module:
    """Return a TransXNet running the fused path.

    model_or_name: a TransXNet, or a module holding one (e.g. timm's features_only wrapper), switched in
    place and returned; or a model name ("transxnet_t", "t", ...) plus the constructor's kwargs,
    `pretrained` included.
    """
    if isinstance(model_or_name, str):
        name = model_or_name if model_or_name.startswith("transxnet_") else f"transxnet_{model_or_name}"
        if name not in MODELS:
            raise ValueError(f"unknown model {model_or_name!r}; expected one of {sorted(MODELS)}")
        model = MODELS[name](**kwargs)
    elif _holds_transxnet(model_or_name):
        if kwargs:
            raise TypeError(f"constructor kwargs {sorted(kwargs)} only apply when a model name is given")
        model = model_or_name
    else:
        raise TypeError(
            "accelerated() takes a TransXNet (or a module holding one) or a model name, "
            f"got {type(model_or_name).__name__}"
        )
    for module in model.modules():
        target = _accelerated_class(type(module))
        if target is not None:
            module.__class__ = target
        drop_inference_constants(module)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Switch an accelerated model (or a module holding one) back to the released eager path, in place."""
    for module in model.modules():
        original = _ORIGINAL.get(type(module))
        if original is not None:
            module.__class__ = original
        drop_inference_constants(module)
    return model


def is_accelerated(model: nn.Module) -> bool:
    """Whether `model` (a TransXNet, or a module holding one) runs the fused path."""
    return any(isinstance(m, AcceleratedTransXNet) for m in model.modules())
