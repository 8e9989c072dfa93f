"""Helpers every Triton op module shares: the capability predicate, device guard, accumulation dtype,
64-bit index rule and the launch target (how many SMs the grid should fill).

Kernel parameter conventions (every module): pointers are ``<tensor>_ptr``; strides are
``<tensor>_stride_<dim>`` with dims named b, c, h, w for feature maps and b, h, n, m, d for attention;
``INDEX64`` switches in-sample offsets to int64 (sample base offsets are always int64); ``ACC`` is the
accumulation dtype.

Specialisation: integer arguments are not specialised on 16-alignment (``do_not_specialize_on_alignment``;
a value of 1 still is). The stencils' tap loads are unaligned by construction and the attention's key and
bias tiles are masked on sizes (49 keys) that are not multiples of a vector, so alignment buys little, while
every distinct alignment pattern of shapes and strides would be another compile at run time and in the static
audit. The exception: OSRA's short-path kernels specialise q's strides and N, which are multiples of 16 in
stages 1-2 (N = 3136, 784), where q, dO, out and dq then move in 16-byte vectors (static audit: ~30% fewer
instructions in the forward). Where a smaller power of two divides them (stage 3: N = 196, a multiple of 4), the
launcher says so in a constexpr (`Q_VECTOR`) and the kernels restate N and the strides as its multiples, so the
compiler sees the divisibility the specialisation misses (bf16 forward loop body on sm_90: 720 -> 487 instructions).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple, Type, TypeVar

import torch
import triton
import triton.language as tl

from ..backend import CallInfo
from ..layout import sample_span

# The oldest GPU generation the kernels are compiled, audited and tested for (Ampere).
MIN_CAPABILITY = 8
# Offsets inside one sample become int64 from this span on (2^31 - 1 is the largest int32).
INT32_SPAN_LIMIT = 2**31 - 1
# Launch option for kernels to which ptxas gives a register budget below what their code needs (72-80 registers
# on 2-4 warps), so that they spill: `.maxnreg 255` lets ptxas allocate what the code needs. Used by the MS-FFN
# forward and saved-z gradient passes (spilled 4-32 B in fp16/bf16 on sm_80 and sm_90 without it; 90-197
# registers with it), by IDConv's int64-offset convolution (4 B on sm_86 fp16 under Triton 3.6; 122 with it) and by
# its tensor-core convolution (8 B in fp16/bf16 with the bias, sm_90 under Triton 3.8 and sm_80 under 3.6), and by
# OSRA's flash dk/dv kernel and its dq kernel over several key blocks (12-16 B without it under Triton 3.6).
NO_REGISTER_BUDGET = {"maxnreg": 255}


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# For kernels to branch on at compile time: the interpreter runs no libdevice call (fast divisions and logs, erf).
INTERPRETED: tl.constexpr = tl.constexpr(interpreter_active())


def _major_minor(version: str) -> Tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0" or "2.4.0rc1"."""
    major, minor = (re.match(r"\d+", part) for part in version.split(".")[:2])
    return int(major.group()), int(minor.group())


def interpreter_defect(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why Triton's interpreter cannot run these kernels with these versions, or None. Before Triton 3.7 the
    interpreter turns a runtime loop bound into a Python int with int() on a one-element array, which NumPy 2.4 made a
    TypeError (triton-lang/triton#9171): every kernel loop with a bound known only at run time (nearly all of ours)
    fails with "only 0-dimensional arrays can be converted to Python scalars"."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter cannot run loops with runtime bounds under NumPy {numpy_version} "
            "(triton-lang/triton#9171); use Triton >= 3.7 or NumPy < 2.4"
        )
    return None


# Checked once: the interpreter is chosen at Triton's import and needs NumPy.
INTERPRETER_DEFECT = (
    interpreter_defect(triton.__version__, importlib.metadata.version("numpy")) if interpreter_active() else None
)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch planning. Not triton.cdiv: in Triton 3.8 (not 3.6) that is a constexpr function whose host
    call unwraps every argument, ~1 us each, and a launch plan makes several."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as triton.next_power_of_2), a plain function like cdiv."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def fewest_batch_groups(B: int, programs_per_batch: int, target: int) -> Tuple[int, int]:
    """(groups, batches per group): the fewest batch groups that give `target` programs (an empty batch: no
    group, of one)."""
    groups = max(1, min(B, cdiv(target, programs_per_batch)))
    per_group = max(1, cdiv(B, groups))
    return cdiv(B, per_group), per_group


@functools.lru_cache(maxsize=4096)  # a launch path's host cost: up to B candidates when one group fills the GPU
def balanced_batch_groups(
    B: int,
    programs_per_batch: int,
    min_programs: int,
    sm_count: int,
    prologue_batches: float,
    tail_batches: float = 0.0,
) -> Tuple[int, int]:
    """(groups, batches per group) of a launch of programs_per_batch programs per batch group.

    Among the group lengths that still give min_programs programs (or a group per batch), the one whose busiest
    SM does the least: ceil(programs / SMs) programs of (batches per group + prologue_batches) each, the prologue
    being what a program pays once, in batches' worth; plus, where one program of each group runs a serial tail
    after the others (OSRA's last-arriver dk/dv sum: tail_batches per batch of its group), one such tail. Longer
    groups pay fewer prologues but end on a ragged last wave and a longer tail; ties go to the longer groups (fewer
    programs). With one SM (interpreted), the fewest groups."""
    _, longest = fewest_batch_groups(B, programs_per_batch, min_programs)

    def busiest_sm_work(per_group: int) -> float:
        programs = cdiv(B, per_group) * programs_per_batch
        return cdiv(programs, sm_count) * (per_group + prologue_batches) + per_group * tail_batches

    per_group = min(range(longest, 0, -1), key=busiest_sm_work)
    return cdiv(B, per_group), per_group


def keep_bounded(cache: Dict, key, value, bound: int) -> None:
    """cache[key] = value, dropping the oldest entry first where the cache already holds `bound` entries."""
    if len(cache) >= bound:
        cache.pop(next(iter(cache)), None)  # None: another thread may have dropped it
    cache[key] = value


# (value, numel, dtype, device) -> a tensor filled with value: for kernels that need a float argument in fp64
# (Triton's float arguments are fp32), read by pointer, or a plane of zeros to read. Bounded for callers that vary
# the value (oldest first).
_SCALARS: Dict[Tuple[float, int, torch.dtype, torch.device], torch.Tensor] = {}
_SCALARS_KEPT = 64


def kept_scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`value` as a one-element tensor of `dtype` on `device` (`kept_filled`)."""
    return kept_filled(value, 1, dtype, device)


def kept_filled(value: float, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `numel` elements of `dtype` on `device`, all `value`, made once and kept instead of filled at every
    call (a launch on a GPU); kernels only read it. Made afresh while a CUDA graph is captured (it would live in the
    graph's memory pool); a kept one's fill is waited for, so that any stream may read it at once."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.full((numel,), value, dtype=dtype, device=device)
    key = (value, numel, dtype, device)
    kept = _SCALARS.get(key)
    if kept is None:
        kept = torch.full((numel,), value, dtype=dtype, device=device)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        keep_bounded(_SCALARS, key, kept, _SCALARS_KEPT)
    return kept


def supports(info: CallInfo) -> Optional[str]:
    """The Triton backend's predicate: None when the kernels can run the call, else why not."""
    if info.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(info.device)
        if major < MIN_CAPABILITY:
            # Triton 3.3+ targets 8.0+: on 7.x tl.dot falls back to FMA and bf16 is absent, and these kernels
            # are neither audited (benchmarks.gpu_audit compiles for sm_80/86/90) nor tested there.
            return (
                f"compute capability {major}.{minor} is below {MIN_CAPABILITY}.0, which the Triton kernels are "
                "audited and tested for; the reference runs instead"
            )
    elif info.device.type == "cpu":
        if not interpreter_active():
            return "CPU tensors need TRITON_INTERPRET=1 set before Triton is imported"
        if INTERPRETER_DEFECT is not None:
            return INTERPRETER_DEFECT
    else:
        return f"device type {info.device.type!r} is not supported"
    if info.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {info.dtype} is not supported"
    return None


def device_guard(t: torch.Tensor):
    """Launch on t's device, whichever device is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_accumulation_dtype(dtype: torch.dtype) -> tl.dtype:
    """accumulation_dtype as a Triton dtype (the ACC constexpr of the kernels)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether offsets within one sample of any tensor can pass int32 (the kernels' INDEX64)."""
    limit = launch_target(tensors[0].device).int32_span_limit
    return max(sample_span(t) for t in tensors) >= limit


def fits_int32(device: torch.device, *spans: int) -> bool:
    """Whether element offsets up to these spans fit int32 (for kernels that address whole tensors, batch
    included, in int32)."""
    return max(spans) < launch_target(device).int32_span_limit


@dataclass(frozen=True)
class LaunchTarget:
    """What launch plans need to know of the device: the SMs a grid should fill, whether the kernels
    run interpreted (on CPU, where few large programs are fastest), and the compute capability (where a
    choice is per GPU generation). `int32_span_limit` is the INDEX64 threshold."""

    sm_count: int
    interpreted: bool
    int32_span_limit: int = INT32_SPAN_LIMIT
    capability: int = 0  # compute capability as 10 * major + minor (90: H100); 0 when interpreted


_overrides: contextvars.ContextVar[Optional[Dict[type, object]]] = contextvars.ContextVar(
    "transxnet_launch", default=None
)


@contextlib.contextmanager
def launch_overrides(*settings: object) -> Iterator[None]:
    """Plan launches with these settings inside the block: a LaunchTarget (the static GPU audit replays
    launches for a GPU it does not have) and/or op modules' `Settings` (tests force small tiles and
    splits). Each replaces the one of its type; thread- and task-local."""
    token = _overrides.set({**(_overrides.get() or {}), **{type(s): s for s in settings}})
    try:
        yield
    finally:
        _overrides.reset(token)


@functools.cache
def _cuda_target(index: int) -> LaunchTarget:
    props = torch.cuda.get_device_properties(index)
    return LaunchTarget(props.multi_processor_count, interpreted=False, capability=10 * props.major + props.minor)


def launch_target(device: torch.device) -> LaunchTarget:
    """The launch target of tensors on `device` (a launch_overrides LaunchTarget wins)."""
    override = (_overrides.get() or {}).get(LaunchTarget)
    if override is not None:
        return override
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_target(index)
    return LaunchTarget(sm_count=1, interpreted=True)


S = TypeVar("S")


def launch_settings(cls: Type[S], device: torch.device) -> S:
    """An op module's launch settings for `device`: a launch_overrides instance of `cls`, else
    `cls.for_target(launch_target(device))`."""
    override = (_overrides.get() or {}).get(cls)
    return override if override is not None else cls.for_target(launch_target(device))
