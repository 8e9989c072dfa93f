"""OSRA attention benchmark: the Triton kernels against eager, torch.compile, SDPA and FlexAttention.

Shapes: every stage of TransXNet-T/S/B at batch 128 with 224x224 input (N = 3136, 784, 196, 49
queries; M = 49 keys), and every stage of T at a detection-size input 800x1216 (batch 2,
N = 60800 / 15200 / 3800 / 950, M = 950). q, k and v are the model's views: q of the q conv's output,
k and v the two halves of the kv conv's (transposed views of [B, h, d, L] memory); the bias is [1, h, N, M]
and requires grad (it is a parameter).

Precisions: bf16, fp32, and fp32 with TF32 allowed for matmuls in every implementation ("float32-tf32").

Passes: "fwd" (no grad) and "fwd+bwd" (q, k, v and bias gradients). Minimal traffic and FLOPs per
case (e = element size, bias read once and, in the backward, its gradient written once):
  fwd      bytes = e·(2·BhNd + 2·BhMd + hNM) + 4·BhN            FLOPs = 4·BhNMd
  fwd+bwd  bytes = fwd + e·(4·BhNd + 4·BhMd + 2·hNM) + 8·BhN    FLOPs = 14·BhNMd
The GPU target (issue 5): Triton faster than every baseline on fwd+bwd, peak memory <= SDPA's.

Baselines: eager and torch.compile of the reference, SDPA with torch's own backend choice and with each
backend forced (efficient, cuDNN, flash, math; flash takes no additive mask, so its cases skip), and
FlexAttention with the bias as a score_mod.

Run on a GPU: PYTHONPATH=. python -m pytest benchmarks/bench_osra_attention.py --benchmark-only
(-k "T-s1 and bfloat16" to narrow). CPU runs collect and skip.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import transxnet_kernels
from benchmarks.common import run_case, tf32_matmuls
from transxnet_kernels import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# variant -> (channels per stage, heads per stage); attention channels are C/2, sr = 8, 4, 2, 1.
VARIANTS = {
    "T": ((48, 96, 224, 448), (1, 2, 4, 8)),
    "S": ((64, 128, 320, 512), (1, 2, 5, 8)),
    "B": ((76, 152, 336, 672), (2, 4, 8, 16)),
}
SR_RATIOS = (8, 4, 2, 1)


def _stage_shapes(variant, height, width, batch):
    channels, heads = VARIANTS[variant]
    for stage, (C, h, sr) in enumerate(zip(channels, heads, SR_RATIOS)):
        H, W = height // 2 ** (stage + 2), width // 2 ** (stage + 2)
        N, M = H * W, math.ceil(H / sr) * math.ceil(W / sr)
        yield f"{variant}-stage{stage + 1}-{height}x{width}-b{batch}", (batch, h, N, M, C // 2 // h)


SHAPES = dict([s for v in VARIANTS for s in _stage_shapes(v, 224, 224, 128)] + list(_stage_shapes("T", 800, 1216, 2)))


def _min_bytes_and_flops(B, h, N, M, d, elem, with_backward):
    fwd_bytes = elem * (2 * B * h * N * d + 2 * B * h * M * d + h * N * M) + 4 * B * h * N
    if not with_backward:
        return fwd_bytes, 4 * B * h * N * M * d
    bwd_bytes = elem * (4 * B * h * N * d + 4 * B * h * M * d + 2 * h * N * M) + 8 * B * h * N
    return fwd_bytes + bwd_bytes, 14 * B * h * N * M * d


def _sdpa(backend=None):
    """SDPA with the bias as its additive mask: torch's own choice, or one backend forced (a backend that
    cannot take this case raises, and the case is skipped)."""

    def run(q, k, v, bias):
        mask = bias.expand(q.shape[0], -1, -1, -1)
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return run


SDPA_BACKENDS = ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "FLASH_ATTENTION", "MATH")


@functools.cache
def _flex_attention_with_bias():
    """FlexAttention with the bias as a score_mod, or None where this torch lacks it."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    flex = torch.compile(flex_attention)

    def run(q, k, v, bias):
        def add_bias(score, b, h, q_idx, kv_idx):
            return score + bias[0, h, q_idx, kv_idx]

        return flex(q, k, v, score_mod=add_bias)

    return run


def _triton(q, k, v, bias):
    with transxnet_kernels.use_backend("triton"):
        return transxnet_kernels.osra_attention(q, k, v, bias)


# Inputs' dtype and whether fp32 matmuls may take TF32 (`tf32_matmuls`): "torch.float32-tf32" allows it
# (`torch.set_float32_matmul_precision("high")`) in every implementation, the Triton kernels' TF32 dots and tiles
# beside the baselines' TF32 matmuls.
PRECISIONS = {
    "torch.bfloat16": (torch.bfloat16, False),
    "torch.float32": (torch.float32, False),
    "torch.float32-tf32": (torch.float32, True),
}
IMPLS = ("eager", "compiled", "sdpa", *(f"sdpa-{b.lower()}" for b in SDPA_BACKENDS), "flex", "triton")


def _implementation(name):
    if name == "flex":
        return _flex_attention_with_bias()
    if name.startswith("sdpa-"):
        return _sdpa(name.removeprefix("sdpa-").upper())
    return {
        "eager": reference.osra_attention,
        "compiled": torch.compile(reference.osra_attention),
        "sdpa": _sdpa(),
        "triton": _triton,
    }[name]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU benchmark: the Triton interpreter on CPU is not a timing target")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_osra_attention(benchmark, shape_name, precision, passes, impl):
    B, h, N, M, d = SHAPES[shape_name]
    dtype, tf32 = PRECISIONS[precision]
    with tf32_matmuls(tf32):
        fn = _implementation(impl)
        if fn is None:
            pytest.skip("this torch has no FlexAttention")
        torch.manual_seed(0)
        with_backward = passes == "fwd+bwd"
        # The model's layouts: q a transposed view of the q conv's [B, h·d, N] output; k and v the two channel
        # halves of the kv conv's [B, 2·h·d, M] output, transposed alike (one set of strides, no copies).
        q_map = torch.randn(B, h * d, N, device=DEVICE, dtype=dtype, requires_grad=with_backward)
        kv_map = torch.randn(B, 2 * h * d, M, device=DEVICE, dtype=dtype, requires_grad=with_backward)
        bias = torch.randn(1, h, N, M, device=DEVICE, dtype=dtype, requires_grad=with_backward)
        q = q_map.view(B, h, d, N).transpose(-1, -2)
        k, v = (half.reshape(B, h, d, M).transpose(-1, -2) for half in kv_map.chunk(2, dim=1))
        grad_out = torch.randn(B, h, N, d, device=DEVICE, dtype=dtype)

        def step():
            if not with_backward:
                with torch.no_grad():
                    return fn(q, k, v, bias)
            out = fn(q, k, v, bias)
            return torch.autograd.grad(out, (q_map, kv_map, bias), grad_out)

        try:
            step()  # compile / autotune outside the timing
        except Exception as exc:  # a baseline that cannot run this case (e.g. flex head dim limits)
            if impl == "triton":
                raise
            pytest.skip(f"{impl} cannot run this case: {type(exc).__name__}: {exc}"[:300])
        min_bytes, flops = _min_bytes_and_flops(B, h, N, M, d, q.element_size(), with_backward)
        record = run_case(
            benchmark,
            step,
            DEVICE,
            min_bytes,
            impl=impl,
            passes=passes,
            shape=shape_name,
            B=B,
            heads=h,
            N=N,
            M=M,
            head_dim=d,
            dtype=precision,
            flops=flops,
        )
        benchmark.extra_info["achieved_tflops"] = flops / (record["median_ms"] * 1e-3) / 1e12
