"""Static GPU audit of the Triton kernels: compile every launch the model makes, for real GPU targets,
without a GPU. Everything here is a static estimate, never a measurement.

    python -m benchmarks.gpu_audit [--targets sm_80,sm_86,sm_90] [--jobs 2] [--no-cache]

Pipeline
1. Capture. Each TransXNet (t, s, b; plain and `accelerated`; train with gradients and eval without)
   runs on the `meta` device at batch 128 x 224x224 and batch 2 x 800x1216, NCHW and channels_last
   input, while a spy on the public ops (`gpu_warmup.recording_fused_calls`) records every call's tensors
   (shape, strides, storage offset, dtype, requires_grad) and other arguments; `has_fused` answers as Triton
   would on a GPU, so the eval model takes its one-op inference forms (`ms_ffn_middle_eval`). The model runs
   in fp32; fp16 and bf16 calls are those calls with each floating tensor's dtype replaced (a model cast
   with `.to(dtype)` runs the same code with the same element strides); "tf32" calls are the fp32 calls of the ops
   whose kernels follow the user's TF32 setting (`TF32_OPS`), replayed with TF32 allowed for matmuls. On meta,
   BatchNorm is replaced by a per-channel affine map with the same output layout (its decomposition costs ~0.1 s a
   call and changes nothing we record).
2. Record. Each distinct call is replayed through the op's Triton implementation on CPU tensors
   (`torch.empty` + `as_strided`: pages are touched only where torch computes something small), the
   forward and, when some input needs a gradient, `torch.autograd.grad` with a gradient laid out like
   the output. `JITFunction.run` is patched to record each launch (kernel, grid, arguments, num_warps,
   num_stages) instead of running it, and the launch code is made to plan for the target GPU (its SM
   count, GPU tiles) by the adapter below. One replay per GPU model, as grids depend on the SM count.
   The torch ops the replay runs (inside the ops' custom-op wrappers too) are recorded with their bytes.
3. Specialise and compile. Triton's own binder (`create_function_from_signature` with the target's
   backend) computes each launch's specialisation exactly as the JIT would: ints equal to 1 or
   divisible by 16, pointers 16-byte aligned (the CPU allocator aligns storages to 64 bytes, so a
   view's data_ptr % 16 is what it is on CUDA, 256-byte aligned). Each distinct (kernel, signature,
   constexprs, attributes, options) compiles with `triton.compile` for the target; the ptxas log
   gives registers and spill bytes, Triton's metadata the shared memory, nvdisasm the SASS.
4. Occupancy: resident blocks per SM = min over registers (64K per SM, 256-register allocation units
   per warp), shared memory (+1 KB reserved per block on sm_80+), warps and the block limit.
5. Static time of one op call on a GPU model: per launch, max(DRAM bytes / bandwidth, issue time of the busiest SM),
   summed over the launches of the forward (and of the backward). The busiest SM runs ceil(programs / SMs) of the
   launch's programs (a partial last wave costs a whole one) and issues at most min(4 schedulers, resident warps)
   instructions a clock (`issue_seconds`); loops one program runs after the rest of its group (a last-arriver sum,
   `gpu_audit_trips.LAST_PROGRAM_TRIPS`) add their time at that program's own issue rate (`tail_seconds`). DRAM bytes:
   every tensor a launch is given and its compiled code dereferences, read or written once (distinct storages; L2
   catches the stencil/tile reuse). Which pointer parameters a specialisation dereferences comes from its TTIR
   (`unused_pointer_args`: data flow from each parameter to a load or store, so a pass handed a tensor its constexpr
   branches skip is not charged for it; nor one it touches only on a path finite maps never take,
   `gpu_audit_trips.RARE_PATH_POINTERS`). Issued warp-instructions: the SASS is split into loops by backward branches;
   each SASS loop is tied to a source `for` loop by the line info of its branch (Triton emits .loc, nvdisasm prints it);
   `gpu_audit_trips.LOOP_TRIPS` gives, per kernel, how many times each source loop's body runs over the whole launch
   (from the launch arguments). Then instructions = Σ_loops (body instructions not in an inner loop) x trips x warps +
   (instructions outside loops) x programs x warps. A source loop compiled to several SASS loops counts one of them per
   trip (`trip_instructions`): the largest (unswitched or peeled copies), or, where LLVM or ptxas unrolled it (a main
   loop doing k trips per pass beside a remainder loop doing one), the main loop's body / k. One issue per scheduler and
   per warp per clock; no stalls modelled, so no memory latency: launches holding few warps per SM are still optimistic.
   One pipe is in the estimate: each scheduler's tensor core. An MMA (HMMA, HGMMA, DMMA) holds it for its FMAs / the
   core's FMAs per clock (`Gpu.tensor_fma_per_clock`: m16n8k16 in bf16 is 8 clocks on an A100, 4 on an H100), so a
   SASS body costs max(instructions, its MMAs' clocks) slots (`Pipes`); the analysis keeps each body's MMA FMAs per
   input class (`mma_fma_f16`, `_tf32`, `_f64`). Other pipes only in one bound reported beside the estimate
   (`fp32_pipe_estimate_s`): on 16 FP32 lanes per scheduler (sm_70/80; 32 on sm_86/90) a warp's FFMA holds its pipe 2
   clocks, so each body costs max(instructions, 2 x fp-category instructions, MMA clocks) slots. The summaries keep
   categories, not pipes, so the bound is close for FFMA-bound stencils and pessimistic where MUFU or compares fill
   the fp category. Torch work between launches (sums of
   partials, copies, fills) is recorded in step 2 by a dispatch mode and adds its bytes / bandwidth (each aten op that
   is not a view or an allocation reads its tensor arguments and writes its outputs once; a fill or zero only writes, a
   copy reads only its source; a slice of padded rows moves each row's whole 32-byte sectors). Beside it, the call's
   roofline: minimal DRAM bytes (the kernel module docstrings' formulas) / bandwidth.
6. Cache: compile results (with the unused pointer parameters; an entry without them, from an older audit,
   compiles again), keyed by `ASTSource.hash()` (kernel source and every jit helper it calls,
   signature, constexprs, attributes), the options, the target, the Triton version and the result format (and, for
   kernels calling tl.dot, the MMA analysis's `TENSOR_PIPE_FORMAT`, so only they recompile when it changes), are kept in
   `benchmarks/results/gpu_audit_cache_<triton>.json`, so a rerun compiles only what changed.

Output: `benchmarks/results/gpu_audit_<triton>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import inspect
import io
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("gpu_audit needs compiled Triton kernels: unset TRITON_INTERPRET")

import torch
import torch.utils._pytree as pytree
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from benchmarks.audit_tables import worst_calls
from benchmarks.common import tf32_matmuls
from benchmarks.gpu_audit_trips import LAST_ARRIVER_RUNS, LAST_PROGRAM_TRIPS, LOOP_TRIPS, RARE_PATH_POINTERS
from benchmarks.gpu_warmup import FORWARD_ONLY_OPS, OPS, _affine_batch_norm, recording_fused_calls

RESULTS = Path(__file__).resolve().parent / "results"
TRITON_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclasses.dataclass(frozen=True)
class Gpu:
    """A GPU model: the compile target (`cc`) and what the occupancy and time model need."""

    name: str
    cc: int
    sms: int
    dram_tb_s: float  # DRAM bandwidth, TB/s
    clock_ghz: float  # boost clock the issue rate is computed at
    smem_per_sm_kb: int
    smem_per_block_kb: int  # the most one block may allocate
    max_warps_per_sm: int
    max_blocks_per_sm: int
    estimate: bool  # include in the time estimates (sm_70 is compile-only)
    fp32_lanes_per_scheduler: int  # FP32 units per scheduler: 16 takes a warp's FFMA 2 clocks (see fp32_pipe_slots)
    # FMAs a scheduler's tensor core does per clock, per input class of the MMA (`_mma_fma`), at the peak dense rate
    # with fp32 accumulation: the device's tensor TFLOPS / (2 x SMs x 4 x the clock they are quoted at).
    tensor_fma_per_clock: Tuple[Tuple[str, float], ...]

    @property
    def fp32_pipe_slots(self) -> int:
        """Issue slots a warp's fp-category instruction holds its pipe for, in the FP32-pipe bound."""
        return 32 // self.fp32_lanes_per_scheduler

    @property
    def issue_pipes(self) -> Pipes:
        """The estimate's slot model: one slot per instruction, or the tensor core's clocks where they are more."""
        return Pipes(1, self.tensor_fma_per_clock)

    @property
    def fp32_pipes(self) -> Pipes:
        """The FP32-pipe bound's slot model: fp-category instructions at fp32_pipe_slots each, and the tensor core."""
        return Pipes(self.fp32_pipe_slots, self.tensor_fma_per_clock)

    @property
    def target(self) -> str:
        return f"sm_{self.cc}"


@dataclasses.dataclass(frozen=True)
class Pipes:
    """The issue slots a SASS body costs its scheduler: one per instruction, or, where a pipe is busier, that pipe's
    clocks: a warp's fp-category instruction holds the FP32 pipe fp_slots clocks (2 on 16 FP32 lanes; the FP32-pipe
    bound), and its MMAs hold the tensor core their FMAs / its rate (`Gpu.tensor_fma_per_clock`, per input class; a
    class the rates leave out is an error). The default (no rates) counts instructions only."""

    fp_slots: int = 1
    tensor_fma_per_clock: Tuple[Tuple[str, float], ...] = ()

    def slots(self, body: Dict[str, int]) -> float:
        rates = dict(self.tensor_fma_per_clock)
        tensor = 0.0
        for key, fmas in body.items():
            if rates and key.startswith(_MMA_FMA):
                mma_class = key[len(_MMA_FMA) :]
                if mma_class not in rates:
                    raise KeyError(f"no tensor-core rate for {mma_class} MMAs in this model")
                tensor += fmas / rates[mma_class]
        return max(body.get("total", 0), self.fp_slots * body.get("fp", 0), tensor)


# Tensor rates: A100 312 / 156 / 19.5 TFLOPS (fp16-bf16 / tf32 / fp64) at 1.41 GHz; RTX 3090 71 / 35.6 with fp32
# accumulation at 1.695 GHz (its fp64 has no tensor path: its FP64 units' 2 FMAs per SM and clock); H100 SXM 989 /
# 495 / 67 at 1.83 GHz, the wgmma rate: mma.sync (HMMA) is reported to reach about two thirds of it, so H100's
# HMMA-bound estimates are optimistic. V100's 125 TFLOPS at 1.53 GHz (compile-only).
GPUS = {
    "sm_70": Gpu("V100 SXM2", 70, 80, 0.90, 1.53, 96, 96, 64, 32, False, 16, (("f16", 128),)),
    "sm_80": Gpu(
        "A100 SXM 80GB", 80, 108, 2.0, 1.41, 164, 163, 64, 32, True, 16, (("f16", 256), ("tf32", 128), ("f64", 16))
    ),
    "sm_86": Gpu(
        "RTX 3090", 86, 82, 0.936, 1.695, 100, 99, 48, 16, True, 32, (("f16", 64), ("tf32", 32), ("f64", 0.5))
    ),
    "sm_90": Gpu(
        "H100 SXM", 90, 132, 3.35, 1.755, 228, 227, 64, 32, True, 32, (("f16", 512), ("tf32", 256), ("f64", 34.6))
    ),
}
# Bump when compile_spec's result changes, so that cached results of the old form are recompiled.
RESULT_FORMAT = 2
# Bump when the analysis of MMA instructions changes: only kernels calling tl.dot recompile.
TENSOR_PIPE_FORMAT = 1
# Bump when the analysis of last-arriver regions changes (`analyse_sass`): only kernels calling tl.atomic_* recompile.
LAST_ARRIVER_FORMAT = 1
REGISTERS_PER_SM = 65536
SCHEDULERS_PER_SM = 4

# ===================================================================================================
# ADAPTER: every reference to transxnet_kernels internals lives here; nothing else in this tool knows the
# package layout.
# ===================================================================================================


# The namespace of the Triton implementations' custom ops (their wrappers run torch work worth counting).
TRITON_NAMESPACE = "transxnet_triton"


def triton_op(op: str):
    """The Triton implementation of public op `op`, called like the public op (its definition checks and
    normalises the arguments; no backend choice)."""
    from transxnet_kernels import ops

    public = getattr(ops, op)
    implementation = public.implementation("triton")
    return lambda *args: implementation(*public._definition(*args)[0])


@contextlib.contextmanager
def plan_for_gpu(gpu: Gpu, index64: bool = False) -> Iterator[None]:
    """Make the launch code plan on CPU tensors as it would on `gpu` (its SM count and compute capability);
    with `index64`, as for a sample spanning 2^31 elements (the kernels' int64 in-sample offsets)."""
    from transxnet_kernels.triton import common

    limit = 0 if index64 else common.INT32_SPAN_LIMIT
    target = common.LaunchTarget(sm_count=gpu.sms, interpreted=False, int32_span_limit=limit, capability=gpu.cc)
    with common.launch_overrides(target):
        yield


def package_jit_functions() -> List[JITFunction]:
    """Every @triton.jit function of the package's Triton modules (kernels and the helpers they call)."""
    import transxnet_kernels.triton  # noqa: F401  (imports the kernel modules)

    return [
        value
        for name, module in sorted(sys.modules.items())
        if name.startswith("transxnet_kernels.triton")
        for value in vars(module).values()
        if isinstance(value, JITFunction)
    ]


def triton_runs(dtype: torch.dtype, cc: int) -> bool:
    """Whether the backend would pick Triton for this dtype on compute capability cc (triton/common.py)."""
    from transxnet_kernels.triton import common

    return cc >= common.MIN_CAPABILITY * 10


# ===================================================================================================
# 1. Capture the public op calls of the model
# ===================================================================================================

MODEL_SIZES = ("t", "s", "b")
INPUTS = ((128, 224, 224), (2, 800, 1216))
DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # torch name -> short name
# fp32 calls replayed with TF32 allowed for matmuls (torch.set_float32_matmul_precision("high")), reported as dtype
# "tf32", for the ops whose kernels follow that setting.
TF32 = "tf32"
TF32_OPS = ("osra_attention",)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    offset: int
    dtype: str
    requires_grad: bool

    @staticmethod
    def of(t: torch.Tensor) -> TensorSpec:
        return TensorSpec(
            tuple(t.shape), tuple(t.stride()), t.storage_offset(), str(t.dtype).removeprefix("torch."), t.requires_grad
        )

    def with_dtype(self, dtype: str) -> TensorSpec:
        floating = getattr(torch, self.dtype).is_floating_point
        return dataclasses.replace(self, dtype=dtype) if floating else self

    def make(self) -> torch.Tensor:
        """A CPU tensor with these strides and offset (uninitialised; large ones stay untouched)."""
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) if all(self.shape) else 0
        base = torch.empty(self.offset + span, dtype=getattr(torch, self.dtype))
        t = base.as_strided(self.shape, self.stride, self.offset)
        return t.requires_grad_() if self.requires_grad else t


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One call of a public op: positional arguments (TensorSpec, tuples of them, or plain values)."""

    op: str
    args: Tuple[Any, ...]
    index64: bool = False  # planned as if a sample spanned 2^31 elements (int64 in-sample offsets)
    tf32: bool = False  # fp32 replayed with TF32 allowed for matmuls

    def with_dtype(self, dtype: str) -> OpCall:
        def cast(a):
            if isinstance(a, TensorSpec):
                return a.with_dtype(dtype)
            return tuple(cast(x) for x in a) if isinstance(a, tuple) else a

        return dataclasses.replace(self, args=tuple(cast(a) for a in self.args))

    def tensors(self) -> List[TensorSpec]:
        flat = [x for a in self.args for x in (a if isinstance(a, tuple) else (a,))]
        return [x for x in flat if isinstance(x, TensorSpec)]

    @property
    def dtype(self) -> str:
        """Short name of the dtype of the first tensor argument; TF32 for an fp32 call replayed with TF32 allowed."""
        return TF32 if self.tf32 else DTYPES[self.tensors()[0].dtype]

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in self.tensors())


def _spec(value, gradients: bool = True):
    """The spec of an op argument; gradients=False: recorded as not requiring a gradient."""
    if isinstance(value, torch.Tensor):
        spec = TensorSpec.of(value)
        return spec if gradients else dataclasses.replace(spec, requires_grad=False)
    if isinstance(value, (list, tuple)):
        return tuple(_spec(v, gradients) for v in value)
    return value


def capture_model_calls(size: str) -> Dict[OpCall, str]:
    """Every distinct fp32 public-op call of TransXNet-`size`, mapped to the first configuration making it. Unlike
    the warm-up's capture, a call records its tensors' requires_grad in every grad mode (forward-only ops aside):
    an eval call with trainable parameters is also audited with its backward (fine-tuning with frozen BatchNorm)."""
    import transxnet

    calls: Dict[OpCall, str] = {}
    config = [""]

    def record(op, arguments):
        gradients = op not in FORWARD_ONLY_OPS
        calls.setdefault(OpCall(op, tuple(_spec(v, gradients) for v in arguments)), config[0])

    with recording_fused_calls(record):
        with torch.device("meta"):
            model = transxnet.TransXNet(size)
        for fused in (False, True):
            (transxnet.accelerated if fused else transxnet.revert)(model)
            for training in (True, False):
                model.train(training)
                for batch, height, width in INPUTS:
                    for layout in ("nchw", "channels_last"):
                        x = torch.empty(batch, 3, height, width, device="meta")
                        if layout == "channels_last":
                            x = x.contiguous(memory_format=torch.channels_last)
                        config[0] = (
                            f"{size} {'accelerated' if fused else 'plain'} "
                            f"{'train' if training else 'eval'} {batch}x{height}x{width} {layout}"
                        )
                        with torch.set_grad_enabled(training):
                            model(x)
    return calls


def _capture_key() -> str:
    """What the captured calls depend on: the model's source, torch, and the capture code and settings."""
    import transxnet

    digest = hashlib.sha256(f"{torch.__version__} {MODEL_SIZES} {INPUTS} {OPS}".encode())
    for code in (
        TensorSpec,
        OpCall,
        _spec,
        _affine_batch_norm,
        recording_fused_calls,
        capture_model_calls,
        head_dim_limit_calls,
    ):
        digest.update(inspect.getsource(code).encode())
    for path in sorted(Path(transxnet.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _encode(value):
    if isinstance(value, TensorSpec):
        return {"tensor": dataclasses.asdict(value)}
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    if isinstance(value, dict):
        t = value["tensor"]
        return TensorSpec(tuple(t["shape"]), tuple(t["stride"]), t["offset"], t["dtype"], t["requires_grad"])
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value


def capture_calls(jobs: int, use_cache: bool, log=print) -> Dict[OpCall, str]:
    """Every distinct public-op call of the models in every dtype, mapped to the first configuration
    making it. Reuses `gpu_audit_calls.json` while the model source and torch are unchanged."""
    path = RESULTS / "gpu_audit_calls.json"
    key = _capture_key()
    if use_cache and path.exists() and (saved := json.loads(path.read_text()))["key"] == key:
        fp32 = {OpCall(c["op"], _decode(c["args"])): c["config"] for c in saved["calls"]}
        log(f"[audit] op calls from {path.name}")
    else:
        fp32 = {}
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            for calls in pool.map(capture_model_calls, MODEL_SIZES):
                for call, config in calls.items():
                    fp32.setdefault(call, config)
        path.write_text(
            json.dumps(
                {
                    "key": key,
                    "calls": [{"op": c.op, "config": cfg, "args": _encode(c.args)} for c, cfg in fp32.items()],
                },
                indent=None,
            )
            + "\n"
        )
    fp32.update(head_dim_limit_calls())
    fp32.update(int64_offset_calls(fp32))
    calls = {
        call.with_dtype(dtype): cfg.replace(" ", f" {short} ", 1)
        for dtype, short in DTYPES.items()
        for call, cfg in fp32.items()
    }
    calls.update(
        {
            dataclasses.replace(call, tf32=True): cfg.replace(" ", f" {TF32} ", 1)
            for call, cfg in fp32.items()
            if call.op in TF32_OPS
        }
    )
    return calls


def head_dim_limit_calls() -> Dict[OpCall, str]:
    """OSRA at the largest head dim the Triton backend accepts (MAX_HEAD_DIM), so that what it advertises is
    audited too: the stage-1 and stage-3 query counts of a 224x224 input, 49 keys, batch 128, the model's
    layouts (q and k, v transposed views, bias shared over the batch), with gradients."""
    from transxnet_kernels.triton.osra_attention import MAX_HEAD_DIM

    calls = {}
    B, h, M, d = 128, 2, 49, MAX_HEAD_DIM
    for N in (3136, 196):

        def transposed(L):
            return TensorSpec((B, h, L, d), (h * d * L, d * L, 1, L), 0, "float32", True)

        bias = TensorSpec((1, h, N, M), (h * N * M, N * M, M, 1), 0, "float32", True)
        call = OpCall("osra_attention", (transposed(N), transposed(M), transposed(M), bias, None))
        calls[call] = f"t osra-head-dim-{d} train {B}x{N}"
    return calls


def int64_offset_calls(calls: Dict[OpCall, str]) -> Dict[OpCall, str]:
    """The kernels' int64-offset variants (INDEX64, taken when one sample spans 2^31 elements, which no model
    shape here reaches) must compile too: per op and per with / without gradients, the first call of
    `calls`, planned as if its samples were that large. Labelled apart, so the per-call estimates skip them."""
    firsts: Dict[Tuple[str, bool], Tuple[OpCall, str]] = {}
    for call, config in calls.items():
        firsts.setdefault((call.op, any(t.requires_grad for t in call.tensors())), (call, config))
    return {dataclasses.replace(call, index64=True): f"int64-offsets {config}" for call, config in firsts.values()}


# ===================================================================================================
# 2. Record the Triton launches of a call
# ===================================================================================================


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch, specialised for a target."""

    kernel: str
    phase: str  # forward | backward
    grid: Tuple[int, int, int]
    num_warps: int
    compile_key: str  # identifies the compiled specialisation (see `compile_spec`)
    spec: Dict[str, Any]  # what `compile_spec` needs: fn, signature, constexprs, attrs, options
    loop_trips: Dict[str, int]
    tensors: Tuple[Tuple[Tuple[str, ...], int], ...]  # per distinct tensor: the arguments naming it, its bytes
    tail_trips: Dict[str, int] = dataclasses.field(default_factory=dict)  # gpu_audit_trips.LAST_PROGRAM_TRIPS
    last_arriver_runs: Tuple[int, ...] = ()  # gpu_audit_trips.LAST_ARRIVER_RUNS

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def dram_bytes(self, unused_args: Sequence[str] = ()) -> int:
        """Each distinct tensor read or written once, but those only named by arguments the compiled kernel never
        uses (a pass handed a tensor that its constexpr branches do not touch)."""
        unused = set(unused_args)
        return sum(size for names, size in self.tensors if not set(names) <= unused)


def _launch_tensors(args: Dict[str, Any]) -> Tuple[Tuple[Tuple[str, ...], int], ...]:
    """The distinct tensors a launch is given, with the arguments naming each and its bytes. A launch with a
    channel block table (blocks_ptr: int32 rows of first channel, end channel, kernel size) covers only its
    blocks' channels: of a tensor whose axis 1 is the C channels (feature maps, per-channel partials) it moves
    that share. C is the launch's C argument, or (a kernel without one) the channel count of its map x_ptr."""
    blocks, x = args.get("blocks_ptr"), args.get("x_ptr")
    channels = args.get("C", x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 4 else None)
    share = 1.0
    if isinstance(blocks, torch.Tensor) and isinstance(channels, int) and channels > 0:
        rows = blocks.reshape(-1, 3).to(torch.int64)
        share = float((rows[:, 1] - rows[:, 0]).sum()) / channels
    seen: Dict[Tuple, Tuple[Tuple[str, ...], int]] = {}
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            size = value.numel() * value.element_size()
            if value.dim() >= 2 and value.shape[1] == channels:
                size = int(size * share)
            key = (value.data_ptr(), value.shape, value.stride())
            seen[key] = (seen[key][0] + (name,) if key in seen else (name,), size)
    return tuple(seen.values())


def _describe(value) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


@contextlib.contextmanager
def recording_launches(gpu: Gpu, sink: List[Launch], phase: List[str]) -> Iterator[None]:
    """Patch JITFunction.run so that a launch is specialised for `gpu` and recorded, not run."""
    target = GPUTarget("cuda", gpu.cc, 32)
    backend = make_backend(target)
    binders: Dict[int, Any] = {}
    real_run = JITFunction.run

    def record(fn, *args, grid, warmup, **kwargs):
        binder = binders.setdefault(id(fn), create_function_from_signature(fn.signature, fn.params, backend))
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        grid = grid(bound) if callable(grid) else grid
        grid = tuple(grid) + (1,) * (3 - len(grid))
        key = json.dumps(
            [
                _line_independent_hash(ASTSource(fn, signature, constexprs, attrs)),
                _options_key(options),
                gpu.target,
                triton.__version__,
                RESULT_FORMAT,
            ]
            + ([TENSOR_PIPE_FORMAT] if _uses_tensor_cores(fn) else [])
            + ([LAST_ARRIVER_FORMAT] if _uses_atomics(fn) else [])
        )
        summary = {
            "signature": signature,
            "constexprs": dict(sorted((fn.arg_names[k[0]], _describe(v)) for k, v in constexprs.items())),
            "num_warps": options.num_warps,
            "num_stages": options.num_stages,
        }
        spec = dict(
            fn=f"{fn.__module__}:{fn.__name__}",
            signature=signature,
            constexprs=constexprs,
            attrs=attrs,
            options=options.__dict__,
            cc=gpu.cc,
            summary=summary,
        )
        sink.append(
            Launch(
                fn.__name__,
                phase[0],
                grid,
                options.num_warps,
                hashlib.sha256(key.encode()).hexdigest(),
                spec,
                LOOP_TRIPS[fn.__name__](bound, grid),
                _launch_tensors(bound),
                LAST_PROGRAM_TRIPS[fn.__name__](bound, grid) if fn.__name__ in LAST_PROGRAM_TRIPS else {},
                LAST_ARRIVER_RUNS[fn.__name__](bound, grid) if fn.__name__ in LAST_ARRIVER_RUNS else (),
            )
        )

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = real_run


def _line_independent_hash(source: ASTSource) -> str:
    """ASTSource.hash() with the package's JIT functions moved to line 0. Triton hashes a function's starting
    line (for debug info), so an edit to one kernel would otherwise invalidate the cached results of every
    kernel below it in the file; resources and SASS do not depend on line numbers."""
    fn = source.fn
    if id(fn) not in _LINE_0_KEYS:
        functions = package_jit_functions()
        saved = [(f, f.starting_line_number, f.hash) for f in functions]
        try:
            for f in functions:
                f.starting_line_number, f.hash = 0, None
            _LINE_0_KEYS[id(fn)] = fn.cache_key
        finally:
            for f, line, digest in saved:
                f.starting_line_number, f.hash = line, digest
    saved_digest, fn.hash = fn.hash, _LINE_0_KEYS[id(fn)]
    try:
        return source.hash()
    finally:
        fn.hash = saved_digest


_LINE_0_KEYS: Dict[int, str] = {}  # id(kernel) -> its cache key with every package JIT function at line 0


def _options_key(options) -> Dict[str, Any]:
    """The compile options as cache-key text. Absolute paths (libdevice under the virtual environment) are cut
    to their file names: the committed cache must hit from any checkout, wherever its venv lives."""
    return {k: _drop_directories(_describe(v)) for k, v in sorted(options.__dict__.items())}


def _drop_directories(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return re.sub(r"/[^'\",()\s]+", lambda m: Path(m.group(0)).name, value)


class TorchWork(TorchDispatchMode):
    """Records the DRAM bytes of the torch ops run between launches, per phase: every aten op that is neither
    a view nor an allocation reads its tensor arguments and writes its outputs once (a fill or zero only
    writes, a copy reads only its source; rows with gaps move whole sectors: `_moved_bytes`). The ops'
    custom-op wrappers are entered (redispatched to their CPU kernels with this mode active) so that the torch
    work inside them is seen."""

    ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias")
    WRITE_ONLY = ("fill_", "zero_", "zeros", "full", "ones", "zeros_like", "full_like", "ones_like")

    def __init__(self, phase: List[str], namespace: str):
        super().__init__()
        self.phase = phase
        self.namespace = namespace
        self.bytes: Dict[str, int] = collections.defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == self.namespace:
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if func.namespace == "aten" and not func.is_view and name not in self.ALLOCATIONS:
            read_args = args[1:] if name == "copy_" else args  # a copy's destination is only written
            reads = [] if name in self.WRITE_ONLY else pytree.tree_leaves((read_args, kwargs))
            writes = pytree.tree_leaves(out)
            self.bytes[self.phase[0]] += sum(_moved_bytes(t) for t in reads + writes if isinstance(t, torch.Tensor))
        return out


DRAM_SECTOR_BYTES = 32


def _moved_bytes(t: torch.Tensor) -> int:
    """DRAM bytes a torch op moves reading or writing t: its elements' bytes, but for rows with gaps between them
    (a slice of padded rows, `buffer[..., :M]`), whose every row moves in whole 32-byte sectors (a row of 49 bf16
    keys, 98 bytes, moves 128)."""
    size = t.numel() * t.element_size()
    if t.dim() < 2 or t.numel() == 0 or t.stride(-1) != 1 or t.stride(-2) <= t.shape[-1]:
        return size
    row = t.shape[-1] * t.element_size()
    moved_row = min(math.ceil(row / DRAM_SECTOR_BYTES) * DRAM_SECTOR_BYTES, t.stride(-2) * t.element_size())
    return t.numel() // t.shape[-1] * moved_row


def record_call(call: OpCall, gpu: Gpu) -> Tuple[List[Launch], Dict[str, int]]:
    """The launches of one op call (forward, then backward when an input needs a gradient), and the DRAM
    bytes of the torch work between them per phase."""
    launches: List[Launch] = []
    phase = ["forward"]

    def build(a):
        if isinstance(a, TensorSpec):
            return a.make()
        return [build(x) for x in a] if isinstance(a, tuple) else a

    args = [build(a) for a in call.args]
    inputs = [
        t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor) and t.requires_grad
    ]
    grad_out = None
    torch_work = TorchWork(phase, TRITON_NAMESPACE)
    with (
        plan_for_gpu(gpu, call.index64),
        tf32_matmuls(call.tf32),
        recording_launches(gpu, launches, phase),
        torch.set_grad_enabled(bool(inputs)),
    ):
        with torch_work:
            out = triton_op(call.op)(*args)
        if inputs:
            grad_out = torch.empty_like(out)
            phase[0] = "backward"
            with torch_work:
                torch.autograd.grad(out, inputs, grad_out)
    return launches, dict(torch_work.bytes)


# ===================================================================================================
# 3. Compile and analyse a specialisation
# ===================================================================================================


def _ast_source(spec: Dict[str, Any]) -> Tuple[JITFunction, ASTSource]:
    module, name = spec["fn"].split(":")
    fn = getattr(importlib.import_module(module), name)
    return fn, ASTSource(fn, spec["signature"], spec["constexprs"], spec["attrs"])


def compile_spec(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Compile one specialisation for its target: resources and the SASS loop analysis, or the error."""
    from triton import knobs

    target = GPUTarget("cuda", spec["cc"], 32)
    fn, src = _ast_source(spec)
    log = io.StringIO()
    started = time.perf_counter()
    try:
        # Triton's own on-disk cache would hand back a kernel without running ptxas, so without its log.
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=spec["options"])
    except Exception as exc:  # a compile failure is a result, reported per launch
        # Triton's CompilationError starts with the source position and ends with the cause: keep both.
        message = str(exc).strip().splitlines()
        where_and_why = " ... ".join(dict.fromkeys([message[0], message[-1]])) if message else ""
        return {
            "ok": False,
            "error": f"{type(exc).__name__}: {where_and_why}"[:500],
            "compile_s": time.perf_counter() - started,
        }
    finally:
        knobs.nvidia.dump_ptxas_log = False
        knobs.compilation.always_compile = False
    ptxas = _parse_ptxas_log(log.getvalue())
    sass = _disassemble(kernel.asm["cubin"])
    return {
        "ok": True,
        "registers": ptxas["registers"],
        "spill_store_bytes": ptxas["spill_stores"],
        "spill_load_bytes": ptxas["spill_loads"],
        "stack_bytes": ptxas["stack"],
        "smem_bytes": int(kernel.metadata.shared) + ptxas["static_smem"],
        "sass": analyse_sass(sass, _source_loops(fn)),
        "unused_pointer_args": unused_pointer_args(kernel.asm["ttir"]),
        "compile_s": time.perf_counter() - started,
    }


_SSA = re.compile(r"%[\w.$-]+(?:#\d+)?")
_DEFINITION = re.compile(r"%[\w.$-]+(?::\d+)?(?:, %[\w.$-]+(?::\d+)?)* = ")  # a line defining values
_MEMORY_OPS = ("tt.load", "tt.store", "tt.atomic_rmw", "tt.atomic_cas", "tt.descriptor_", "tt.call")


def _ssa_results(lhs: str) -> List[str]:
    """The values a "%a, %b = ..." or "%t:3 = ..." line defines, as later lines name them (%t#0 .. %t#2)."""
    results = []
    for token in lhs.split(","):
        token = token.strip()
        name, _, count = token.partition(":")
        results += [f"{name}#{i}" for i in range(int(count))] if count else [name]
    return results


def unused_pointer_args(ttir: str) -> List[str]:
    """The pointer parameters (by source name) that a kernel's TTIR never dereferences. Triton's TTIR passes have
    inlined the helpers, pruned the branches its constexprs rule out and removed dead code; what can remain of an
    untouched tensor is pointer arithmetic carried through a loop (a per-image base advanced but never loaded).
    So: data flow from each pointer parameter through every op's operands to its results, through scf.for
    iter_args and the yields of scf.for / scf.if to their block arguments and results; a parameter is used
    when it reaches an operand of a load, store, atomic, descriptor op or call."""
    header_at = ttir.index("tt.func public @")
    header_end = ttir.index("\n", header_at)
    header, body = ttir[header_at:header_end], ttir[header_end:]
    # "%x_ptr: !tt.ptr<bf16> {tt.divisibility = 16 : i32} loc("x_ptr"(#loc))" (Triton 3.6 names it %arg0)
    params = re.findall(r'(%[\w.$-]+): !tt\.ptr<[^>]+>(?: \{[^}]*\})? loc\("(\w+)"', header)
    edges: Dict[str, set] = collections.defaultdict(set)
    sinks: set = set()
    regions: List[Tuple[str, List[str], List[str]]] = []  # (op, results, block arguments) of each open region
    for raw in body.splitlines():
        line = re.sub(r"\bloc\(.*$", "", raw).strip()  # drop the location suffix
        closes, opens = line.startswith("}"), line.endswith("{")
        if closes and regions:
            region = regions.pop()
            if opens:  # "} else {": the same scf.if's other region
                regions.append(region)
            continue
        lhs, eq, rhs = line.partition(" = ") if _DEFINITION.match(line) else ("", "", line)
        results = _ssa_results(lhs) if eq else []
        if rhs.startswith("scf.for "):
            pairs = re.findall(r"(%[\w.$-]+) = (%[\w.$-]+(?:#\d+)?)", rhs[rhs.find("iter_args(") :])
            for arg, init in pairs:
                edges[init].add(arg)
            regions.append(("for", results, [arg for arg, _ in pairs]))
            continue
        operands = _SSA.findall(rhs)
        if rhs.startswith("scf.yield"):
            op, region_results, args = regions[-1] if regions else ("", [], [])
            for i, value in enumerate(operands):
                targets = [region_results[i]] if i < len(region_results) else region_results
                edges[value].update(targets + ([args[i]] if op == "for" and i < len(args) else []))
            continue
        if opens:
            regions.append(("if" if rhs.startswith("scf.if") else "other", results, []))
        for value in operands:
            edges[value].update(results)
        if rhs.startswith(_MEMORY_OPS):
            sinks.update(operands)
    unused = []
    for value, name in params:
        seen, todo = {value}, [value]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        if not seen & sinks:
            unused.append(name)
    return unused


def _parse_ptxas_log(log: str) -> Dict[str, int]:
    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    if "Used" not in log:
        raise RuntimeError(f"no resource line in the ptxas log:\n{log}")
    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack": grab(r"(\d+) bytes stack frame"),
        "static_smem": grab(r"(\d+) bytes smem"),
    }


def _disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [str(TRITON_BIN / "nvdisasm"), "-c", "--print-line-info", f.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout


@dataclasses.dataclass(frozen=True)
class SourceLoop:
    name: str  # <function>:<loop variable>
    file: str  # the source file's name (helpers may live in another module than the kernel)
    first_line: int
    last_line: int


def _uses_tensor_cores(fn: JITFunction) -> bool:
    """Whether fn or a jit function it calls calls tl.dot (its SASS may hold MMAs)."""
    return any("tl.dot(" in f.src for f in _jit_helpers(fn))


def _uses_atomics(fn: JITFunction) -> bool:
    """Whether fn or a jit function it calls calls tl.atomic_* (its SASS may hold last-arriver regions)."""
    return any("tl.atomic_" in f.src for f in _jit_helpers(fn))


def _jit_helpers(fn: JITFunction) -> List[JITFunction]:
    """fn and the jit functions it calls, transitively (those defined at module level)."""
    found, todo = {}, [fn]
    while todo:
        f = todo.pop()
        if f.__name__ in found:
            continue
        found[f.__name__] = f
        for node in ast.walk(ast.parse(textwrap.dedent(f.src))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                callee = f.__globals__.get(node.func.id)
                if isinstance(callee, JITFunction):
                    todo.append(callee)
    return list(found.values())


def _source_loops(fn: JITFunction) -> List[SourceLoop]:
    """The runtime `for ... in range(...)` loops of fn and its helpers, with their source line spans."""
    loops = []
    for f in _jit_helpers(fn):
        # The source as the JITFunction kept it when defined, which Triton compiles and numbers SASS lines by;
        # inspect would read the file as it is now, and an edit since the import shifts every span after it.
        lines, first = f.raw_src, f.starting_line_number
        file = os.path.basename(f.fn.__code__.co_filename)
        tree = ast.parse(textwrap.dedent("".join(lines)))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.For)
                and isinstance(node.iter, ast.Call)
                and isinstance(node.iter.func, ast.Name)
                and node.iter.func.id == "range"
            ):
                target = node.target.id if isinstance(node.target, ast.Name) else ast.unparse(node.target)
                loops.append(
                    SourceLoop(f"{f.__name__}:{target}", file, first + node.lineno - 1, first + node.end_lineno - 1)
                )
    return loops


_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)([.\w]*)(.*?);")
_LINE_INFO = re.compile(r'//## File "([^"]*)", line (\d+)')
_LABEL = re.compile(r"^(\.L_\w+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_\w+)\)")

_FP = {
    "FADD",
    "FMUL",
    "FFMA",
    "FMNMX",
    "FSEL",
    "FSETP",
    "FCHK",
    "FRND",
    "FSET",
    "MUFU",
    "HADD2",
    "HMUL2",
    "HFMA2",
    "HMNMX2",
    "HSETP2",
    "DADD",
    "DMUL",
    "DFMA",
    "DSETP",
    "F2F",
    "F2I",
    "I2F",
    "F2FP",
    "FMUL2",
    "FADD2",
    "FFMA2",
    "FSWZADD",
    "I2FP",
}
_INT = {
    "IADD3",
    "IADD",
    "IMAD",
    "IMUL",
    "ISETP",
    "LOP3",
    "LOP",
    "SHF",
    "SHL",
    "SHR",
    "LEA",
    "IABS",
    "IMNMX",
    "SEL",
    "PLOP3",
    "POPC",
    "FLO",
    "BMSK",
    "PRMT",
    "SGXT",
    "IDP",
    "VIADD",
    "VIMNMX",
    "IADD32I",
    "IMAD32I",
    "LEA32I",
    "ISCADD",
    "BREV",
    "P2R",
    "R2P",
    "ICMP",
}


_MMA = {"HMMA", "HGMMA", "DMMA"}
_MMA_FMA = "mma_fma_"  # body counts of the FMAs MMAs do per warp, per input class: mma_fma_f16, _tf32, _f64
_MMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)|\.(884|1684|1688|16816|16832)\b")
_MMA_SYNC_SHAPES = {
    "884": (8, 8, 4),
    "1684": (16, 8, 4),
    "1688": (16, 8, 8),
    "16816": (16, 8, 16),
    "16832": (16, 8, 32),
}
_MMA_CLASS = {"F16": "f16", "BF16": "f16", "TF32": "tf32", "F64": "f64"}


def _mma_fma(opcode: str, modifiers: str) -> Tuple[str, int]:
    """(input class, FMAs per warp) of an MMA instruction: HMMA.16816.F32.BF16 is m16n8k16 per warp (2048 FMAs);
    HGMMA.64x32x16.F32.BF16 is m64n32k16 per warpgroup, a quarter of it per warp; DMMA.884 m8n8k4 in fp64. Integer
    MMAs (IMMA) are not counted: no kernel of ours has them."""
    shape = _MMA_SHAPE.search(modifiers)
    if shape is None:
        raise ValueError(f"unknown MMA shape: {opcode}{modifiers}")
    if shape.group(4):
        m, n, k = _MMA_SYNC_SHAPES[shape.group(4)]
    else:
        m, n, k = (int(shape.group(i)) for i in (1, 2, 3))
    fmas = m * n * k // (4 if opcode == "HGMMA" else 1)
    if opcode == "DMMA":
        return "f64", fmas
    # The accumulator's type comes first; the inputs' follows unless it is fp16 (HMMA.16816.F32: fp16 in, fp32 out).
    types = [t for t in modifiers.strip(".").split(".") if t in _MMA_CLASS or t == "F32"]
    return _MMA_CLASS[types[1]] if len(types) > 1 else "f16", fmas


def _category(opcode: str) -> str:
    base = opcode[1:] if opcode.startswith("U") and opcode[1:] in _INT | {"MOV"} else opcode
    if base in _MMA:
        return "mma"
    if base.startswith("LD") and base != "LDGDEPBAR":
        return "load"
    if base in {"STG", "STS", "STL", "ST", "RED", "ATOM", "ATOMG", "ATOMS", "REDG", "STSM"}:
        return "store"
    if base in _FP:
        return "fp"
    if base in _INT:
        return "int"
    return "other"


def analyse_sass(sass: str, source_loops: Sequence[SourceLoop]) -> Dict[str, Any]:
    """Split the SASS into loops (backward branches) and count instructions by category.

    Returns the instruction counts outside every loop and, per loop, the counts of its body that are
    in no inner loop, the source loop its branch's line falls in (innermost) and its nesting depth; and, per
    last-arriver region (SASS order), the counts of its straight code, which outside_loops includes. A region is
    the code a conditional forward branch (to its target) or a conditional exit (to the end) leaves to the
    programs that do not take it, where that branch is the first after an atomic outside the loops: the
    `if tl.atomic_add(count, 1) == last` of a program summing what the others of its group wrote, which one
    program of the group runs (`gpu_audit_trips.LAST_ARRIVER_RUNS`)."""
    instructions, labels, line = [], {}, ("", 0)
    pending_labels = []
    for text in sass.splitlines():
        if m := _LINE_INFO.search(text):
            line = (os.path.basename(m.group(1)), int(m.group(2)))
        elif m := _LABEL.match(text):
            pending_labels.append(m.group(1))
        elif m := _INSTRUCTION.match(text):
            address = int(m.group(1), 16)
            for label in pending_labels:
                labels[label] = address
            pending_labels = []
            target = _BRANCH_TARGET.search(m.group(5)) if m.group(3) == "BRA" else None
            mma = _mma_fma(m.group(3), m.group(4)) if m.group(3) in _MMA else None
            instructions.append((address, m.group(3), line, target.group(1) if target else None, mma, m.group(2)))
    loops = []  # (start address, end address, branch line)
    for address, _, branch_line, target, _, _ in instructions:
        if target is not None and labels[target] < address:
            loops.append((labels[target], address, branch_line))
    loops.sort(key=lambda lp: lp[1] - lp[0])  # innermost (shortest) first

    def innermost_loop(address):
        return next((i for i, (lo, hi, _) in enumerate(loops) if lo <= address <= hi), None)

    def count(counter, opcode, mma):
        counter[_category(opcode)] += 1
        counter["total"] += 1
        if mma is not None:
            counter[_MMA_FMA + mma[0]] += mma[1]

    counts = [collections.Counter() for _ in loops]
    outside = collections.Counter()
    for address, opcode, _, _, mma, _ in instructions:
        i = innermost_loop(address)
        count(outside if i is None else counts[i], opcode, mma)

    def source_loop_of(file, line):
        enclosing = [s for s in source_loops if s.file == file and s.first_line <= line <= s.last_line]
        return min(enclosing, key=lambda s: s.last_line - s.first_line).name if enclosing else None

    result = []
    for (lo, hi, (branch_file, branch_line)), c in zip(loops, counts):
        source = source_loop_of(branch_file, branch_line)
        if source is None:  # the branch carries a hoisted line: the source loop most of the body's lines fall in
            votes = collections.Counter(source_loop_of(*ln) for a, _, ln, _, _, _ in instructions if lo <= a <= hi)
            votes.pop(None, None)
            source = votes.most_common(1)[0][0] if votes else None
        depth = sum(1 for lo2, hi2, _ in loops if lo2 <= lo and hi <= hi2) - 1
        result.append(
            {"source_loop": source, "branch_line": branch_line, "depth": depth, "sass_range": [lo, hi], "body": dict(c)}
        )
    result.sort(key=lambda lp: lp["sass_range"][0])

    last_arrivers = []
    for i, (address, opcode, *_) in enumerate(instructions):
        if opcode not in ("ATOMG", "ATOM") or innermost_loop(address) is not None:
            continue
        for branch_address, branch_opcode, _, target, _, predicate in instructions[i + 1 :]:
            if innermost_loop(branch_address) is not None:
                break
            if predicate and branch_opcode == "EXIT":
                end = instructions[-1][0] + 1
            elif predicate and target is not None and labels[target] > branch_address:
                end = labels[target]
            else:
                continue
            region = collections.Counter()
            for a, op, _, _, mma, _ in instructions:
                if branch_address < a < end and innermost_loop(a) is None:
                    count(region, op, mma)
            last_arrivers.append(dict(region))
            break
    return {"outside_loops": dict(outside), "loops": result, "last_arrivers": last_arrivers}


# ===================================================================================================
# 4. Occupancy and time model
# ===================================================================================================


def occupancy(result: Dict[str, Any], num_warps: int, gpu: Gpu) -> Dict[str, int]:
    """Resident blocks and warps per SM from registers, shared memory, warps and the block limit."""
    regs_per_warp = math.ceil(max(result["registers"], 1) * 32 / 256) * 256
    by_regs = (REGISTERS_PER_SM // regs_per_warp) // num_warps
    reserved = 1024 if gpu.cc >= 80 else 0
    smem = result["smem_bytes"]
    by_smem = (gpu.smem_per_sm_kb * 1024) // (smem + reserved) if smem else gpu.max_blocks_per_sm
    if smem > gpu.smem_per_block_kb * 1024:
        by_smem = 0
    blocks = min(by_regs, by_smem, gpu.max_warps_per_sm // num_warps, gpu.max_blocks_per_sm)
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps}


def trip_instructions(versions: Sequence[Dict[str, int]], pipes: Pipes = Pipes()) -> float:
    """Instructions one trip of a source loop issues, from the exclusive bodies of the SASS loops tied to it.

    Several versions are unswitched or peeled copies (one runs per trip: the largest counts) or an unrolled
    loop: LLVM and ptxas unroll a runtime loop by k = 2, 4 or 8 into a main loop doing k trips per pass and a
    remainder loop doing one. That pair is recognised by its loads: the main loop's are k times the
    remainder's, less at most one per extra trip (a loop-invariant constant load hoisted out of the unrolled
    body), and its instructions at least 3/4 of k times (the branch and induction are shared); a trip then
    costs the main body / k. Copies per kernel size (the stencils' K taps unrolled) scale their loads by
    K / K' (7 / 3 for their 35 and 15), which misses both tests. In issue slots of `pipes` (`Pipes.slots`)."""
    largest = max(versions, key=lambda body: body.get("total", 0))
    smallest = min(versions, key=lambda body: body.get("total", 0))
    total, loads, remainder_loads = largest.get("total", 0), largest.get("load", 0), smallest.get("load", 0)
    slots = pipes.slots(largest)
    for k in (2, 4, 8):
        unrolled_loads = k * remainder_loads - (k - 1) <= loads <= k * remainder_loads
        if remainder_loads > 0 and unrolled_loads and total >= 0.75 * k * smallest.get("total", 0):
            return slots / k
    return slots


def issued_warp_instructions(launch: Launch, sass: Dict[str, Any], pipes: Pipes = Pipes()) -> int:
    """Σ over source loops of (instructions per trip, `trip_instructions`) x trips, plus the straight code once per
    program but each last-arriver region's (`analyse_sass`) once per program that runs it; times the program's
    warps. In issue slots of `pipes`: a body's fp-category instructions or its MMAs' tensor-core clocks where they
    outweigh its instruction count (`Pipes.slots`)."""
    for loop in sass["loops"]:
        if loop["source_loop"] not in launch.loop_trips:
            raise KeyError(
                f"{launch.kernel}: SASS loop at line {loop['branch_line']} (source loop "
                f"{loop['source_loop']}) has no trip count in gpu_audit_trips.LOOP_TRIPS"
            )
    regions = sass.get("last_arrivers", [])  # (cached results of kernels without atomics predate the field)
    if len(regions) != len(launch.last_arriver_runs):
        raise ValueError(
            f"{launch.kernel}: {len(regions)} last-arriver regions in its SASS, {len(launch.last_arriver_runs)} run "
            "counts in gpu_audit_trips.LAST_ARRIVER_RUNS"
        )
    everyone = collections.Counter(sass["outside_loops"])
    for region in regions:
        everyone.subtract(region)
    per_warp = pipes.slots(dict(everyone)) * launch.programs
    per_warp += sum(pipes.slots(region) * runs for region, runs in zip(regions, launch.last_arriver_runs))
    per_warp += _loop_instructions(sass, launch.loop_trips, pipes)
    return round(per_warp * launch.num_warps)


def _loop_instructions(sass: Dict[str, Any], trips: Dict[str, int], pipes: Pipes) -> float:
    """Σ over the source loops named in `trips` of (instructions per trip, `trip_instructions` over the SASS loops
    tied to it) x its trips, per warp."""
    versions: Dict[str, List[Dict[str, int]]] = collections.defaultdict(list)
    for loop in sass["loops"]:
        if loop["source_loop"] in trips:
            versions[loop["source_loop"]].append(loop["body"])
    return sum(trip_instructions(bodies, pipes) * trips[name] for name, bodies in versions.items())


def issue_seconds(launch: Launch, result: Dict[str, Any], gpu: Gpu, pipes: Optional[Pipes] = None) -> float:
    """Time the busiest SM takes to issue its programs' instructions.

    Programs of one launch cost alike (their instructions are averaged) and are spread over the SMs, so the
    busiest runs ceil(programs / SMs) of them: a partial last wave costs what a full one does. An SM issues at
    most one instruction per scheduler per clock and a warp at most one per clock (in order, no dual issue), so
    an SM holding fewer warps than schedulers leaves some idle. Still no stalls: a real warp waits on memory
    and on dependent instructions, which only more resident warps hide. pipes: the slot model, `Gpu.issue_pipes` unless
    given (`Pipes`): a scheduler's tensor core is its own, so its clocks bound the scheduler as its issue slots do."""
    pipes = pipes or gpu.issue_pipes
    on_busiest_sm = math.ceil(launch.programs / gpu.sms)
    # A block that cannot fit is reported as a problem; its time is counted as if one did.
    resident_blocks = min(on_busiest_sm, max(occupancy(result, launch.num_warps, gpu)["blocks_per_sm"], 1))
    issue_per_clock = min(SCHEDULERS_PER_SM, resident_blocks * launch.num_warps)
    per_program = issued_warp_instructions(launch, result["sass"], pipes) / launch.programs
    return on_busiest_sm * per_program / (issue_per_clock * gpu.clock_ghz * 1e9) + tail_seconds(
        launch, result, gpu, pipes
    )


def tail_seconds(launch: Launch, result: Dict[str, Any], gpu: Gpu, pipes: Optional[Pipes] = None) -> float:
    """The serial tail of a launch whose programs wait for others (`gpu_audit_trips.LAST_PROGRAM_TRIPS`: OSRA's
    last-arriver dk/dv and bias-gradient sums): the loops one program runs once the rest of its group is done and the
    straight code of its last-arriver regions (`analyse_sass`), issued by its warps alone (at most 4 a clock) after the
    launch's spread work. Averaged over the programs as the spread work is, the dk/dv sum over 196 query blocks'
    partials that one program of each of 8 groups ran for 16 batches (T stage 1 fp32 on an H100, when this was written)
    counted 6% of itself (the busiest SM's 12 of 1568 programs' share). Several such sums in one launch (dk/dv per
    group, the bias gradient's per query block) count as one program's, the last. Its loops and regions are counted
    once more than they run, a small share where the groups are many; the partials' reads from L2 are not modelled
    (issue only)."""
    pipes = pipes or gpu.issue_pipes
    per_warp = _loop_instructions(result["sass"], launch.tail_trips, pipes)
    per_warp += sum(pipes.slots(region) for region in result["sass"].get("last_arrivers", []))
    return per_warp * launch.num_warps / (min(SCHEDULERS_PER_SM, launch.num_warps) * gpu.clock_ghz * 1e9)


def launch_seconds(launch: Launch, result: Dict[str, Any], gpu: Gpu) -> Dict[str, float]:
    """DRAM time, issue time (tensor-core clocks included, `Gpu.issue_pipes`), the estimate (their max) and the
    FP32-pipe bound's estimate (`Gpu.fp32_pipes`: on 16 FP32 lanes per scheduler, sm_70/80, every fp-category
    instruction at 2 issue slots; else the estimate)."""
    unused = [*result["unused_pointer_args"], *RARE_PATH_POINTERS.get(launch.kernel, ())]
    dram = launch.dram_bytes(unused) / (gpu.dram_tb_s * 1e12)
    issue = issue_seconds(launch, result, gpu)
    fp32_pipe = issue_seconds(launch, result, gpu, gpu.fp32_pipes) if gpu.fp32_pipe_slots > 1 else issue
    return {
        "dram_s": dram,
        "issue_s": issue,
        "estimate_s": max(dram, issue),
        "fp32_pipe_estimate_s": max(dram, fp32_pipe),
    }


def roofline_bytes(call: OpCall) -> Dict[str, int]:
    """Minimal DRAM bytes of the forward and of the backward (formulas of the kernel docstrings)."""
    first = call.tensors()[0]
    e = getattr(torch, first.dtype).itemsize
    if call.op == "osra_attention":
        q, k, bias = call.args[0], call.args[1], call.args[3]
        B, h, N, d = q.shape
        M = k.shape[2]
        bias_bytes = math.prod(bias.shape) * getattr(torch, bias.dtype).itemsize if bias is not None else 0
        return {
            "forward": e * (2 * B * h * N * d + 2 * B * h * M * d) + bias_bytes + 4 * B * h * N,
            "backward": e * (4 * B * h * N * d + 4 * B * h * M * d) + 2 * bias_bytes + 8 * B * h * N,
        }
    n = math.prod(first.shape)  # the stencil ops: forward reads x, writes y; backward 3 more passes
    if call.op == "idconv":  # plus its logits, weight bank and bias: read forward, read and grads written backward
        small = sum(math.prod(t.shape) * getattr(torch, t.dtype).itemsize for t in call.tensors()[1:])
        return {"forward": 2 * n * e + small, "backward": 3 * n * e + 2 * small}
    return {"forward": 2 * n * e, "backward": 3 * n * e}


# ===================================================================================================
# 5. Driver: cache, report
# ===================================================================================================


def load_cache(path: Path) -> Dict[str, Any]:
    """The cached compile results of this Triton version; an entry without a field the report reads (written by an
    older audit) is left out, so its specialisation compiles again."""
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("triton") == triton.__version__:
            return {k: v for k, v in data["entries"].items() if not v["ok"] or "unused_pointer_args" in v}
    return {}


def save_cache(path: Path, entries: Dict[str, Any]) -> None:
    path.write_text(
        json.dumps({"triton": triton.__version__, "entries": dict(sorted(entries.items()))}, indent=1, sort_keys=True)
        + "\n"
    )


_CALLS: List[OpCall] = []  # op calls to record, inherited by the forked workers


def _record_target(target: str) -> List[Tuple[OpCall, List[Launch], Dict[str, int]]]:
    gpu = GPUS[target]
    return [
        (call, *record_call(call, gpu))
        for call in _CALLS
        if triton_runs(getattr(torch, call.tensors()[0].dtype), gpu.cc)
    ]


_PENDING: Dict[str, Dict[str, Any]] = {}  # specs to compile, inherited by the forked workers


def _compile_worker(key: str) -> Dict[str, Any]:
    return compile_spec(_PENDING[key])


def audit(targets: Sequence[str], jobs: int, use_cache: bool, configs: str = "", log=print) -> Dict[str, Any]:
    """The audit of the op calls whose (first) configuration label matches the regex `configs`."""
    started = time.perf_counter()
    calls = {c: cfg for c, cfg in capture_calls(jobs, use_cache, log).items() if re.search(configs, cfg)}
    log(f"[audit] {len(calls)} distinct op calls captured in {time.perf_counter() - started:.0f} s")
    _CALLS[:] = calls
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        launches = dict(zip(targets, pool.map(_record_target, targets)))
    log(f"[audit] launches recorded in {time.perf_counter() - started:.0f} s")

    cache_path = RESULTS / f"gpu_audit_cache_{triton.__version__}.json"
    cache = load_cache(cache_path) if use_cache else {}
    specs = {ln.compile_key: ln.spec for per in launches.values() for _, lns, _ in per for ln in lns}
    todo = {k: s for k, s in specs.items() if k not in cache}
    log(f"[audit] {len(specs)} distinct specialisations, {len(todo)} to compile ({jobs} jobs)")
    compile_started = time.perf_counter()
    _PENDING.update(todo)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for i, (key, result) in enumerate(zip(todo, pool.map(_compile_worker, todo)), 1):
            result["summary"] = dict(todo[key]["summary"])
            result["kernel"] = todo[key]["fn"].split(":")[1]
            cache[key] = result
            if i % 10 == 0 or i == len(todo):
                log(f"[audit]   compiled {i}/{len(todo)} ({time.perf_counter() - compile_started:.0f} s)")
                save_cache(cache_path, cache)
    # A full audit drops entries no launch needs any more; a filtered one keeps the others' entries.
    save_cache(cache_path, {k: v for k, v in cache.items() if k in specs or configs})
    report = build_report(calls, launches, cache)
    report["configs"] = configs or "all"
    report["runtime_s"] = {
        "total": time.perf_counter() - started,
        "compile": time.perf_counter() - compile_started,
        "compiled": len(todo),
        "cached": len(specs) - len(todo),
    }
    return report


def build_report(calls: Dict[OpCall, str], launches, cache) -> Dict[str, Any]:
    kernels: Dict[Tuple[str, str], Dict[str, Any]] = {}
    call_rows = []
    for target, per_call in launches.items():
        gpu = GPUS[target]
        for call, lns, torch_bytes in per_call:
            phases = collections.defaultdict(
                lambda: {"estimate_s": 0.0, "dram_s": 0.0, "issue_s": 0.0, "torch_s": 0.0, "fp32_pipe_estimate_s": 0.0}
            )
            for ln in lns:
                result = cache[ln.compile_key]
                entry = kernels.setdefault(
                    (ln.kernel, target), {"kernel": ln.kernel, "target": target, "specialisations": {}, "failures": []}
                )
                spec_row = entry["specialisations"].setdefault(
                    ln.compile_key,
                    {
                        "dtypes": [],  # of the calls launching it, first first (fp32's and tf32's can be one)
                        **result["summary"],
                        **{
                            k: result.get(k)
                            for k in ("ok", "error", "registers", "spill_store_bytes", "spill_load_bytes", "smem_bytes")
                        },
                    },
                )
                if call.dtype not in spec_row["dtypes"]:
                    spec_row["dtypes"].append(call.dtype)
                if not result["ok"]:
                    continue
                spec_row.update(occupancy(result, ln.num_warps, gpu))
                spec_row["loops"] = [
                    {"source_loop": lp["source_loop"], "depth": lp["depth"], **lp["body"]}
                    for lp in result["sass"]["loops"]
                ]
                if gpu.estimate:
                    for k, v in launch_seconds(ln, result, gpu).items():
                        phases[ln.phase][k] += v
            if gpu.estimate:
                for phase, n_bytes in torch_bytes.items():
                    seconds = n_bytes / (gpu.dram_tb_s * 1e12)
                    for k in ("torch_s", "dram_s", "estimate_s", "fp32_pipe_estimate_s"):
                        phases[phase][k] += seconds
            if gpu.estimate and phases:
                rb = roofline_bytes(call)
                for phase, t in phases.items():
                    call_rows.append(
                        {
                            "op": call.op,
                            "phase": phase,
                            "target": target,
                            "gpu": gpu.name,
                            "config": calls[call],
                            "dtype": call.dtype,
                            "shape": list(call.tensors()[0].shape),
                            "roofline_s": rb[phase] / (gpu.dram_tb_s * 1e12),
                            **t,
                        }
                    )
    for entry in kernels.values():
        limit = GPUS[entry["target"]].smem_per_block_kb * 1024
        for row in entry["specialisations"].values():
            problems = []
            if not row["ok"]:
                problems.append(f"compile error: {row['error']}")
            else:
                if row["smem_bytes"] > limit:
                    problems.append(f"smem {row['smem_bytes']} B > {limit} B")
                if row["spill_store_bytes"] or row["spill_load_bytes"]:
                    problems.append(f"spills {row['spill_store_bytes']} B stores / {row['spill_load_bytes']} B loads")
            row["problems"] = problems
            if problems:
                entry["failures"].append(
                    {"dtypes": row["dtypes"], "constexprs": row["constexprs"], "problems": problems}
                )
        entry["specialisations"] = list(entry["specialisations"].values())
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "targets": {t: dataclasses.asdict(GPUS[t]) for t in launches},
        "note": "static estimates from compiled SASS and a simple issue/DRAM model, not measurements",
        "kernels": sorted(kernels.values(), key=lambda e: (e["kernel"], e["target"])),
        "calls": call_rows,
    }


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def markdown(report: Dict[str, Any]) -> str:
    out = [
        f"# Static GPU audit (Triton {report['triton']}, {report['date']})",
        "",
        "Static estimates from the compiled kernels (no GPU involved): registers, spills and shared memory "
        "from ptxas/Triton; occupancy from the target's limits; times from `benchmarks/gpu_audit.py`'s "
        "issue/DRAM model. Not measurements.",
        "",
        "Targets: "
        + "; ".join(
            f"{t} = {g['name']} ({g['sms']} SMs, {g['dram_tb_s']} TB/s, "
            f"{g['clock_ghz']} GHz{'' if g['estimate'] else ', compile only'})"
            for t, g in report["targets"].items()
        ),
        "",
        "## Kernels (worst specialisation per column)",
        "",
        "| kernel | target | specs | regs | spill B (st+ld) | smem KB | min blocks/SM | min warps/SM "
        "| hot loop body (insts: ld/st/fp/int/other) | problems |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["kernels"]:
        ok = [s for s in e["specialisations"] if s["ok"]]
        failed = len(e["specialisations"]) - len(ok)
        if ok:
            hot = max(
                (lp for s in ok for lp in s["loops"]), key=lambda lp: (lp["depth"], lp.get("total", 0)), default=None
            )
            hot_text = (
                (
                    f"{hot['source_loop']}: {hot.get('total', 0)} ({hot.get('load', 0)}/{hot.get('store', 0)}/"
                    f"{hot.get('fp', 0)}/{hot.get('int', 0)}/{hot.get('other', 0)})"
                )
                if hot
                else "no loop"
            )
            spills = max(s["spill_store_bytes"] + s["spill_load_bytes"] for s in ok)
            row = (
                f"{max(s['registers'] for s in ok)} | {spills}"
                f" | {max(s['smem_bytes'] for s in ok) / 1024:.1f} | {min(s['blocks_per_sm'] for s in ok)}"
                f" | {min(s['warps_per_sm'] for s in ok)} | {hot_text}"
            )
        else:
            row = "- | - | - | - | - | -"
        problems = ""
        if e["failures"]:
            problems = f"{len(e['failures'])} failing" + (f" ({failed} compile errors)" if failed else "")
        out.append(f"| {e['kernel']} | {e['target']} | {len(e['specialisations'])} | {row} | {problems} |")
    out += ["", "## Failures", ""]
    for e in report["kernels"]:
        for f in e["failures"]:
            dtypes = "/".join(f["dtypes"])
            out.append(f"* {e['kernel']} {e['target']} {dtypes} {f['constexprs']}: {'; '.join(f['problems'])}")
    out += [
        "",
        "## Op calls, TransXNet-T at batch 128, 224x224 (worst over layouts and modes)",
        "",
        "Static estimate vs roofline (minimal DRAM bytes / bandwidth), µs. In brackets, where it is 1% higher: the "
        "FP32-pipe bound on GPUs with 16 FP32 lanes per scheduler (every fp-category instruction at 2 issue slots; "
        "close for FFMA-bound stencils, pessimistic where MUFU, HMMA or compares make up the fp category).",
        "",
        "| op | phase | dtype | shape | "
        + " | ".join(f"{g['name']} est / roof" for g in report["targets"].values() if g["estimate"])
        + " |",
        "|---|---|---|---|" + "---|" * sum(g["estimate"] for g in report["targets"].values()),
    ]
    worst: Dict[Tuple, Dict[str, Dict]] = collections.defaultdict(dict)
    for (op, _, shape, dtype, target, phase), row in worst_calls(report, models=("t",)).items():
        worst[(op, phase, dtype, shape)][target] = row

    def cell(r):
        bound = r["fp32_pipe_estimate_s"]
        pipe = f" [{_us(bound)}]" if bound > 1.01 * r["estimate_s"] else ""
        return f"{_us(r['estimate_s'])}{pipe} / {_us(r['roofline_s'])}"

    for (op, phase, dtype, shape), per_target in sorted(worst.items()):
        cells = [
            cell(r) if (r := per_target.get(t)) else "-" for t in report["targets"] if report["targets"][t]["estimate"]
        ]
        out.append(f"| {op} | {phase} | {dtype} | {'x'.join(map(str, shape))} | " + " | ".join(cells) + " |")
    out += ["", f"Configurations audited: `{report['configs']}`."]
    rt = report.get("runtime_s")
    if rt:
        out += [
            "",
            f"Audit run: {rt['total']:.0f} s total, {rt['compiled']} specialisations compiled "
            f"({rt['compile']:.0f} s), {rt['cached']} from the cache.",
        ]
    return "\n".join(out) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="sm_70,sm_80,sm_86,sm_90", help="comma-separated, of " + ",".join(GPUS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--no-cache", action="store_true", help="recompile everything (the cache is rewritten)")
    parser.add_argument(
        "--configs",
        default="",
        help="regex on call configurations, e.g. '^t fp16 .* 128x224x224'"
        " (labels: '<model> <dtype> plain|accelerated train|eval <B>x<H>x<W> nchw|channels_last')",
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default results/gpu_audit_<triton>.json)")
    args = parser.parse_args(argv)
    report = audit(
        [t.strip() for t in args.targets.split(",")],
        args.jobs,
        not args.no_cache,
        args.configs,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    path = args.output or RESULTS / f"gpu_audit_{triton.__version__}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(report))
    print(f"[audit] wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
