"""Backend selection for the TransXNet ops, in one place.

Backends, in the fixed order `auto` tries them:

* ``triton`` -- fused Triton kernels. Runs on CUDA tensors (compute capability
  7.0+, bf16 needs 8.0+) and on CPU tensors when ``TRITON_INTERPRET=1`` was set
  before Triton was imported (the interpreter; slow, used by the tests).
* ``cpp``    -- C++ CPU kernels from ``csrc/`` (optional build).
* ``reference`` -- pure PyTorch (``transxnet_kernels.reference``); always works.

``auto`` never picks the Triton interpreter: on CPU tensors it goes cpp then
reference. The choice comes from, in order of precedence, the innermost
``use_backend(...)`` context, then the ``TRANSXNET_BACKEND`` environment
variable (read at every call), then ``auto``. A forced backend that cannot run
a call raises ``BackendUnavailableError`` saying why; it never falls back.

Implementations register themselves per (op, backend) with a predicate that
says whether they can run a given call (``register``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("triton", "cpp", "reference")
CHOICES: Tuple[str, ...] = ("auto",) + BACKENDS
ENV_VAR = "TRANSXNET_BACKEND"

# Modules that register implementations when their backend's dependencies exist.
_BACKEND_MODULES: Dict[str, Tuple[str, ...]] = {
    "triton": (
        "transxnet_kernels.idconv_triton",
        "transxnet_kernels.msdwconv_triton",
        "transxnet_kernels.osra_triton",
    ),
    "cpp": ("transxnet_kernels.cpp_ops",),
}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested call."""


@dataclass(frozen=True)
class CallInfo:
    """What an implementation needs to know to say whether it can run a call."""

    device: torch.device
    dtype: torch.dtype
    needs_grad: bool
    training: bool = False  # ms_ffn_middle: batch-statistics BatchNorm


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    # Returns None when the call is supported, else the reason it is not.
    supports: Callable[[CallInfo], Optional[str]]


_IMPLS: Dict[str, Dict[str, _Impl]] = {}
_LOAD_ERRORS: Dict[str, List[str]] = {}  # backend -> why its modules failed to import
_forced: list = []  # stack of use_backend() choices


def _always(_: CallInfo) -> Optional[str]:
    return None


def register(op: str, backend: str, supports: Callable[[CallInfo], Optional[str]] = _always):
    """Decorator: `fn` implements `op` on `backend` for the calls `supports` accepts."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = _Impl(fn, supports)
        return fn

    return deco


def _load_backends() -> None:
    from . import reference

    for op in ("idconv", "multiscale_dwconv", "ms_ffn_middle", "ms_ffn_middle_eval", "osra_attention"):
        register(op, "reference")(getattr(reference, op))
    for backend, modules in _BACKEND_MODULES.items():
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # missing dependency or failed build: that backend is off
                _LOAD_ERRORS.setdefault(backend, []).append(f"{name} failed to import: {type(exc).__name__}: {exc}")


def triton_interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> Dict[str, str]:
    """Each backend mapped to 'available' or the reason it is not."""
    status = {}
    for backend in BACKENDS:
        ops = sorted(op for op, impls in _IMPLS.items() if backend in impls)
        errors = "; ".join(_LOAD_ERRORS.get(backend, []))
        if not ops:
            status[backend] = errors or "no op implementations registered"
        else:
            status[backend] = "available (" + ", ".join(ops) + ")" + (f"; {errors}" if errors else "")
    return status


def requested_backend() -> str:
    """The backend asked for by the innermost use_backend() or TRANSXNET_BACKEND."""
    choice = _forced[-1] if _forced else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {', '.join(CHOICES)}")
    return choice


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (or 'auto') for the ops called inside the block."""
    name = name.strip().lower()
    if name not in CHOICES:
        raise ValueError(f"backend {name!r} is not one of {', '.join(CHOICES)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _reason_unavailable(op: str, backend: str, info: CallInfo) -> Optional[str]:
    impl = _IMPLS.get(op, {}).get(backend)
    if impl is None:
        errors = "; ".join(_LOAD_ERRORS.get(backend, []))
        return f"backend {backend!r} has no implementation of {op}" + (f" ({errors})" if errors else "")
    return impl.supports(info)


def _call_info(x: torch.Tensor, others, training: bool) -> CallInfo:
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x,) + tuple(others))
    return CallInfo(x.device, x.dtype, needs_grad, training)


# --- issue 14 (export): begin
def exporting() -> bool:
    """Whether a graph exporter is tracing: torch.export (which the dynamo ONNX exporter runs) sets
    torch.compiler.is_exporting(); the TorchScript ONNX exporter sets torch.onnx.is_in_onnx_export().
    Exported graphs must hold standard ops only, so every op then runs its reference formula, on any
    backend choice; and `runs_fused` says True, so the model takes its one-op forms (the accelerated
    eval graph stays BatchNorm-free)."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
# --- issue 14 (export): end


def _resolve(op: str, info: CallInfo) -> Tuple[Optional[str], Optional[str]]:
    """(backend that runs the call, None) or (None, why the forced backend cannot)."""
    if exporting():  # issue 14 (export)
        return "reference", None
    requested = requested_backend()
    if requested != "auto":
        reason = _reason_unavailable(op, requested, info)
        return (requested, None) if reason is None else (None, reason)
    for backend in BACKENDS:
        if backend == "triton" and info.device.type != "cuda":
            continue  # the interpreter is for tests, never an automatic choice
        if _reason_unavailable(op, backend, info) is None:
            return backend, None
    raise AssertionError("the reference backend supports every call")  # pragma: no cover


def select(op: str, x: torch.Tensor, *others: Optional[torch.Tensor], training: bool = False) -> Callable:
    """The implementation of `op` to run for these tensors (x decides device and dtype)."""
    info = _call_info(x, others, training)
    backend, reason = _resolve(op, info)
    if backend is None:
        raise BackendUnavailableError(
            f"backend {requested_backend()!r} cannot run {op} on {info.device} {info.dtype}"
            f"{' with gradients' if info.needs_grad else ''}{' in training mode' if training else ''}: {reason}"
        )
    return _IMPLS[op][backend].fn


def runs_fused(op: str, x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether a call of `op` on these tensors would run a non-reference backend (never raises);
    True while exporting (see `exporting`)."""
    if exporting():  # issue 14 (export)
        return True
    backend, _ = _resolve(op, _call_info(x, others, False))
    return backend is not None and backend != "reference"


def triton_supports(info: CallInfo) -> Optional[str]:
    """Shared predicate of the Triton implementations."""
    if info.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(info.device)
        if major < 7:
            return f"compute capability {major}.{minor} is below 7.0"
        if info.dtype == torch.bfloat16 and major < 8:
            return f"bfloat16 needs compute capability 8.0+, device has {major}.{minor}"
    elif info.device.type == "cpu":
        if not triton_interpreter_active():
            return "CPU tensors need TRITON_INTERPRET=1 set before Triton is imported"
    else:
        return f"device type {info.device.type!r} is not supported"
    if info.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {info.dtype} is not supported"
    return None
