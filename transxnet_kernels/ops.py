"""The TransXNet ops, each defined once: name, signature, argument checks, docstring and reference.

An op is an ``Op`` object made from its definition below (``@define(reference.<op>)``). Calling it checks
the arguments, asks ``backend.select`` which backend runs the call, and calls that backend's
implementation with the arguments normalised to a full positional tuple (defaults filled in, sequences as
lists). Backends attach their implementations with ``@ops.<op>.register("<backend>", supports=...)``;
``transxnet_kernels/__init__.py`` imports them.

Argument rules shared by every op and backend: all tensors on one device; the feature-map operands share
one floating dtype (per op below); under ``torch.autocast`` those operands are first cast to the autocast
dtype, as torch does for convolutions and matmuls, except the group weights and biases of ``multiscale_dwconv``
and ``ms_ffn_middle``, which keep theirs and are rounded to x's dtype by the backend (the Triton kernels as they
pack them: a cast per tensor, and one per gradient, fewer). Violations raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import reference
from .backend import BACKENDS, OPS, CallInfo, Supports, always, call_info, inference_backend, runs_fused, select
from .library import custom_op

Tensor = torch.Tensor


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    supports: Supports
    unchecked: Optional[Callable] = None  # the raw kernel for inference calls whose arguments are known good


class Op:
    """One op: its definition (checks + normalisation), reference, and backend implementations."""

    def __init__(self, definition: Callable[..., Tuple[tuple, CallInfo]], reference_fn: Callable):
        self.name = definition.__name__
        self.__doc__ = definition.__doc__
        self.__signature__ = inspect.signature(definition)
        self._definition = definition
        self._impls: Dict[str, _Impl] = {"reference": _Impl(reference_fn, always, reference_fn)}
        self._load_errors: Dict[str, str] = {}
        OPS[self.name] = self

    def __repr__(self) -> str:
        return f"<transxnet op {self.name}>"

    def __call__(self, *args, **kwargs):
        args, info = self._definition(*args, **kwargs)
        backend = select(self.name, info.device, info.dtype, info.needs_grad, info.training, info.head_dim)
        return self._impls[backend].fn(*args)

    def register(
        self, backend: str, supports: Supports = always, unchecked: Optional[Callable] = None
    ) -> Callable[[Callable], Callable]:
        """Decorator: `fn` implements this op on `backend` for the calls `supports` accepts. `unchecked`, if
        given, is the kernel `fn` ends in, taking the same full positional arguments (see `unchecked_kernel`)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

        def deco(fn: Callable) -> Callable:
            self._impls[backend] = _Impl(fn, supports, unchecked)
            return fn

        return deco

    def unchecked_kernel(
        self, device: torch.device, dtype: torch.dtype, fused_only: bool = False
    ) -> Optional[Callable]:
        """The raw kernel a call without gradients on `device` and `dtype` would end in under the current
        backend choice, or None when that backend registered none (or a forced backend cannot run the call:
        the checked op then raises why). fused_only: None where the choice is the reference too (for a caller
        with a standard-op path of its own, which then keeps it).

        For a caller that builds the arguments itself and calls the op many times per forward (the
        accelerated model's CPU inference): it takes the full positional arguments, already of one device
        and dtype and outside autocast, and skips the argument checks and the torch.library layer, which
        cost more than the kernels at batch 1. Not for traced calls (torch.compile / export), which must see
        the op."""
        backend = inference_backend(self.name, device, dtype)
        if backend is None or (fused_only and backend == "reference"):
            return None
        return self._impls[backend].unchecked

    def library_op(self, namespace: str, fake: Callable[..., Tensor]) -> Callable[[Callable], Any]:
        """Decorator: `fn` as the torch.library custom op ``<namespace>::<op>`` taking this op's arguments, with
        `fake` as its fake (meta) implementation. The schema is inferred from the reference, so a backend does
        not write the parameter list again."""
        schema = torch.library.infer_schema(self._impls["reference"].fn, mutates_args=())
        # Without defaults: the definition passes every argument, and the dispatcher would drop those equal
        # to a schema default before calling `fn`.
        schema = re.sub(r"=[^,)]+", "", schema)

        def deco(fn: Callable) -> Any:
            library_op = custom_op(f"{namespace}::{self.name}", schema=schema)(fn)
            library_op.register_fake(fake)
            return library_op

        return deco

    def record_load_error(self, backend: str, exc: BaseException) -> None:
        """The module implementing this op on `backend` failed to import: that implementation is off."""
        self._load_errors[backend] = f"failed to import: {type(exc).__name__}: {exc}"

    def implementation(self, backend: str) -> Callable:
        """The function `backend` runs for this op (KeyError if it has none)."""
        return self._impls[backend].fn

    def status(self, backend: str) -> str:
        if backend in self._impls:
            return "available"
        return self._load_errors.get(backend, "not implemented")

    def reason_unsupported(self, backend: str, info: CallInfo) -> Optional[str]:
        """None when `backend` can run a call described by `info`, else why not."""
        impl = self._impls.get(backend)
        if impl is None:
            return f"backend {backend!r} has no implementation of {self.name} ({self.status(backend)})"
        return impl.supports(info)


def define(reference_fn: Callable) -> Callable[[Callable], Op]:
    return lambda definition: Op(definition, reference_fn)


# ------------------------------------------------------------------------------------------ checks


def _check(cond: bool, message: Callable[[], str]) -> None:
    # The message is built only on failure: formatting a symbolic size would make torch.compile
    # specialise it (e.g. a dynamic batch size).
    if not cond:
        raise ValueError(message())


def _same_device_and_dtype(op: str, named: Sequence[Tuple[str, Optional[Tensor]]], same_dtype: bool = True) -> None:
    """Every tensor on the first one's device (and, if same_dtype, of its floating dtype)."""
    first_name, first = named[0]
    _check(first.is_floating_point(), lambda: f"{op}: {first_name} must be floating point, got {first.dtype}")
    for name, t in named[1:]:
        if t is None:
            continue
        _check(t.device == first.device, lambda: f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
        if same_dtype:
            _check(
                t.dtype == first.dtype, lambda: f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}"
            )
        else:
            _check(t.is_floating_point(), lambda: f"{op}: {name} must be floating point, got {t.dtype}")


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype the ops cast their floating inputs to on `device_type` (autocast on), else None."""
    # is_autocast_enabled raises for device types without autocast (e.g. meta): those have nothing to cast.
    # is_autocast_available is a graph break for dynamo before torch 2.13; a compiled call's (fake) tensors
    # are on a real device, which has autocast, so the check is for eager calls only.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast(tensors: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """The tensors cast to the autocast dtype when autocast is on for their device, else unchanged."""
    dtype = autocast_dtype(tensors[0].device.type)
    if dtype is None:
        return tensors
    return [None if t is None else t.to(dtype) for t in tensors]


def _check_multiscale(
    op: str, x: Tensor, weights: List[Tensor], biases: List[Tensor], groups_any_dtype: bool = False
) -> None:
    """groups_any_dtype (under autocast, `_autocast_feature_map`): the weights and biases may have any floating
    dtype; else x's."""
    _check(x.dim() == 4, lambda: f"{op}: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    _check(
        len(weights) == len(biases) and len(weights) > 0,
        lambda: f"{op}: need one bias per weight, got {len(weights)} weights and {len(biases)} biases",
    )
    for i, (w, b) in enumerate(zip(weights, biases)):
        _check(
            w.dim() == 4 and w.shape[1] == 1 and w.shape[2] == w.shape[3] and w.shape[2] % 2 == 1,
            lambda: f"{op}: weights[{i}] must be [c_i, 1, k_i, k_i] with odd k_i, got {tuple(w.shape)}",
        )
        _check(
            tuple(b.shape) == (w.shape[0],), lambda: f"{op}: biases[{i}] must be [{w.shape[0]}], got {tuple(b.shape)}"
        )
    total = sum(w.shape[0] for w in weights)
    _check(total == x.shape[1], lambda: f"{op}: the groups cover {total} channels but x has {x.shape[1]}")
    device, dtype = x.device, x.dtype
    if dtype.is_floating_point and all(t.device == device and t.dtype == dtype for t in (*weights, *biases)):
        return  # the common case, without naming every tensor (this runs at every call)
    _same_device_and_dtype(
        op,
        [("x", x)]
        + [(f"weights[{i}]", w) for i, w in enumerate(weights)]
        + [(f"biases[{i}]", b) for i, b in enumerate(biases)],
        same_dtype=not groups_any_dtype,
    )


def _check_per_channel(op: str, x: Tensor, named: Sequence[Tuple[str, Optional[Tensor]]]) -> None:
    C = x.shape[1]
    for name, t in named:
        _check(
            t is None or tuple(t.shape) == (C,),
            lambda: f"{op}: {name} must be [{C}], got {None if t is None else tuple(t.shape)}",
        )
    _same_device_and_dtype(op, [("x", x), *named], same_dtype=False)


def _cast_multiscale(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]):
    n = len(weights)
    x, *rest = _autocast([x, *weights, *biases])
    return x, rest[:n], rest[n:]


def _autocast_feature_map(x: Tensor) -> Tuple[Tensor, bool]:
    """(x cast to the autocast dtype, True) when autocast is on for its device, else (x, False): for the ops whose
    group weights the backends round to x's dtype themselves."""
    dtype = autocast_dtype(x.device.type)
    return (x, False) if dtype is None else (x.to(dtype), True)


# --------------------------------------------------------------------------------------------- ops


@define(reference.idconv)
def idconv(
    x: Tensor,
    kernel_logits: Tensor,
    weight: Tensor,
    bias_logits: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """Input-dependent depthwise conv (IDConv).

    x [B, C, H, W]; kernel_logits [B, G, C, K, K] (pre-softmax over G); weight [G, C, K, K];
    bias_logits [B, G, C] and bias [G, C], both or neither; all of one dtype.
    Returns [B, C, H, W]: each sample's channels cross-correlated (padding K//2) with
    sum_g softmax_g(kernel_logits) * weight[g], plus sum_g softmax_g(bias_logits) * bias[g].
    """
    _check(x.dim() == 4, lambda: f"idconv: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    _check(
        weight.dim() == 4 and weight.shape[1] == C and weight.shape[2] == weight.shape[3],
        lambda: f"idconv: weight must be [G, {C}, K, K], got {tuple(weight.shape)}",
    )
    G, _, K, _ = weight.shape
    _check(K % 2 == 1, lambda: f"idconv: kernel size must be odd, got {K}")
    _check(
        tuple(kernel_logits.shape) == (B, G, C, K, K),
        lambda: f"idconv: kernel_logits must be {(B, G, C, K, K)}, got {tuple(kernel_logits.shape)}",
    )
    _check((bias is None) == (bias_logits is None), lambda: "idconv: pass both bias_logits and bias, or neither")
    if bias is not None:
        _check(tuple(bias.shape) == (G, C), lambda: f"idconv: bias must be {(G, C)}, got {tuple(bias.shape)}")
        _check(
            tuple(bias_logits.shape) == (B, G, C),
            lambda: f"idconv: bias_logits must be {(B, G, C)}, got {tuple(bias_logits.shape)}",
        )
    args = _autocast([x, kernel_logits, weight, bias_logits, bias])
    _same_device_and_dtype("idconv", list(zip(("x", "kernel_logits", "weight", "bias_logits", "bias"), args)))
    return tuple(args), call_info(args)


@define(reference.multiscale_dwconv)
def multiscale_dwconv(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> Tensor:
    """Per-group depthwise convs over consecutive channel groups, concatenated.

    x [B, sum(c_i), H, W]; weights[i] [c_i, 1, k_i, k_i] (odd k_i, padding k_i//2); biases[i] [c_i].
    """
    x, autocast = _autocast_feature_map(x)
    _check_multiscale("multiscale_dwconv", x, weights, biases, groups_any_dtype=autocast)
    return (x, weights, biases), call_info([x, *weights, *biases])


@define(reference.ms_ffn_middle)
def ms_ffn_middle(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """The MS-FFN middle, BatchNorm(GELU(multiscale_dwconv(x) + x)), with F.batch_norm's semantics:
    batch statistics and in-place running-statistic updates when `training`, running statistics otherwise.

    The BatchNorm tensors (norm_weight, norm_bias, running_mean, running_var; [C] or None) may have any
    floating dtype (BatchNorm keeps fp32 parameters under autocast)."""
    x, autocast = _autocast_feature_map(x)
    _check_multiscale("ms_ffn_middle", x, weights, biases, groups_any_dtype=autocast)
    _check_per_channel(
        "ms_ffn_middle",
        x,
        (
            ("norm_weight", norm_weight),
            ("norm_bias", norm_bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
        ),
    )
    _check(
        training or (running_mean is not None and running_var is not None),
        lambda: "ms_ffn_middle: eval mode needs running_mean and running_var",
    )
    args = (x, weights, biases, norm_weight, norm_bias, running_mean, running_var, bool(training), momentum, eps)
    return args, call_info([x, *weights, *biases, norm_weight, norm_bias], training=bool(training))


@define(reference.ms_ffn_middle_eval)
def ms_ffn_middle_eval(
    x: Tensor,
    input_scale: Tensor,
    input_shift: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    output_scale: Tensor,
    output_shift: Tensor,
) -> Tensor:
    """Inference MS-FFN from fc1's conv output to fc2's input, the eval BatchNorms folded:
    GELU(multiscale_dwconv(y) + y) * output_scale + output_shift with y = GELU(x) * input_scale + input_shift.

    The [C] scales and shifts may have any floating dtype."""
    x, weights, biases = _cast_multiscale(x, weights, biases)
    _check_multiscale("ms_ffn_middle_eval", x, weights, biases)
    affine = (
        ("input_scale", input_scale),
        ("input_shift", input_shift),
        ("output_scale", output_scale),
        ("output_shift", output_shift),
    )
    _check(all(t is not None for _, t in affine), lambda: "ms_ffn_middle_eval: scales and shifts are required")
    _check_per_channel("ms_ffn_middle_eval", x, affine)
    args = (x, input_scale, input_shift, weights, biases, output_scale, output_shift)
    return args, call_info([x, input_scale, input_shift, *weights, *biases, output_scale, output_shift])


@define(reference.osra_attention)
def osra_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None
) -> Tensor:
    """softmax(q @ k^T * scale + bias) @ v.

    q [B, h, N, d]; k, v [B, h, M, d] (one dtype); bias [1 or B, 1 or h, N, M] of any floating dtype;
    scale defaults to d**-0.5. Returns [B, h, N, d]."""
    _check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "osra_attention: q, k, v must be 4-D [B, h, L, d]")
    B, h, N, d = q.shape
    M = k.shape[2]
    _check(
        tuple(k.shape) == (B, h, M, d) and tuple(v.shape) == (B, h, M, d),
        lambda: f"osra_attention: k and v must be {(B, h, 'M', d)}, got {tuple(k.shape)} and {tuple(v.shape)}",
    )
    if bias is not None:
        # `== 1 or == B` (not `in (1, B)`) so torch.compile keeps a dynamic batch size symbolic
        _check(
            bias.dim() == 4
            and (bias.shape[0] == 1 or bias.shape[0] == B)
            and bias.shape[1] in (1, h)
            and tuple(bias.shape[2:]) == (N, M),
            lambda: f"osra_attention: bias must be [1 or {B}, 1 or {h}, {N}, {M}], got {tuple(bias.shape)}",
        )
    q, k, v = _autocast([q, k, v])
    _same_device_and_dtype("osra_attention", (("q", q), ("k", k), ("v", v)))
    _same_device_and_dtype("osra_attention", (("q", q), ("bias", bias)), same_dtype=False)
    if scale is None:
        scale = d**-0.5
    return (q, k, v, bias, float(scale)), call_info([q, k, v, bias], head_dim=d)


def has_fused(op: str, x: Tensor) -> bool:
    """Whether a call of `op` on tensors like x (no gradients) would run a fused (non-reference) backend
    under the current backend choice; False where a forced backend lacks it. Never raises."""
    return runs_fused(op, x.device, x.dtype)
