"""Fill the on-disk Triton cache with a model's kernels before its first call, compiling in parallel.

On a GPU, the first call of each kernel specialisation compiles it, one after another, inside the model's
first forward and backward: TransXNet-T's accelerated training step at 128x224x224 (fp32) makes 78 distinct
specialisations (inference: 31), ~415 s of compiling on this project's 2-core machine, the largest (IDConv's
stencils at k = 7) up to ~33 s each; on an H200 the model benchmark did not finish its warm-up in 170 s
(2026-12-04). This tool runs the model once on the `meta` device to record every call of the fused ops
(shapes, strides, storage offsets, dtypes, which tensors need gradients: what the kernels specialise on), then
replays the calls on the GPU as the model made them, shared among several processes. Each compile lands in
Triton's on-disk cache (`TRITON_CACHE_DIR`, default ~/.triton/cache), which the model's own first call then
reads, as does every later process on the machine. Precisions: `fp32`, `bf16`, `fp16` replay each call with
its floating tensors in that dtype (a model cast with `.to(dtype)`); `tf32` replays the fp32 calls with TF32 allowed
for fp32 matmuls (`torch.set_float32_matmul_precision("high")`, which OSRA's kernels follow; the others replay
without); `amp` replays the
call under autocast (bf16 where the GPU has it) with the tensors as the model's AMP run hands them to the op
(`replay_dtypes`).

    python -m benchmarks.gpu_warmup --model t --input 128x224x224 --precisions fp32,amp --jobs 16
    python -m benchmarks.gpu_warmup --model t --input 2x800x1216 --modes eval --layouts channels_last

`capture_calls(model, (B, C, H, W))` records the calls of any TransXNet module (a timm one, a fork_feat
backbone) for `warm`.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch

from benchmarks.common import tf32_matmuls

# The public fused ops, and those without a backward (their calls replay the forward only). The static GPU audit
# (gpu_audit.py) captures with these too (`recording_fused_calls`).
OPS = ("idconv", "multiscale_dwconv", "ms_ffn_middle", "ms_ffn_middle_eval", "osra_attention")
FORWARD_ONLY_OPS = ("ms_ffn_middle_eval",)
PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "amp": None}


def _encode(value, gradients: bool):
    """An op argument as the replay rebuilds it: a tensor as its layout (no values), lists element-wise."""
    if isinstance(value, torch.Tensor):
        return {
            "tensor": {
                "shape": list(value.shape),
                "stride": list(value.stride()),
                "offset": value.storage_offset(),
                "dtype": str(value.dtype).removeprefix("torch."),
                "requires_grad": value.requires_grad and gradients and torch.is_grad_enabled(),
            }
        }
    if isinstance(value, (list, tuple)):
        return [_encode(v, gradients) for v in value]
    return value


def _affine_batch_norm(input, running_mean, running_var, weight=None, bias=None, *args, **kwargs):
    """Stand-in for F.batch_norm on meta: same shape, layout and autograd reach, none of the cost."""
    out = input * weight.view(1, -1, 1, 1) if weight is not None else input * 1
    return out + bias.view(1, -1, 1, 1) if bias is not None else out


@contextlib.contextmanager
def recording_fused_calls(on_call: Callable[[str, List[Any]], None]) -> Iterator[None]:
    """Inside the block each call of a public fused op (`OPS`, as `transxnet_kernels.<op>`) is passed to
    on_call(op, its arguments in signature order, defaults filled in) and then runs; F.batch_norm is the meta
    stand-in `_affine_batch_norm`; and `has_fused` answers as with the Triton backend available, so a model run on
    meta (where no fused backend runs) takes the fused forms it would take on a GPU. The meta capture of this
    warm-up and of the static GPU audit (gpu_audit.capture_model_calls)."""
    import torch.nn.functional as F

    import transxnet_kernels

    originals = {op: getattr(transxnet_kernels, op) for op in OPS}

    def spy(op):
        signature = inspect.signature(originals[op])

        def record(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            on_call(op, list(bound.arguments.values()))
            return originals[op](*args, **kwargs)

        return record

    def triton_has(op, x):
        return transxnet_kernels.backend.OPS[op].status("triton") == "available"

    real_batch_norm, real_has_fused = F.batch_norm, transxnet_kernels.has_fused
    try:
        F.batch_norm = _affine_batch_norm
        transxnet_kernels.has_fused = triton_has
        for op in OPS:
            setattr(transxnet_kernels, op, spy(op))
        yield
    finally:
        F.batch_norm, transxnet_kernels.has_fused = real_batch_norm, real_has_fused
        for op, fn in originals.items():
            setattr(transxnet_kernels, op, fn)


def capture_calls(
    model: torch.nn.Module,
    input_shape: Sequence[int],
    modes: Sequence[str] = ("train", "eval"),
    layouts: Sequence[str] = ("nchw",),
) -> List[Dict[str, Any]]:
    """Every distinct fused-op call a forward of (a meta copy of) `model` makes on an input of `input_shape`, in
    each mode (train: with gradients; eval: without) and input layout (nchw, channels_last), as the replay
    takes them: {"op", "config", "args"}. The model's choices of fused forms are made as with the Triton
    backend available (on meta no fused backend runs)."""
    import copy

    calls: Dict[str, Dict[str, Any]] = {}
    config = [""]

    def record(op, arguments):
        encoded = [_encode(v, op not in FORWARD_ONLY_OPS) for v in arguments]
        calls.setdefault(json.dumps([op, encoded]), {"op": op, "config": config[0], "args": encoded})

    with recording_fused_calls(record):
        meta = copy.deepcopy(model).to("meta")
        for mode in modes:
            meta.train(mode == "train")
            for layout in layouts:
                x = torch.empty(*input_shape, device="meta")
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                config[0] = f"{mode} {'x'.join(map(str, input_shape))} {layout}"
                with torch.set_grad_enabled(mode == "train"):
                    meta(x)
    return list(calls.values())


def _span(spec: Dict[str, Any]) -> int:
    """Elements from the tensor's first to one past its last (its storage offset aside)."""
    shape, stride = spec["shape"], spec["stride"]
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0


def _tensor(spec: Dict[str, Any], floating: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor with the spec's shape, strides and storage offset (so the kernels specialise on the same
    alignments), a floating spec in `floating`. Values in [0.5, 1.5): valid BatchNorm variances, finite everywhere."""
    shape, stride, offset = spec["shape"], spec["stride"], spec["offset"]
    saved = getattr(torch, spec["dtype"])
    dtype = floating if saved.is_floating_point else saved
    base = torch.rand(offset + _span(spec), device=device).add_(0.5).to(dtype)
    t = base.as_strided(shape, stride, offset)
    return t.requires_grad_() if spec["requires_grad"] and dtype.is_floating_point else t


def _arguments(encoded, floating: Callable[[Dict[str, Any]], torch.dtype], device: torch.device):
    """The call's arguments rebuilt, each floating tensor in the dtype `floating` gives its spec."""
    if isinstance(encoded, dict):
        return _tensor(encoded["tensor"], floating(encoded["tensor"]), device)
    if isinstance(encoded, list):
        return [_arguments(a, floating, device) for a in encoded]
    return encoded


def _autocast_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16


def replay_dtypes(precision: str, device: torch.device) -> Callable[[Dict[str, Any]], torch.dtype]:
    """Each floating tensor's dtype as the replay of `precision` builds it. For amp, what reaches the op under
    autocast: views with gaps (channel slices: activations, which autocast's convs and linears made half
    precision) in the autocast dtype, with their strides; dense tensors in fp32, the op's own autocast
    casting those it casts (parameters, dense activations: `.to` keeps dense strides) and leaving the rest
    fp32 as the model has them (BatchNorm's parameters and statistics)."""
    if precision != "amp":
        return lambda spec: PRECISIONS[precision]
    half = _autocast_dtype(device)
    return lambda spec: half if _span(spec) != math.prod(spec["shape"]) else torch.float32


def replay(call: Dict[str, Any], precision: str, device: torch.device, backend: str) -> None:
    """One op call on `backend` as the model made it: forward and backward when an input needed a gradient (the
    call was captured in grad mode), else the forward without gradients."""
    import transxnet_kernels as tk

    args = [_arguments(a, replay_dtypes(precision, device), device) for a in call["args"]]
    with (
        tk.use_backend(backend),
        torch.autocast(device.type, _autocast_dtype(device), enabled=precision == "amp"),
        tf32_matmuls(precision == "tf32"),
    ):
        run_call(getattr(tk, call["op"]), args, gradient_inputs(call["op"], args))


def gradient_inputs(op: str, args: Sequence[Any]) -> List[torch.Tensor]:
    """The tensors of a rebuilt call that need a gradient (none for a forward-only op)."""
    if op in FORWARD_ONLY_OPS:
        return []
    leaves = [t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]
    return [t for t in leaves if t.requires_grad]


def run_call(op: Callable[..., torch.Tensor], args: Sequence[Any], inputs: Sequence[torch.Tensor]) -> None:
    """op(*args): forward and backward (a gradient of ones) when `inputs` need gradients, else the forward alone,
    without recording a graph."""
    with torch.set_grad_enabled(bool(inputs)):
        out = op(*args)
    if inputs:
        torch.autograd.grad(out, inputs, torch.ones_like(out))


def _replay_share(work: Sequence[Tuple[Dict[str, Any], str]], device: str, backend: str) -> Tuple[int, List[str]]:
    """A worker process's calls: (how many ran, one line per call that failed)."""
    failures = []
    for call, precision in work:
        try:
            replay(call, precision, torch.device(device), backend)
        except Exception as exc:  # reported per call; a failing call leaves the others to warm
            failures.append(f"{call['op']} {precision} {call['config']}: {type(exc).__name__}: {exc}"[:300])
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return len(work) - len(failures), failures


def warm(
    calls: Sequence[Dict[str, Any]], precisions: Sequence[str], jobs: int, device: str, backend: str
) -> Tuple[int, List[str]]:
    """Replay every (call, precision) over `jobs` processes (spawned: CUDA does not survive a fork). Returns
    (calls run, failures)."""
    work = [(call, precision) for precision in precisions for call in calls]
    shares = [work[i::jobs] for i in range(jobs) if work[i::jobs]]
    if jobs == 1:
        return _replay_share(work, device, backend)
    done, failures = 0, []
    with ProcessPoolExecutor(len(shares), mp_context=multiprocessing.get_context("spawn")) as pool:
        for ran, failed in pool.map(_replay_share, shares, [device] * len(shares), [backend] * len(shares)):
            done += ran
            failures += failed
    return done, failures


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="t", help="t, s or b")
    p.add_argument("--input", default="128x224x224", help="BxHxW of the 3-channel input")
    p.add_argument("--modes", default="train,eval", help="comma list of train (with gradients), eval")
    p.add_argument("--layouts", default="nchw", help="comma list of nchw, channels_last")
    p.add_argument("--plain", action="store_true", help="the released model's forms, not transxnet.accelerated's")
    p.add_argument("--precisions", default="fp32,amp", help=f"comma list of {', '.join(PRECISIONS)}")
    p.add_argument("--jobs", type=int, default=max(1, (multiprocessing.cpu_count() or 2)))
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="triton", help="the backend whose kernels to warm")
    args = p.parse_args(argv)
    precisions = [x for x in args.precisions.split(",") if x]
    unknown = [x for x in precisions if x not in PRECISIONS]
    if unknown:
        p.error(f"unknown precisions {unknown}; choose from {list(PRECISIONS)}")
    import transxnet

    batch, height, width = (int(n) for n in args.input.split("x"))
    with torch.device("meta"):
        model = transxnet.TransXNet(args.model)
    if not args.plain:
        transxnet.accelerated(model)
    start = time.perf_counter()
    calls = capture_calls(model, (batch, 3, height, width), args.modes.split(","), args.layouts.split(","))
    captured = time.perf_counter() - start
    done, failures = warm(calls, precisions, args.jobs, args.device, args.backend)
    print(
        f"[warmup] {args.model} {args.input} {args.modes} {args.layouts} {','.join(precisions)}: {len(calls)} "
        f"distinct op calls captured in {captured:.0f} s; {done} of {done + len(failures)} replays on "
        f"{args.backend} in {time.perf_counter() - start - captured:.0f} s over {args.jobs} processes"
    )
    for line in failures:
        print(f"[warmup] failed: {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
