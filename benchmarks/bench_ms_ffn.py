"""The MS-FFN family (multiscale_dwconv, ms_ffn_middle): eager reference vs torch.compile(reference) vs Triton.

Shapes: the MS-FFN hidden map of every stage of TransXNet-T/S/B at batch 128 (hidden Ch = C * ratio,
groups of kernels 1/3/5/7 with widths Ch - 3*(Ch//4), Ch//4, Ch//4, Ch//4), contiguous NCHW,
dtype from TRANSXNET_BENCH_DTYPE (default bfloat16).

Cases (N = B*Ch*H*W elements of e bytes):
    middle-fwd-eval    BN(GELU(multiscale_dwconv(x) + x)) with running stats     min bytes 2*N*e  (Triton: 2 passes)
    middle-fwd-train   the same with batch stats + running update   min bytes 2*N*e  (Triton: 3 passes)
    middle-fwdbwd-train  forward + backward, training               min bytes 5*N*e  (Triton: 3 + 7 passes)
    multiscale-fwd     multiscale_dwconv alone                      min bytes 2*N*e  (Triton: 2 passes)
    multiscale-fwdbwd  forward + backward                           min bytes 5*N*e  (Triton: 2 + 3 passes)
The 5*N*e of a forward+backward is x and out, then go, x (for dW) and dx. Roofline time = min bytes /
HBM bandwidth (H100 SXM ~3.35 TB/s, H200 ~4.8 TB/s); `achieved_gbps` in extra_info is min_bytes / time.
FLOPs (extra_info `flops`): 2 * N * mean(k^2) per conv pass, ~3x that for forward+backward.
Issue targets on GPU: middle-fwdbwd-train Triton >= 3x eager; middle-fwd-eval >= 50% of copy bandwidth.
"""

import os

import pytest
import torch

import transxnet_kernels as tk
from benchmarks.common import run_case

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU benchmark: needs CUDA (the Triton interpreter on CPU says nothing about speed)",
)

BATCH = 128
SPATIAL = (56, 28, 14, 7)
MODELS = {  # name: (channels per stage, MLP ratio per stage)
    "T": ((48, 96, 224, 448), (4, 4, 4, 4)),
    "S": ((64, 128, 320, 512), (6, 6, 4, 4)),
    "B": ((76, 152, 336, 672), (8, 8, 4, 4)),
}
KERNELS = (1, 3, 5, 7)
SHAPES = [
    (f"{m}-stage{stage + 1}", int(c * r), s)
    for m, (cs, rs) in MODELS.items()
    for stage, (c, r, s) in enumerate(zip(cs, rs, SPATIAL))
]
CASES = ["middle-fwd-eval", "middle-fwd-train", "middle-fwdbwd-train", "multiscale-fwd", "multiscale-fwdbwd"]
IMPLS = ["eager", "compiled", "triton"]
DTYPE = getattr(torch, os.environ.get("TRANSXNET_BENCH_DTYPE", "bfloat16"))


def _group_widths(ch):
    q = ch // 4
    return [ch - 3 * q, q, q, q]


def _mean_k2(widths):
    return sum(w * k * k for w, k in zip(widths, KERNELS)) / sum(widths)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name,ch,size", SHAPES, ids=[s[0] for s in SHAPES])
def test_ms_ffn(benchmark, name, ch, size, case, impl):
    device = torch.device("cuda")
    torch.manual_seed(0)
    widths = _group_widths(ch)
    backward = "fwdbwd" in case
    x = torch.randn(BATCH, ch, size, size, device=device, dtype=DTYPE, requires_grad=backward)
    weights = [
        (0.2 * torch.randn(c, 1, k, k, device=device, dtype=DTYPE)).requires_grad_(backward)
        for c, k in zip(widths, KERNELS)
    ]
    biases = [(0.1 * torch.randn(c, device=device, dtype=DTYPE)).requires_grad_(backward) for c in widths]
    # fp32 BatchNorm parameters beside half activations, as autocast training has them (cuDNN's BatchNorm
    # backward refuses half parameters with fp32 running statistics).
    norm_weight = torch.ones(ch, device=device, dtype=torch.float32, requires_grad=backward)
    norm_bias = torch.zeros(ch, device=device, dtype=torch.float32, requires_grad=backward)
    running_mean = torch.zeros(ch, device=device, dtype=torch.float32)
    running_var = torch.ones(ch, device=device, dtype=torch.float32)
    training = "train" in case

    if case.startswith("middle"):

        def op(x, weights, biases):
            return tk.ms_ffn_middle(x, weights, biases, norm_weight, norm_bias, running_mean, running_var, training)

        params = [x, *weights, *biases, norm_weight, norm_bias]
    else:

        def op(x, weights, biases):
            return tk.multiscale_dwconv(x, weights, biases)

        params = [x, *weights, *biases]

    backend_name = "triton" if impl == "triton" else "reference"
    fn = torch.compile(op, dynamic=False) if impl == "compiled" else op
    grad = torch.randn(x.shape, device=device, dtype=DTYPE) if backward else None

    def step():
        with tk.use_backend(backend_name):
            out = fn(x, weights, biases)
            if backward:
                torch.autograd.grad(out, params, grad)
        return out

    N = x.numel()
    e = x.element_size()
    flops = 2 * N * _mean_k2(widths) * (3 if backward else 1)
    min_bytes = (5 if backward else 2) * N * e
    run_case(
        benchmark,
        step,
        device,
        min_bytes,
        flops=flops,
        shape=f"{BATCH}x{ch}x{size}x{size}",
        dtype=str(DTYPE),
        impl=impl,
        case=case,
        model_stage=name,
    )
