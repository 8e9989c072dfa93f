"""Fused kernels for TransXNet's IDConv, OSRA attention and multi-scale depthwise FFN (MS-FFN).

Each op (``ops.py``) runs on the backend ``backend.py`` selects: Triton on CUDA (``triton/``), C++ on CPU
where built (``cpp/``), the pure-PyTorch reference (``reference.py``) otherwise. The backends are imported
below; one that fails to import is recorded per op (``available_backends()`` says why) and ``auto`` skips it.
"""

from . import reference
from .backend import BackendUnavailableError, available_backends, backend_status, requested_backend, use_backend
from .ops import has_fused, idconv, ms_ffn_middle, ms_ffn_middle_eval, multiscale_dwconv, osra_attention

try:
    from .triton import idconv as _triton_idconv  # noqa: F401  (registers ops.idconv on "triton")
except Exception as exc:  # no Triton, or a version it cannot run on: that implementation is off
    idconv.record_load_error("triton", exc)
try:
    from .triton import ms_ffn as _triton_ms_ffn  # noqa: F401
except Exception as exc:
    multiscale_dwconv.record_load_error("triton", exc)
    ms_ffn_middle.record_load_error("triton", exc)
try:
    from .triton import osra_attention as _triton_osra_attention  # noqa: F401
except Exception as exc:
    osra_attention.record_load_error("triton", exc)
try:
    from .cpp import ops as _cpp_ops  # noqa: F401
except Exception as exc:  # no compiler at install time, failed build, TRANSXNET_NO_CPP=1
    for _op in (idconv, multiscale_dwconv, ms_ffn_middle, ms_ffn_middle_eval, osra_attention):
        _op.record_load_error("cpp", exc)

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "has_fused",
    "idconv",
    "ms_ffn_middle",
    "ms_ffn_middle_eval",
    "multiscale_dwconv",
    "osra_attention",
    "reference",
    "requested_backend",
    "use_backend",
]
