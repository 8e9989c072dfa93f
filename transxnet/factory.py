"""Model constructors: transxnet_t / transxnet_s / transxnet_b, and timm registration."""
from __future__ import annotations

from typing import Union

from .checkpoint import RELEASE_URL, load_checkpoint
from .model import TransXNet

# Keyword arguments timm.create_model passes that our constructor has no use for.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _build(arch: str, pretrained: Union[bool, str], **kwargs) -> TransXNet:
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
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
    """Register the three models with timm, if timm is importable; True when registered."""
    try:
        from timm.models import is_model, register_model
    except ImportError:
        return False
    for name, fn in MODELS.items():
        if not is_model(name):
            register_model(fn)
    return True
