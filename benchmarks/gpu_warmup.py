"""Fill the on-disk Triton cache with a model's kernels before timing it, compiling in parallel.

On a GPU, the first call of each kernel specialisation compiles it (seconds each), one after another,
inside the model's first forward and backward: on an H200 (2026-12-04) the model benchmark for TransXNet-T
did not finish its warm-up in 170 s. This replays the model's op calls as the static audit captured them
(`benchmarks/results/gpu_audit_calls.json`: every distinct public-op call of T/S/B, with shapes, strides,
storage offsets, dtypes and which tensors need gradients) on the GPU, forward and backward, the calls
shared among several processes. Each compile lands in Triton's on-disk cache, which the model's own first
call then reads. Precisions: `fp32`, `bf16`, `fp16` replay each call with its floating tensors in that dtype
(a model cast with `.to(dtype)`); `amp` replays the fp32 call under autocast (bf16 where the GPU has it),
as the model's AMP run makes it. A call the file does not hold (a model or input it was not captured
for, or model code changed since) is not warmed and compiles at its first use, as without this tool.

    python -m benchmarks.gpu_warmup --model t --input 128x224x224 --precisions fp32,amp --jobs 16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

CALLS_FILE = Path(__file__).resolve().parent / "results" / "gpu_audit_calls.json"
FORWARD_ONLY_OPS = ("ms_ffn_middle_eval",)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "amp": None}


def select_calls(saved: Dict[str, Any], model: str, inputs: str) -> List[Dict[str, Any]]:
    """The saved calls of TransXNet-`model` at input `inputs` (BxHxW), every mode and layout. The capture names
    each call after the first configuration making it ("t accelerated train 128x224x224 nchw")."""
    chosen = []
    for call in saved["calls"]:
        size, _fused, _mode, shape, _layout = call["config"].split()
        if size == model and shape == inputs:
            chosen.append(call)
    return chosen


def _tensor(spec: Dict[str, Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor with the spec's shape, strides and storage offset (so the kernels specialise on the same
    alignments), floating specs in `dtype`. Values in [0.5, 1.5): valid BatchNorm variances, finite everywhere."""
    shape, stride, offset = spec["shape"], spec["stride"], spec["offset"]
    saved_dtype = getattr(torch, spec["dtype"])
    dtype = dtype if saved_dtype.is_floating_point else saved_dtype
    span = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    base = torch.rand(offset + span, device=device).add_(0.5).to(dtype)
    t = base.as_strided(shape, stride, offset)
    return t.requires_grad_() if spec["requires_grad"] and dtype.is_floating_point else t


def _arguments(encoded, dtype: torch.dtype, device: torch.device):
    if isinstance(encoded, dict):
        return _tensor(encoded["tensor"], dtype, device)
    if isinstance(encoded, list):
        return [_arguments(a, dtype, device) for a in encoded]
    return encoded


def replay(call: Dict[str, Any], precision: str, device: torch.device, backend: str) -> None:
    """One op call on `backend`: the forward without gradients (what inference and a no_grad forward run), then,
    when an input needs a gradient, forward and backward (a training forward can take other kernels)."""
    import transxnet_kernels as tk

    amp = precision == "amp"
    dtype = torch.float32 if amp else PRECISIONS[precision]
    args = [_arguments(a, dtype, device) for a in call["args"]]
    leaves = [t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]
    inputs = [t for t in leaves if t.requires_grad] if call["op"] not in FORWARD_ONLY_OPS else []
    op = getattr(tk, call["op"])
    autocast_dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    with tk.use_backend(backend), torch.autocast(device.type, dtype=autocast_dtype, enabled=amp):
        with torch.no_grad():
            op(*args)
        if inputs:
            out = op(*args)
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
    p.add_argument("--input", default="128x224x224", help="BxHxW as captured (128x224x224 or 2x800x1216)")
    p.add_argument("--precisions", default="fp32,amp", help=f"comma list of {', '.join(PRECISIONS)}")
    p.add_argument("--jobs", type=int, default=max(1, (multiprocessing.cpu_count() or 2)))
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="triton", help="the backend whose kernels to warm")
    p.add_argument("--calls", type=Path, default=CALLS_FILE)
    args = p.parse_args(argv)
    precisions = [x for x in args.precisions.split(",") if x]
    unknown = [x for x in precisions if x not in PRECISIONS]
    if unknown:
        p.error(f"unknown precisions {unknown}; choose from {list(PRECISIONS)}")
    calls = select_calls(json.loads(args.calls.read_text()), args.model, args.input)
    if not calls:
        p.error(f"{args.calls.name} holds no call of model {args.model!r} at input {args.input}")
    start = time.perf_counter()
    done, failures = warm(calls, precisions, args.jobs, args.device, args.backend)
    print(
        f"[warmup] {args.model} {args.input} {','.join(precisions)}: {done} of {done + len(failures)} op calls "
        f"replayed on {args.backend} in {time.perf_counter() - start:.0f} s over {args.jobs} processes"
    )
    for line in failures:
        print(f"[warmup] failed: {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
