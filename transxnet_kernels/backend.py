"""Which backend runs an op call: the one place that decides.

Backends:

* ``triton``    -- fused Triton kernels (``transxnet_kernels.triton``). CUDA tensors; CPU tensors only when
  forced and ``TRITON_INTERPRET=1`` was set before Triton's import (the interpreter, used by the tests).
  Runs only when forced, for now: see ``AUTO_ORDER``.
* ``cpp``       -- C++ CPU kernels (``transxnet_kernels.cpp``, optional build), inference only.
* ``reference`` -- pure PyTorch (``transxnet_kernels.reference``); runs every call.

The choice comes from, in order of precedence: the innermost ``use_backend(...)`` block of the calling
thread or task (a context variable), the ``TRANSXNET_BACKEND`` environment variable (read at every call),
then ``auto``. ``auto`` takes the first backend of ``AUTO_ORDER`` whose implementation accepts the call (its
``supports`` predicate returns no reason). A forced backend that cannot run a call
raises ``BackendUnavailableError`` saying why; it never falls back. While a graph is being exported
(``torch.export``, ``torch.onnx.export``) every op runs its reference, so exported graphs hold standard ops.

Under ``torch.compile`` the choice is made once, when the call is traced (``select`` is a constant to
dynamo); changing the backend afterwards needs ``torch._dynamo.reset()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

if TYPE_CHECKING:
    from .ops import Op

BACKENDS: Tuple[str, ...] = ("triton", "cpp", "reference")
# What auto tries, in this order. Not Triton: measured on a GPU for the first time (NVIDIA H200, torch 2.11,
# Triton 3.6, 2026-11-28; benchmarks/results/README.md) every Triton kernel ran slower than the reference at
# the TransXNet-T stage shapes (0.14-0.86x eager; one case 1.07x), and on CPU Triton is the test interpreter.
# Forcing it still runs it; auto takes it back once its kernels measure faster than the reference.
AUTO_ORDER: Tuple[str, ...] = ("cpp", "reference")
CHOICES: Tuple[str, ...] = ("auto",) + BACKENDS
ENV_VAR = "TRANSXNET_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested call."""


@dataclass(frozen=True)
class CallInfo:
    """What an implementation's ``supports`` predicate sees of a call."""

    device: torch.device
    dtype: torch.dtype
    needs_grad: bool
    training: bool = False  # ms_ffn_middle: batch-statistics BatchNorm
    head_dim: int = 0  # osra_attention: the head dim d (backends cap it)


# Returns None when the implementation can run the call, else the reason it cannot.
Supports = Callable[[CallInfo], Optional[str]]


def always(_: CallInfo) -> Optional[str]:
    return None


def call_info(tensors: Sequence[Optional[torch.Tensor]], training: bool = False, head_dim: int = 0) -> CallInfo:
    """The CallInfo of a call on `tensors`; the first one decides device and dtype."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return CallInfo(tensors[0].device, tensors[0].dtype, needs_grad, training, head_dim)


_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("transxnet_backend", default=None)


def requested_backend() -> str:
    """The backend asked for by the innermost use_backend() or TRANSXNET_BACKEND, else 'auto'."""
    choice = _forced.get()
    if choice is None:
        choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {', '.join(CHOICES)}")
    return choice


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (or 'auto') for the ops called inside the block, in this thread or task only."""
    name = name.strip().lower()
    if name not in CHOICES:
        raise ValueError(f"backend {name!r} is not one of {', '.join(CHOICES)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def exporting() -> bool:
    """Whether a graph exporter is tracing: torch.export (which the dynamo ONNX exporter runs) sets
    torch.compiler.is_exporting(); the TorchScript ONNX exporter sets torch.onnx.is_in_onnx_export().
    Exported graphs must hold standard ops only, so every op then runs its reference formula, on any
    backend choice; and `runs_fused` says True, so the model takes its one-op forms (the accelerated
    eval graph stays BatchNorm-free). The TorchScript exporter traces, so its (slower) flag is read only
    while torch.jit traces."""
    return torch.compiler.is_exporting() or (torch.jit.is_tracing() and torch.onnx.is_in_onnx_export())


OPS: Dict[str, Op] = {}  # filled by transxnet_kernels.ops


def _resolve(op: Op, info: CallInfo) -> Tuple[Optional[str], str]:
    """(backend that runs the call, '') or (None, why the forced backend cannot)."""
    requested = requested_backend()
    if requested != "auto":
        reason = op.reason_unsupported(requested, info)
        return (requested, "") if reason is None else (None, reason)
    for backend in AUTO_ORDER:
        if op.reason_unsupported(backend, info) is None:
            return backend, ""
    raise AssertionError("the reference backend runs every call")  # pragma: no cover


@torch.compiler.assume_constant_result
def select(
    op_name: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, training: bool, head_dim: int
) -> str:
    """The backend that runs a call of `op_name` (raises BackendUnavailableError for a forced one that cannot)."""
    if exporting():
        return "reference"
    info = CallInfo(device, dtype, needs_grad, training, head_dim)
    backend, reason = _resolve(OPS[op_name], info)
    if backend is None:
        raise BackendUnavailableError(
            f"backend {requested_backend()!r} cannot run {op_name} on {device} {dtype}"
            f"{' with gradients' if needs_grad else ''}{' in training mode' if training else ''}: {reason}"
        )
    return backend


@torch.compiler.assume_constant_result
def runs_fused(op_name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a call without gradients would run a non-reference backend under the current choice (never
    raises). A constant to torch.compile, as select is (dynamo cannot trace the use_backend context variable).
    While exporting, True: the one-op forms are then exported as their reference formulas (see `exporting`)."""
    if exporting():
        return True
    return inference_backend(op_name, device, dtype) not in (None, "reference")


def inference_backend(op_name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """The backend a call without gradients would run under the current choice, or None where a forced
    backend cannot run it (never raises; not export-aware: see `select`)."""
    backend, _ = _resolve(OPS[op_name], CallInfo(device, dtype, False))
    return backend


def backend_status() -> Dict[str, Dict[str, str]]:
    """backend -> op -> 'available', 'not implemented', or why the implementation failed to load."""
    return {backend: {name: op.status(backend) for name, op in OPS.items()} for backend in BACKENDS}


def available_backends() -> Dict[str, str]:
    """Each backend mapped to 'available (ops...)' when every op it implements loaded, else why not."""
    summary = {}
    for backend, per_op in backend_status().items():
        loaded = sorted(op for op, status in per_op.items() if status == "available")
        failed = {op: status for op, status in per_op.items() if status not in ("available", "not implemented")}
        if failed:
            summary[backend] = "; ".join(f"{op}: {why}" for op, why in sorted(failed.items()))
        elif loaded:
            summary[backend] = "available (" + ", ".join(loaded) + ")"
        else:
            summary[backend] = "no op implementations registered"
    return summary
