"""Fused kernels for TransXNet's IDConv, OSRA attention and multi-scale depthwise FFN.

Every op runs on the backend `transxnet_kernels.backend` selects: Triton on
CUDA, C++ on CPU where built, the pure-PyTorch reference otherwise.
"""
from . import reference
from .backend import (
    BackendUnavailableError,
    available_backends,
    requested_backend,
    use_backend,
)
from .backend import _load_backends
from .ops import has_fused, idconv, ms_ffn_middle, ms_ffn_middle_eval, multiscale_dwconv, osra_attention

_load_backends()

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "idconv",
    "has_fused",
    "ms_ffn_middle",
    "ms_ffn_middle_eval",
    "multiscale_dwconv",
    "osra_attention",
    "reference",
    "requested_backend",
    "use_backend",
]
