"""`accelerated()`: the same TransXNet, running fused ops and exact fusions.

What changes (the state dict does not):
* The IDConv / OSRA / multi-scale depthwise ops run on the best backend
  (`transxnet_kernels`; they do for the plain model too).
* MS-FFN's dwconv + residual + GELU + BatchNorm runs as one op (`ms_ffn_middle`),
  in training with nn.BatchNorm2d's exact batch-statistics and running-stat semantics.
* The relative-position bias is resized once per stage instead of once per block,
  and cached per input size when no gradient is needed.
* Eval mode only: every BatchNorm that sits next to a conv is folded into it
  (stem, downsamplers, IDConv's proj, OSRA's reduction, the STE's three BNs, fc2).
  Folding is exact in real arithmetic; results move by float rounding only.
"""
from __future__ import annotations

from typing import Union

import torch.nn as nn

from .factory import MODELS
from .model import ConvNorm, HybridTokenMixer, Mlp, TransXNet

# The modules with a fused path (a `fused` flag).
_FUSABLE = (ConvNorm, HybridTokenMixer, Mlp, TransXNet)


def _set_fused(model: nn.Module, fused: bool) -> None:
    for module in model.modules():
        if isinstance(module, _FUSABLE):
            module.fused = fused
        if isinstance(module, TransXNet):  # (issue 14: also TransXNets inside a wrapper)
            module._rpe_cache.clear()


def _wraps_transxnet(module: object) -> bool:
    """(issue 14) A module holding a TransXNet, such as timm's features_only wrapper."""
    return isinstance(module, nn.Module) and any(isinstance(m, TransXNet) for m in module.modules())


def accelerated(model_or_name: Union[TransXNet, str], **kwargs) -> TransXNet:
    """Return a TransXNet running the fused path.

    model_or_name: a TransXNet instance (switched in place and returned), a module that wraps one
    (e.g. timm's features_only wrapper; switched in place and returned), or a model
    name ("transxnet_t", "t", ...) plus the constructor's kwargs, `pretrained` included.
    """
    if isinstance(model_or_name, str):
        name = model_or_name if model_or_name.startswith("transxnet_") else f"transxnet_{model_or_name}"
        if name not in MODELS:
            raise ValueError(f"unknown model {model_or_name!r}; expected one of {sorted(MODELS)}")
        model = MODELS[name](**kwargs)
    elif isinstance(model_or_name, TransXNet) or _wraps_transxnet(model_or_name):
        if kwargs:
            raise TypeError(f"constructor kwargs {sorted(kwargs)} only apply when a model name is given")
        model = model_or_name
    else:
        raise TypeError("accelerated() takes a TransXNet (or a module holding one) or a model name, "
                        f"got {type(model_or_name).__name__}")
    _set_fused(model, True)
    return model


def revert(model: TransXNet) -> TransXNet:
    """Switch an accelerated model back to the released eager path (in place)."""
    _set_fused(model, False)
    return model


def is_accelerated(model: nn.Module) -> bool:
    """Whether `model` (a TransXNet, or a module wrapping one) runs the fused path."""
    return any(isinstance(m, TransXNet) and m.fused for m in model.modules())
