"""IDConv benchmark: the IDConv of every stage of TransXNet-T/S/B at batch 128, K = 7, fp32 and bf16.

Implementations: the eager reference (softmax, multiply, sum, grouped conv over B·C groups),
torch.compile of the reference, and the Triton backend; forward and forward+backward. In bf16 also
the Triton backend with its tensor-core conv passes off (`triton_strips`: the FFMA strip stencils),
the A/B baseline of `idconv._toeplitz_conv_kernel` where the plan takes it (stage 1 on A100/H100).

Minimal bytes (N = B·c·H·W activations, S = the logits/weight/bias elements, e = element size):
    forward           (2·N + S)·e        read x and the small tensors, write y
    forward+backward  (5·N + 3·S)·e      + backward: read gy and x, write gx; read the small tensors
                                           again and write their grads
FLOPs: forward 2·K²·N, forward+backward 6·K²·N (gx and dk each cost as much as the forward).

Targets on a GPU: forward+backward at least 3x the eager reference; forward at least 50% of the
device's copy bandwidth (``copy_gbps`` in extra_info, measured in the same run; compare
``achieved_gbps`` with it: ``fraction_of_copy_bw``).

Run: PYTHONPATH=. python -m pytest benchmarks/bench_idconv.py --benchmark-json=idconv.json
Every case skips on CPU: the Triton interpreter is a test vehicle, not a performance target.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import transxnet_kernels
from benchmarks.common import median_ms, run_case
from transxnet_kernels import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 128
K = 7
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (model, stage): (IDConv channels c = C/2, spatial side, groups G)
STAGES = {
    ("T", 1): (24, 56, 2),
    ("T", 2): (48, 28, 2),
    ("T", 3): (112, 14, 2),
    ("T", 4): (224, 7, 2),
    ("S", 1): (32, 56, 2),
    ("S", 2): (64, 28, 2),
    ("S", 3): (160, 14, 3),
    ("S", 4): (256, 7, 4),
    ("B", 1): (38, 56, 2),
    ("B", 2): (76, 28, 2),
    ("B", 3): (168, 14, 4),
    ("B", 4): (336, 7, 4),
}

IMPLS = {
    "reference": lambda: functools.partial(_with_backend, "reference"),
    "reference_compiled": lambda: torch.compile(reference.idconv),
    "triton": lambda: functools.partial(_with_backend, "triton"),
    "triton_strips": lambda: _triton_strips,
}


def _with_backend(name, *args):
    with transxnet_kernels.use_backend(name):
        return transxnet_kernels.idconv(*args)


def _triton_strips(*args):
    """The Triton backend with the tensor-core conv passes off (the plans take the FFMA strips instead)."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import idconv as triton_idconv

    settings = dataclasses.replace(common.launch_settings(triton_idconv.Settings, args[0].device), toeplitz_dtypes=())
    with common.launch_overrides(settings):
        return _with_backend("triton", *args)


def min_bytes_and_flops(c: int, side: int, G: int, backward: bool, dtype: torch.dtype):
    e = torch.finfo(dtype).bits // 8
    n = BATCH * c * side * side
    small = BATCH * G * c * K * K + G * c * K * K + BATCH * G * c + G * c
    if backward:
        return (5 * n + 3 * small) * e, 6 * K * K * n
    return (2 * n + small) * e, 2 * K * K * n


@functools.cache
def copy_gbps() -> float:
    """The device's copy bandwidth (read + write bytes per second) of a 1 GiB tensor, in GB/s."""
    src = torch.empty(2**28, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), DEVICE)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


@pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU benchmark: no CUDA device (the interpreter is not timed)")
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("stage", list(STAGES), ids=lambda s: f"{s[0]}-stage{s[1]}")
def test_idconv(benchmark, stage, dtype_name, mode, impl):
    dtype = DTYPES[dtype_name]
    c, side, G = STAGES[stage]
    backward = mode == "forward_backward"
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=gen).requires_grad_(backward)

    inputs = (randn(BATCH, c, side, side), randn(BATCH, G, c, K, K), randn(G, c, K, K), randn(BATCH, G, c), randn(G, c))
    if impl == "triton_strips":
        from transxnet_kernels.triton import idconv as triton_idconv

        x = inputs[0].detach()
        if not triton_idconv._Plan(x, K, conv=True, others=(x,)).toeplitz:
            pytest.skip("no tensor-core conv pass planned here (fp32, small planes, this GPU): triton is the strips")
    fn = IMPLS[impl]()
    if backward:
        grad_out = torch.randn(BATCH, c, side, side, device=DEVICE, dtype=dtype, generator=gen)

        def step():
            return torch.autograd.grad(fn(*inputs), inputs, grad_out)
    else:

        def step():
            with torch.no_grad():
                return fn(*inputs)

    step()  # compile / autotune outside the timing
    min_bytes, flops = min_bytes_and_flops(c, side, G, backward, dtype)
    record = run_case(
        benchmark,
        step,
        DEVICE,
        min_bytes,
        impl=impl,
        mode=mode,
        model=stage[0],
        stage=stage[1],
        channels=c,
        side=side,
        groups=G,
        kernel=K,
        batch=BATCH,
        dtype=str(dtype),
        flops=flops,
        copy_gbps=copy_gbps(),
    )
    benchmark.extra_info["fraction_of_copy_bw"] = record["achieved_gbps"] / record["copy_gbps"]
    benchmark.extra_info["tflops"] = flops / (record["median_ms"] * 1e-3) / 1e12
