"""OSRA attention in Triton: softmax(q @ k^T * scale + bias) @ v, with its backward.

Shapes: q [B, h, N, d]; k, v [B, h, M, d]; bias [1 or B, 1 or h, N, M] or None. Any strides for
q, k, v, bias and the incoming gradient (the model passes transposed views); no [B, h, N, M]
tensor is ever materialised. The output is allocated as [B, h, d, N] memory and returned as its
[B, h, N, d] transposed view, so the model's `out.transpose(-1, -2).reshape(B, c, H, W)` is a free
view. Both passes store lse = log-sum-exp of the scores (fp32; fp64 for fp64 inputs).

Backward math, with P = exp(S - lse), dP = dO @ v^T, Delta = rowsum(dO * O) = rowsum(P * dP),
dS = P * (dP - Delta): dq = scale * dS @ k, dk = scale * dS^T @ q, dv = P^T @ dO, dbias = dS summed
over the bias's broadcast (batch / head) dims. Every reduction is deterministic (fixed-order sums
of partials, no atomics).

Two paths (`_short_path` picks per call):
* Short: M <= SHORT_PATH_MAX_KEYS = 64 keys (every OSRA call of TransXNet at 224x224: M = 49), a
  positive finite scale, tl.dot available. All keys in one block; one program per (query block,
  head, batch group) loops over its group's batches.
  - `_osra_fwd_short_kernel`: a batch-shared bias tile is loaded once per program, as bias / scale
    with -inf on padded keys (from a copy with rows padded to the key block, `_padded_bias`: aligned vectors, no
    key mask), and starts the q @ k^T dot as its accumulator (the scores come out in
    the dot's register layout and the softmax stays there); one-pass softmax, no rescaling. In fp16/bf16, V's
    padded head-dim columns are loaded as 1 where d leaves room, so P @ V carries the softmax's row sums
    (`_sum_columns_from`).
  - `_osra_bwd_short_kernel`: one read of q, dO, k, v and lse per (query block, batch); O is not
    read (Delta from P * dP); on sm_90 the bias tile from the padded copy too (`_short_bwd_bias_padded`). dq
    is stored; dk and dv are stored as fp32 partials per query block
    ([query blocks, B, h, M, d], each (block, b, head) slice M·d contiguous elements starting at a multiple of 4,
    `_dkdv_partials`), which the last query-block program of each (head, batch group) to finish sums, in
    query-block order, into dk and dv, a slice as one flat run of aligned vectors (an atomic arrival count per
    (head, group); the partials are read back from L2, no separate sum launch); with one query block (stage 4),
    straight into dk and dv where they share a layout (DKV_DIRECT). dS is summed over the group's batches (in registers
    on sm_90 and in sm_80's 128-row kernel, in the program's own slice of the buffer in sm_8x's 64-row one:
    `_short_dbias_in_registers`; rows padded to the key block in sm_80's 64-row kernel, for sm_90's 16-bit slices and
    for fp32 ones where the kernel is bound by issue, `_short_dbias_rows_padded`) into a slice per group ([groups, h,
    N, M]), which the last program writing each query block's rows sums over the groups (and broadcast heads) into
    the gradient where at least `Settings.dbias_sum_min_programs` such programs share it (DBIAS_SUMMED); with fewer
    such programs and several query blocks (stages 2-3), the last of each set of groups (`Settings.dbias_set_slices`
    slices) sums the set's into an fp32 slice, which torch sums over the sets (DBIAS_IN_SETS: a few slices, where it
    read one per group); and torch sums the group slices elsewhere (stage 4).
    On sm_80 the fp16/bf16 backward at 128 query rows (stages 1-2) holds the batch-shared bias tile in its 16-bit
    dtype and converts it per batch (`BIAS_TILE_RAW`): the fp32 tile left no registers for the bias-gradient sum; so
    does sm_90's beside a register group sum, reading the padded copy (`_short_bwd_holds_raw_bias`).
    In both, batch groups are as long as Settings' floor on programs and the wave tail allow
    (`balanced_batch_groups`), and q, out, dO, dq and lse tiles move in vectors along the queries wherever a power
    of two divides N and q's strides (`_query_alignment`; the kernels' Q_VECTOR at N = 196, stage 3, where Triton's
    16-divisibility specialisation sees none and every element was a scalar load or store with its own address
    and mask). The fp16/bf16 forward's per-row log and reciprocal of the softmax sum are the hardware's approximate
    ones (`_log_row_sum`, `_reciprocal_row_sum`); its 128-row kernel on sm_90 runs under a 128-register budget
    (`_SHORT_FWD_HALF_REGISTERS_SM90`: two blocks per SM).
    (The q vectors cut the stage-3 bf16 estimates on an H100 by 20-30%, and let the backward run 128 query rows per
    program, which spilled with scalar q loads.)
* Flash: longer M (detection sizes, M ~ 950), or a scale <= 0, or fp64 on GPUs.
  - `_osra_fwd_kernel`, one program per (query block, b·head): loop over key blocks of BLOCK_M keys
    with the online softmax.
  - `_osra_bwd_dq_kernel`, one program per (query block, head, batch group): per batch Delta (stored
    for the next kernel), dq, and dS accumulated into the bias gradient's per-group partial (in
    registers when M fits one key block, else read-modify-written by the owning program only).
  - `_osra_bwd_dkdv_kernel`, one program per (key block, b·head, query split): loops over its query
    range; the query range is split (fp32 partials) only when B·h·key-blocks cannot fill the GPU.
  - `_osra_dkdv_sum_kernel` sums the dk/dv partials in a fixed order and stores dk and dv once, in
    k's and v's dtype and layout (one launch for both; not run when a single partial already is the gradient).

Precision: fp16/bf16 inputs use fp32 softmax and fp32 accumulation (P and dS are rounded to the
input dtype before their tl.dot, as flash attention does); fp64 computes in fp64 (for gradcheck);
on GPUs fp64 skips tl.dot (not compiled for fp64 by Triton before 2025) for the flash kernels'
broadcast-multiply-sum on 16x16 blocks: slow, exact, any Triton 3. fp32 takes plain TF32 only where
the user allowed it for matmuls (`torch.set_float32_matmul_precision("high")` or
`torch.backends.cuda.matmul.fp32_precision = "tf32"`), in every kernel, and the short path then runs
larger tiles (`_SHORT_BLOCKS`). Otherwise the short path uses 3xTF32 (`_dot`: each operand split into a
TF32 part and an fp32 remainder by `_tf32_split`, three TF32 products, within 1.2e-6 of |a|·|b| per product, like
IEEE fp32's rounding), where the static audit counts fewer instructions for it than for IEEE FMA
(`_short_precision`), and the flash kernels IEEE; the fp32 backward on sm_8x then runs on the flash kernels (the
one-pass kernel's five 3xTF32 dots spill there; `_short_path`). `_tf32_split` rounds with two integer
instructions where Triton's own tf32x3 took eight (static audit, Triton 3.8, T stage 1 fp32 on an H100: forward
37.9 -> 30.7 us, backward 239.7 -> 199.8; A100 forward 146.3 -> 119.7). The interpreter multiplies fp32 dots whole,
so the tests emulate the tensor core's TF32 inputs (`tf32_tensor_cores` in tests/ops/test_osra_attention.py).

Roofline (e = element size, minimal traffic, the bias read once since it is shared across B):
  forward  bytes = e·(2·BhNd + 2·BhMd) + e_bias·h·N·M + 4·BhN (lse);  FLOPs = 4·BhNMd
  backward bytes = e·(4·BhNd + 4·BhMd) + e_bias·2·h·N·M + 8·BhN;     FLOPs = 10·BhNMd
The short backward moves more: the dk/dv partials (2·4·BhMd per query block, written; read back from L2) and the
bias-gradient group partials (4·hNM per group, written and read by the sum, from L2 where the kernel sums them
itself; 2·hNM for a group of one batch in fp16/bf16, `_dbias_partial_dtype`). At the model's sizes (d <= 32, M =
49) the FLOP/byte ratio is ~M/2 ≈ 25, so every OSRA call is memory-bound on H100 (3.35 TB/s; ~295 FLOP/byte ridge
for bf16 tensor cores, ~20 for fp32 IEEE FMA).

Static audit of `osra_attention` (`python -m benchmarks.audit_tables` writes this table from gpu_audit_3.8.0.json:
Triton 3.8.0, batch 128 at 224x224, the worst over layouts and modes; tf32: fp32 inputs with TF32 allowed for matmuls;
estimate / DRAM roofline, µs):

    stage  shape      phase     fp32 A100  fp32 H100  bf16 A100  bf16 H100  tf32 A100  tf32 H100
    T1     1x3136x24  forward   120/40.2   30.7/24.0  20.9/20.5  12.5/12.3  41.1/40.2  24.5/24.0
    T1     1x3136x24  backward  730/80.5   182/48.1   65.0/41.1  38.7/24.5  106/80.5   102/48.1
    T2     2x784x24   forward   60.2/21.0  20.3/12.6  11.7/10.7  7.8/6.4    21.4/21.0  12.8/12.6
    T2     2x784x24   backward  370/42.1   86.9/25.1  39.7/21.4  22.9/12.8  59.7/42.1  50.2/25.1
    T3     4x196x28   forward   32.9/14.3  11.2/8.6   7.8/7.3    5.2/4.3    14.5/14.3  8.7/8.6
    T3     4x196x28   backward  197/28.7   48.3/17.1  41.6/14.5  17.6/8.7   47.4/28.7  36.4/17.1
    T4     8x49x28    forward   21.5/11.4  6.9/6.8    5.8/5.7    3.7/3.4    11.5/11.4  6.9/6.8
    T4     8x49x28    backward  140/22.8   31.4/13.6  19.2/11.5  13.0/6.9   35.1/22.8  26.0/13.6
    S1     1x3136x32  forward   120/53.3   32.3/31.8  27.4/27.0  16.4/16.1  54.1/53.3  32.3/31.8
    S1     1x3136x32  backward  731/107    182/63.6   70.4/54.1  44.3/32.3  136/107    102/63.6
    S2     2x784x32   forward   60.2/27.9  20.3/16.6  14.3/14.1  8.6/8.4    28.3/27.9  16.9/16.6
    S2     2x784x32   backward  370/55.7   86.9/33.3  41.2/28.3  27.0/16.9  75.4/55.7  51.7/33.3
    S3     5x196x32   forward   40.9/20.4  14.0/12.2  10.3/10.3  8.2/6.2    20.7/20.4  12.3/12.2
    S3     5x196x32   backward  242/40.8   58.6/24.4  47.7/20.7  20.1/12.3  66.8/40.8  51.5/24.4
    S4     8x49x32    forward   21.5/13.0  7.8/7.8    6.6/6.5    3.9/3.9    13.1/13.0  7.8/7.8
    S4     8x49x32    backward  140/26.0   31.4/15.5  19.2/13.1  13.0/7.8   39.5/26.0  29.6/15.5
    B1     2x3136x19  forward   238/64.2   59.0/38.3  34.7/32.9  21.3/19.6  65.8/64.2  39.3/38.3
    B1     2x3136x19  backward  1466/128   341/76.6   109/65.8   58.1/39.3  183/128    193/76.6
    B2     4x784x19   forward   120/33.5   35.8/20.0  19.2/17.2  13.3/10.2  34.6/33.5  21.7/20.0
    B2     4x784x19   backward  678/67.0   165/40.0   62.4/34.3  35.4/20.5  94.9/67.0  95.0/40.0
    B3     8x196x21   forward   64.9/21.6  20.4/12.9  12.5/11.0  8.7/6.6    22.0/21.6  13.2/12.9
    B3     8x196x21   backward  356/43.3   91.5/25.8  71.4/22.0  27.1/13.2  85.1/43.3  61.3/25.8
    B4     16x49x21   forward   41.6/17.1  12.6/10.2  9.5/8.7    6.5/5.2    17.3/17.1  10.4/10.2
    B4     16x49x21   backward  252/34.3   59.2/20.5  35.8/17.3  21.7/10.4  55.5/34.3  39.9/20.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .. import ops
from ..backend import CallInfo
from ..layout import key_padded_rows, tensor_span
from ..library import custom_op
from .common import (
    INTERPRETED,
    NO_REGISTER_BUDGET,
    LaunchTarget,
    accumulation_dtype,
    balanced_batch_groups,
    cdiv,
    device_guard,
    fewest_batch_groups,
    fits_int32,
    kept_scalar,
    launch_settings,
    launch_target,
    needs_int64,
    next_power_of_2,
    supports,
    tl_accumulation_dtype,
)
from .ms_ffn import _multiple_of_4

# The largest head dim the kernels are audited (static GPU audit) and tested for; TransXNet's are 19 to 32.
# At 64 the fp32 kernels spill and the dq kernel needs 116 KB of shared memory (sm_86 has 99 KB).
MAX_HEAD_DIM = 32


@triton.jit
def _tf32_split(x):
    """fp32 x = big + small exactly, big being x rounded to TF32's 10-bit mantissa (half an ulp added to the bits,
    the 13 low bits cleared: to nearest, ties away from zero) and small the remainder (|small| <= 2^-11 |x|, exact
    in fp32), whose own 13 low bits the tensor core ignores. Two integer instructions and an FADD per element, where
    Triton's tf32x3 rounds both parts with cvt.rna.tf32, which ptxas expands to four each (finite test, add,
    select, mask)."""
    bits = x.to(tl.uint32, bitcast=True)
    big = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return big, x - big


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """tl.dot(a, b, acc) at `PRECISION`; "tf32x3" (fp32 a and b) is three TF32 products of `_tf32_split`'s parts,
    the small ones first: a·b less a_small·b_small, each product within 1.25·2^-20 (1.2e-6) of |a|·|b| (the small
    parts truncated to TF32 by the tensor core, 2^-21 each, and the dropped product, 2^-22; the big parts' product is
    exact), like the rounding of an IEEE fp32 dot over a few dozen terms."""
    if PRECISION == "tf32x3":
        a_big, a_small = _tf32_split(a)
        b_big, b_small = _tf32_split(b)
        acc = tl.dot(a_small, b_big, acc, input_precision="tf32")
        acc = tl.dot(a_big, b_small, acc, input_precision="tf32")
        return tl.dot(a_big, b_big, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _matmul(a, b, PRECISION: tl.constexpr, USE_DOT: tl.constexpr):
    """a @ b with the accumulation dtype's precision; without tl.dot where it lacks the dtype."""
    if USE_DOT:
        return _dot(a, b, None, PRECISION)
    else:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _log2e(like):
    """log2(e) in like's dtype (a Python float literal would be fp32, too coarse for the fp64 kernels)."""
    return 1.0 / tl.log(tl.zeros_like(like) + 2.0)


@triton.jit
def _log_row_sum(l, HALF: tl.constexpr):
    """log(l) of a softmax row sum (l >= 1: the row's largest term is exp(0)). HALF (fp16/bf16 inputs): the
    hardware's approximate log2 (MUFU.LG2, absolute error ~2^-22) times ln 2, libdevice's fast_logf, where its logf
    spends ~12 FFMAs per row on range reduction and special cases that l in [1, M] never needs (the short forward
    stores one per row and batch). fp32 inputs keep tl.log: with the fast log the 3xTF32 forward at 64 rows
    spilled 12 B on sm_90 under Triton 3.6 (255 registers). fp64, and the interpreter (no libdevice): tl.log."""
    if HALF and not INTERPRETED:
        return libdevice.fast_logf(l)
    else:
        return tl.log(l)


@triton.jit
def _reciprocal_row_sum(l, HALF: tl.constexpr):
    """1 / l of a softmax row sum (l in [1, M]). HALF (fp16/bf16 inputs): the hardware's approximate reciprocal and
    one multiply (libdevice's fast_dividef, error ~2 ulp like Triton's division), where that division (div.full)
    adds range checks and scalings per row that l never needs. fp32 (untried with it), fp64 and the interpreter:
    1 / l."""
    if HALF and not INTERPRETED:
        return libdevice.fast_dividef(tl.zeros_like(l) + 1.0, l)
    else:
        return 1.0 / l


@triton.jit
def _scores_init(
    bias_ptr, nm_offs, mask_n, mask_m, scale, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr
):
    """bias / scale, -inf on padded keys: the accumulator the short-path kernels start the q @ k^T dot from,
    so S / scale = q @ k^T + bias / scale comes out of the dot in its register layout and the softmax
    stays there (a bias added after the dot makes Triton move the scores to the bias's load layout: ~3x the
    instructions). The launcher routes scale <= 0 to the flash kernels. Taken as bias * (1 / scale): one FFMA
    per element with the padding, where the division spent three instructions (`_scores_from_raw_bias` alike)."""
    key_pad = tl.where(mask_m, 0.0, float("-inf")).to(scale.dtype)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + nm_offs, mask=mask_n[:, None] & mask_m[None, :], other=0.0).to(scale.dtype)
        return bias * (1.0 / scale) + key_pad[None, :]
    else:
        return tl.zeros([BLOCK_N, BLOCK_M], scale.dtype) + key_pad[None, :]


# Not shared with `_scores_init` (which could be `_scores_from_raw_bias` of this tile): built that way, the fp32 path's
# code changed and the sm_90 fp16 backward at stage 3 spilled 32 B (Triton 3.8).
@triton.jit
def _bias_tile_raw(bias_ptr, nm_offs, mask_n, mask_m):
    """`_scores_init`'s batch-shared bias tile before its conversion: in the bias's dtype, -inf on padded keys."""
    key_pad = tl.where(mask_m, 0.0, float("-inf")).to(bias_ptr.dtype.element_ty)
    return tl.load(bias_ptr + nm_offs, mask=mask_n[:, None] & mask_m[None, :], other=0.0) + key_pad[None, :]


@triton.jit
def _padded_bias_tile(bias_ptr, h, bias_stride_h, offs_n, offs_m, N, BLOCK_M: tl.constexpr):
    """Head h's batch-shared bias tile from `_padded_bias`'s copy (BIAS_PADDED): rows of BLOCK_M keys, -inf past M
    keys (`_bias_tile_raw`'s values), so the tile loads in aligned vectors at offsets known at compile time, masked by
    row only (0 on query rows past N, as there). The copy's head stride (N·BLOCK_M, or 0) is restated as a multiple
    of BLOCK_M, which is what tells the compiler the vectors are aligned."""
    head = bias_ptr + h * (bias_stride_h // BLOCK_M * BLOCK_M)
    return tl.load(head + (offs_n[:, None] * BLOCK_M + offs_m[None, :]), mask=(offs_n < N)[:, None], other=0.0)


@triton.jit
def _scores_from_raw_bias(bias_tile, scale):
    """`_scores_init` from `_bias_tile_raw`'s tile: the same values (x + -inf = -inf, x + 0 = x in any dtype)."""
    return bias_tile.to(scale.dtype) * (1.0 / scale)


@triton.jit
def _query_multiples(N, q_stride_b, q_stride_h, q_stride_d, Q_VECTOR: tl.constexpr):
    """N and q's batch, head and d strides restated as multiples of Q_VECTOR, which divides each of them (the
    launcher checks: `_query_vector`). The values are unchanged; the compiler now knows the divisibility, so q, dO,
    out, dq and lse tiles move in Q_VECTOR-element vectors along the queries where Triton's specialisation on
    16-divisibility does not see it (N = 196 at 224^2 stage 3: per element, a scalar load or store with its own
    address and mask)."""
    return (
        N // Q_VECTOR * Q_VECTOR,
        q_stride_b // Q_VECTOR * Q_VECTOR,
        q_stride_h // Q_VECTOR * Q_VECTOR,
        q_stride_d // Q_VECTOR * Q_VECTOR,
    )


@triton.jit
def _flat_row_col(flat, row):
    """(flat // row, flat % row) for a runtime row length, the quotient in fp32: (flat + 0.5) / row lies at least
    0.5 / row from an integer and is computed to within (flat / row)·2^-23, so it truncates exactly while flat <
    2^22. A multiply where an integer division by a runtime value cost ~20 instructions per element (B stage 3 bf16
    on sm_90: 1088 -> 996 per program outside the loops)."""
    quotient = ((flat.to(tl.float32) + 0.5) * (1.0 / row)).to(tl.int32)
    return quotient, flat - quotient * row


@triton.jit
def _store_partials_sum(
    parts_ptr,
    parts_stride_s,
    PARTIALS,
    parts_offs,
    parts_mask,
    grad_ptr,
    grad_offs,
    grad_mask,
    ACC: tl.constexpr,
):
    """grad = the sum of PARTIALS partial tiles, taken in ACC in a fixed order (partial 0 first) and stored once,
    in grad's dtype and layout. The partials are read past L1 (.cg): other programs of the launch may have
    written them. parts_mask may cover lanes the store leaves out (whole aligned vectors of a padded slice)."""
    acc = tl.zeros(parts_offs.shape, ACC)
    for _partial in range(PARTIALS):
        acc += tl.load(parts_ptr + parts_offs, mask=parts_mask, other=0.0, cache_modifier=".cg").to(ACC)
        parts_ptr += parts_stride_s  # a 64-bit pointer step: PARTIALS·B·h·M·d may pass int32
    tl.store(grad_ptr + grad_offs, acc.to(grad_ptr.dtype.element_ty), mask=grad_mask)


# q's strides and N are specialised on 16-alignment (see common.py): q, dO, out and dq tiles then move in vectors.
_SHORT_PATH_ALIGNMENT_FREE = [
    "q_stride_n",
    "k_stride_b",
    "k_stride_h",
    "k_stride_m",
    "k_stride_d",
    "bias_stride_b",
    "bias_stride_h",
    "bias_stride_n",
    "bias_stride_m",
    "B",
    "H",
    "M",
    "D",
    "BATCHES_PER_PROGRAM",
]


@triton.jit(do_not_specialize_on_alignment=_SHORT_PATH_ALIGNMENT_FREE)
def _osra_fwd_short_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    out_ptr,
    lse_ptr,
    scale_ptr,
    q_stride_b,
    q_stride_h,
    q_stride_n,
    q_stride_d,
    k_stride_b,
    k_stride_h,
    k_stride_m,
    k_stride_d,
    bias_stride_b,
    bias_stride_h,
    bias_stride_n,
    bias_stride_m,
    B,
    H,
    N,
    M,
    D,
    BATCHES_PER_PROGRAM,
    HAS_BIAS: tl.constexpr,
    BIAS_PER_BATCH: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INDEX64: tl.constexpr,
    Q_VECTOR: tl.constexpr,
    KEY_ROW_STRIDE: tl.constexpr,
    SUM_COLUMNS_FROM: tl.constexpr,
    BIAS_PADDED: tl.constexpr,
):
    """All M <= BLOCK_M keys in one block: one pass, no rescaling. One program per (query block, head,
    batch group); a batch-shared bias tile is loaded once and serves every batch of the group (from `_padded_bias`'s
    copy where BIAS_PADDED: `_padded_bias_tile`).

    KEY_ROW_STRIDE (`_key_row_stride`): k's and v's stride between head-dim rows where their keys are contiguous
    (the model's [B, h, d, M] memory), else 0 (the runtime strides). Known at compile time, a thread's K and V
    elements lie at constant distances from its first, so each one's address is an immediate add where it was a
    multiply-add of the runtime stride (the unaligned rows of M keys load element by element).
    SUM_COLUMNS_FROM (`_sum_columns_from`): 0, or the first of V's padded head-dim columns (>= D) that are loaded
    as 1, so P @ V also carries each row's sum of P in each of them; their sum over the power-of-two count of them
    is that row sum, exactly. It replaces an FADD per score: where the columns are the dot accumulator's last n-tile
    of 8, every thread holds them at fixed registers and the selection compiles away. The row sum is then that of P
    as rounded to the 16-bit dtype for the dot, the weights the output is formed from."""
    N, q_stride_b, q_stride_h, q_stride_d = _query_multiples(N, q_stride_b, q_stride_h, q_stride_d, Q_VECTOR)
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    group = tl.program_id(2).to(tl.int64)
    scale = tl.load(scale_ptr)
    scale_log2 = scale * _log2e(scale)  # exp(x * scale) = exp2(x * scale_log2)
    HALF: tl.constexpr = q_ptr.dtype.element_ty.is_fp16() or q_ptr.dtype.element_ty.is_bf16()

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if INDEX64:
        offs_n = offs_n.to(tl.int64)
    mask_n = offs_n < N
    mask_m = offs_m < M
    mask_d = offs_d < D
    nd_mask = mask_n[:, None] & mask_d[None, :]
    # In-slice offset tiles (int32 unless INDEX64) on int64 scalar bases: pointer tiles cost registers.
    # q and out share one layout, k and v another (the launcher makes it so): one offset tile each.
    nd_offs = offs_n[:, None] * q_stride_n + offs_d[None, :] * q_stride_d
    if KEY_ROW_STRIDE:
        dm_offs = offs_d[:, None] * KEY_ROW_STRIDE + offs_m[None, :]
        md_offs = offs_m[:, None] + offs_d[None, :] * KEY_ROW_STRIDE
    else:
        dm_offs = offs_d[:, None] * k_stride_d + offs_m[None, :] * k_stride_m
        md_offs = offs_m[:, None] * k_stride_m + offs_d[None, :] * k_stride_d
    nm_offs = offs_n[:, None] * bias_stride_n + offs_m[None, :] * bias_stride_m
    bias_head = bias_ptr + h * bias_stride_h
    if BIAS_PADDED:
        bias_tile = _padded_bias_tile(bias_ptr, h, bias_stride_h, offs_n, offs_m, N, BLOCK_M)
        scores_init = _scores_from_raw_bias(bias_tile, scale)
    else:
        scores_init = _scores_init(
            bias_head, nm_offs, mask_n, mask_m, scale, HAS_BIAS and not BIAS_PER_BATCH, BLOCK_N, BLOCK_M
        )

    sum_columns = offs_d >= SUM_COLUMNS_FROM
    v_padding = tl.where(sum_columns, 1.0, 0.0).to(v_ptr.dtype.element_ty)[None, :] if SUM_COLUMNS_FROM else 0.0

    b_lo = group * BATCHES_PER_PROGRAM
    for b in range(b_lo, tl.minimum(b_lo + BATCHES_PER_PROGRAM, B)):
        if BIAS_PER_BATCH:
            scores_init = _scores_init(
                bias_head + b * bias_stride_b, nm_offs, mask_n, mask_m, scale, HAS_BIAS, BLOCK_N, BLOCK_M
            )
        q_slice = b * q_stride_b + h * q_stride_h
        k_slice = b * k_stride_b + h * k_stride_h
        lse_slice = (b * H + h) * N
        if not INDEX64:  # whole tensors within int32 (the launcher checks): see _osra_bwd_short_kernel's offsets
            q_slice = q_slice.to(tl.int32)
            k_slice = k_slice.to(tl.int32)
            lse_slice = lse_slice.to(tl.int32)
        q = tl.load(q_ptr + (q_slice + nd_offs), mask=nd_mask, other=0.0)
        # K^T is loaded transposed (not tl.trans of a K tile): the tile goes straight to the dot operand.
        kt = tl.load(k_ptr + (k_slice + dm_offs), mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        v = tl.load(v_ptr + (k_slice + md_offs), mask=mask_m[:, None] & mask_d[None, :], other=v_padding)
        s = _dot(q, kt, scores_init, PRECISION)  # S / scale
        m = tl.max(s, 1)
        p = tl.exp2(s * scale_log2 - (m * scale_log2)[:, None])
        pv = _dot(p.to(v.dtype), v, None, PRECISION)
        if SUM_COLUMNS_FROM:  # every sum column holds the row sum: their sum, times a power of two, exactly
            l = tl.sum(tl.where(sum_columns[None, :], pv, -0.0), 1) * (1.0 / (BLOCK_D - SUM_COLUMNS_FROM))
        else:
            l = tl.sum(p, 1)
        out = pv * _reciprocal_row_sum(l, HALF)[:, None]
        tl.store(out_ptr + (q_slice + nd_offs), out.to(out_ptr.dtype.element_ty), mask=nd_mask)
        tl.store(lse_ptr + (lse_slice + offs_n), m * scale + _log_row_sum(l, HALF), mask=mask_n)


@triton.jit(
    do_not_specialize_on_alignment=_SHORT_PATH_ALIGNMENT_FREE
    + [
        "dkv_stride_s",
        "dkv_stride_b",
        "dkv_stride_h",
        "dkv_stride_m",
        "dkv_stride_d",
        "dk_stride_b",
        "dk_stride_h",
        "dk_stride_m",
        "dk_stride_d",
        "dv_stride_b",
        "dv_stride_h",
        "dv_stride_m",
        "dv_stride_d",
        "dbias_stride_g",
        "dbias_stride_h",
        "dbias_stride_n",
        "dbias_stride_m",
        "DBIAS_SET_GROUPS",
    ]
)
def _osra_bwd_short_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    grad_out_ptr,
    lse_ptr,
    dq_ptr,
    dk_parts_ptr,
    dv_parts_ptr,
    dk_ptr,
    dv_ptr,
    arrivals_ptr,
    dbias_ptr,
    dbias_out_ptr,
    scale_ptr,
    q_stride_b,
    q_stride_h,
    q_stride_n,
    q_stride_d,
    k_stride_b,
    k_stride_h,
    k_stride_m,
    k_stride_d,
    bias_stride_b,
    bias_stride_h,
    bias_stride_n,
    bias_stride_m,
    dkv_stride_s,
    dkv_stride_b,
    dkv_stride_h,
    dkv_stride_m,
    dkv_stride_d,
    dk_stride_b,
    dk_stride_h,
    dk_stride_m,
    dk_stride_d,
    dv_stride_b,
    dv_stride_h,
    dv_stride_m,
    dv_stride_d,
    dbias_stride_g,
    dbias_stride_h,
    dbias_stride_n,
    dbias_stride_m,
    B,
    H,
    N,
    M,
    D,
    BATCHES_PER_PROGRAM,
    DBIAS_SET_GROUPS,
    HAS_BIAS: tl.constexpr,
    BIAS_PER_BATCH: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    DBIAS_IN_REGISTERS: tl.constexpr,
    DBIAS_ROWS_PADDED: tl.constexpr,
    DKV_DIRECT: tl.constexpr,
    DBIAS_SUMMED: tl.constexpr,
    DBIAS_IN_SETS: tl.constexpr,
    DBIAS_HEADS_SUMMED: tl.constexpr,
    DBIAS_SUM_ALIGNED: tl.constexpr,
    BIAS_PADDED: tl.constexpr,
    BIAS_TILE_RAW: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    Q_VECTOR: tl.constexpr,
):
    """The whole backward of the one-key-block case in one pass over q and dO: per (query block, head, batch group)
    program and batch, dq (stored), this query block's dk/dv partial (stored at [query block, b, h]) and dS, summed over
    the group's batches for a batch-shared bias (stored per group), stored per batch otherwise. The group sum is a
    register tile (DBIAS_IN_REGISTERS) or the group's slice of the bias-gradient buffer, read, added to and written back
    per batch by this program only: 32 registers per thread fewer, which is what keeps the sm_8x 64-row kernel from
    spilling. DBIAS_ROWS_PADDED (`_short_dbias_rows_padded`): the buffer's rows are padded to BLOCK_M keys (the padded
    keys' dS is 0), so whole rows move in 16-byte vectors at compile-time offsets: with masked scalar accesses to rows
    of M = 49 keys the read-modify-write sum took 232 of the bf16 kernel's 1085 instructions per batch on sm_80 (S stage
    3), padded 107 of 949; the register sum's store of a 16-bit slice on sm_90, 172 of the 1688 a T stage-4 bf16
    program issues. A batch-shared bias is held across the batch loop as the scores' fp32 start (bias / scale), or
    (BIAS_TILE_RAW: `_short_bwd_holds_raw_bias`) in its own 16-bit dtype, converted per batch: half the registers for 2
    instructions per element and batch. Delta = rowsum(P * dP) (= rowsum(dO * O)), so O is not read.

    dk and dv: the last of a (head, batch group)'s query-block programs to finish (an arrival count per
    (head, group), incremented once per program after its partial stores) sums the group's partials in query
    block order, so the sum is deterministic whoever arrives last, and stores dk and dv once, in their dtype and
    layout. The partials are read back while the programs that wrote them (neighbours in the grid) are still
    running, from L2, where a separate sum kernel read them from DRAM. DKV_DIRECT (one query block): the partial
    pointers are dk and dv themselves, so nothing is summed (T stage 4 bf16 on an H100: 16.3 -> 13.8 us)."""
    N, q_stride_b, q_stride_h, q_stride_d = _query_multiples(N, q_stride_b, q_stride_h, q_stride_d, Q_VECTOR)
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    group = tl.program_id(2)
    scale = tl.load(scale_ptr)
    log2e = _log2e(scale)
    scale_log2 = scale * log2e

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_m = offs_m < M
    mask_d = offs_d < D
    nd_mask = mask_n[:, None] & mask_d[None, :]
    md_mask = mask_m[:, None] & mask_d[None, :]
    dm_mask = mask_d[:, None] & mask_m[None, :]
    nm_mask = mask_n[:, None] & mask_m[None, :]
    # Every offset is int32 (the launcher routes larger tensors to the flash kernels), and each load or store
    # adds its batch's base to the offset tile before the pointer: from `ptr + base + offsets` LLVM hoists
    # `ptr + offsets` out of the batch loop, a 64-bit pointer tile per access held across it, which made this
    # kernel spill 0.4-0.6 KB. q, dO and dq share one layout, k and v another (the launcher makes it so): one
    # offset tile each.
    nd_offs = offs_n[:, None] * q_stride_n + offs_d[None, :] * q_stride_d
    dm_offs = offs_d[:, None] * k_stride_d + offs_m[None, :] * k_stride_m
    md_offs = offs_m[:, None] * k_stride_m + offs_d[None, :] * k_stride_d
    nm_offs = offs_n[:, None] * bias_stride_n + offs_m[None, :] * bias_stride_m
    bias_head = bias_ptr + h * bias_stride_h
    if BIAS_PADDED:
        bias_tile = _padded_bias_tile(bias_ptr, h, bias_stride_h, offs_n, offs_m, N, BLOCK_M)
        if not BIAS_TILE_RAW:  # else converted per batch in the loop
            scores_init = _scores_from_raw_bias(bias_tile, scale)
    elif BIAS_TILE_RAW:
        bias_tile = _bias_tile_raw(bias_head, nm_offs, mask_n, mask_m)
    else:
        scores_init = _scores_init(
            bias_head, nm_offs, mask_n, mask_m, scale, HAS_BIAS and not BIAS_PER_BATCH, BLOCK_N, BLOCK_M
        )
    dbias_acc = tl.zeros([BLOCK_N, BLOCK_M], scale.dtype)
    if BIAS_PER_BATCH or not DBIAS_IN_REGISTERS:  # else computed after the loop: held across it, sm_90 spilled
        if DBIAS_ROWS_PADDED:  # the group's slice, rows of BLOCK_M keys: whole rows in 16-byte vectors
            dbias_offs = offs_n[:, None] * BLOCK_M + offs_m[None, :]
        else:
            dbias_offs = offs_n[:, None] * dbias_stride_n + offs_m[None, :] * dbias_stride_m

    b_lo = group * BATCHES_PER_PROGRAM
    for b in range(b_lo, tl.minimum(b_lo + BATCHES_PER_PROGRAM, B)):
        if BIAS_PER_BATCH:
            scores_init = _scores_init(
                bias_head + b * bias_stride_b, nm_offs, mask_n, mask_m, scale, HAS_BIAS, BLOCK_N, BLOCK_M
            )
        elif BIAS_TILE_RAW:
            # The scale is loaded again per batch: the loop's stores may alias it, so the load stays in the loop
            # and so does the conversion; the tile held across the loop is the bias's 16-bit one.
            scores_init = _scores_from_raw_bias(bias_tile, tl.load(scale_ptr))
        q_slice = b * q_stride_b + h * q_stride_h
        k_slice = b * k_stride_b + h * k_stride_h
        dkv_slice = pid_n * dkv_stride_s + b * dkv_stride_b + h * dkv_stride_h
        lse_slice = (b * H + h) * N
        dbias_slice = (b if BIAS_PER_BATCH else group) * dbias_stride_g + h * dbias_stride_h
        q = tl.load(q_ptr + (q_slice + nd_offs), mask=nd_mask, other=0.0)
        do = tl.load(grad_out_ptr + (q_slice + nd_offs), mask=nd_mask, other=0.0)
        lse = tl.load(lse_ptr + (lse_slice + offs_n), mask=mask_n, other=float("inf"))  # padded rows: P = 0
        vt = tl.load(v_ptr + (k_slice + dm_offs), mask=dm_mask, other=0.0)
        # K once, its transpose for the scores taken through shared memory: a second (K^T) load held 16-32
        # more registers of addresses and data (loads of unaligned rows of M keys are scalar) and spilled more.
        k = tl.load(k_ptr + (k_slice + md_offs), mask=md_mask, other=0.0)
        s = _dot(q, tl.trans(k), scores_init, PRECISION)  # S / scale
        p = tl.exp2(s * scale_log2 - (lse * log2e)[:, None])
        # Each product as soon as its operands exist, each result stored at once: fewer live register tiles.
        dkv_offs = offs_m[:, None] * dkv_stride_m + offs_d[None, :] * dkv_stride_d
        dv = _dot(tl.trans(p.to(do.dtype)), do, None, PRECISION)
        tl.store(dv_parts_ptr + (dkv_slice + dkv_offs), dv.to(dv_parts_ptr.dtype.element_ty), mask=md_mask)
        dp = _dot(do, vt, None, PRECISION)
        ds = p * (dp - tl.sum(p * dp, 1)[:, None])
        dq = _dot(ds.to(k.dtype), k, None, PRECISION) * scale
        tl.store(dq_ptr + (q_slice + nd_offs), dq.to(dq_ptr.dtype.element_ty), mask=nd_mask)
        dk = _dot(tl.trans(ds.to(q.dtype)), q, None, PRECISION) * scale
        tl.store(dk_parts_ptr + (dkv_slice + dkv_offs), dk.to(dk_parts_ptr.dtype.element_ty), mask=md_mask)
        if HAS_DBIAS:
            if DBIAS_IN_REGISTERS and not BIAS_PER_BATCH:
                dbias_acc += ds
            elif BIAS_PER_BATCH:
                tl.store(dbias_ptr + (dbias_slice + dbias_offs), ds.to(dbias_ptr.dtype.element_ty), mask=nm_mask)
            else:
                if DBIAS_ROWS_PADDED:
                    dbias_ptrs = dbias_ptr + ((group * H + h) * N * BLOCK_M + dbias_offs)
                    dbias_mask = mask_n[:, None]
                else:
                    dbias_ptrs = dbias_ptr + (dbias_slice + dbias_offs)
                    dbias_mask = nm_mask
                # The barrier orders the previous batch's store before this load across the program's threads.
                tl.debug_barrier()
                partial = tl.load(dbias_ptrs, mask=dbias_mask & (b > b_lo), other=0.0)  # the first batch starts it
                tl.store(dbias_ptrs, (partial + ds).to(dbias_ptr.dtype.element_ty), mask=dbias_mask)
    if HAS_DBIAS and DBIAS_IN_REGISTERS and not BIAS_PER_BATCH:
        if DBIAS_ROWS_PADDED:
            dbias_offs = offs_n[:, None] * BLOCK_M + offs_m[None, :]
            dbias_ptrs = dbias_ptr + ((group * H + h) * N * BLOCK_M + dbias_offs)
            tl.store(dbias_ptrs, dbias_acc.to(dbias_ptr.dtype.element_ty), mask=mask_n[:, None])
        else:
            dbias_offs = offs_n[:, None] * dbias_stride_n + offs_m[None, :] * dbias_stride_m
            dbias_ptrs = dbias_ptr + (group * dbias_stride_g + h * dbias_stride_h + dbias_offs)
            tl.store(dbias_ptrs, dbias_acc.to(dbias_ptr.dtype.element_ty), mask=nm_mask)

    if DBIAS_SUMMED:
        # This query block's rows of every group's slice (and every head's, for a head-broadcast bias) are complete
        # once the last program writing them counts its arrival (the barrier and the acq_rel atomic as for dk/dv
        # below). That program sums them, in group (then head) order, as one flat run per slice (rows of the
        # buffer's row length, contiguous), and stores the bias gradient itself in the bias's dtype: torch's sum
        # had read the slices back from DRAM (T stage 1 bf16 at batch 128: 43 groups, 26 MB).
        # In sets (DBIAS_IN_SETS: DBIAS_SET_GROUPS groups each, the last shorter), the last arriver of each set sums
        # the set's slices into its own slice of dbias_out (fp32), which torch sums over the sets.
        row = dbias_stride_n
        if DBIAS_IN_SETS:
            dbias_set = group // DBIAS_SET_GROUPS
            set_first = dbias_set * DBIAS_SET_GROUPS
            set_groups = tl.minimum(DBIAS_SET_GROUPS, tl.num_programs(2) - set_first)
        else:
            dbias_set, set_first, set_groups = 0, 0, tl.num_programs(2)
        if DBIAS_HEADS_SUMMED:
            parts, slot, out_head, out_heads = set_groups * H, pid_n, 0, 1
        else:
            parts, slot, out_head, out_heads = set_groups, pid_n * H + h, h, H
        counter = H * tl.num_programs(2) + dbias_set * (tl.num_programs(0) * out_heads) + slot
        tl.debug_barrier()
        if tl.atomic_add(arrivals_ptr + counter, 1) == parts - 1:
            lanes = tl.arange(0, BLOCK_N * BLOCK_M)
            block_len = tl.minimum(BLOCK_N, N - pid_n * BLOCK_N) * row
            slice_len = N * row
            first = pid_n * BLOCK_N * row
            if DBIAS_SUM_ALIGNED:  # every slice and block starts at a multiple of 4 elements: 16-byte vectors
                block_len, slice_len = _multiple_of_4(block_len), _multiple_of_4(slice_len)
                first = _multiple_of_4(first)
            if DBIAS_HEADS_SUMMED:
                part_ptr, part_stride = dbias_ptr + (set_first * H * slice_len + first), slice_len
            else:
                part_ptr, part_stride = dbias_ptr + ((set_first * H + h) * slice_len + first), H * slice_len
            total = tl.zeros([BLOCK_N * BLOCK_M], ACC)
            for _dbias_part in range(parts):
                total += tl.load(part_ptr + lanes, mask=lanes < block_len, other=0.0, cache_modifier=".cg").to(ACC)
                part_ptr += part_stride
            if DBIAS_ROWS_PADDED:
                r, c = lanes // BLOCK_M, lanes % BLOCK_M
            else:
                r, c = _flat_row_col(lanes, M)
            out_row = (dbias_set * out_heads + out_head) * N + pid_n * BLOCK_N + r
            tl.store(
                dbias_out_ptr + (out_row * M + c),
                total.to(dbias_out_ptr.dtype.element_ty),
                mask=(lanes < block_len) & (c < M),
            )

    if not DKV_DIRECT:  # (with DKV_DIRECT the stores above were dk's and dv's own: nothing to sum)
        # The barrier puts every thread's partial stores before the count; the atomic (acq_rel, GPU scope) releases
        # them to, and acquires the other programs' for, the program that arrives last.
        query_blocks = tl.num_programs(0)
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + (h * tl.num_programs(2) + group), 1)
        if arrived == query_blocks - 1:
            # Each (b, head)'s partial is one run of M·D elements, d-contiguous, its start a multiple of 4 elements
            # (the launcher pads the slices: `_dkdv_partials`): summed as a flat range in aligned 16-byte vectors,
            # lanes past the slice's padded end masked, each partial one pointer step. As [key, d] tiles with an
            # offset and a mask per element (rows of D = 19-32 values) the sum took 135 instructions per partial and
            # warp on sm_90 (T stage 1 fp32), and the last program of each group runs it alone.
            flat = tl.arange(0, BLOCK_M * BLOCK_D)
            slice_len = M * D
            parts_mask = flat < (slice_len + 3) // 4 * 4
            key, dim = _flat_row_col(flat, D)
            grad_mask = flat < slice_len
            dk_offs = key * dk_stride_m + dim * dk_stride_d
            dv_offs = key * dv_stride_m + dim * dv_stride_d
            parts_stride_s = _multiple_of_4(dkv_stride_s)
            for group_b in range(b_lo, tl.minimum(b_lo + BATCHES_PER_PROGRAM, B)):
                parts = group_b * _multiple_of_4(dkv_stride_b) + h * _multiple_of_4(dkv_stride_h)
                dk = dk_ptr + (group_b * dk_stride_b + h * dk_stride_h)
                dv = dv_ptr + (group_b * dv_stride_b + h * dv_stride_h)
                _store_partials_sum(
                    dk_parts_ptr + parts, parts_stride_s, query_blocks, flat, parts_mask, dk, dk_offs, grad_mask, ACC
                )
                _store_partials_sum(
                    dv_parts_ptr + parts, parts_stride_s, query_blocks, flat, parts_mask, dv, dv_offs, grad_mask, ACC
                )


@triton.jit(
    do_not_specialize_on_alignment=[
        "q_stride_b",
        "q_stride_h",
        "q_stride_n",
        "q_stride_d",
        "k_stride_b",
        "k_stride_h",
        "k_stride_m",
        "k_stride_d",
        "bias_stride_b",
        "bias_stride_h",
        "bias_stride_n",
        "bias_stride_m",
        "H",
        "N",
        "M",
        "D",
    ]
)
def _osra_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    out_ptr,
    lse_ptr,
    scale_ptr,
    q_stride_b,
    q_stride_h,
    q_stride_n,
    q_stride_d,
    k_stride_b,
    k_stride_h,
    k_stride_m,
    k_stride_d,
    bias_stride_b,
    bias_stride_h,
    bias_stride_n,
    bias_stride_m,
    H,
    N,
    M,
    D,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INDEX64: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    scale = tl.load(scale_ptr)  # its dtype (fp32, or fp64 for fp64 inputs) is the accumulation dtype

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if INDEX64:
        offs_n = offs_n.to(tl.int64)
    mask_n = offs_n < N
    mask_d = offs_d < D
    # q and out share one layout (the launcher makes it so), hence one offset tile.
    q_offs = b * q_stride_b + h * q_stride_h + offs_n[:, None] * q_stride_n + offs_d[None, :] * q_stride_d
    q = tl.load(q_ptr + q_offs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    k_base = k_ptr + b * k_stride_b + h * k_stride_h
    v_base = v_ptr + b * k_stride_b + h * k_stride_h
    # The head's base pointers once, then offsets within the head added before each load (int32 unless INDEX64),
    # not a tile of 64-bit row pointers held across the key loop; the softmax in log2 units (scores times log2 e,
    # exp2: one multiply fewer per score than exp's). With both, the 32-row bf16 kernel on sm_90 went from 224
    # registers to 200 and its estimate at T stage 1, 800x1216, from 505.6 us to 428.1 (static audit, Triton 3.8).
    bias_head = bias_ptr + b * bias_stride_b + h * bias_stride_h
    bias_rows = offs_n[:, None] * bias_stride_n
    log2e = _log2e(scale)

    m_i = tl.full([BLOCK_N], float("-inf"), scale.dtype)  # running max of the scores, in log2 units
    l_i = tl.zeros([BLOCK_N], scale.dtype)
    acc = tl.zeros([BLOCK_N, BLOCK_D], scale.dtype)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        # K^T is loaded transposed (not tl.trans of a K tile): the tile goes straight to the dot operand.
        kt = tl.load(
            k_base + (offs_d[:, None] * k_stride_d + offs_m[None, :] * k_stride_m),
            mask=mask_d[:, None] & mask_m[None, :],
            other=0.0,
        )
        v = tl.load(
            v_base + (offs_m[:, None] * k_stride_m + offs_d[None, :] * k_stride_d),
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        s = _matmul(q, kt, PRECISION, USE_DOT).to(scale.dtype) * (scale * log2e)
        if HAS_BIAS:
            s += (
                tl.load(
                    bias_head + (bias_rows + offs_m[None, :] * bias_stride_m),
                    mask=mask_n[:, None] & mask_m[None, :],
                    other=0.0,
                ).to(scale.dtype)
                * log2e
            )
        s = tl.where(mask_m[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _matmul(p.to(v.dtype), v, PRECISION, USE_DOT).to(scale.dtype)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * N + offs_n, (m_i + tl.log2(l_i)) / log2e, mask=mask_n)


@triton.jit(
    do_not_specialize_on_alignment=[
        "q_stride_b",
        "q_stride_h",
        "q_stride_n",
        "q_stride_d",
        "k_stride_b",
        "k_stride_h",
        "k_stride_m",
        "k_stride_d",
        "bias_stride_b",
        "bias_stride_h",
        "bias_stride_n",
        "bias_stride_m",
        "dbias_stride_g",
        "dbias_stride_h",
        "dbias_stride_n",
        "dbias_stride_m",
        "B",
        "H",
        "N",
        "M",
        "D",
        "BATCHES_PER_GROUP",
    ]
)
def _osra_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    out_ptr,
    grad_out_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    dbias_ptr,
    scale_ptr,
    q_stride_b,
    q_stride_h,
    q_stride_n,
    q_stride_d,
    k_stride_b,
    k_stride_h,
    k_stride_m,
    k_stride_d,
    bias_stride_b,
    bias_stride_h,
    bias_stride_n,
    bias_stride_m,
    dbias_stride_g,
    dbias_stride_h,
    dbias_stride_n,
    dbias_stride_m,
    B,
    H,
    N,
    M,
    D,
    BATCHES_PER_GROUP,
    HAS_BIAS: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    ONE_KEY_BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INDEX64: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    group = tl.program_id(2).to(tl.int64)
    scale = tl.load(scale_ptr)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if INDEX64:
        offs_n = offs_n.to(tl.int64)
    mask_n = offs_n < N
    mask_d = offs_d < D
    nd_mask = mask_n[:, None] & mask_d[None, :]
    nd_offs = offs_n[:, None] * q_stride_n + offs_d[None, :] * q_stride_d
    # As in the forward: the head's base pointers, then int32 offsets within the head (unless INDEX64) added
    # before each load, and the softmax in log2 units.
    dbias_head = dbias_ptr + group * dbias_stride_g + h * dbias_stride_h
    dbias_rows = offs_n[:, None] * dbias_stride_n
    bias_rows = offs_n[:, None] * bias_stride_n
    log2e = _log2e(scale)
    # Bias-gradient slice of this program, summed over its batches (used when M fits one block).
    dbias_acc = tl.zeros([BLOCK_N, BLOCK_M], scale.dtype)

    b_start = group * BATCHES_PER_GROUP
    b_end = tl.minimum(b_start + BATCHES_PER_GROUP, B)
    for b in range(b_start, b_end):
        # q, out, dO and dq share one layout (the launcher makes it so), hence one offset tile.
        q_head_offs = b * q_stride_b + h * q_stride_h
        q = tl.load(q_ptr + q_head_offs + nd_offs, mask=nd_mask, other=0.0)
        do = tl.load(grad_out_ptr + q_head_offs + nd_offs, mask=nd_mask, other=0.0)
        o = tl.load(out_ptr + q_head_offs + nd_offs, mask=nd_mask, other=0.0)
        delta = tl.sum(do.to(scale.dtype) * o.to(scale.dtype), 1)
        row = (b * H + h) * N + offs_n
        tl.store(delta_ptr + row, delta, mask=mask_n)
        lse = tl.load(lse_ptr + row, mask=mask_n, other=float("inf")) * log2e  # padded rows get P = 0
        k_head = k_ptr + b * k_stride_b + h * k_stride_h
        v_head = v_ptr + b * k_stride_b + h * k_stride_h
        bias_head = bias_ptr + b * bias_stride_b + h * bias_stride_h

        dq = tl.zeros([BLOCK_N, BLOCK_D], scale.dtype)
        for start_m in range(0, M, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            dm_mask = mask_d[:, None] & mask_m[None, :]
            dm_offs = offs_d[:, None] * k_stride_d + offs_m[None, :] * k_stride_m
            # K, K^T and V^T are separate (L2-resident) loads rather than tl.trans of register tiles.
            k = tl.load(
                k_head + (offs_m[:, None] * k_stride_m + offs_d[None, :] * k_stride_d),
                mask=mask_m[:, None] & mask_d[None, :],
                other=0.0,
            )
            kt = tl.load(k_head + dm_offs, mask=dm_mask, other=0.0)
            vt = tl.load(v_head + dm_offs, mask=dm_mask, other=0.0)
            s = _matmul(q, kt, PRECISION, USE_DOT).to(scale.dtype) * (scale * log2e)
            nm_mask = mask_n[:, None] & mask_m[None, :]
            if HAS_BIAS:
                s += (
                    tl.load(bias_head + (bias_rows + offs_m[None, :] * bias_stride_m), mask=nm_mask, other=0.0).to(
                        scale.dtype
                    )
                    * log2e
                )
            p = tl.where(mask_m[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = _matmul(do, vt, PRECISION, USE_DOT).to(scale.dtype)
            ds = p * (dp - delta[:, None])
            dq += _matmul(ds.to(k.dtype), k, PRECISION, USE_DOT).to(scale.dtype)
            if HAS_DBIAS:
                if ONE_KEY_BLOCK:
                    dbias_acc += ds
                else:
                    # Read-modify-write of the slice only this program owns; the barrier orders
                    # the previous batch's store before this load across the program's threads.
                    dbias_ptrs = dbias_head + (dbias_rows + offs_m[None, :] * dbias_stride_m)
                    tl.debug_barrier()
                    prev = tl.load(dbias_ptrs, mask=nm_mask, other=0.0).to(scale.dtype)
                    prev = tl.where(b > b_start, prev, 0.0)  # the group's first batch starts the sum
                    tl.store(dbias_ptrs, (prev + ds).to(dbias_ptr.dtype.element_ty), mask=nm_mask)
        tl.store(dq_ptr + q_head_offs + nd_offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=nd_mask)

    if HAS_DBIAS:
        if ONE_KEY_BLOCK:
            offs_m = tl.arange(0, BLOCK_M)
            tl.store(
                dbias_head + (dbias_rows + offs_m[None, :] * dbias_stride_m),
                dbias_acc.to(dbias_ptr.dtype.element_ty),
                mask=mask_n[:, None] & (offs_m < M)[None, :],
            )


@triton.jit(
    do_not_specialize_on_alignment=[
        "q_stride_b",
        "q_stride_h",
        "q_stride_n",
        "q_stride_d",
        "k_stride_b",
        "k_stride_h",
        "k_stride_m",
        "k_stride_d",
        "bias_stride_b",
        "bias_stride_h",
        "bias_stride_n",
        "bias_stride_m",
        "dkv_stride_s",
        "dkv_stride_b",
        "dkv_stride_h",
        "dkv_stride_m",
        "dkv_stride_d",
        "H",
        "N",
        "M",
        "D",
        "ROWS_PER_SPLIT",
    ]
)
def _osra_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    grad_out_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    scale_ptr,
    q_stride_b,
    q_stride_h,
    q_stride_n,
    q_stride_d,
    k_stride_b,
    k_stride_h,
    k_stride_m,
    k_stride_d,
    bias_stride_b,
    bias_stride_h,
    bias_stride_n,
    bias_stride_m,
    dkv_stride_s,
    dkv_stride_b,
    dkv_stride_h,
    dkv_stride_m,
    dkv_stride_d,
    H,
    N,
    M,
    D,
    ROWS_PER_SPLIT,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INDEX64: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2).to(tl.int64)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    scale = tl.load(scale_ptr)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    md_mask = mask_m[:, None] & mask_d[None, :]
    # k and v share one layout, q and dO another (the launcher makes it so): one offset tile each.
    k_offs = b * k_stride_b + h * k_stride_h + offs_m[:, None] * k_stride_m + offs_d[None, :] * k_stride_d
    k = tl.load(k_ptr + k_offs, mask=md_mask, other=0.0)
    v = tl.load(v_ptr + k_offs, mask=md_mask, other=0.0)
    # As in the forward: q's and dO's head base pointers, then int32 offsets within the head (unless INDEX64) added
    # before each load. Not its exp2 (with a bias it saves no multiply; under Triton 3.6 it cost T stage 1 bf16 at
    # 800x1216 on sm_90 231.2 -> 251.4 us) nor in-head bias offsets (225.7 -> 231.2 us): the bias keeps row pointers.
    q_head = q_ptr + b * q_stride_b + h * q_stride_h
    do_head = grad_out_ptr + b * q_stride_b + h * q_stride_h
    bias_base = bias_ptr + b * bias_stride_b + h * bias_stride_h + offs_m[:, None] * bias_stride_m
    row_base = bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_M, BLOCK_D], scale.dtype)
    dv = tl.zeros([BLOCK_M, BLOCK_D], scale.dtype)
    n_lo = (split * ROWS_PER_SPLIT).to(tl.int32)
    n_hi = tl.minimum(n_lo + ROWS_PER_SPLIT, N)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if INDEX64:
            offs_n = offs_n.to(tl.int64)
        mask_n = offs_n < n_hi
        nd_mask = mask_n[:, None] & mask_d[None, :]
        dn_mask = mask_d[:, None] & mask_n[None, :]
        # Q, Q^T, dO and dO^T are separate (L2-resident) loads rather than tl.trans of register tiles.
        nd_offs = offs_n[:, None] * q_stride_n + offs_d[None, :] * q_stride_d
        dn_offs = offs_d[:, None] * q_stride_d + offs_n[None, :] * q_stride_n
        q = tl.load(q_head + nd_offs, mask=nd_mask, other=0.0)
        qt = tl.load(q_head + dn_offs, mask=dn_mask, other=0.0)
        do = tl.load(do_head + nd_offs, mask=nd_mask, other=0.0)
        dot = tl.load(do_head + dn_offs, mask=dn_mask, other=0.0)
        lse = tl.load(lse_ptr + row_base + offs_n, mask=mask_n, other=float("inf"))  # padded rows: P = 0
        delta = tl.load(delta_ptr + row_base + offs_n, mask=mask_n, other=0.0)
        # Transposed scores: rows are keys, columns are queries.
        st = _matmul(k, qt, PRECISION, USE_DOT).to(scale.dtype) * scale
        if HAS_BIAS:
            st += tl.load(
                bias_base + offs_n[None, :] * bias_stride_n, mask=mask_m[:, None] & mask_n[None, :], other=0.0
            ).to(scale.dtype)
        pt = tl.exp(st - lse[None, :])
        dv += _matmul(pt.to(do.dtype), do, PRECISION, USE_DOT).to(scale.dtype)
        dpt = _matmul(v, dot, PRECISION, USE_DOT).to(scale.dtype)
        dst = pt * (dpt - delta[None, :])
        dk += _matmul(dst.to(q.dtype), q, PRECISION, USE_DOT).to(scale.dtype)

    dkv_offs = (
        split * dkv_stride_s
        + b * dkv_stride_b
        + h * dkv_stride_h
        + offs_m[:, None] * dkv_stride_m
        + offs_d[None, :] * dkv_stride_d
    )
    tl.store(dk_ptr + dkv_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=md_mask)
    tl.store(dv_ptr + dkv_offs, dv.to(dv_ptr.dtype.element_ty), mask=md_mask)


@triton.jit
def _osra_dkdv_sum_kernel(
    dk_parts_ptr,
    dv_parts_ptr,
    dk_ptr,
    dv_ptr,
    parts_stride_s,
    parts_stride_b,
    parts_stride_h,
    parts_stride_m,
    parts_stride_d,
    dk_stride_b,
    dk_stride_h,
    dk_stride_m,
    dk_stride_d,
    dv_stride_b,
    dv_stride_h,
    dv_stride_m,
    dv_stride_d,
    H,
    M,
    D,
    PARTIALS,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dk (program axis 2 = 0) or dv (1) of one (b·head, block of keys): the flash dk/dv kernel's partials
    [PARTIALS, B, h, M, d] summed in a fixed order (partial 0 first) in ACC and stored once, in the gradient's
    dtype and layout (d-contiguous partials; the model's k and v are key-contiguous)."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < M)[:, None] & (offs_d < D)[None, :]
    parts_offs = offs_m[:, None] * parts_stride_m + offs_d[None, :] * parts_stride_d
    if tl.program_id(2) == 0:
        parts = dk_parts_ptr + (b * parts_stride_b + h * parts_stride_h)
        grad = dk_ptr + (b * dk_stride_b + h * dk_stride_h)
        grad_offs = offs_m[:, None] * dk_stride_m + offs_d[None, :] * dk_stride_d
    else:
        parts = dv_parts_ptr + (b * parts_stride_b + h * parts_stride_h)
        grad = dv_ptr + (b * dv_stride_b + h * dv_stride_h)
        grad_offs = offs_m[:, None] * dv_stride_m + offs_d[None, :] * dv_stride_d
    _store_partials_sum(parts, parts_stride_s, PARTIALS, parts_offs, mask, grad, grad_offs, mask, ACC)


# ----------------------------------------------------------------------------------------------
# Launch helpers


@dataclass(frozen=True)
class _Config:
    block_n: int
    block_m: int
    block_d: int
    precision: str  # tl.dot input precision: "ieee" keeps fp32 exact (no TF32); fp16/bf16 ignore it
    use_dot: bool
    num_warps: int
    num_stages: int


def _uses_dot(q: torch.Tensor) -> bool:
    # tl.dot on fp64 only compiles on recent Triton (FMA/DMMA support landed in 2025); fp64 exists for
    # gradcheck, so on GPUs it takes the broadcast-multiply-sum path, which every Triton compiles.
    return not (q.dtype == torch.float64 and q.device.type == "cuda")


# (kernel, half precision?) -> (BLOCK_N, num_warps, num_stages): rows of queries per program, its warps, and
# its software-pipeline depth; BLOCK_M = 64 keys. Chosen with the static GPU audit (python -m
# benchmarks.gpu_audit): no register spills and shared memory within sm_86's 99 KB on sm_80/86/90, at every
# TransXNet shape and at head dims up to MAX_HEAD_DIM. More warps than 16-row mma tiles replicate work, but the
# register tiles shrink. fp16/bf16 run these kernels only where the short path does not (M > 64 keys: detection
# sizes, where they are bound by issue, not DRAM; int64 offsets; scale <= 0): there the forward takes 64 rows on 8
# warps (32 rows replicated each mma tile over 4 of the 8; with 4 warps it spills) and dk/dv 32 key rows on 4 warps
# with no register budget (static audit, Triton 3.8, T stage 1 at 800x1216, bf16, with the forward's exp2 and
# in-head int32 offsets: forward 505.6 -> 301.7 us on an H100, 777.9 -> 463.0 on an A100; dk/dv 343.3 -> 213.7 and
# 479.4 -> 305.9). Their dq kernel takes 16 rows on 4 warps with no register budget where it loops over several key
# blocks (with 8 warps two shared each mma tile; 32 or 64 rows spilled 16-588 B). fp32 takes its tiles at
# M = 49 too (the sm_8x backward under 3xTF32). The fp32 dq kernel pipelines 2 stages, not Triton's default 3: with
# 3, ptxas for sm_80 needs 255 registers and spills 80 B; with 2, 196 registers and no spill (a one-key-block loop
# gains nothing from a third stage).
_BLOCKS = {
    ("fwd", True): (64, 8, 2),
    ("dq", True): (16, 4, 2),
    ("dkdv", True): (32, 4, 2),
    ("fwd", False): (16, 8, 3),
    ("dq", False): (16, 8, 2),
    ("dkdv", False): (16, 8, 3),
}


def _user_allows_tf32() -> bool:
    """Whether the user allowed TF32 for fp32 matmuls (torch.matmul would use it)."""
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # torch >= 2.9 refuses the legacy query once the new per-backend flags are set
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def _short_precision(q: torch.Tensor) -> str:
    """tl.dot's input precision in the short-path kernels. fp16/bf16 ignore it; fp64 is IEEE. fp32 uses TF32
    only where the user allowed it for matmuls; otherwise 3xTF32 (`_dot`: three TF32 tensor-core products, ~1e-6
    relative error like IEEE fp32): the static audit counted 1.4-2.3x fewer instructions for it than for IEEE FMA
    in the forward on sm_80 and sm_90, and 2x fewer in the sm_90 backward, with Triton's own tf32x3, whose operand
    split `_tf32_split` has since made 3x cheaper."""
    if q.dtype != torch.float32:
        return "ieee" if q.dtype == torch.float64 else "tf32"
    return "tf32" if _user_allows_tf32() else "tf32x3"


def _config(q: torch.Tensor, kernel: str) -> _Config:
    """Launch configuration of the flash kernel `kernel` ("fwd", "dq" or "dkdv") for q's dtype and head dim."""
    d = q.shape[-1]
    if not _uses_dot(q):
        # Without tl.dot a [block_n, block_d, block_m] product lives in registers: keep it small.
        return _Config(16, 16, next_power_of_2(d), "ieee", False, 4, 3)
    half = q.dtype in (torch.float16, torch.bfloat16)
    block_n, num_warps, num_stages = _BLOCKS[kernel, half]
    # The short path's precision, but IEEE (on FMA units) where it takes 3xTF32: 3xTF32 (`_dot`) counted barely fewer
    # instructions here and spilled (static audit, Triton 3.8, sm_80, T stage 1: dq kernel 396 -> 354 us, spilling
    # 24 B; dk/dv kernel 365 -> 369 us). tl.dot needs dims >= 16.
    short_precision = _short_precision(q)
    precision = "ieee" if short_precision == "tf32x3" else short_precision
    return _Config(block_n, 64, max(16, next_power_of_2(d)), precision, True, num_warps, num_stages)


# Keys the short path holds in one block; TransXNet's M is 49 at 224x224 in every stage.
SHORT_PATH_MAX_KEYS = 64
# (kernel, operands: `_short_operands`) -> (BLOCK_N, num_warps, num_stages) of the short-path kernels, chosen with
# the static GPU audit (sm_80/86/90, T/S/B shapes). Triton gives chained dots all warps on the query rows (warpsPerCTA
# [num_warps, 1]), so each warp holds whole 16-row strips of [rows, 64 keys] fp32 tiles (32 registers each) and
# warps beyond rows / 16 replicate mma work. The forwards run 16 query rows per warp, so row max and sum stay in
# the warp. The fp16/bf16 backward runs 8 warps on 64 rows (two warps share a 16-row mma tile): with 4 warps
# its five dots' operands spilled 0.1-0.5 KB per thread, with 8 none (Triton 3.8; 32 or 16 rows on 4 warps
# spilled 24-100 B). One pipeline stage: a one-key-block loop over batches has little to prefetch, and a second
# stage's buffers made the kernels spill more (by 0.1-0.2 KB, measured on their earlier versions). A forward
# takes no more rows than N (stage 4: N = 49, 64 rows) and then 16 rows per warp: fp16/bf16 at 64 rows on 4
# warps, not 8 that would replicate the mma tiles (static audit, T stage 4 on H100: 7.7 -> 5.9 us issue; no
# spill under Triton 3.6 or 3.8 on sm_80/86/90, 128-254 registers; an earlier form of the kernel spilled 84-96 B
# there). fp32 at 64 rows too, since `_tf32_split` made its 3xTF32 cheaper: 8 warps replicated its mma tiles (T
# stage 4 on an H100 13.9 -> 6.9 us, at its DRAM time; 4 warps had spilled 12 B under Triton 3.6 with Triton's own
# split, now none under 3.6 or 3.8, 144-255 registers).
# fp32 (3xTF32 splits every operand in two) runs the smallest tiles that do not spill: the backward (sm_90+; sm_8x
# runs the flash kernels, see _short_path) 16 rows on 4 warps, one warp on its 16-row mma tile where eight repeated
# it: 64 rows spilled 2.0-2.3 KB per thread, 32 rows 1.7-2.0 KB (4 or 8 warps; with `_tf32_split`, 64 rows on 4
# warps 0.4-0.9 KB, 32 rows 1.4-1.6 KB, T stages 1, 3, 4 on sm_90); 16 rows on 4 warps spilled 0.8 KB in
# an earlier form of the kernel, then 12 B under Triton 3.6 with q in vectors (stages 1-2, which kept 8 warps until
# the thirty-third session), none now (Triton 3.6 and 3.8, 235-255 registers). Static audit, Triton 3.8, H100,
# backward kernel issue time 8 -> 4 warps: T stage 1 375 -> 302 us, stage 2 154 -> 119; B stage 1 821 -> 674, stage 2
# 292 -> 223; at stages 3-4, where 4 warps came first, T went 79.6 -> 62.4 and 52.5 -> 39.9. (At 8 warps and
# 64 rows, T stage 1 had been estimated at 213 us, with spill traffic the estimate does not count; the flash
# kernels 457 us.) The forward on sm_8x (`_SHORT_BLOCKS_SM8X`) 16 rows on 4 warps, 1 stage: 64 rows
# on 4 warps spilled 0.8-1.7 KB (2 stages or 1), 32 rows 0.6-1.3 KB (2, 4 or 8 warps); T stage 1 estimate on A100
# 164 us (113 us for the spilling 64 rows, 372 us for the flash kernel). With `_tf32_split` 64 rows still spilled 80-216
# B, 32 rows 32-116 B (T stages 1, 3, 4); 16 rows: T stage 1 119 us.
# fp32 where the user allowed TF32 (one TF32 product per dot, no operand split) fits the larger tiles: its forward
# the 16-bit one's 128 rows on 8 warps, on sm_8x too; its backward 32 rows on 4 warps on sm_90+ (64 rows spilled 8-104
# B on 4 or 8 warps, with the bias-gradient group sum in registers or in the buffer) and 64 rows on 4 warps on sm_8x
# (128 rows spilled 52-1040 B), where with it the fp32 backward leaves the flash kernels for the one-pass kernel.
# Static audit, Triton 3.8, T stage 1 with TF32 allowed: forward on an A100 75.8 us at 16 rows -> 40.3 (its DRAM
# time); backward kernels on an H100 139 us at 16 rows -> 109, on an A100 761 us in the flash kernels (IEEE; 383 with
# their dots in TF32) -> 98.
_SHORT_BLOCKS = {
    ("fwd", "16-bit"): (128, 8, 1),
    ("bwd", "16-bit"): (64, 8, 1),
    ("fwd", "tf32"): (128, 8, 1),
    ("bwd", "tf32"): (32, 4, 1),
    ("fwd", "fp32"): (128, 8, 1),
    ("bwd", "fp32"): (16, 4, 1),
}
_SHORT_BLOCKS_SM8X = {("fwd", "fp32"): (16, 4, 1), ("bwd", "tf32"): (64, 4, 1)}
# Those TF32 backward tiles hold where Triton's specialisation already knows the query vectors (stages 1-2 in the
# model's layout, `_query_vectors_specialised`). Elsewhere (N = 196 with Q_VECTOR = 4 restated, N = 49 or d contiguous
# with scalar q) they spilled (sm_8x 64 rows on 4 warps 4-288 B; sm_90 32 rows 52 B at d = 32, h = 2), and the backward
# takes 32 rows on 4 warps on sm_8x and 16 on 4 warps on sm_90+, which do not. Static audit, Triton 3.8, T stage 3
# backward kernel: A100 45.0 us (64 rows on 8 warps: 48.5), H100 36.4 (32 rows, spilling where d = 32: 32.1).
_SHORT_TF32_BWD_UNSPECIALISED = (16, 4, 1)
_SHORT_TF32_BWD_UNSPECIALISED_SM8X = (32, 4, 1)
# fp16/bf16 backward rows per program when its queries move in vectors of 4 or more (`_query_alignment`; TransXNet's
# stages 1-3 on sm_90+, 1-2 on sm_8x): half the dk/dv partials and ~30% fewer instructions per query than 64 rows
# (sm_90, T stage 1 estimate 48 -> 33 us, plus 16 MB less partial traffic), no spill. Scalar q loads (stage 4,
# N = 49; or d contiguous) spilled 100-108 B with 128 rows on sm_90: they keep 64. Stage 3 (N = 196) with 4-element
# vectors on sm_90: no spill, T/S/B estimates on H100 27.8 -> 24.9, 31.5 -> 22.7, 44.9 -> 36.3 us (Triton 3.8).
# sm_80 (mma.sync: the dots' operands and accumulators all in registers) fits 128 rows only with its bias-gradient
# sum in registers (its read-modify-write offsets and masks spilled 92 B) and the shared bias held in its 16-bit
# dtype (BIAS_TILE_RAW; held as the fp32 scores' start it spilled 8 B), and only where Triton's specialisation
# already knows the query alignment (N = 3136, 784): with Q_VECTOR = 4 restated (N = 196) it spilled 16-24 B, with
# scalar loads 72-76 B. sm_86 spilled 8-32 B even so: it keeps 64 rows. Static audit, Triton 3.8, A100, bf16
# backward, 64 -> 128 rows, us (DRAM roofline): T stage 1 95.1 -> 71.8 (41.1), stage 2 56.8 -> 44.5 (21.4); B stage 1
# 173.9 -> 121.0 (65.8), stage 2 101.0 -> 73.8 (34.3).
_SHORT_BWD_ROWS_ALIGNED = 128
# The fp16/bf16 forward at 128 rows on sm_90+ under a register budget: unbudgeted, ptxas took 135 registers (Triton
# 3.8), one 8-warp block per SM where 125 had allowed two, for 0.6% fewer issued instructions; at 128 it runs two
# blocks again with no spill (Triton 3.6 and 3.8). The static audit counts the instructions, not the latency the
# second block hides. (sm_86 spilled 16-32 B at 128, the int64-offset variant 40-56 B; sm_80 has run one block per
# SM at 143-154 registers.)
_SHORT_FWD_HALF_REGISTERS_SM90 = {"maxnreg": 128}


def _short_bwd_rows_aligned(q: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether the fp16/bf16 one-pass backward takes _SHORT_BWD_ROWS_ALIGNED query rows (see there)."""
    capability = launch_target(q.device).capability
    if _query_alignment(q) < 4:
        return False
    if not 0 < capability < 90:
        return True
    shared_16bit_bias = bias is not None and not _bias_per_batch(bias) and bias.element_size() == 2
    return capability == 80 and shared_16bit_bias and _query_vectors_specialised(q)


def _key_row_stride(k: torch.Tensor) -> int:
    """The one-pass forward's KEY_ROW_STRIDE: k's (and v's: the launcher gives them one layout) stride along the
    head dim where its keys are contiguous, as in the model (k and v are [B, h, d, M] memory, the stride M), else 0.
    A compiled variant per value, so per key count M the model runs at. Static audit, Triton 3.8, bf16 forward on an
    H100: 3-6% fewer instructions (B stage 2 16.0 -> 15.5 us, stage 4 7.9 -> 7.4; S stage 4 4.7 -> 4.4). fp32 on an
    RTX 3090 (sm_86): 0.6% more at stage 4 under Triton 3.8, 1.2-1.5% more at T/B stages 1-2 under 3.6."""
    return k.stride(3) if k.stride(2) == 1 and k.shape[2] > 1 else 0


# V's padded head-dim columns that carry the softmax row sum (`_sum_columns_from`), most first: the last 8 columns
# are the last n-tile of the mma accumulator, whole in every thread, so no column is selected at run time.
_SUM_COLUMN_COUNTS = (8, 4, 2)


def _sum_columns_from(q: torch.Tensor, cfg: _Config) -> int:
    """The one-pass forward's SUM_COLUMNS_FROM: for fp16/bf16, the first of the last 8, 4 or 2 head-dim columns of
    the block that are padding (d <= BLOCK_D - that many: TransXNet-T's d = 24 and 28, B's 19 and 21; not S's 32),
    else 0. fp32 keeps its summed row: its P @ V is a 3xTF32 (or IEEE) product of unrounded P, and the fp32 kernels
    are near their register limits. Static audit, Triton 3.8, bf16 forward on an H100 (with `_key_row_stride`):
    10.6% fewer instructions per batch at B stage 1 (397 -> 355), B stage 2 16.0 -> 14.7 us, T stage 3 6.6 -> 6.2."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return 0
    padding = cfg.block_d - q.shape[-1]
    return next((cfg.block_d - count for count in _SUM_COLUMN_COUNTS if count <= padding), 0)


def _short_fwd_register_budget(q: torch.Tensor, cfg: _Config) -> bool:
    """Whether the one-pass forward launches under _SHORT_FWD_HALF_REGISTERS_SM90 (see there); the launcher also
    needs its offsets in int32 (the int64 variant spilled under the budget)."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    return half and cfg.block_n == 128 and not 0 < launch_target(q.device).capability < 90


def _short_dbias_in_registers(q: torch.Tensor, block_n: int) -> bool:
    """Whether the one-pass backward sums a batch-shared bias's gradient over its batch group in registers (sm_90+,
    interpreted, and the sm_80 128-row kernel) or in its slice of the gradient buffer (the sm_8x 64-row kernel: the
    register tile made it spill 8-16 B, the read-modify-write does not; it costs 16 loads and 16 stores per thread and
    batch, 4 and 4 vectors on padded rows, of the program's own 16 KB slice, which stays in cache)."""
    return not 0 < launch_target(q.device).capability < 90 or block_n >= _SHORT_BWD_ROWS_ALIGNED


def _short_dbias_rows_padded(q: torch.Tensor, cfg: _Config, in_registers: bool, slice_dtype: torch.dtype) -> bool:
    """Whether the one-pass backward's bias-gradient slices have rows padded to the key block (the padded keys' dS
    is 0; `_backward` takes [..., :M]), so whole rows move in 16-byte vectors at compile-time offsets, without a
    mask per key. The read-modify-write sum (`_short_dbias_in_registers` false) on sm_80 (A100's 2 TB/s), where the
    kernel is bound by issue: static audit, Triton 3.8, bf16 S stage 3, 53.6 -> 48.0 us; on sm_86/89 (GDDR, ~0.5-1
    TB/s) it is bound by DRAM and the padded rows' extra bytes made it slower (RTX 3090: S stage 3 82.6 -> 84.6 us,
    1-3% at most shapes). The register sum's store on sm_90+: where the slices are 16-bit (one batch's dS,
    `_dbias_partial_dtype`), a row of 49 keys moves in four 32-byte sectors either way, so padding costs no DRAM.
    fp32 rows of 196 bytes move 256 padded, 30% more slice bytes for fewer instructions (B stage 3 bf16 on sm_90,
    per warp: the batch trip 833 -> 747, the straight code 846 -> 664, of which the masked scalar store of the 128 x
    49 tile was 233, 32 STG and 64 LEA per thread; the bias sum's last-arriver branch 567 -> 335), which pays where
    the kernel is bound by issue, not DRAM: under 3xTF32 (static audit, Triton 3.8, H100 backward, µs:
    T1 183.6 -> 181.7, S3 59.9 -> 58.6, B3 93.5 -> 91.5, every stage 0.6-3.7% lower; under Triton 3.6 T/S stage 2
    and B stages 1-2 0.7-0.9% higher, the rest 1-3% lower) and in 16 bits where the head
    dim fills at most two thirds of the tile's (B: d = 19-21 in 32; B1 bf16 59.8 -> 58.1, B3 30.9 -> 27.1), not at
    d = 24-32, whose bytes per batch trip leave less room (T2 bf16 22.9 -> 24.0, S1 44.3 -> 46.7), nor with TF32
    allowed (B1 192.6 -> 194.1, B3 61.3 -> 60.6). So too in sm_80's 128-row kernel (A100 bf16 backward: B stage 1
    112.6 -> 109.1 us, stage 2 65.2 -> 62.4; no spill under Triton 3.6 or 3.8)."""
    capability = launch_target(q.device).capability
    if in_registers:  # (compiled: sm_90+ and sm_80's 128-row kernel)
        issue_bound = cfg.precision == "tf32x3" or (q.element_size() == 2 and 3 * q.shape[-1] <= 2 * cfg.block_d)
        return capability > 0 and (issue_bound or (capability >= 90 and slice_dtype.itemsize == 2))
    return capability == 80


def _short_path(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], scale: float, kernel: str) -> bool:
    """Whether `kernel` ("fwd" or "bwd") runs on the short path: all keys in one block, tl.dot available, and
    a positive finite scale (the kernels start the scores from bias / scale and take the softmax's max of
    S / scale). Not the fp32 backward on sm_8x under 3xTF32: there the one-pass kernel's five fp32 dots spill 7-8
    KB per thread (IEEE or Triton's tf32x3; 1.2-2.5 KB at 16-64 rows on 4 warps with `_tf32_split`) and the static
    audit estimates it no faster than the flash kernels, which do not spill; both passes share the forward's lse.
    (With TF32 allowed its dots fit, `_SHORT_BLOCKS`.) Nor a backward whose offsets pass int32: the one-pass kernel
    has no int64 variant (with int64 offset tiles it spilled 28-88 B on every target)."""
    if kernel == "bwd":
        if _short_precision(q) == "tf32x3" and 0 < launch_target(q.device).capability < 90:
            return False
        if not fits_int32(q.device, *_short_path_spans(q, k, bias, _short_config(q, k, bias, kernel), kernel)):
            return False
    return k.shape[2] <= SHORT_PATH_MAX_KEYS and _uses_dot(q) and 0.0 < scale < math.inf


def _short_path_spans(
    q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], cfg: _Config, kernel: str
) -> Tuple[int, ...]:
    """The largest element offset into each tensor a short-path kernel (`kernel`'s config `cfg`) addresses, batch
    included: q (out, dO and dq share its layout), k and v (one layout), lse, the bias and its padded copy
    (`_padded_bias`); the backward's dk/dv partials (one per query block, `_dkdv_partials`) and bias-gradient buffer
    (at most one [h, N, M] slice per batch, rows padded to the key block)."""
    B, h, N, _ = q.shape
    M = k.shape[2]
    spans = (tensor_span(q), tensor_span(k), B * h * N - 1)
    if bias is not None:
        spans += (tensor_span(bias), bias.shape[1] * N * cfg.block_m - 1)
    if kernel == "bwd":
        d = k.shape[3]
        partial_slices = cdiv(N, cfg.block_n) * B * h  # each M·d elements, padded to a multiple of 4 (_dkdv_partials)
        spans += (partial_slices * cdiv(M * d, 4) * 4 - 1, B * h * N * max(M, cfg.block_m) - 1)
    return spans


def _short_operands(q: torch.Tensor) -> str:
    """What the short-path kernels' dots take, which their tiles follow (`_SHORT_BLOCKS`): "16-bit" (fp16/bf16),
    "tf32" (fp32 where the user allowed TF32) or "fp32" (3xTF32, which splits every fp32 operand in two; fp64, whose
    IEEE dots run only interpreted on this path, takes its tiles)."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return "16-bit"
    return "tf32" if _short_precision(q) == "tf32" else "fp32"


def _short_config(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], kernel: str) -> _Config:
    half = q.dtype in (torch.float16, torch.bfloat16)
    operands = _short_operands(q)
    blocks = _SHORT_BLOCKS[kernel, operands]
    capability = launch_target(q.device).capability
    if 0 < capability < 90:
        blocks = _SHORT_BLOCKS_SM8X.get((kernel, operands), blocks)
    if kernel == "bwd" and operands == "tf32" and not _query_vectors_specialised(q):
        sm8x = 0 < capability < 90
        blocks = _SHORT_TF32_BWD_UNSPECIALISED_SM8X if sm8x else _SHORT_TF32_BWD_UNSPECIALISED
    block_n, num_warps, num_stages = blocks
    if kernel == "bwd" and half and _short_bwd_rows_aligned(q, bias):
        block_n = _SHORT_BWD_ROWS_ALIGNED
    if kernel == "fwd":  # no more query rows than N, then 16 rows per warp (see _SHORT_BLOCKS)
        rows = min(block_n, max(16, next_power_of_2(q.shape[2])))
        if rows < block_n:
            num_warps = min(num_warps, rows // 16)
        block_n = rows
    block_m = max(16, next_power_of_2(k.shape[2]))
    block_d = max(16, next_power_of_2(q.shape[-1]))
    return _Config(block_n, block_m, block_d, _short_precision(q), True, num_warps, num_stages)


@dataclass(frozen=True)
class Settings:
    """Launch settings (override with common.launch_overrides). target_programs: programs a flash backward
    launch should have; the bias-gradient batch groups and the dk/dv query splits exist only below it.
    short_path_programs, short_forward_programs: the fewest programs (as the groups round) a short-path backward (8 per
    SM: the bias gradient's partials) and forward (4 per SM) launch may have; their batch groups, which share a bias
    tile (and, in the backward, sum the bias gradient), are the length `balanced_batch_groups` finds best for the launch
    target's SMs, each program paying a prologue of prologue_batches batches' worth (the bias tile, the offset tiles:
    the SASS outside the batch loop issues 0.3-1.1x one trip of it, Triton 3.8, sm_80-90, forward and backward, the
    backward's last-arriver sums left out; 1.0 also stands in for the bias-gradient slices a shorter backward group
    adds, which the weighing does not count: at 0.5-0.7 the A100's 16-bit backward at S stage 1 rose 70.4 -> 73.7 us
    as B stage 1 fell 112.6 -> 108.3), but tf32x3_backward_prologue_batches for the fp32 backward under 3xTF32, whose
    batch trip (every dot three products) is 2-3x the straight code (sm_90; on sm_8x it runs the flash kernels):
    its issue, not the slices' bytes, binds it (static audit, Triton 3.8, H100, 1.0 -> 0.4, backward: T stage 2 16
    groups of 8 -> 32 of 4, 91.2 -> 87.7 us; B stage 1 likewise, 355.5 -> 344.2; T stage 1 32 of 4 -> 43 of 3, 186.1
    -> 183.6; B stage 3 11 of 12 -> 16 of 8, 95.4 -> 93.5; no row slower. In the 3xTF32 forward 0.4 was mixed: A100
    T stage 1 119.7 -> 123.0 us, H100 T stage 2 20.3 -> 19.4). The
    programs hold 127-255 registers, so 1-3 are resident per SM and a ragged last wave costs a whole one (B stage 1 bf16
    forward on an H100 at 16 warps' worth per SM was 1.14 waves of 22 batches a program: 2 waves' time). The forward's
    floor of 4 per SM keeps 2+ waves, room for what the static audit does not model (programs slowed unevenly by DRAM
    contention) to even out; at 2 per SM it estimates 0-23% less, at 8 per SM 3% less to 23% more (T/S/B 224^2 stages,
    batch 128, fp32 and bf16, A100 and H100, Triton 3.8).
    partial_sum_batches: the last-arriver sum of one query block's dk or dv partial, in batches' worth of the
    backward's loop (the static audit's tail, `gpu_audit.tail_seconds`; sm_90, Triton 3.8: 16 of 777 instructions per
    warp at T stage 1 bf16, 30 of 1644 in fp32), which the group length weighs (`balanced_batch_groups`): a group of g
    batches over Q query blocks ends on g·2Q of them. Weighed only where that is at least partial_sum_min_batches per
    batch (the fp32 kernel's 196 and 49 blocks of 16 rows at stages 1-2): shorter groups add bias-gradient partials,
    whose bytes the weighing does not count, and at 25 blocks (bf16, stage 1) they cost more than the tail saved
    (A100, S stage 1: 32 groups of 4 -> 43 of 3 raised the DRAM-bound estimate 80.3 -> 87.1 us).
    dbias_sum_min_programs: the fewest last-arriving programs (query blocks x summed heads) among which the backward
    splits the bias gradient's sum over its group slices (DBIAS_SUMMED); with fewer, each one's serial sum over the
    groups outlasts torch's sum at full bandwidth. Static audit, Triton 3.8, bf16 backward, µs, torch sum ->
    in-kernel: on an H100 S stage 1 (25 programs) 52.2 -> 45.3, B stage 1 (50) 71.8 -> 67.1, B stage 2 (28) 42.1 ->
    41.3, but T stage 2 (14) 27.4 -> 30.4, B stage 3 (16) 33.9 -> 38.4, T stage 3 (8, one-batch groups: 128 slices)
    18.5 -> 35.1; on an A100 S stage 1 80.3 -> 72.1, B stage 1 121.3 -> 119.4, B stage 2 70.7 -> 71.0.
    dbias_set_slices: where fewer than dbias_sum_min_programs share that sum and there are several query blocks, the
    groups are summed in sets of at most this many slices (groups x summed heads; DBIAS_IN_SETS), the last arriver of
    each set storing an fp32 sum, which torch sums over the sets: 8 sets where torch read 64 group slices. Static
    audit, Triton 3.8, bf16 backward, torch sum -> sets of 8, µs: on an H100 T stage 2 26.6 -> 22.9, S stage 2 31.4
    -> 27.0, T stage 3 18.0 -> 17.6, S stage 3 22.0 -> 20.1, B stage 3 33.3 -> 30.9; on an A100 T stage 2 42.3 ->
    39.7, S stage 2 46.0 -> 41.2. Sets of 4 or 32 were slower at some of these (H100 B stage 3 31.9 and 31.6, T stage
    3 18.2 and 19.8), 16 within 2.5% of 8. With one query block (stage 4) the kernel is bound by issue and the sets'
    sums cost more than torch's read (B stage 4 on an H100 21.9 -> 22.6), and one set of all the groups would be the
    long serial sum above.
    Interpreted, small values, so small test shapes exercise the groups, the splits and the in-kernel sum."""

    target_programs: int
    short_path_programs: int
    short_forward_programs: int
    prologue_batches: float = 1.0
    tf32x3_backward_prologue_batches: float = 0.4
    partial_sum_batches: float = 0.02
    partial_sum_min_batches: float = 1.5
    dbias_sum_min_programs: int = 25
    dbias_set_slices: int = 8

    @classmethod
    def for_target(cls, target: LaunchTarget) -> Settings:
        if target.interpreted:
            return cls(target_programs=4, short_path_programs=4, short_forward_programs=4, dbias_sum_min_programs=1)
        return cls(
            target_programs=2 * target.sm_count,
            short_path_programs=8 * target.sm_count,
            short_forward_programs=4 * target.sm_count,
        )


def _bias_strides(bias: Optional[torch.Tensor]) -> Tuple[int, int, int, int]:
    if bias is None:
        return (0, 0, 0, 0)
    # Broadcast dims (size 1) read with stride 0.
    return tuple(0 if bias.shape[i] == 1 else bias.stride(i) for i in range(4))  # type: ignore[return-value]


def _scale_tensor(scale: float, q: torch.Tensor) -> torch.Tensor:
    """The scale as a one-element tensor in q's accumulation dtype: passed by pointer so that fp64 calls get it in
    fp64 (Triton's float arguments are fp32); kept, not filled at every call (`kept_scalar`)."""
    return kept_scalar(scale, accumulation_dtype(q.dtype), q.device)


def _padded_bias(bias: torch.Tensor, cfg: _Config) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """A batch-shared bias as the short-path kernels read it with BIAS_PADDED (`_padded_bias_tile`): a copy
    [h (or 1), N, BLOCK_M], -inf past M keys; with its four strides as the kernels take them (batch 0, head 0 where
    broadcast). One small torch op per call (h·N·M elements in, h·N·BLOCK_M out) that takes the key masks, the
    unaligned rows of M keys and their per-element address arithmetic out of every program's prologue: loaded
    element by element, the tile cost a T stage-3 bf16 forward on sm_90 (512 programs of two batches each) a sixth
    of its instructions (static audit, Triton 3.8: 6.2 -> 5.2 us with the copy). A bias that already views such a
    copy (`layout.key_padded_bias`: an inference model's constant) is read in place, with no op at all: the copy had
    cost the eval forward's Python path ~30-60 us per call on this project's CPU host (benchmarks/results)."""
    if key_padded_rows(bias) == cfg.block_m:
        padded = bias[0]
    else:
        padded = torch.nn.functional.pad(bias[0], (0, cfg.block_m - bias.shape[-1]), value=float("-inf"))
    return padded, (0, padded.stride(0) if bias.shape[1] > 1 else 0, padded.stride(1), padded.stride(2))


def _short_bias_arguments(
    q: torch.Tensor, bias: Optional[torch.Tensor], padded: bool, cfg: _Config
) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """The short-path kernels' bias pointer argument and its four strides: `_padded_bias`'s copy where `padded`, else
    the bias itself, or q as a placeholder the kernels never read (no bias)."""
    if padded:
        return _padded_bias(bias, cfg)
    return (bias if bias is not None else q), _bias_strides(bias)


def _short_fwd_bias_padded(q: torch.Tensor, bias: Optional[torch.Tensor], cfg: _Config, sum_columns_from: int) -> bool:
    """Whether the one-pass forward reads a batch-shared bias from `_padded_bias`'s copy: yes, but in the 128-row
    fp16/bf16 kernel that sums its softmax rows itself (`sum_columns_from`, `_sum_columns_from`'s, 0: d = 32) with q
    in restated vectors (`_query_vector` > 1: N = 196): there (S stage 3) it spilled 8 B under Triton 3.6, at its
    128-register budget."""
    if bias is None or _bias_per_batch(bias):
        return False
    half = q.dtype in (torch.float16, torch.bfloat16)
    tight = half and cfg.block_n == 128 and sum_columns_from == 0 and _query_vector(q) > 1
    return not tight


def _short_bwd_bias_padded(q: torch.Tensor, bias: Optional[torch.Tensor], register_group_sum: bool) -> bool:
    """Whether the one-pass backward reads a batch-shared bias from `_padded_bias`'s copy: on sm_90+ (and
    interpreted); beside a bias-gradient sum held in registers over several batches only for a 16-bit bias, which
    the kernel then holds in that dtype (`_short_bwd_holds_raw_bias`). Not on sm_8x: the 64-row kernel spilled 24-48 B
    on sm_86 (Triton 3.6 and 3.8), and on sm_80 the estimates moved by under 1%, mostly up. Static audit, Triton 3.8,
    bf16 backward on an H100: T stage 3 20.7 -> 18.8 us, T and S stage 4 13.8 -> 13.0 (one-batch programs)."""
    if bias is None or _bias_per_batch(bias) or (register_group_sum and bias.element_size() != 2):
        return False
    return not 0 < launch_target(q.device).capability < 90


def _short_bwd_holds_raw_bias(q: torch.Tensor, block_n: int, bias_padded: bool, register_group_sum: bool) -> bool:
    """The one-pass backward's BIAS_TILE_RAW: the batch-shared bias tile held across the batch loop in its 16-bit
    dtype, converted per batch. sm_8x's 128-row kernel (`_short_bwd_rows_aligned`); and on sm_90 the padded copy's
    tile beside a register group sum, where held as the fp32 scores' start it spilled 32 B (B stage 3, Triton 3.8):
    static audit, Triton 3.8, bf16 backward on an H100, 1-4% lower at T stages 1-2, S stage 3 and B stages 1-4 (B
    stage 3 35.7 -> 34.7 us), 0.4% higher at S stages 1-2 (bound by DRAM, they pay the copy's bytes)."""
    if 0 < launch_target(q.device).capability < 90:
        return block_n >= _SHORT_BWD_ROWS_ALIGNED
    return bias_padded and register_group_sum


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: empty_like keeps exactly these strides."""
    return torch.empty_like(t, device="meta").stride() == t.stride()


def _shared_layouts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q dense (its layout is out's, dO's and dq's), k and v of one layout: the kernels address each group
    with one set of strides. The model's tensors are so already (q a transposed view of a conv output, k and
    v two channel halves of one); other callers may pay a copy."""
    if not _dense(q):
        q = q.contiguous()
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return q, k, v


def _in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)


def _forward(q, k, v, bias, scale):
    B, h, N, d = q.shape
    M = k.shape[2]
    q, k, v = _shared_layouts(q, k, v)
    # q's layout: for the model's q (a transposed view of [B, h, d, N] memory) the model's
    # out.transpose(-1, -2).reshape(B, C, H, W) is then a view.
    out = torch.empty_like(q)
    lse = torch.empty((B, h, N), dtype=accumulation_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse
    if M == 0:  # softmax over no keys: the reference's empty sum, zeros (lse -inf)
        return out.zero_(), lse.fill_(float("-inf"))
    if _short_path(q, k, bias, scale, "fwd"):
        _forward_short(q, k, v, bias, scale, out, lse)
        return out, lse
    cfg = _config(q, "fwd")
    grid = (cdiv(N, cfg.block_n), B * h)
    with device_guard(q):
        _osra_fwd_kernel[grid](
            q,
            k,
            v,
            bias if bias is not None else q,
            out,
            lse,
            _scale_tensor(scale, q),
            *q.stride(),
            *k.stride(),
            *_bias_strides(bias),
            h,
            N,
            M,
            d,
            HAS_BIAS=bias is not None,
            PRECISION=cfg.precision,
            USE_DOT=cfg.use_dot,
            BLOCK_N=cfg.block_n,
            BLOCK_M=cfg.block_m,
            BLOCK_D=cfg.block_d,
            INDEX64=_flash_index64(bias, q, k, v, out),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out, lse


def _bias_per_batch(bias: Optional[torch.Tensor]) -> bool:
    return bias is not None and bias.shape[0] > 1


def _query_alignment(q: torch.Tensor) -> int:
    """The most elements, up to 16 bytes, that divide N and q's batch, head and d strides (size-1 dims aside: their
    index is always 0): the vector a tile of queries moves in; 1 unless the queries are contiguous. q's layout is
    also out's, dO's and dq's (the launchers make it so)."""
    if q.stride(2) != 1:
        return 1
    multiples = [q.shape[2]] + [q.stride(i) for i in (0, 1, 3) if q.shape[i] > 1]
    vector = 16 // q.element_size()
    while vector > 1 and any(x % vector for x in multiples):
        vector //= 2
    return vector


def _query_vectors_specialised(q: torch.Tensor) -> bool:
    """Whether q's tiles move in vectors by Triton's own 16-divisibility specialisation: N and q's strides are
    multiples of 16 (TransXNet's stages 1-2 in the model's layout), so Q_VECTOR is 1 and the compiled kernel differs
    from the one for N = 196 (Q_VECTOR = 4) or 49 (scalar)."""
    return _query_alignment(q) > 1 and _query_vector(q) == 1


def _query_vector(q: torch.Tensor) -> int:
    """The short-path kernels' Q_VECTOR: `_query_alignment`, except 1 where N and the four strides are all multiples
    of 16, which Triton's specialisation already tells the compiler (restated anyway, the sm_86 backward at 64 rows
    spilled 12 B under Triton 3.6)."""
    if all(x % 16 == 0 for x in (q.shape[2], q.stride(0), q.stride(1), q.stride(3))):
        return 1
    return _query_alignment(q)


def _short_path_groups(
    bias, B: int, query_blocks: int, heads: int, device: torch.device, backward: bool, precision: str
) -> Tuple[int, int]:
    """(groups, batches per group) of a short-path launch of query_blocks x heads programs per group, its kernel's dots
    at `precision`. A batch-shared bias tile is loaded once per group (and its gradient summed over the group), so
    groups are as long as the programs' floor, the wave tail and, in the backward over many query blocks, the last
    arriver's dk/dv sum allow (`balanced_batch_groups`, `Settings.prologue_batches`, `Settings.partial_sum_batches`);
    without one, a program per batch. Static audit, Triton
    3.8, H100, fp32 backward with the sum weighed: T stage 1 8 groups of 16 batches -> 32 of 4, B stage 1 3 of 43 -> 16
    of 8."""
    if bias is None or _bias_per_batch(bias):
        return B, 1
    settings = launch_settings(Settings, device)
    floor = settings.short_path_programs if backward else settings.short_forward_programs
    sm_count = launch_target(device).sm_count
    tail = 2 * query_blocks * settings.partial_sum_batches if backward else 0.0
    tail = tail if tail >= settings.partial_sum_min_batches else 0.0
    split_fp32 = backward and precision == "tf32x3"
    prologue = settings.tf32x3_backward_prologue_batches if split_fp32 else settings.prologue_batches
    return balanced_batch_groups(B, query_blocks * heads, floor, sm_count, prologue, tail)


def _flash_index64(bias: Optional[torch.Tensor], *tensors: torch.Tensor) -> bool:
    """The flash kernels' INDEX64: whether offsets within one sample of the tensors or of the bias (or its gradient
    buffer, one of `tensors`) can pass int32. The kernels add a head's offsets (row times stride) to its base
    pointer, so a bias's N·M span counts even where q, k and v are small."""
    return needs_int64(*tensors, *(() if bias is None else (bias,)))


def _dbias_buffer(bias, has_dbias: bool, groups: int, batches_per_group: int, q: torch.Tensor, M: int, row_of=None):
    """(buffer, its strides, dims to sum) of the bias gradient: one [h, N, row] slice per batch group (per batch
    for a per-batch bias), summed afterwards over the groups and a broadcast head dim (by the one-pass kernel
    itself where it can, DBIAS_SUMMED). The slices' dtype: `_dbias_partial_dtype`; row: M, or row_of(that dtype)
    (the one-pass backward's rows padded to its key block, `_short_dbias_rows_padded`; keys past M are not part of
    the gradient: `_backward` takes [..., :M])."""
    if not has_dbias:
        return torch.empty((0,), dtype=q.dtype, device=q.device), (0, 0, 0, 0), []
    _, h, N, _ = q.shape
    reduce_dims = [i for i, size in enumerate((groups, h)) if bias.shape[i] == 1 and size > 1]
    dtype = _dbias_partial_dtype(bias, q, bool(reduce_dims), batches_per_group)
    buf = torch.empty((groups, h, N, M if row_of is None else row_of(dtype)), dtype=dtype, device=q.device)
    return buf, buf.stride(), reduce_dims


def _dbias_partial_dtype(bias: torch.Tensor, q: torch.Tensor, summed_after: bool, batches_per_group: int):
    """The bias-gradient slices' dtype. A slice of one batch is in the bias's dtype when it is the gradient itself
    (nothing summed afterwards), and also when q and the bias share a 16-bit dtype: it is then one (batch, head)'s
    dS, which eager PyTorch too rounds to that dtype before summing over the batch in fp32, as torch's sum of the
    slices does; the same rounding, half the bytes. Those slices are written, then read by the sum: in fp32, ~40 MB
    of the ~73 MB that TransXNet-T's stage-3 bf16 backward moves at batch 128 on an H100, where the short path's
    floor of programs leaves a batch per program. A group's sum over several batches keeps fp32 (fp64): rounded to
    16 bits it would add error that eager does not have (and a bf16 store of the register sum made the sm_80
    128-row kernel spill)."""
    if batches_per_group == 1 and (not summed_after or (bias.dtype == q.dtype and q.element_size() == 2)):
        return bias.dtype
    return accumulation_dtype(q.dtype)


def _dkdv_buffers(k: torch.Tensor, partials: int):
    """(dk, dv) partials [partials, B, h, M, d] of the flash dk/dv kernel: fp32 (fp64), summed afterwards by
    `_dkdv_from_partials`; with one partial, views of the gradients themselves (empty_like(k), k's dtype)."""
    if partials > 1:
        shape = (partials,) + tuple(k.shape)
        dk = torch.empty(shape, dtype=accumulation_dtype(k.dtype), device=k.device)
        return dk, torch.empty_like(dk)
    return torch.empty_like(k).unsqueeze(0), torch.empty_like(k).unsqueeze(0)


def _dkdv_partials(n_blocks: int, k: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The short backward's dk and dv partials, each [query blocks, B, h, M, d]: every (block, b, head) slice M·d
    contiguous elements (d-contiguous rows) starting at a multiple of 4 elements (the slices padded), so the last
    program's sum reads whole slices in aligned 16-byte vectors. One allocation for both (a host op less)."""
    B, h, M, d = k.shape
    slice_len = cdiv(M * d, 4) * 4
    both = torch.empty((2, n_blocks, B, h, slice_len), dtype=dtype, device=k.device)
    strides = (B * h * slice_len, h * slice_len, slice_len, d, 1)
    return tuple(both[i].as_strided((n_blocks, B, h, M, d), strides) for i in range(2))


def _dkdv_from_partials(dk_parts: torch.Tensor, dv_parts: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(dk, dv) in the layouts and dtypes of empty_like(k) and empty_like(v) (what the fake impl promises), from
    the flash dk/dv kernel's partials [S, B, h, M, d]: one partial already so is returned as it is (no query
    split); else `_osra_dkdv_sum_kernel` sums, casts and lays out both in one launch.
    It replaced torch's sum over the partials (an fp32 write of dk and dv) and the copies into k's dtype and
    layout (their reads): T stage 3 bf16, ~11 MB less traffic per backward and 4 launches -> 1."""
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    partials, B, h, M, d = dk_parts.shape
    already_final = dk_parts[0].stride() == dk.stride() and dv_parts[0].stride() == dv.stride()
    if partials == 1 and dk_parts.dtype == k.dtype and already_final:
        return dk_parts[0], dv_parts[0]
    # dk_parts and dv_parts come from one constructor: one set of strides serves both.
    block_m = min(64, next_power_of_2(M))
    with device_guard(k):
        _osra_dkdv_sum_kernel[(B * h, cdiv(M, block_m), 2)](
            dk_parts,
            dv_parts,
            dk,
            dv,
            *dk_parts.stride(),
            *dk.stride(),
            *dv.stride(),
            h,
            M,
            d,
            partials,
            ACC=tl_accumulation_dtype(k.dtype),
            BLOCK_M=block_m,
            BLOCK_D=next_power_of_2(d),
            num_warps=4,
        )
    return dk, dv


def _forward_short(q, k, v, bias, scale, out, lse):
    B, h, N, d = q.shape
    cfg = _short_config(q, k, bias, "fwd")
    n_blocks = cdiv(N, cfg.block_n)
    groups, batches_per_group = _short_path_groups(bias, B, n_blocks, h, q.device, False, cfg.precision)
    index64 = not fits_int32(q.device, *_short_path_spans(q, k, bias, cfg, "fwd"))
    sum_columns_from = _sum_columns_from(q, cfg)
    bias_padded = _short_fwd_bias_padded(q, bias, cfg, sum_columns_from)
    bias_arg, bias_strides = _short_bias_arguments(q, bias, bias_padded, cfg)
    with device_guard(q):
        _osra_fwd_short_kernel[(n_blocks, h, groups)](
            q,
            k,
            v,
            bias_arg,
            out,
            lse,
            _scale_tensor(scale, q),
            *q.stride(),
            *k.stride(),
            *bias_strides,
            B,
            h,
            N,
            k.shape[2],
            d,
            batches_per_group,
            HAS_BIAS=bias is not None,
            BIAS_PER_BATCH=_bias_per_batch(bias),
            PRECISION=cfg.precision,
            BLOCK_N=cfg.block_n,
            BLOCK_M=cfg.block_m,
            BLOCK_D=cfg.block_d,
            INDEX64=index64,
            Q_VECTOR=_query_vector(q),
            KEY_ROW_STRIDE=_key_row_stride(k),
            SUM_COLUMNS_FROM=sum_columns_from,
            BIAS_PADDED=bias_padded,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **(_SHORT_FWD_HALF_REGISTERS_SM90 if _short_fwd_register_budget(q, cfg) and not index64 else {}),
        )


def _backward_short(grad_out, q, k, v, bias, lse, scale, has_dbias, dk, dv):
    """(dq, bias-gradient buffer, its dims to sum) of the one-pass backward; dk and dv (any layout) are written."""
    B, h, N, d = q.shape
    M = k.shape[2]
    cfg = _short_config(q, k, bias, "bwd")
    n_blocks = cdiv(N, cfg.block_n)
    groups, batches_per_group = _short_path_groups(bias, B, n_blocks, h, q.device, True, cfg.precision)
    dbias_in_registers = _short_dbias_in_registers(q, cfg.block_n)

    def padded_row(slice_dtype: torch.dtype) -> int:
        shared = not _bias_per_batch(bias)
        return cfg.block_m if shared and _short_dbias_rows_padded(q, cfg, dbias_in_registers, slice_dtype) else M

    dbias_buf, dbias_strides, reduce_dims = _dbias_buffer(bias, has_dbias, groups, batches_per_group, q, M, padded_row)
    rows_padded = has_dbias and dbias_buf.shape[-1] > M
    # A batch-shared bias's group slices (and heads, where it is broadcast over them) are summed in the kernel, by the
    # last program writing each query block's rows, straight into the gradient (no torch sum to read them back),
    # where enough such programs share the sum (`Settings.dbias_sum_min_programs`); with fewer and several query
    # blocks, in sets of groups (`Settings.dbias_set_slices`), each set's last arriver storing its fp32 sum, which
    # torch sums over the sets (DBIAS_IN_SETS). Not beside the read-modify-write group sum (sm_8x's 64-row kernel: it
    # spilled 8 B on sm_86 under Triton 3.6, and an A100's B stage 3 estimate went 72.7 -> 73.3 us).
    heads_summed = 1 in reduce_dims
    out_heads = 1 if heads_summed else h
    summing_programs = n_blocks * out_heads
    settings = launch_settings(Settings, q.device)
    set_groups = groups
    if summing_programs < settings.dbias_sum_min_programs and n_blocks > 1:
        set_groups = max(1, settings.dbias_set_slices // (h if heads_summed else 1))
    sets = cdiv(groups, set_groups)
    dbias_summed = bool(reduce_dims) and not _bias_per_batch(bias) and dbias_in_registers
    dbias_summed = dbias_summed and summing_programs * sets >= settings.dbias_sum_min_programs
    dbias_out = dbias_buf  # (not dereferenced unless summed into)
    if dbias_summed:
        set_dtype = bias.dtype if sets == 1 else accumulation_dtype(q.dtype)
        dbias_out = torch.empty((sets, out_heads, N, M), dtype=set_dtype, device=q.device)
    register_group_sum = has_dbias and dbias_in_registers and batches_per_group > 1
    bias_padded = _short_bwd_bias_padded(q, bias, register_group_sum)
    # One query block (N <= the block: stage 4 at 224^2): the kernel stores dk and dv in place, in their layout, where
    # they share one (as the model's do), with nothing to sum (DKV_DIRECT); beside a bias-gradient sum held in
    # registers across several batches only where the padded copy's tile is held in its 16-bit dtype (with the fp32
    # tile, sm_90 at B's stage 4 spilled 16 B under Triton 3.6; with the 16-bit one, no spill, and the static audit's
    # bf16 backward on an H100 went 28.7 -> 21.9 us, Triton 3.8). Else dk/dv partials, one per query block, [query
    # blocks, B, h, M, d], d-contiguous (stored from the dot in the model's k layout, M-contiguous, the kernel spilled
    # 16 B on sm_90 under Triton 3.6), fp32 (one block: k's dtype), which the kernel sums into dk and dv. Arrival
    # counts: one per (head, batch group).
    # (With a register group sum, the copy is read only for a 16-bit bias, and its tile is then held 16-bit.)
    dkv_direct = n_blocks == 1 and dk.stride() == dv.stride() and (not register_group_sum or bias_padded)
    if dkv_direct:
        dk_parts, dv_parts = dk.unsqueeze(0), dv.unsqueeze(0)
    else:
        partial_dtype = accumulation_dtype(k.dtype) if n_blocks > 1 else k.dtype
        dk_parts, dv_parts = _dkdv_partials(n_blocks, k, partial_dtype)
    # Arrival counts: one per (head, group) for the dk/dv sum, then one per query block (and head) for the bias's
    # (at that offset, with DKV_DIRECT too); none dereferenced where neither sum runs.
    if dkv_direct and not dbias_summed:
        arrivals = kept_scalar(0, torch.int32, q.device)
    else:
        counters = h * groups + (summing_programs * sets if dbias_summed else 0)
        arrivals = torch.zeros((counters,), dtype=torch.int32, device=q.device)
    dq = torch.empty_like(q)
    bias_arg, bias_strides = _short_bias_arguments(q, bias, bias_padded, cfg)
    with device_guard(q):
        _osra_bwd_short_kernel[(n_blocks, h, groups)](
            q,
            k,
            v,
            bias_arg,
            grad_out,
            lse,
            dq,
            dk_parts,
            dv_parts,
            dk,
            dv,
            arrivals,
            dbias_buf,
            dbias_out,
            _scale_tensor(scale, q),
            *q.stride(),
            *k.stride(),
            *bias_strides,
            *dk_parts.stride(),
            *dk.stride(),
            *dv.stride(),
            *dbias_strides,
            B,
            h,
            N,
            M,
            d,
            batches_per_group,
            set_groups,
            HAS_BIAS=bias is not None,
            BIAS_PER_BATCH=_bias_per_batch(bias),
            HAS_DBIAS=has_dbias,
            DBIAS_IN_REGISTERS=dbias_in_registers,
            DBIAS_ROWS_PADDED=rows_padded,
            DKV_DIRECT=dkv_direct,
            DBIAS_SUMMED=dbias_summed,
            DBIAS_IN_SETS=dbias_summed and sets > 1,
            DBIAS_HEADS_SUMMED=heads_summed,
            DBIAS_SUM_ALIGNED=dbias_summed and N * dbias_buf.shape[-1] % 4 == 0,
            BIAS_PADDED=bias_padded,
            BIAS_TILE_RAW=_short_bwd_holds_raw_bias(q, cfg.block_n, bias_padded, register_group_sum),
            ACC=tl_accumulation_dtype(k.dtype),
            PRECISION=cfg.precision,
            BLOCK_N=cfg.block_n,
            BLOCK_M=cfg.block_m,
            BLOCK_D=cfg.block_d,
            # The 64-row backward (sm_8x at stage 3) keeps scalar q loads: vectorised, the static audit counted 1.0%
            # (Triton 3.8) to 4.6% (3.6) more issue there; vectors are what let the 128-row one fit (_short_config).
            Q_VECTOR=_query_vector(q) if cfg.block_n >= _SHORT_BWD_ROWS_ALIGNED else 1,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    if dbias_summed:
        return dq, dbias_out, [0] if sets > 1 else []
    return dq, dbias_buf, reduce_dims


def _backward_flash(grad_out, q, k, v, bias, out, lse, scale, has_dbias):
    """(dq, dk, dv, bias-gradient buffer, its dims to sum): the dq kernel (with Delta and the bias gradient),
    then the dk/dv kernel."""
    B, h, N, d = q.shape
    M = k.shape[2]
    device = q.device
    settings = launch_settings(Settings, device)
    scale_t = _scale_tensor(scale, q)
    cfg = _config(q, "dq")
    n_blocks = cdiv(N, cfg.block_n)
    # Batch groups exist to sum a batch-shared bias's gradient; per-batch biases get one slice per batch.
    shared_dbias = has_dbias and not _bias_per_batch(bias)
    # Each group writes a bias-gradient slice that is summed afterwards: as few groups as fill the GPU.
    groups, batches_per_group = (
        fewest_batch_groups(B, n_blocks * h, settings.target_programs) if shared_dbias else (B, 1)
    )
    dbias_buf, dbias_strides, reduce_dims = _dbias_buffer(bias, has_dbias, groups, batches_per_group, q, M)

    dq = torch.empty_like(q)
    delta = torch.empty((B, h, N), dtype=accumulation_dtype(q.dtype), device=device)
    # Split the query range of dk/dv only when B·h·key-blocks cannot fill the device.
    dkdv_cfg = _config(q, "dkdv")
    n_dkdv_blocks = cdiv(N, dkdv_cfg.block_n)
    m_blocks = cdiv(M, dkdv_cfg.block_m)
    splits = min(n_dkdv_blocks, max(1, cdiv(settings.target_programs, m_blocks * B * h)))
    rows_per_split = cdiv(n_dkdv_blocks, splits) * dkdv_cfg.block_n
    splits = cdiv(N, rows_per_split)
    dk_buf, dv_buf = _dkdv_buffers(k, splits)
    index64 = _flash_index64(bias, q, k, v, out, grad_out, dq, dbias_buf)
    one_key_block = cfg.block_m >= M
    with device_guard(q):
        _osra_bwd_dq_kernel[(n_blocks, h, groups)](
            q,
            k,
            v,
            bias if bias is not None else q,
            out,
            grad_out,
            lse,
            delta,
            dq,
            dbias_buf,
            scale_t,
            *q.stride(),
            *k.stride(),
            *_bias_strides(bias),
            *dbias_strides,
            B,
            h,
            N,
            M,
            d,
            batches_per_group,
            HAS_BIAS=bias is not None,
            HAS_DBIAS=has_dbias,
            ONE_KEY_BLOCK=one_key_block,
            PRECISION=cfg.precision,
            USE_DOT=cfg.use_dot,
            BLOCK_N=cfg.block_n,
            BLOCK_M=cfg.block_m,
            BLOCK_D=cfg.block_d,
            INDEX64=index64,
            num_warps=cfg.num_warps,
            # One key block with int64 offsets: 3 stages, where 2 spilled 8 B (fp32, sm_90, Triton 3.6: ptxas gave it
            # 128 registers; any register budget spilled 36-100 B on sm_80/86/90).
            num_stages=3 if index64 and one_key_block and cfg.precision == "ieee" else cfg.num_stages,
            # Over several key blocks ptxas's budget (128 registers in fp32 on sm_90 under Triton 3.6) spilled 12 B;
            # with one block (fp32 at 224x224) lifting it spilled 44-84 B on sm_80/86, so that one keeps it.
            **({} if one_key_block else NO_REGISTER_BUDGET),
        )
        _osra_bwd_dkdv_kernel[(m_blocks, B * h, splits)](
            q,
            k,
            v,
            bias if bias is not None else q,
            grad_out,
            lse,
            delta,
            dk_buf,
            dv_buf,
            scale_t,
            *q.stride(),
            *k.stride(),
            *_bias_strides(bias),
            *dk_buf.stride(),
            h,
            N,
            M,
            d,
            rows_per_split,
            HAS_BIAS=bias is not None,
            PRECISION=dkdv_cfg.precision,
            USE_DOT=dkdv_cfg.use_dot,
            BLOCK_N=dkdv_cfg.block_n,
            BLOCK_M=dkdv_cfg.block_m,
            BLOCK_D=dkdv_cfg.block_d,
            INDEX64=index64,
            num_warps=dkdv_cfg.num_warps,
            num_stages=dkdv_cfg.num_stages,
            # ptxas's budget spilled: fp16/bf16's 4-warp programs 16 B on sm_86 (186-214 registers without it), the
            # fp32 8-warp ones with TF32 16 B on sm_86 under Triton 3.6 (128 registers; 220-226 without)
            **NO_REGISTER_BUDGET,
        )
    return dq, dk_buf, dv_buf, dbias_buf, reduce_dims


def _backward(grad_out, q, k, v, bias, out, lse, scale, bias_needs_grad):
    has_dbias = bias is not None and bias_needs_grad
    if q.shape[:3].numel() * k.shape[2] == 0:  # no scores: every gradient is zero (or empty)
        dbias = torch.zeros_like(bias) if has_dbias else q.new_empty((0,))
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    inputs = (q, k, v)  # the gradients take the layouts of empty_like(input), as the fake impl says
    q, k, v = _shared_layouts(q, k, v)
    grad_out = _in_layout_of(grad_out, q)
    if _short_path(q, k, bias, scale, "bwd"):
        dk, dv = torch.empty_like(inputs[1]), torch.empty_like(inputs[2])
        dq, dbias_buf, reduce_dims = _backward_short(grad_out, q, k, v, bias, lse, scale, has_dbias, dk, dv)
    else:
        grads = _backward_flash(grad_out, q, k, v, bias, _in_layout_of(out, q), lse, scale, has_dbias)
        dq, dk_parts, dv_parts, dbias_buf, reduce_dims = grads
        dk, dv = _dkdv_from_partials(dk_parts, dv_parts, *inputs[1:])
    dq = _in_layout_of(dq, torch.empty_like(inputs[0]))
    if not has_dbias:
        dbias = dbias_buf
    elif reduce_dims:
        dbias = dbias_buf[..., : k.shape[2]].sum(dim=reduce_dims, keepdim=True).to(bias.dtype)
    else:
        dbias = dbias_buf[..., : k.shape[2]].to(bias.dtype, memory_format=torch.contiguous_format)
    return dq, dk, dv, dbias


# ------------------------------------------------------------------------------- torch.library ops


@custom_op("transxnet_triton::osra_attention", mutates_args=())
def osra_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out [B, h, N, d] (memory [B, h, d, N]), lse [B, h, N] log-sum-exp of the scores."""
    return _forward(q, k, v, bias, scale)


@osra_attention_with_lse.register_fake
def _(q, k, v, bias, scale):
    B, h, N, _ = q.shape
    return torch.empty_like(q if _dense(q) else q.contiguous()), q.new_empty(
        (B, h, N), dtype=accumulation_dtype(q.dtype)
    )


@custom_op("transxnet_triton::osra_attention_backward", mutates_args=())
def osra_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    bias_needs_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias); dbias has the bias's shape, or is empty when not needed."""
    return _backward(grad_out, q, k, v, bias, out, lse, scale, bias_needs_grad)


@osra_attention_backward.register_fake
def _(grad_out, q, k, v, bias, out, lse, scale, bias_needs_grad):
    dbias = bias.new_empty(bias.shape) if bias is not None and bias_needs_grad else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[3]
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse's gradient would be a [B, h, N] zero fill each backward


def _autograd_rule(ctx, grad_out, _grad_lse):
    if grad_out is None:  # an undefined output gradient (autograd may pass one; gradcheck checks it)
        return None, None, None, None, None
    q, k, v, bias, out, lse = ctx.saved_tensors
    dq, dk, dv, dbias = osra_attention_backward(grad_out, q, k, v, bias, out, lse, ctx.scale, ctx.bias_needs_grad)
    return dq, dk, dv, (dbias if ctx.bias_needs_grad else None), None


osra_attention_with_lse.register_autograd(_autograd_rule, setup_context=_setup_context)


def _supports(info: CallInfo) -> Optional[str]:
    if info.head_dim > MAX_HEAD_DIM:
        return f"head dim {info.head_dim} is above {MAX_HEAD_DIM}, the largest the kernels are audited and tested for"
    return supports(info)


@ops.osra_attention.register("triton", supports=_supports)
def osra_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    return osra_attention_with_lse(q, k, v, bias, scale)[0]
