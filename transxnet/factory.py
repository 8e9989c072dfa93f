"""Model constructors: transxnet_t / transxnet_s / transxnet_b, and timm registration."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Union

from .checkpoint import RELEASE_URL, load_checkpoint
from .model import TransXNet


def _build(arch: str, pretrained: Union[bool, str], **kwargs) -> TransXNet:
    model = TransXNet(arch, **kwargs)
    if pretrained:
        source = RELEASE_URL.format(arch=arch) if pretrained is True else pretrained
        load_checkpoint(model, source)
    return model


def transxnet_t(pretrained: Union[bool, str] = False, **kwargs) -> TransXNet:
    """TransXNet-T (12.8 M params). pretrained: True for the released weights, or a path / URL."""
    return _build("t", pretrained, **kwargs)


def transxnet_s(pretrained: Union[bool, str] = False, **kwargs) -> TransXNet:
    """TransXNet-S (26.9 M params). pretrained: True for the released weights, or a path / URL."""
    return _build("s", pretrained, **kwargs)


def transxnet_b(pretrained: Union[bool, str] = False, **kwargs) -> TransXNet:
    """TransXNet-B (48.0 M params). pretrained: True for the released weights, or a path / URL."""
    return _build("b", pretrained, **kwargs)


MODELS = {"transxnet_t": transxnet_t, "transxnet_s": transxnet_s, "transxnet_b": transxnet_b}


def register_timm_models() -> bool:
    """Register the three models (and their `in1k` pretrained cfgs) with timm if timm is installed;
    True when registered. See `transxnet.timm_models`."""
    if importlib.util.find_spec("timm") is None:
        return False
    importlib.import_module("transxnet.timm_models")  # registers on import; its errors are real errors
    return True
