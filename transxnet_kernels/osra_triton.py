"""OSRA attention in Triton: softmax(q @ k^T * scale + bias) @ v, flash-style, with its backward.

Shapes: q [B, h, N, d]; k, v [B, h, M, d]; bias [1 or B, 1 or h, N, M] or None. Any strides for
q, k, v, bias and the incoming gradient (the model passes transposed views); no [B, h, N, M]
tensor is ever materialised.

Forward (one program per (query block, b, head)): q tile in registers, loop over key blocks of
BLOCK_M keys with the online softmax; the bias tile is loaded and added in registers; the program
writes out and the log-sum-exp lse = m + log(l) (fp32; fp64 for fp64 inputs). The output is
allocated as [B, h, d, N] memory and returned as its [B, h, N, d] transposed view, so the model's
`out.transpose(-1, -2).reshape(B, c, H, W)` is a free view.

Backward, with P = exp(S - lse), dP = dO @ v^T, Delta = rowsum(dO * O), dS = P * (dP - Delta):
  dq = scale * dS @ k, dk = scale * dS^T @ q, dv = P^T @ dO, dbias = dS summed over the bias's
  broadcast (batch / head) dims.
* `_osra_bwd_dq_kernel`, one program per (query block, head, batch group): loops over the batches
  of its group; per batch it computes Delta (stored for the next kernel), dq, and dS, which it
  accumulates into the bias gradient. A batch-1 bias is reduced deterministically: the program
  owns its [BLOCK_N, M] slice of a per-group fp32 partial (accumulated in registers when M fits
  one key block, else read-modify-written by the owning program only), and the few group
  partials are summed by torch.sum (fixed order). Groups exist only to fill the GPU when
  N-blocks x heads is small; per-batch biases need no reduction and are written directly.
* `_osra_bwd_dkdv_kernel`, one program per (key block, b·head, query split): loops over its
  query range; when B·h·key-blocks is too small to fill the GPU the query range is split and the
  fp32 partials summed (deterministic, no atomics).

Precision: fp16/bf16 inputs use fp32 softmax and fp32 accumulation (P and dS are rounded to the
input dtype before their tl.dot, as flash attention does); fp32 uses input_precision="ieee" (no
TF32); fp64 computes in fp64 (for gradcheck); on GPUs fp64 skips tl.dot (not compiled for fp64 by
Triton before 2025) for a broadcast-multiply-sum on 16x16 blocks: slow, exact, any Triton 3.

Roofline (e = element size, minimal traffic, the bias read once since it is shared across B):
  forward  bytes = e·(2·BhNd + 2·BhMd) + e_bias·h·N·M + 4·BhN (lse);  FLOPs = 4·BhNMd
  backward bytes = e·(4·BhNd + 4·BhMd) + e_bias·2·h·N·M + 8·BhN;     FLOPs = 10·BhNMd (+4·BhNMd of
  recompute in this two-kernel design). At the model's sizes (d <= 32, M = 49) the FLOP/byte ratio
  is ~M/2 ≈ 25, so every OSRA call is memory-bound on H100 (3.35 TB/s; ~295 FLOP/byte ridge for
  bf16 tensor cores, ~20 for fp32 ieee FMA on the larger-d stages).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import backend

MAX_HEAD_DIM = 128


@triton.jit
def _matmul(a, b, PRECISION: tl.constexpr, USE_DOT: tl.constexpr):
    """a @ b with the accumulation dtype's precision; without tl.dot where it lacks the dtype."""
    if USE_DOT:
        return tl.dot(a, b, input_precision=PRECISION)
    else:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _osra_fwd_kernel(
    Q, K, V, BIAS, OUT, LSE, SCALE,
    sqb, sqh, sqn, sqd,
    skb, skh, skm, skd,
    svb, svh, svm, svd,
    sbb, sbh, sbn, sbm,
    sob, soh, son, sod,
    H, N, M, D,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    scale = tl.load(SCALE)  # its dtype (fp32, or fp64 for fp64 inputs) is the accumulation dtype

    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    bias_base = BIAS + b * sbb + h * sbh + offs_n[:, None] * sbn

    m_i = tl.full([BLOCK_N], float("-inf"), scale.dtype)
    l_i = tl.zeros([BLOCK_N], scale.dtype)
    acc = tl.zeros([BLOCK_N, BLOCK_D], scale.dtype)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        kv_mask = mask_m[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_m[:, None] * skm + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_m[:, None] * svm + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        s = _matmul(q, tl.trans(k), PRECISION, USE_DOT).to(scale.dtype) * scale
        if HAS_BIAS:
            s += tl.load(bias_base + offs_m[None, :] * sbm,
                         mask=mask_n[:, None] & mask_m[None, :], other=0.0).to(scale.dtype)
        s = tl.where(mask_m[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _matmul(p.to(v.dtype), v, PRECISION, USE_DOT).to(scale.dtype)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(OUT + b * sob + h * soh + offs_n[:, None] * son + offs_d[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    tl.store(LSE + bh.to(tl.int64) * N + offs_n, m_i + tl.log(l_i), mask=mask_n)


@triton.jit
def _osra_bwd_dq_kernel(
    Q, K, V, BIAS, OUT, DOUT, LSE, DELTA, DQ, DBIAS, SCALE,
    sqb, sqh, sqn, sqd,
    skb, skh, skm, skd,
    svb, svh, svm, svd,
    sbb, sbh, sbn, sbm,
    sob, soh, son, sod,
    sgb, sgh, sgn, sgd,
    sdqb, sdqh, sdqn, sdqd,
    sdbg, sdbh, sdbn, sdbm,
    B, H, N, M, D, BATCHES_PER_GROUP,
    HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, ONE_KEY_BLOCK: tl.constexpr,
    PRECISION: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    group = tl.program_id(2).to(tl.int64)
    scale = tl.load(SCALE)

    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    nd_mask = mask_n[:, None] & mask_d[None, :]
    dbias_base = DBIAS + group * sdbg + h * sdbh + offs_n[:, None] * sdbn
    # Bias-gradient slice of this program, summed over its batches (used when M fits one block).
    dbias_acc = tl.zeros([BLOCK_N, BLOCK_M], scale.dtype)

    b_start = group * BATCHES_PER_GROUP
    b_end = tl.minimum(b_start + BATCHES_PER_GROUP, B)
    for b in range(b_start, b_end):
        q = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=nd_mask, other=0.0)
        do = tl.load(DOUT + b * sgb + h * sgh + offs_n[:, None] * sgn + offs_d[None, :] * sgd,
                     mask=nd_mask, other=0.0)
        o = tl.load(OUT + b * sob + h * soh + offs_n[:, None] * son + offs_d[None, :] * sod,
                    mask=nd_mask, other=0.0)
        delta = tl.sum(do.to(scale.dtype) * o.to(scale.dtype), 1)
        row = (b * H + h) * N + offs_n
        tl.store(DELTA + row, delta, mask=mask_n)
        lse = tl.load(LSE + row, mask=mask_n, other=float("inf"))  # padded rows get P = 0
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        bias_base = BIAS + b * sbb + h * sbh + offs_n[:, None] * sbn

        dq = tl.zeros([BLOCK_N, BLOCK_D], scale.dtype)
        for start_m in range(0, M, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            kv_mask = mask_m[:, None] & mask_d[None, :]
            k = tl.load(k_base + offs_m[:, None] * skm + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_m[:, None] * svm + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            s = _matmul(q, tl.trans(k), PRECISION, USE_DOT).to(scale.dtype) * scale
            nm_mask = mask_n[:, None] & mask_m[None, :]
            if HAS_BIAS:
                s += tl.load(bias_base + offs_m[None, :] * sbm, mask=nm_mask, other=0.0).to(scale.dtype)
            p = tl.where(mask_m[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = _matmul(do, tl.trans(v), PRECISION, USE_DOT).to(scale.dtype)
            ds = p * (dp - delta[:, None])
            dq += _matmul(ds.to(k.dtype), k, PRECISION, USE_DOT).to(scale.dtype)
            if HAS_DBIAS:
                if ONE_KEY_BLOCK:
                    dbias_acc += ds
                else:
                    # Read-modify-write of the slice only this program owns; the barrier orders
                    # the previous batch's store before this load across the program's threads.
                    dbias_ptrs = dbias_base + offs_m[None, :] * sdbm
                    tl.debug_barrier()
                    prev = tl.load(dbias_ptrs, mask=nm_mask, other=0.0).to(scale.dtype)
                    prev = tl.where(b > b_start, prev, 0.0)  # the group's first batch starts the sum
                    tl.store(dbias_ptrs, (prev + ds).to(DBIAS.dtype.element_ty), mask=nm_mask)
        tl.store(DQ + b * sdqb + h * sdqh + offs_n[:, None] * sdqn + offs_d[None, :] * sdqd,
                 (dq * scale).to(DQ.dtype.element_ty), mask=nd_mask)

    if HAS_DBIAS:
        if ONE_KEY_BLOCK:
            offs_m = tl.arange(0, BLOCK_M)
            tl.store(dbias_base + offs_m[None, :] * sdbm, dbias_acc.to(DBIAS.dtype.element_ty),
                     mask=mask_n[:, None] & (offs_m < M)[None, :])


@triton.jit
def _osra_bwd_dkdv_kernel(
    Q, K, V, BIAS, DOUT, LSE, DELTA, DK, DV, SCALE,
    sqb, sqh, sqn, sqd,
    skb, skh, skm, skd,
    svb, svh, svm, svd,
    sbb, sbh, sbn, sbm,
    sgb, sgh, sgn, sgd,
    sdks, sdkb, sdkh, sdkm, sdkd,
    sdvs, sdvb, sdvh, sdvm, sdvd,
    H, N, M, D, ROWS_PER_SPLIT,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2).to(tl.int64)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    scale = tl.load(SCALE)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    md_mask = mask_m[:, None] & mask_d[None, :]
    k = tl.load(K + b * skb + h * skh + offs_m[:, None] * skm + offs_d[None, :] * skd, mask=md_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_m[:, None] * svm + offs_d[None, :] * svd, mask=md_mask, other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DOUT + b * sgb + h * sgh
    bias_base = BIAS + b * sbb + h * sbh + offs_m[:, None] * sbm
    row_base = bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_M, BLOCK_D], scale.dtype)
    dv = tl.zeros([BLOCK_M, BLOCK_D], scale.dtype)
    n_lo = split * ROWS_PER_SPLIT
    n_hi = tl.minimum(n_lo + ROWS_PER_SPLIT, N)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        nd_mask = mask_n[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=nd_mask, other=0.0)
        do = tl.load(do_base + offs_n[:, None] * sgn + offs_d[None, :] * sgd, mask=nd_mask, other=0.0)
        lse = tl.load(LSE + row_base + offs_n, mask=mask_n, other=float("inf"))  # padded rows: P = 0
        delta = tl.load(DELTA + row_base + offs_n, mask=mask_n, other=0.0)
        # Transposed scores: rows are keys, columns are queries.
        st = _matmul(k, tl.trans(q), PRECISION, USE_DOT).to(scale.dtype) * scale
        if HAS_BIAS:
            st += tl.load(bias_base + offs_n[None, :] * sbn,
                          mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(scale.dtype)
        pt = tl.exp(st - lse[None, :])
        dv += _matmul(pt.to(do.dtype), do, PRECISION, USE_DOT).to(scale.dtype)
        dpt = _matmul(v, tl.trans(do), PRECISION, USE_DOT).to(scale.dtype)
        dst = pt * (dpt - delta[None, :])
        dk += _matmul(dst.to(q.dtype), q, PRECISION, USE_DOT).to(scale.dtype)

    tl.store(DK + split * sdks + b * sdkb + h * sdkh + offs_m[:, None] * sdkm + offs_d[None, :] * sdkd,
             (dk * scale).to(DK.dtype.element_ty), mask=md_mask)
    tl.store(DV + split * sdvs + b * sdvb + h * sdvh + offs_m[:, None] * sdvm + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=md_mask)


# ----------------------------------------------------------------------------------------------
# Launch helpers


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _Config:
    block_n: int
    block_m: int
    block_d: int
    precision: str  # tl.dot input precision: "ieee" keeps fp32 exact (no TF32); fp16/bf16 ignore it
    use_dot: bool


def _uses_dot(q: torch.Tensor) -> bool:
    # tl.dot on fp64 only compiles on recent Triton (FMA/DMMA support landed in 2025); fp64 exists for
    # gradcheck, so on GPUs it takes the broadcast-multiply-sum path, which every Triton compiles.
    return not (q.dtype == torch.float64 and q.device.type == "cuda")


def _config(q: torch.Tensor) -> _Config:
    d = q.shape[-1]
    precision = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
    if _uses_dot(q):
        # BLOCK_M = 64 covers the model's M = 49 in one key block; tl.dot needs every dim >= 16.
        return _Config(64, 64, max(16, triton.next_power_of_2(d)), precision, True)
    # Without tl.dot a [block_n, block_d, block_m] product lives in registers: keep it small.
    return _Config(16, 16, triton.next_power_of_2(d), precision, False)


def _target_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the device; splits/groups only exist below it.

    On CPU (the interpreter) a small fixed value, so small test shapes exercise the split paths."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _bias_strides(bias: Optional[torch.Tensor]) -> Tuple[int, int, int, int]:
    if bias is None:
        return (0, 0, 0, 0)
    # Broadcast dims (size 1) read with stride 0.
    return tuple(0 if bias.shape[i] == 1 else bias.stride(i) for i in range(4))  # type: ignore[return-value]


def _scale_tensor(scale: float, q: torch.Tensor) -> torch.Tensor:
    # Passed by pointer so fp64 calls get the scale in fp64 (Triton float args are fp32).
    return torch.full((1,), scale, dtype=_acc_dtype(q.dtype), device=q.device)


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    """[B, h, N, d] with [B, h, d, N] memory: the model's transpose+reshape after it is a view."""
    B, h, N, d = q.shape
    return q.new_empty((B, h, d, N)).transpose(-1, -2)


def _forward(q, k, v, bias, scale):
    B, h, N, d = q.shape
    M = k.shape[2]
    out = _empty_out(q)
    lse = torch.empty((B, h, N), dtype=_acc_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse
    cfg = _config(q)
    grid = (triton.cdiv(N, cfg.block_n), B * h)
    _osra_fwd_kernel[grid](
        q, k, v, bias if bias is not None else q, out, lse, _scale_tensor(scale, q),
        *q.stride(), *k.stride(), *v.stride(), *_bias_strides(bias), *out.stride(),
        h, N, M, d,
        HAS_BIAS=bias is not None, PRECISION=cfg.precision, USE_DOT=cfg.use_dot,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, num_warps=4,
    )
    return out, lse


def _backward(grad_out, q, k, v, bias, out, lse, scale, bias_needs_grad):
    B, h, N, d = q.shape
    M = k.shape[2]
    device = q.device
    acc_dtype = _acc_dtype(q.dtype)
    target = _target_programs(device)
    scale_t = _scale_tensor(scale, q)
    cfg = _config(q)
    n_blocks = triton.cdiv(N, cfg.block_n)
    has_dbias = bias is not None and bias_needs_grad

    # Bias-gradient target: per-batch biases get one slice per batch (no reduction); a batch-1 bias
    # gets one fp32 partial per batch group, summed afterwards together with a broadcast head dim.
    if has_dbias and bias.shape[0] == 1 and B > 1:
        groups = min(B, max(1, triton.cdiv(target, n_blocks * h)))
        batches_per_group = triton.cdiv(B, groups)
        groups = triton.cdiv(B, batches_per_group)
    else:
        groups, batches_per_group = B, 1
    reduce_dims = [i for i, size in enumerate((groups, h)) if has_dbias and bias.shape[i] == 1 and size > 1]
    if has_dbias:
        # Sums over batches or groups accumulate in fp32 (fp64), whatever the bias dtype.
        dbias_dtype = acc_dtype if reduce_dims or batches_per_group > 1 else bias.dtype
        dbias_buf = torch.empty((groups, h, N, M), dtype=dbias_dtype, device=device)
    else:
        dbias_buf = torch.empty((0,), dtype=q.dtype, device=device)
    dbias_strides = dbias_buf.stride() if has_dbias else (0, 0, 0, 0)

    dq = torch.empty_like(q)
    delta = torch.empty((B, h, N), dtype=acc_dtype, device=device)
    _osra_bwd_dq_kernel[(n_blocks, h, groups)](
        q, k, v, bias if bias is not None else q, out, grad_out, lse, delta, dq, dbias_buf, scale_t,
        *q.stride(), *k.stride(), *v.stride(), *_bias_strides(bias), *out.stride(), *grad_out.stride(),
        *dq.stride(), *dbias_strides,
        B, h, N, M, d, batches_per_group,
        HAS_BIAS=bias is not None, HAS_DBIAS=has_dbias, ONE_KEY_BLOCK=M <= cfg.block_m,
        PRECISION=cfg.precision, USE_DOT=cfg.use_dot,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, num_warps=4,
    )

    # Split the query range only when B·h·key-blocks cannot fill the device.
    m_blocks = triton.cdiv(M, cfg.block_m)
    splits = min(n_blocks, max(1, triton.cdiv(target, m_blocks * B * h)))
    rows_per_split = triton.cdiv(n_blocks, splits) * cfg.block_n
    splits = triton.cdiv(N, rows_per_split)
    if splits > 1:
        dk_buf = torch.empty((splits, B, h, M, d), dtype=acc_dtype, device=device)
        dv_buf = torch.empty((splits, B, h, M, d), dtype=acc_dtype, device=device)
        dk_strides, dv_strides = dk_buf.stride(), dv_buf.stride()
    else:
        dk_buf, dv_buf = torch.empty_like(k), torch.empty_like(v)
        dk_strides, dv_strides = (0,) + dk_buf.stride(), (0,) + dv_buf.stride()
    _osra_bwd_dkdv_kernel[(m_blocks, B * h, splits)](
        q, k, v, bias if bias is not None else q, grad_out, lse, delta, dk_buf, dv_buf, scale_t,
        *q.stride(), *k.stride(), *v.stride(), *_bias_strides(bias), *grad_out.stride(),
        *dk_strides, *dv_strides,
        h, N, M, d, rows_per_split,
        HAS_BIAS=bias is not None, PRECISION=cfg.precision, USE_DOT=cfg.use_dot,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, num_warps=4,
    )
    if splits > 1:
        # Same layout as the unsplit case (that of k and v), whatever the device decided.
        dk, dv = torch.empty_like(k).copy_(dk_buf.sum(0)), torch.empty_like(v).copy_(dv_buf.sum(0))
    else:
        dk, dv = dk_buf, dv_buf

    if not has_dbias:
        dbias = dbias_buf
    elif reduce_dims:
        dbias = dbias_buf.sum(dim=reduce_dims, keepdim=True).to(bias.dtype)
    else:
        dbias = dbias_buf.to(bias.dtype)
    return dq, dk, dv, dbias


# ----------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("transxnet::osra_attention_fwd", mutates_args=())
def osra_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out [B, h, N, d] (memory [B, h, d, N]), lse [B, h, N] log-sum-exp of the scores."""
    return _forward(q, k, v, bias, scale)


@osra_attention_fwd.register_fake
def _(q, k, v, bias, scale):
    B, h, N, _ = q.shape
    return _empty_out(q), q.new_empty((B, h, N), dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("transxnet::osra_attention_bwd", mutates_args=())
def osra_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, scale: float, bias_needs_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias); dbias has the bias's shape, or is empty when not needed."""
    return _backward(grad_out, q, k, v, bias, out, lse, scale, bias_needs_grad)


@osra_attention_bwd.register_fake
def _(grad_out, q, k, v, bias, out, lse, scale, bias_needs_grad):
    if bias is not None and bias_needs_grad:
        dbias = bias.new_empty(bias.shape)
    else:
        dbias = q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[3]
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.mark_non_differentiable(lse)


def _backward_rule(ctx, grad_out, _grad_lse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    dq, dk, dv, dbias = osra_attention_bwd(grad_out, q, k, v, bias, out, lse, ctx.scale, ctx.bias_needs_grad)
    return dq, dk, dv, (dbias if ctx.bias_needs_grad else None), None


osra_attention_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


@backend.register("osra_attention", "triton", supports=backend.triton_supports)
def osra_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """softmax(q @ k^T * scale + bias) @ v with the Triton kernels (see the module docstring)."""
    d = q.shape[-1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"osra_attention (triton): head dim {d} > {MAX_HEAD_DIM} is not supported")
    if scale is None:
        scale = d ** -0.5
    out, _ = osra_attention_fwd(q, k, v, bias, float(scale))
    return out
