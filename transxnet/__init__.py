"""TransXNet (T/S/B) backbones running on transxnet_kernels' fused ops."""

from .accelerate import accelerated, is_accelerated, revert
from .checkpoint import CheckpointMismatchError, load_checkpoint
from .factory import MODELS, register_timm_models, transxnet_b, transxnet_s, transxnet_t
from .model import ARCHS, TransXNet

register_timm_models()

__all__ = [
    "ARCHS",
    "MODELS",
    "CheckpointMismatchError",
    "TransXNet",
    "accelerated",
    "is_accelerated",
    "load_checkpoint",
    "register_timm_models",
    "revert",
    "transxnet_b",
    "transxnet_s",
    "transxnet_t",
]
