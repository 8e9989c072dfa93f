"""CPU op benchmarks: the cpp backend vs the eager reference vs torch.compile of the reference.

TransXNet-T shapes at batch 16, 224x224 input, 2 threads (the CI machines and the
issue's target): stages C = 48, 96, 224, 448 at 56, 28, 14, 7 pixels; IDConv on
C/2 channels (G=2, K=7); MS-FFN hidden 4C in kernel groups (1, 3, 5, 7); OSRA on
C/2 channels with 1, 2, 4, 8 heads, N = H*W queries, M = 49 keys, q passed as
the model's transposed view. Forward only (inference: the cpp kernels are
forward-only). Each case records the minimal bytes it must move (read every
input once, write the output once) and its FLOPs in extra_info:

* idconv:            bytes (2*B*c*H*W + B*G*c*K*K + G*c*K*K) * s,  FLOPs 2*B*c*H*W*K*K
* multiscale_dwconv: bytes 2*B*Ch*H*W * s,                          FLOPs 2*B*H*W*sum(c_i*k_i^2)
* ms_ffn_middle:     bytes 2*B*Ch*H*W * s,                          FLOPs as above + ~20/element (GELU, BN)
* ms_ffn_middle_eval: as ms_ffn_middle, + ~20 FLOPs/element (fc1's GELU and BN, fused into the input staging)
* osra_attention:    bytes (2*B*h*N*d + 2*B*h*M*d + B*h*N*M) * s,  FLOPs 4*B*h*N*M*d

Every case runs in two layouts: nchw (contiguous) and nhwc (channels_last; IDConv
on the first channel half of a channels_last tensor, as the model's
x.chunk(2, dim=1)[0]; OSRA q, k, v as the transposed views of channels_last
conv outputs). The cpp kernels run NHWC natively (no layout copy).

Run: PYTHONPATH=. python -m pytest benchmarks/bench_cpu_ops.py -q [--benchmark-json out.json]
The torch.compile cases compile once per shape (excluded from the timing; the
compile time is recorded as compile_s).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Tuple

import pytest
import torch

import transxnet_kernels as tk
from benchmarks.common import run_case
from transxnet_kernels import reference

THREADS = 2
BATCH = 16
STAGES = [(48, 56, 1), (96, 28, 2), (224, 14, 4), (448, 7, 8)]  # (C, H=W, OSRA heads)
OPS = ["idconv", "multiscale_dwconv", "ms_ffn_middle", "ms_ffn_middle_eval", "osra_attention"]
LAYOUTS = ["nchw", "nhwc"]
IMPLS = ["reference", "cpp", "compiled_reference"]
CPU = torch.device("cpu")

requires_cpp = pytest.mark.skipif(
    not tk.available_backends()["cpp"].startswith("available"), reason=f"cpp backend: {tk.available_backends()['cpp']}"
)


def make_case(op: str, C: int, HW: int, heads: int, layout: str = "nchw") -> Tuple[tuple, int, int]:
    """(args, min_bytes, flops) of op at one TransXNet-T stage, activations in `layout`."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    def image(*shape):  # a [B, C, H, W] activation in the layout of the case
        t = rand(*shape)
        return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else t

    B, s = BATCH, 4
    if op == "idconv":
        c, G, K = C // 2, 2, 7
        x = image(B, 2 * c, HW, HW).chunk(2, dim=1)[0]  # the model's IDConv input, a channel half
        args = (x, rand(B, G, c, K, K), rand(G, c, K, K), rand(B, G, c), rand(G, c))
        return args, (2 * B * c * HW * HW + B * G * c * K * K + G * c * K * K) * s, 2 * B * c * HW * HW * K * K
    if op in ("multiscale_dwconv", "ms_ffn_middle", "ms_ffn_middle_eval"):
        Ch = 4 * C
        q = Ch // 4
        widths, kernels = [Ch - 3 * q, q, q, q], [1, 3, 5, 7]
        x = image(B, Ch, HW, HW)
        weights = [rand(w, 1, k, k) for w, k in zip(widths, kernels)]
        biases = [rand(w) for w in widths]
        flops = 2 * B * HW * HW * sum(w * k * k for w, k in zip(widths, kernels))
        if op == "multiscale_dwconv":
            return (x, weights, biases), 2 * B * Ch * HW * HW * s, flops
        if op == "ms_ffn_middle_eval":
            args = (x, rand(Ch), rand(Ch), weights, biases, rand(Ch), rand(Ch))
            return args, 2 * B * Ch * HW * HW * s, flops + 40 * B * Ch * HW * HW
        bn = (rand(Ch), rand(Ch), rand(Ch), torch.rand(Ch, generator=g) + 0.5)
        return (x, weights, biases, *bn, False), 2 * B * Ch * HW * HW * s, flops + 20 * B * Ch * HW * HW
    c, M = C // 2, 49
    N, d = HW * HW, c // heads
    q = image(B, c, HW, HW).reshape(B, heads, d, N).transpose(-1, -2)  # the model's q view of a conv output
    k, v = (t.reshape(B, heads, d, M).transpose(-1, -2) for t in image(B, 2 * c, 7, 7).chunk(2, dim=1))
    args = (q, k, v, rand(B, heads, N, M))
    return args, (2 * B * heads * N * d + 2 * B * heads * M * d + B * heads * N * M) * s, 4 * B * heads * N * M * d


_COMPILED: Dict[str, Callable] = {}


def implementation(op: str, impl: str) -> Callable:
    if impl == "reference":
        return getattr(reference, op)
    if impl == "compiled_reference":
        if op not in _COMPILED:
            _COMPILED[op] = torch.compile(getattr(reference, op))  # default mode (inductor)
        return _COMPILED[op]
    public_op = getattr(tk, op)

    def on_cpp(*args):
        with tk.use_backend("cpp"):
            return public_op(*args)

    return on_cpp


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stage", range(len(STAGES)), ids=[f"C{c}_{hw}x{hw}" for c, hw, _ in STAGES])
@pytest.mark.parametrize("op", OPS)
@requires_cpp
def test_cpu_op(benchmark, op, stage, layout, impl):
    torch.set_num_threads(THREADS)
    C, HW, heads = STAGES[stage]
    args, min_bytes, flops = make_case(op, C, HW, heads, layout)
    fn = implementation(op, impl)
    with torch.no_grad():
        t0 = time.perf_counter()
        fn(*args)  # compiles the torch.compile case
        first_call_s = time.perf_counter() - t0
        record = run_case(
            benchmark,
            lambda: fn(*args),
            CPU,
            min_bytes,
            op=op,
            impl=impl,
            layout=layout,
            stage_channels=C,
            pixels=HW,
            batch=BATCH,
            threads=THREADS,
            flops=flops,
            compile_s=first_call_s if impl == "compiled_reference" else 0.0,
        )
    record["gflops"] = flops / (record["median_ms"] * 1e-3) / 1e9
    benchmark.extra_info["gflops"] = record["gflops"]
