"""Fused Triton IDConv (input-dependent depthwise conv) behind autograd.

Math, per sample b and channel c, with s = softmax over the G groups, t = (kh, kw) a tap of
the K×K kernel and P = K // 2 (zero padding):

    k[b,c,t]   = Σ_g s_g(kernel_logits[b,:,c,t]) · weight[g,c,t]
    β[b,c]     = Σ_g s_g(bias_logits[b,:,c]) · bias[g,c]
    y[b,c,h,w] = Σ_t k[b,c,t] · x[b,c,h+kh−P, w+kw−P] + β[b,c]

Backward (gy = grad of y):

    gx[b,c,h,w] = Σ_t k[b,c,t] · gy[b,c,h−kh+P, w−kw+P]        the same conv with flipped taps
    dk[b,c,t]   = Σ_{h,w} gy[b,c,h,w] · x[b,c,h+kh−P, w+kw−P]
    dβ[b,c]     = Σ_{h,w} gy[b,c,h,w]
    grad kernel_logits[b,g,c,t] = s_g · (dk·weight[g] − Σ_g' s_g' · dk·weight[g'])
    grad weight[g,c,t]          = Σ_b s_g[b,c,t] · dk[b,c,t]
    (bias_logits and bias likewise, with dβ in place of dk)

Kernels (no atomics anywhere, so every result is deterministic):

* ``_dynconv_kernel`` -- the forward where planes are not whole-plane stencils (stages 1-2), and gx with
  flipped taps everywhere. A program owns (sample, channel block, chunk of output positions) and walks the
  chunk in [channels, positions] tiles; each thread accumulates its own outputs over the K² taps, unrolled
  with compile-time offsets (no reduction across threads; see the chunked stencils below). The per-sample
  kernels k[b,c] and biases β[b,c] are synthesized once per forward by ``_mix_kernel`` into [B, C, K²] /
  [B, C] buffers in the accumulation dtype, so a tap costs one weight load; where autograd records a graph
  the kernels are kept for the backward's gx pass (`idconv_keeping_kernels`), which then mixes nothing.
* ``_toeplitz_conv_kernel`` -- the conv passes (forward, gx) of fp16/bf16 maps on the strips' planes of at least
  Settings.toeplitz_min_pixels (2048: stage 1 at 224², the detection sizes' stages 1-2) on the tensor cores of A100
  and H100 class GPUs (`_FAST_TENSOR_CORES`; an RTX 3090's do a quarter of the FMAs, so they keep the strips): a
  program per (sample, channel) builds the plane's kernel as a banded matrix T once and takes each output tile as one
  X @ T, X holding per output row and kernel row the input row's window (details in its docstring). The taps are
  rounded to the map's dtype for the MMA (as eager's 16-bit conv rounds its weights); products are exact and summed in
  fp32. T's zeros multiply whole windows, so a non-finite input would make a whole tile NaN: planes with a
  non-finite output are flagged and convolved again tap by tap by ``_toeplitz_redo_kernel`` (one flag load per
  finite plane). Per output the FFMA strip issues ~75 instructions per thread, 49 of them FMAs; this kernel ~1/8 of
  an MMA and the window's loads and masks, about 2 warp-instructions per output with the banded matrix's build. That
  build (a gather of K² taps into ROWS·WINDOW x 16 entries, ~370 instructions per warp) repays itself only on large
  planes: at 28² (784 pixels) the kernel estimated 25.7 µs against the strips' 15.6 (T stage 2 bf16 forward, H100),
  so smaller planes keep the strips.
* ``_toeplitz_kernel_grad_kernel`` -- the dk pass where the conv passes run on the tensor cores: per tile
  D += X^T @ G (the conv's window tile and gy's), dk a set of D's diagonals, read once per plane through a small
  slot in global memory (the band of D stored, a barrier, rows loaded back and summed): about a third less than the
  strips' dk pass (T stage 1 bf16, H100 35.2 -> 23.1 µs). Summed in registers, with a select per tap, the diagonals
  cost more than the loop saved on an A100.
* ``_mix_kernel`` -- the softmax over G and the weighted sum of the weight bank, one read of the logits
  (B·G·C·K² values) and one write of the kernels (B·C·K²): not small next to the map in the late stages
  (stage 4: K² = H·W). It replaced torch's softmax, product and sum (three passes; the static audit
  counted them at up to 40% of the stage-4 forward estimate).
* ``_mixing_plane_forward_kernel`` -- the forward on whole planes (stages 3-4 at 224²): the mix and the conv
  in one launch. A program mixes its (sample, channel block)'s kernels as a [channels, taps] tile, each tap
  once, spread over its threads, and stores them (kept for the backward, or scratch); after a barrier each
  thread reads its channel's K² taps back from L1 for the whole-plane stencil. The kernels are written once
  and not read back from DRAM, and the mix's launch is gone: at stage 4, where the kernels are as large as the
  fp32 map, that was a third of the forward's traffic. (Mixed in each of a channel's column threads instead,
  every tap would be mixed W times.) fp16/bf16 logits mix with the hardware's approximate exp and reciprocal
  (`_softmax_mix`; B stage 4, G = 4, bf16, sm_90: with the exact forms the mix was 638 of the kernel's 1400
  instructions, now 471 of 1088).
* ``_kernel_grad_partial_kernel`` -- dk and dβ partial sums, one program per (sample, channel block,
  chunk of positions), accumulated elementwise in registers and reduced once at the end; partials go
  to a [chunks, B, C, K²] buffer.
* ``_softmax_chain_kernel`` -- sums the chunks in a fixed order and chains dk/dβ through the softmax
  to grad kernel_logits / bias_logits; a program takes a group of samples (Settings.chain_programs) and
  sums their terms s_g·dk, s_g·dβ in registers, one store per group, whose sum over the groups (a
  deterministic ``torch.sum``) is grad weight / bias. The weight and bias banks are loaded once per program, each
  logit once and exponentiated once (`_softmax_backward`; fp16/bf16 with the approximate exp and reciprocal): B stage
  4, bf16, sm_90, the kernel 29.2 -> 14.4 µs and the backward 49.6 -> 34.9 (static audit, Triton 3.8).

x, gy, y and gx are addressed through their strides (contiguous, channels_last, channel slices of a
larger tensor all work without copies); the small tensors (logits, weight, bias) are made contiguous.
Offsets within a sample are int32 unless the sample spans 2^31 elements; the sample base offset is
always int64, so B·C·H·W beyond 2^31 is fine. Accumulation is fp32 (fp64 for fp64 inputs).

Roofline (N = B·C·H·W elements of e bytes each; L = the logits, weight bank and bias tensors' bytes,
B·G·C·K²·e for the kernel logits, as large as G·N·e when K² = H·W):

    forward           reads x, logits; writes y               2·N·e + L bytes, 2·K²·N FLOPs
    backward          reads gy, x, logits; writes gx, grads   3·N·e + 2·L bytes minimum
    (this backward:   gx pass reads gy, writes gx; dk pass reads gy, x  -> 4·N·e bytes)
    forward+backward  5·N·e bytes minimum (6·N·e as implemented)

Stencils. Planes of at most Settings.plane_max (16) rows and columns with int32 offsets (T/S/B stages 3-4 at 224^2:
14x14, 7x7, either layout) run the MS-FFN's whole-plane stencils, a program per (sample, channel block) and a thread
per (channel, column): the conv passes `ms_ffn._dwconv_plane_k` (per kernel column, the shifted column loaded once
and its K vertical taps added as register FMAs with compile-time row bounds), the dk pass `ms_ffn._wgrad_plane_k`
over the one sample (K² per-thread partials, one cross-column sum per tap; a single chunk, so dk and dβ need no
chunk sums). On NCHW maps whose rows are a multiple of 4 pixels (T/S/B stages 1-2: W = 56, 28), with
row-contiguous strides that are multiples of 4 and int32 offsets, the conv and dk passes run strips of at most
Settings.strip_rows (8) rows, spread evenly (7 at H = 28), a program per (sample, channel block, strip, block of up
to 16 chunks of a row) and a thread per (channel, chunk of 4 pixels): `ms_ffn._dwconv_strip_vec_k` loads the K² taps
once and each of the strip's S + K - 1 input rows once (3 vector loads: the chunk and its neighbours) and adds it
into every output row it reaches by register FMAs; `ms_ffn._wgrad_strip_vec_k` holds the strip's gy rows and
multiplies each x row into K² per-thread partials, reduced once per program into one chunk of dk and dβ partials per
(strip, column block). With strip_rows = 0 they run the MS-FFN's chunked stencils (`ms_ffn._dwconv_tile_vec_k`,
`ms_ffn._wgrad_tile_vec_k`: every kernel row and the taps reloaded per output row). Elsewhere each pass gathers the
K×K taps from L1/L2 with one masked load per tap and output element (the dk pass as a [channels, taps, positions]
window), bound by instruction issue rather than DRAM traffic. Each form cut the estimates several-fold (T stage 1
bf16 on an H100, forward + backward, per-tap -> chunked -> strips: 649 -> 215 -> 95 µs; each change's numbers are in
benchmarks/results/README.md), and the first, a [channels, taps, positions] window reduced over the taps across
threads, measured 0.14-0.19x eager on an H200 (benchmarks/results, 2026-11-28). At stage 4 the backward's passes
over the logits weigh as much as the map (K² = H·W): the softmax chain sums its weight-gradient terms over groups
of samples in registers (`_softmax_chain_kernel`), so torch's batch sum reads one term per group.

Static audit of `idconv` (`python -m benchmarks.audit_tables` writes this table from gpu_audit_3.8.0.json: Triton 3.8.0,
batch 128 at 224x224, the worst over layouts and modes; estimate / DRAM roofline, µs):

    stage  shape      phase     fp32 A100  fp32 H100  bf16 A100  bf16 H100
    T1     24x56x56   forward   40.3/39.2  26.5/23.4  36.5/19.6  24.1/11.7
    T1     24x56x56   backward  92.0/59.0  60.8/35.2  78.0/29.5  46.7/17.6
    T2     48x28x28   forward   22.5/20.5  14.8/12.2  23.7/10.3  15.6/6.1
    T2     48x28x28   backward  50.6/31.4  33.9/18.7  53.3/15.7  36.4/9.4
    T3     112x14x14  forward   15.5/14.1  9.3/8.4    14.4/7.1   9.6/4.2
    T3     112x14x14  backward  40.4/22.6  25.4/13.5  38.8/11.3  26.0/6.8
    T4     224x7x7    forward   14.2/11.4  8.5/6.8    10.0/5.7   6.8/3.4
    T4     224x7x7    backward  36.4/20.0  22.5/11.9  29.8/10.0  19.2/6.0
    S1     32x56x56   forward   53.9/52.2  35.6/31.2  47.8/26.1  32.1/15.6
    S1     32x56x56   backward  123/78.7   81.4/47.0  102/39.4   62.2/23.5
    S2     64x28x28   forward   29.4/27.3  19.6/16.3  31.1/13.7  20.8/8.2
    S2     64x28x28   backward  66.6/41.8  45.3/25.0  69.8/20.9  48.6/12.5
    S3     160x14x14  forward   24.3/22.2  14.5/13.3  21.5/11.1  14.1/6.6
    S3     160x14x14  backward  62.1/36.5  38.5/21.8  57.5/18.2  37.3/10.9
    S4     256x7x7    forward   22.8/19.6  13.6/11.7  14.4/9.8   9.9/5.9
    S4     256x7x7    backward  55.4/36.1  34.0/21.5  41.1/18.0  27.0/10.8
    B1     38x56x56   forward   66.7/62.0  43.9/37.0  57.8/31.0  37.1/18.5
    B1     38x56x56   backward  152/93.5   101/55.8   124/46.7   71.9/27.9
    B2     76x28x28   forward   36.9/32.5  23.9/19.4  39.1/16.2  25.3/9.7
    B2     76x28x28   backward  83.8/49.7  55.1/29.7  88.4/24.8  59.3/14.8
    B3     168x14x14  forward   27.6/25.5  16.5/15.2  23.5/12.8  15.7/7.6
    B3     168x14x14  backward  69.0/42.6  43.2/25.4  61.8/21.3  41.1/12.7
    B4     336x7x7    forward   30.0/25.8  17.9/15.4  19.0/12.9  12.7/7.7
    B4     336x7x7    backward  71.4/47.3  44.0/28.3  52.7/23.7  34.9/14.1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .. import ops
from ..layout import channels_last_input
from ..library import custom_op
from .common import (
    INTERPRETED,
    NO_REGISTER_BUDGET,
    LaunchTarget,
    accumulation_dtype,
    balanced_batch_groups,
    cdiv,
    device_guard,
    launch_settings,
    launch_target,
    needs_int64,
    next_power_of_2,
    supports,
    tl_accumulation_dtype,
)

# The chunked stencils are the MS-FFN's (same conditions, same code).
from .ms_ffn import (
    _chunk_coords,
    _chunk_ptrs,
    _chunk_strides,
    _chunked_hw,
    _dense_plane_conv_store,
    _dense_rows,
    _dwconv_plane_k,
    _dwconv_strip_vec_k,
    _dwconv_tile_vec_k,
    _multiple_of_4,
    _plane_shape,
    _rows_to_tile,
    _stencil_taps,
    _strip_coords,
    _tap_totals,
    _vectorisable,
    _wgrad_init,
    _wgrad_plane_k,
    _wgrad_strip_vec_k,
    _wgrad_tile_vec_k,
    _zero_plane,
)


@dataclass(frozen=True)
class Settings:
    """Launch settings (override with common.launch_overrides).

    conv_tile_elements: outputs of one program's [channels, positions] tile in the conv passes (forward, gx),
    each thread looping over the K² taps for its share, and in the chunked dk pass; conv_num_warps: its warps.
    tile_elements: elements of the per-tap dk pass's [channels, taps, positions] register tile; num_warps: its
    warps. target_programs: programs a launch should have before a plane is split into position chunks.
    plane_max: the largest H and W the whole-plane stencils run (0: never); plane_columns: (channel, column) pairs
    of a whole-plane program, one per thread on GPUs (the interpreter runs few large programs fastest).
    strip_rows: most output rows of a strip program of the conv and dk passes where the chunked stencils apply (0:
    the chunked stencils instead; H is cut into as few strips as that allows, of equal rows, see
    _balanced_strip_rows); strip_chunks: (channel, chunk of 4 pixels) pairs of one strip program, one per thread;
    strip_row_chunks: most chunks of a row one strip program covers (wider rows take several column blocks, so a row is
    not padded far past W). chain_programs: the fewest programs of the softmax-chain launch, which sums the weight-bank
    gradient terms over each program's samples before storing them; its sample groups are the length
    `balanced_batch_groups` finds best for the launch target's SMs, charging each program chain_prologue_samples
    samples' worth for its setup and its G bank-gradient sums stored once. One program per SM on GPUs: a program's
    warps (`_CHAIN_WARPS`, 4) already give each of an SM's schedulers one, so more programs add waves, not issue slots
    (when the programs ran 8 warps, one resident per SM, T's stage 4 took 224 programs of 8 samples, two on the
    busiest SM of an H100, where 256 of 7 had put three there). The prologue charge is a rough one sample's worth, not
    measured per kernel. toeplitz_dtypes: the map dtypes whose conv passes run on the tensor cores
    (`_toeplitz_conv_kernel`) where the strips apply and a plane has at least toeplitz_min_pixels pixels (none on GPUs
    without fast tensor cores, `_FAST_TENSOR_CORES`); toeplitz_rows: most output rows of its tiles (16 output columns
    each), toeplitz_num_warps / toeplitz_num_stages: its launch. Interpreted, few programs."""

    conv_tile_elements: int = 512
    conv_num_warps: int = 4
    tile_elements: int = 8192
    num_warps: int = 8
    target_programs: int = 1024
    plane_max: int = 16
    plane_columns: int = 64
    strip_rows: int = 8
    strip_chunks: int = 64
    strip_row_chunks: int = 16
    chain_programs: int = 1
    chain_prologue_samples: float = 1.0
    toeplitz_dtypes: Tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    toeplitz_rows: int = 32
    toeplitz_min_pixels: int = 2048
    toeplitz_num_warps: int = 4
    toeplitz_num_stages: int = 2

    @classmethod
    def for_target(cls, target: LaunchTarget) -> Settings:
        if target.interpreted:
            return cls(plane_columns=512, strip_chunks=512)
        if target.capability not in _FAST_TENSOR_CORES:
            return cls(chain_programs=target.sm_count, toeplitz_dtypes=())
        return cls(chain_programs=target.sm_count)


# Compute capabilities whose tensor cores do 256+ 16-bit FMAs a clock per scheduler with fp32 accumulation (A100,
# H100): there the banded-matrix conv beats the FFMA strips. The RTX 30/40 series (8.6, 8.9) do 64 (GeForce) to 128,
# where the static audit estimated it 2.2x slower than the strips (T stage 1 bf16 forward on an RTX 3090, 48 -> 106 µs).
_FAST_TENSOR_CORES = (80, 90)


# Elements of a _mix_kernel program (4 warps: 4 per thread, each with G loads of logits and of the bank).
_MIX_BLOCK = 512
# The softmax chain's [channels, taps] tile and warps (`_softmax_chain_kernel`; see its launch).
_CHAIN_TILE = 512
_CHAIN_WARPS = 4


@triton.jit
def _group_max(logits_ptrs, g_stride, mask, G: tl.constexpr, ACC: tl.constexpr):
    """max_g logits[g] (the softmax's shift); logits of group g at ptrs + g·g_stride."""
    m = tl.load(logits_ptrs, mask=mask, other=0.0).to(ACC)
    for g in tl.static_range(1, G):
        m = tl.maximum(m, tl.load(logits_ptrs + g * g_stride, mask=mask, other=0.0).to(ACC))
    return m


@triton.jit
def _group_values(ptrs, g_stride, mask, G: tl.constexpr, ACC: tl.constexpr):
    """The G groups' values of logits or a bank (group g at ptrs + g·g_stride), 0 where masked."""
    values = ()
    for g in tl.static_range(G):
        values = values + (tl.load(ptrs + g * g_stride, mask=mask, other=0.0).to(ACC),)
    return values


@triton.jit
def _softmax_backward(d, logits_ptrs, bank, grad_logits_ptrs, g_stride, mask, G: tl.constexpr, ACC: tl.constexpr):
    """Given d = grad of Σ_g s_g·bank[g] (bank: the G groups' values, loaded once by the caller for all its samples),
    store grad logits s_g·(d·bank[g] − Σ s·d·bank) and return the G terms s_g·d of the bank's gradient. Each logit is
    loaded and exponentiated once and the softmax's sum inverted once (approximately for fp16/bf16 logits,
    `_fast_softmax_math`), where a second pass over the groups, between the grad-logit stores, had loaded the logits
    and the bank again (the compiler cannot tell the stores from them) and taken G more exponentials and G + 1
    divisions."""
    FAST: tl.constexpr = _fast_softmax_math(logits_ptrs.dtype.element_ty)
    logits = _group_values(logits_ptrs, g_stride, mask, G, ACC)
    m = logits[0]
    for g in tl.static_range(1, G):
        m = tl.maximum(m, logits[g])
    exps = ()
    den = tl.zeros_like(m)
    weighted_bank = tl.zeros_like(m)
    for g in tl.static_range(G):
        e = _softmax_exp(logits[g] - m, FAST)
        exps = exps + (e,)
        den += e
        weighted_bank += e * bank[g]
    inv_den = _softmax_divide(1.0, den, FAST)
    weighted_dot = d * weighted_bank * inv_den  # Σ_g s_g·d·bank[g]
    bank_terms = ()
    for g in tl.static_range(G):
        s = exps[g] * inv_den
        grad_logits = s * (d * bank[g] - weighted_dot)
        tl.store(grad_logits_ptrs + g * g_stride, grad_logits.to(grad_logits_ptrs.dtype.element_ty), mask=mask)
        bank_terms = bank_terms + (s * d,)
    return bank_terms


@triton.jit
def _add_terms(total, terms, G: tl.constexpr):
    out = ()
    for g in tl.static_range(G):
        out = out + (total[g] + terms[g],)
    return out


@triton.constexpr_function
def _fast_softmax_math(logits_dtype):
    """Whether a softmax over logits of this dtype takes the hardware's approximate exp and division (`_softmax_exp`,
    `_softmax_divide`): fp16/bf16 logits on a GPU (the interpreter has no libdevice). libdevice's fast_expf and
    fast_dividef are a few ulp off at the max-shifted logits' range, where expf and the division spend 6 and 9 issued
    instructions per element on range cases (sm_90) that a max-shifted softmax over G terms never reaches: far below
    the 16-bit results' rounding. fp32 and fp64 keep tl.exp and the division."""
    return (logits_dtype.is_fp16() or logits_dtype.is_bf16()) and not INTERPRETED


@triton.jit
def _softmax_exp(x, FAST: tl.constexpr):
    if FAST:
        return libdevice.fast_expf(x)
    else:
        return tl.exp(x)


@triton.jit
def _softmax_divide(num, den, FAST: tl.constexpr):
    if FAST:
        return libdevice.fast_dividef(num, den)
    else:
        return num / den


@triton.jit
def _softmax_mix(logits_ptrs, bank_ptrs, g_stride, mask, G: tl.constexpr, ACC: tl.constexpr):
    """Σ_g s_g(logits) · bank[g] elementwise, s the softmax over the G groups (group g of either at ptrs + g·g_stride);
    0 where masked. fp16/bf16 logits: the approximate exp and division (`_fast_softmax_math`)."""
    FAST: tl.constexpr = _fast_softmax_math(logits_ptrs.dtype.element_ty)
    m = _group_max(logits_ptrs, g_stride, mask, G, ACC)
    den = tl.zeros_like(m)
    num = tl.zeros_like(m)
    for g in tl.static_range(G):
        e = _softmax_exp(tl.load(logits_ptrs + g * g_stride, mask=mask, other=0.0).to(ACC) - m, FAST)
        den += e
        num += e * tl.load(bank_ptrs + g * g_stride, mask=mask, other=0.0).to(ACC)
    return _softmax_divide(num, den, FAST)


@triton.jit(do_not_specialize_on_alignment=["n"])
def _mix_kernel(
    logits_ptr,
    bank_ptr,
    out_ptr,
    n,
    n_blocks,
    G: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """out[b, i] = Σ_g s_g(logits[b, :, i]) · bank[g, i] over the flattened i < n (n = C·K² for the kernels,
    C for the biases): one read of the logits and one write, in place of torch's softmax, product and sum
    (three passes over G·n values per sample; at stage 4, K² = H·W, as many values as the map)."""
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    i = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    mixed = _softmax_mix(logits_ptr + b * G * n + i, bank_ptr + i, n, mask, G, ACC)
    tl.store(out_ptr + b * n + i, mixed, mask=mask)


@triton.jit
def _tap_window(
    c,
    c_ok,
    p,
    p_end,
    H,
    W,
    stride_c,
    stride_h,
    stride_w,
    K: tl.constexpr,
    KK_PAD: tl.constexpr,
    FLIP: tl.constexpr,
    INDEX64: tl.constexpr,
):
    """Offsets and mask of the [channels, taps, positions] input window of output positions p."""
    t = tl.arange(0, KK_PAD)
    if FLIP:
        dh = K // 2 - t // K
        dw = K // 2 - t % K
    else:
        dh = t // K - K // 2
        dw = t % K - K // 2
    h = p // W
    w = p % W
    ih = h[None, None, :] + dh[None, :, None]
    iw = w[None, None, :] + dw[None, :, None]
    mask = (
        c_ok[:, None, None]
        & (t < K * K)[None, :, None]
        & (p < p_end)[None, None, :]
        & (ih >= 0)
        & (ih < H)
        & (iw >= 0)
        & (iw < W)
    )
    c3 = c[:, None, None]
    if INDEX64:
        offs = c3.to(tl.int64) * stride_c + ih.to(tl.int64) * stride_h + iw.to(tl.int64) * stride_w
    else:
        offs = c3 * stride_c + ih * stride_h + iw * stride_w
    return offs, mask


@triton.jit
def _plane_offsets(c, p, W, stride_c, stride_h, stride_w, INDEX64: tl.constexpr, VEC: tl.constexpr = False):
    """Offsets of the [channels, positions] tile at output positions p (VEC: in chunks of 4, see _chunked_hw)."""
    if VEC:
        h, w = _chunked_hw(p, W)
    else:
        h = p // W
        w = p % W
    # One return: Triton rejects returns of different types (int64 / int32) from the two branches.
    if INDEX64:
        c, h, w = c.to(tl.int64), h.to(tl.int64), w.to(tl.int64)
    return c[:, None] * stride_c + h[None, :] * stride_h + w[None, :] * stride_w


@triton.jit
def _plane_conv_store(
    src,
    dst,
    taps,
    beta,
    c,
    c_ok,
    src_stride_c,
    src_stride_h,
    src_stride_w,
    dst_stride_c,
    dst_stride_h,
    dst_stride_w,
    zero_plane,
    K: tl.constexpr,
    FLIP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PLANE_H: tl.constexpr,
    PLANE_W: tl.constexpr,
    PLANE_WP: tl.constexpr,
    PLANE_DENSE: tl.constexpr,
):
    """dst = the whole-plane conv of src (channels c, a thread per (channel, column): ms_ffn._dwconv_plane_k) with
    the K^2 taps in registers, plus beta [BLOCK_C] where HAS_BIAS; dense planes store it row by row
    (ms_ffn._dense_plane_conv_store)."""
    if PLANE_DENSE:
        _dense_plane_conv_store(
            src,
            dst,
            taps,
            beta,
            c,
            c_ok,
            src_stride_c,
            dst_stride_c,
            zero_plane,
            K,
            FLIP,
            False,
            HAS_BIAS,
            ACC,
            BLOCK_C,
            PLANE_H,
            PLANE_W,
            PLANE_WP,
        )
    else:
        HP: tl.constexpr = BLOCK_P // PLANE_WP
        rows = _dwconv_plane_k(
            src,
            taps,
            c,
            c_ok,
            src_stride_c,
            src_stride_h,
            src_stride_w,
            zero_plane,
            K,
            FLIP,
            False,
            ACC,
            BLOCK_C,
            PLANE_H,
            PLANE_W,
            HP,
            PLANE_WP,
            PLANE_DENSE,
        )
        acc = _rows_to_tile(rows, HP, PLANE_WP, BLOCK_C)
        if HAS_BIAS:
            acc += beta[:, None]
        p = tl.arange(0, BLOCK_P)
        h = p // PLANE_WP
        w = p % PLANE_WP
        ok = c_ok[:, None] & ((h < PLANE_H) & (w < PLANE_W))[None, :]
        out_offs = c[:, None] * dst_stride_c + (h * dst_stride_h + w * dst_stride_w)[None, :]
        tl.store(dst + out_offs, acc.to(dst.dtype.element_ty), mask=ok)


@triton.jit(
    do_not_specialize_on_alignment=[
        "C",
        "H",
        "W",
        "src_stride_b",
        "src_stride_c",
        "src_stride_h",
        "src_stride_w",
        "dst_stride_b",
        "dst_stride_c",
        "dst_stride_h",
        "dst_stride_w",
        "n_cblocks",
        "n_chunks",
        "chunk_len",
    ]
)
def _dynconv_kernel(
    src_ptr,
    dst_ptr,
    kernel_ptr,
    beta_ptr,
    C,
    H,
    W,
    src_stride_b,
    src_stride_c,
    src_stride_h,
    src_stride_w,
    dst_stride_b,
    dst_stride_c,
    dst_stride_h,
    dst_stride_w,
    n_cblocks,
    n_chunks,
    chunk_len,
    zero_plane_ptr,
    K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    FLIP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    INDEX64: tl.constexpr,
    VEC: tl.constexpr,
    PLANE_H: tl.constexpr,
    PLANE_W: tl.constexpr,
    PLANE_WP: tl.constexpr,
    PLANE_DENSE: tl.constexpr,
    STRIP: tl.constexpr,
):
    """dst[b,c] = src[b,c] ⋆ k[b,c] (+ β[b,c]) with k, β already synthesized ([B, C, K²], [B, C]); FLIP
    convolves with the flipped kernel (gx).

    Each thread accumulates its own outputs over the K² taps (unrolled, offsets known at compile time): no
    reduction across threads, the centre offset and the row / column indices computed once per tile. VEC
    (row-contiguous planes, W and strides multiples of 4, K <= 9): the MS-FFN's chunked stencil
    (ms_ffn._dwconv_tile_vec_k), 4 outputs per thread from 3 vector loads per kernel row. PLANE_W > 0 (planes of
    at most Settings.plane_max, int32 offsets): the MS-FFN's whole-plane stencil (ms_ffn._dwconv_plane_k), a
    program per (sample, channel block) holding the plane, a thread per (channel, column). STRIP > 0 (with VEC):
    strips of STRIP rows (ms_ffn._dwconv_strip_vec_k), a program per (sample, channel block, strip, block of
    BLOCK_P columns), each input row loaded once per strip and the taps once per program; the position chunks
    are the (strip, column block) pairs."""
    if VEC:  # strides Triton can prove multiples of 4 (see _multiple_of_4)
        src_stride_b, src_stride_c, src_stride_h = _chunk_strides(src_stride_b, src_stride_c, src_stride_h)
        dst_stride_b, dst_stride_c, dst_stride_h = _chunk_strides(dst_stride_b, dst_stride_c, dst_stride_h)
        chunk_len = _multiple_of_4(chunk_len)
    pid = tl.program_id(0)
    chunk = pid % n_chunks
    bc = pid // n_chunks
    b = (bc // n_cblocks).to(tl.int64)
    c = (bc % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    KK: tl.constexpr = K * K
    P: tl.constexpr = K // 2
    taps = kernel_ptr + (b * C + c) * KK
    if HAS_BIAS:
        beta = tl.load(beta_ptr + b * C + c, mask=c_ok, other=0.0)
    else:
        beta = c  # not read
    src = src_ptr + b * src_stride_b
    dst = dst_ptr + b * dst_stride_b
    if PLANE_W > 0:
        _plane_conv_store(
            src,
            dst,
            _stencil_taps(kernel_ptr + b * C * KK, c, c_ok, K, KK, ACC),
            beta,
            c,
            c_ok,
            src_stride_c,
            src_stride_h,
            src_stride_w,
            dst_stride_c,
            dst_stride_h,
            dst_stride_w,
            zero_plane_ptr,
            K,
            FLIP,
            HAS_BIAS,
            ACC,
            BLOCK_C,
            BLOCK_P,
            PLANE_H,
            PLANE_W,
            PLANE_WP,
            PLANE_DENSE,
        )
    elif STRIP > 0:
        CHUNKS: tl.constexpr = BLOCK_P // 4
        h0, wq, q_ok, left_ok, right_ok = _strip_coords(chunk, W, STRIP, CHUNKS)
        rows = _dwconv_strip_vec_k(
            src,
            _stencil_taps(kernel_ptr + b * C * KK, c, c_ok, K, KK, ACC),
            c,
            c_ok,
            h0,
            wq,
            q_ok,
            left_ok,
            right_ok,
            H,
            src_stride_c,
            src_stride_h,
            K,
            FLIP,
            False,
            ACC,
            BLOCK_C,
            CHUNKS,
            STRIP,
        )
        for o in tl.static_range(STRIP):
            out = rows[o]
            if HAS_BIAS:
                out += beta[:, None, None]
            ok = c_ok[:, None] & (q_ok & (h0 + o < H))[None, :]
            out_ptrs = _chunk_ptrs(dst, c[:, None] * (dst_stride_c // 4), h0 + o, wq, dst_stride_h)
            tl.store(out_ptrs, out.to(dst_ptr.dtype.element_ty), mask=ok[:, :, None])
    else:
        p_start = chunk * chunk_len
        p_end = tl.minimum(p_start + chunk_len, H * W)
        for p0 in range(p_start, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            ok = c_ok[:, None] & (p < p_end)[None, :]
            if VEC:
                hq, wq, q_ok, left_ok, right_ok = _chunk_coords(p0 // 4, p_end // 4, W, BLOCK_P // 4)
                acc = _dwconv_tile_vec_k(
                    src,
                    kernel_ptr + b * C * KK,
                    c,
                    c_ok,
                    hq,
                    wq,
                    q_ok,
                    left_ok,
                    right_ok,
                    H,
                    src_stride_c,
                    src_stride_h,
                    K,
                    KK,
                    FLIP,
                    ACC,
                    BLOCK_C,
                    BLOCK_P,
                )
            else:
                h = p // W
                w = p % W
                centre = _plane_offsets(c, p, W, src_stride_c, src_stride_h, src_stride_w, INDEX64)
                acc = tl.zeros([BLOCK_C, BLOCK_P], ACC)
                # Kernel rows as a runtime loop, taps within a row unrolled: a 7x smaller body than unrolling all K²
                # taps (compile time), for one row offset and row mask per K taps.
                for kh in range(K):
                    dh = P - kh if FLIP else kh - P
                    row_ok = ok & ((h + dh >= 0) & (h + dh < H))[None, :]
                    if INDEX64:
                        row = centre + dh.to(tl.int64) * src_stride_h
                    else:
                        row = centre + dh * src_stride_h
                    for kw in tl.static_range(K):
                        dw = P - kw if FLIP else kw - P
                        tap = tl.load(taps + kh * K + kw, mask=c_ok, other=0.0)  # L1-resident, one per channel held
                        valid = row_ok & ((w + dw >= 0) & (w + dw < W))[None, :]
                        acc += tap[:, None] * tl.load(src + row + dw * src_stride_w, mask=valid, other=0.0).to(ACC)
            if HAS_BIAS:
                acc += beta[:, None]
            out_offs = _plane_offsets(c, p, W, dst_stride_c, dst_stride_h, dst_stride_w, INDEX64, VEC)
            tl.store(dst + out_offs, acc.to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _plane_in_vectors(ptr, plane, C, stride_b, stride_c, VECTOR: tl.constexpr):
    """ptr moved to the (sample, channel) plane `plane` = b·C + c of a map whose strides arrive divided by VECTOR
    (the tensor-core kernels), in int64."""
    b = (plane // C).to(tl.int64)
    c = (plane % C).to(tl.int64)
    return ptr + b * (stride_b * VECTOR) + c * (stride_c * VECTOR)


@triton.jit
def _window_columns(ROWS: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tensor-core kernels' index vectors: X's columns as (kernel row, window column), ROWS·WINDOW of them, and
    the tile's BLOCK_N output columns."""
    q = tl.arange(0, ROWS * WINDOW)
    return q // WINDOW, q % WINDOW, tl.arange(0, BLOCK_N)


@triton.jit
def _band(kernel_row, window_col, n, K: tl.constexpr, LEAD: tl.constexpr):
    """Of the banded matrix T [ROWS·WINDOW, BLOCK_N] (and the dk pass's D, its shape): the kernel column each entry
    stands for, T[(i, k), n] = k[i, k - n - (LEAD - K // 2)], and whether it is a tap (else T holds a zero)."""
    tap_col = window_col[:, None] - n[None, :] - (LEAD - K // 2)
    return tap_col, (tap_col >= 0) & (tap_col < K) & (kernel_row < K)[:, None]


@triton.jit
def _window_rows(h0, kernel_row, H, K: tl.constexpr, BLOCK_M: tl.constexpr):
    """The input row of each (output row h0 + m, kernel row) entry of the X tiles starting at row h0, and whether it
    is in the map (and a kernel row, not padding)."""
    in_row = h0 + tl.arange(0, BLOCK_M)[:, None] + kernel_row[None, :] - K // 2
    return in_row, (in_row >= 0) & (in_row < H) & (kernel_row < K)[None, :]


@triton.jit
def _load_window(plane, in_row, row_ok, w0, window_col, W, stride_h, LEAD: tl.constexpr, VECTOR: tl.constexpr):
    """X for output columns from w0: per (output row, kernel row) the WINDOW input columns from w0 - LEAD, zero outside
    the map (a mask uniform over each VECTOR-element load)."""
    in_col = w0 - LEAD + window_col[None, :]
    return tl.load(plane + in_row * (stride_h * VECTOR) + in_col, mask=row_ok & (in_col >= 0) & (in_col < W), other=0.0)


@triton.jit(
    do_not_specialize_on_alignment=[
        "C",
        "H",
        "W_vectors",
        "src_stride_b",
        "src_stride_c",
        "src_stride_h",
        "dst_stride_b",
        "dst_stride_c",
        "dst_stride_h",
    ]
)
def _toeplitz_conv_kernel(
    src_ptr,
    dst_ptr,
    kernel_ptr,
    beta_ptr,
    flag_ptr,
    C,
    H,
    W_vectors,
    src_stride_b,
    src_stride_c,
    src_stride_h,
    dst_stride_b,
    dst_stride_c,
    dst_stride_h,
    K: tl.constexpr,
    FLIP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    ROWS: tl.constexpr,
    LEAD: tl.constexpr,
    VECTOR: tl.constexpr,
):
    """dst[b,c] = src[b,c] ⋆ k[b,c] (+ β[b,c]) as one matmul per output tile, on the tensor cores (16-bit maps on
    row-contiguous planes); FLIP convolves with the flipped kernel (gx).

    A program owns one (sample, channel) plane. An output tile of BLOCK_M rows x BLOCK_N columns starting at (h0,
    w0) is X @ T: X [BLOCK_M, ROWS·WINDOW] holds, for output row h0 + m and kernel row i, the WINDOW input columns
    from w0 - LEAD of input row h0 + m + i - P (zero outside the map); T [ROWS·WINDOW, BLOCK_N] is the plane's
    kernel as a banded (Toeplitz) matrix, T[(i, j + n + LEAD - P), n] = k[i, j], built once per program in the map's
    dtype. Its zeros are multiplied too (K = 7: 7·22 of T's 256 rows per column are taps), which the tensor cores
    afford: the FFMA stencils issue 49 FMAs and their loads per output, this ~1/8 of an MMA. LEAD (a multiple of
    VECTOR >= P) aligns each window, so X moves in VECTOR-element loads whose mask is uniform (W, the strides and
    w0 are multiples of VECTOR; strides arrive divided by it so that Triton sees it). flag[plane]: Σ outputs · 0, NaN
    where an output is not finite (`_toeplitz_redo_kernel` convolves those planes again)."""
    plane = tl.program_id(0)
    src = _plane_in_vectors(src_ptr, plane, C, src_stride_b, src_stride_c, VECTOR)
    dst = _plane_in_vectors(dst_ptr, plane, C, dst_stride_b, dst_stride_c, VECTOR)
    W = W_vectors * VECTOR
    kernel_row, window_col, n = _window_columns(ROWS, WINDOW, BLOCK_N)
    tap_col, tap_ok = _band(kernel_row, window_col, n, K, LEAD)
    if FLIP:
        tap = (K - 1 - kernel_row)[:, None] * K + (K - 1 - tap_col)
    else:
        tap = kernel_row[:, None] * K + tap_col
    toeplitz = tl.load(kernel_ptr + plane.to(tl.int64) * (K * K) + tap, mask=tap_ok, other=0.0)
    toeplitz = toeplitz.to(src_ptr.dtype.element_ty)
    if HAS_BIAS:
        beta = tl.load(beta_ptr + plane)
    else:
        beta = 0.0
    m = tl.arange(0, BLOCK_M)
    poison = tl.zeros([BLOCK_M, BLOCK_N], ACC)  # NaN once an output is not finite
    for h0 in range(0, H, BLOCK_M):
        in_row, row_ok = _window_rows(h0, kernel_row, H, K, BLOCK_M)
        out_row = h0 + m[:, None]
        for w0 in range(0, W, BLOCK_N):
            x = _load_window(src, in_row, row_ok, w0, window_col, W, src_stride_h, LEAD, VECTOR)
            out = tl.dot(x, toeplitz, input_precision="ieee")  # ieee: fp32 and fp64 (tests) take no TF32
            poison += out * 0.0
            if HAS_BIAS:
                out += beta
            out_col = w0 + n[None, :]
            tl.store(
                dst + out_row * (dst_stride_h * VECTOR) + out_col,
                out.to(dst_ptr.dtype.element_ty),
                mask=(out_row < H) & (out_col < W),
            )
    # T's zeros multiply the whole window, so an inf or NaN input anywhere in it makes all of the tile's outputs NaN,
    # where the conv's taps keep a non-finite input's effect on its K x K neighbours: the plane's flag (NaN once an
    # output is not finite) sends it to `_toeplitz_redo_kernel`.
    tl.store(flag_ptr + plane, tl.sum(tl.sum(poison, axis=1), axis=0))


@triton.jit(
    do_not_specialize_on_alignment=[
        "C",
        "H",
        "W_vectors",
        "src_stride_b",
        "src_stride_c",
        "src_stride_h",
        "dst_stride_b",
        "dst_stride_c",
        "dst_stride_h",
    ]
)
def _toeplitz_redo_kernel(
    src_ptr,
    dst_ptr,
    kernel_ptr,
    beta_ptr,
    flag_ptr,
    C,
    H,
    W_vectors,
    src_stride_b,
    src_stride_c,
    src_stride_h,
    dst_stride_b,
    dst_stride_c,
    dst_stride_h,
    K: tl.constexpr,
    FLIP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    VECTOR: tl.constexpr,
):
    """The planes `_toeplitz_conv_kernel` flagged (a non-finite output) convolved again, one masked load per tap and
    output, the taps rounded to the map's dtype as there: the reference's zero padding and tap support whatever the
    map holds. A program per plane; one load of its flag where the map is finite. (In the conv kernel itself this path
    cost its loop 50% more instructions on sm_90: ptxas recomputed the window's addresses.)"""
    plane = tl.program_id(0)
    if tl.load(flag_ptr + plane) != 0.0:
        src = _plane_in_vectors(src_ptr, plane, C, src_stride_b, src_stride_c, VECTOR)
        dst = _plane_in_vectors(dst_ptr, plane, C, dst_stride_b, dst_stride_c, VECTOR)
        taps = kernel_ptr + plane.to(tl.int64) * (K * K)
        W = W_vectors * VECTOR
        P: tl.constexpr = K // 2
        m = tl.arange(0, BLOCK_M)
        n = tl.arange(0, BLOCK_N)
        for h0 in range(0, H, BLOCK_M):
            out_row = h0 + m[:, None]
            for w0 in range(0, W, BLOCK_N):
                out_col = w0 + n[None, :]
                out = tl.zeros([BLOCK_M, BLOCK_N], ACC)
                for t in range(K * K):
                    if FLIP:
                        k = tl.load(taps + (K * K - 1 - t))
                    else:
                        k = tl.load(taps + t)
                    row = out_row + t // K - P
                    col = out_col + t % K - P
                    x = tl.load(
                        src + row * (src_stride_h * VECTOR) + col,
                        mask=(row >= 0) & (row < H) & (col >= 0) & (col < W),
                        other=0.0,
                    )
                    out += k.to(src_ptr.dtype.element_ty).to(ACC) * x.to(ACC)
                if HAS_BIAS:
                    out += tl.load(beta_ptr + plane)
                tl.store(
                    dst + out_row * (dst_stride_h * VECTOR) + out_col,
                    out.to(dst_ptr.dtype.element_ty),
                    mask=(out_row < H) & (out_col < W),
                )


@triton.jit(
    do_not_specialize_on_alignment=[
        "C",
        "H",
        "W_vectors",
        "x_stride_b",
        "x_stride_c",
        "x_stride_h",
        "gy_stride_b",
        "gy_stride_c",
        "gy_stride_h",
    ]
)
def _toeplitz_kernel_grad_kernel(
    x_ptr,
    gy_ptr,
    dk_ptr,
    dbeta_ptr,
    band_ptr,
    C,
    H,
    W_vectors,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    gy_stride_b,
    gy_stride_c,
    gy_stride_h,
    K: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    ROWS: tl.constexpr,
    LEAD: tl.constexpr,
    VECTOR: tl.constexpr,
):
    """dk[b,c,i,j] = Σ_{h,w} gy[b,c,h,w] · x[b,c,h+i-P,w+j-P] and dβ[b,c] = Σ gy, on the tensor cores: the transpose
    of `_toeplitz_conv_kernel`'s product. Per output tile D += X^T @ G, X the conv's window tile and G gy's tile, so
    D[(i, k), n] sums x[h + i - P, w0 - LEAD + k] · gy[h, w0 + n] over the plane; a tap's gradient is one of D's
    diagonals, dk[i, j] = Σ_n D[(i, j + n + LEAD - P), n]. Once per plane the band of D (the K taps of each kernel row
    per output column) goes to the plane's slot of band_ptr ([ROWS, ROWS, BLOCK_N] per plane, (i, j, n)) and comes
    back after a barrier as rows (i, j) summed over n: summed in registers, with a select per tap, the diagonals took
    ~1200 instructions per warp and plane, more than the loop saved on an A100. A program per plane writes its
    (only) chunk of the dk and dβ partials."""
    plane = tl.program_id(0)
    x_base = _plane_in_vectors(x_ptr, plane, C, x_stride_b, x_stride_c, VECTOR)
    gy_base = _plane_in_vectors(gy_ptr, plane, C, gy_stride_b, gy_stride_c, VECTOR)
    W = W_vectors * VECTOR
    kernel_row, window_col, n = _window_columns(ROWS, WINDOW, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    products = tl.zeros([ROWS * WINDOW, BLOCK_N], ACC)
    gy_sum = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for h0 in range(0, H, BLOCK_M):
        in_row, row_ok = _window_rows(h0, kernel_row, H, K, BLOCK_M)
        out_row = h0 + m[:, None]
        for w0 in range(0, W, BLOCK_N):
            x = _load_window(x_base, in_row, row_ok, w0, window_col, W, x_stride_h, LEAD, VECTOR)
            out_col = w0 + n[None, :]
            gy = tl.load(
                gy_base + out_row * (gy_stride_h * VECTOR) + out_col, mask=(out_row < H) & (out_col < W), other=0.0
            )
            products = tl.dot(tl.trans(x), gy, acc=products, input_precision="ieee")
            gy_sum += gy.to(ACC)
    tap_col, band = _band(kernel_row, window_col, n, K, LEAD)
    slot = band_ptr + plane.to(tl.int64) * (ROWS * ROWS * BLOCK_N)
    tl.store(slot + (kernel_row[:, None] * ROWS + tap_col) * BLOCK_N + n[None, :], products, mask=band)
    tl.debug_barrier()  # the band's entries come back from other threads (global memory, visible after the barrier)
    tap = tl.arange(0, ROWS * ROWS)
    tap_i = tap // ROWS
    tap_j = tap % ROWS
    tap_ok = (tap_i < K) & (tap_j < K)
    diagonals = tl.load(slot + tap[:, None] * BLOCK_N + n[None, :], mask=tap_ok[:, None], other=0.0)
    tl.store(dk_ptr + plane.to(tl.int64) * (K * K) + tap_i * K + tap_j, tl.sum(diagonals, axis=1), mask=tap_ok)
    tl.store(dbeta_ptr + plane, tl.sum(tl.sum(gy_sum, axis=1), axis=0))


@triton.jit(
    do_not_specialize_on_alignment=[
        "C",
        "src_stride_b",
        "src_stride_c",
        "src_stride_h",
        "src_stride_w",
        "dst_stride_b",
        "dst_stride_c",
        "dst_stride_h",
        "dst_stride_w",
        "n_cblocks",
    ]
)
def _mixing_plane_forward_kernel(
    src_ptr,
    dst_ptr,
    logits_ptr,
    bank_ptr,
    kernel_ptr,
    bias_logits_ptr,
    bias_bank_ptr,
    C,
    src_stride_b,
    src_stride_c,
    src_stride_h,
    src_stride_w,
    dst_stride_b,
    dst_stride_c,
    dst_stride_h,
    dst_stride_w,
    n_cblocks,
    zero_plane_ptr,
    G: tl.constexpr,
    K: tl.constexpr,
    KK_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    PLANE_H: tl.constexpr,
    PLANE_W: tl.constexpr,
    PLANE_WP: tl.constexpr,
    PLANE_DENSE: tl.constexpr,
):
    """The whole-plane forward with the mix fused: a program per (sample, channel block) mixes its channels' kernels
    from the logits as a [channels, taps] tile (each tap once, spread over the program's threads), stores them to
    kernel_ptr ([B, C, K²], kept for the backward or scratch), and after a barrier each thread reads its channel's
    K² taps back (L1) for `_plane_conv_store`; the biases β are mixed in registers. Against `_mix_kernel` then
    `_dynconv_kernel`: the kernels are not read back from DRAM, and one launch fewer."""
    pid = tl.program_id(0)
    b = (pid // n_cblocks).to(tl.int64)
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    KK: tl.constexpr = K * K
    t = tl.arange(0, KK_PAD)
    tap_offs = c[:, None] * KK + t[None, :]
    tap_ok = c_ok[:, None] & (t < KK)[None, :]
    kernels = kernel_ptr + b * C * KK
    mixed = _softmax_mix(logits_ptr + b * G * C * KK + tap_offs, bank_ptr + tap_offs, C * KK, tap_ok, G, ACC)
    tl.store(kernels + tap_offs, mixed, mask=tap_ok)
    if HAS_BIAS:
        beta = _softmax_mix(bias_logits_ptr + b * G * C + c, bias_bank_ptr + c, C, c_ok, G, ACC)
    else:
        beta = c  # not read
    tl.debug_barrier()  # each tap is read back by every thread of its channel, stored by one thread of the program
    _plane_conv_store(
        src_ptr + b * src_stride_b,
        dst_ptr + b * dst_stride_b,
        _stencil_taps(kernels, c, c_ok, K, KK, ACC),
        beta,
        c,
        c_ok,
        src_stride_c,
        src_stride_h,
        src_stride_w,
        dst_stride_c,
        dst_stride_h,
        dst_stride_w,
        zero_plane_ptr,
        K,
        False,
        HAS_BIAS,
        ACC,
        BLOCK_C,
        BLOCK_P,
        PLANE_H,
        PLANE_W,
        PLANE_WP,
        PLANE_DENSE,
    )


@triton.jit(
    do_not_specialize_on_alignment=[
        "B",
        "C",
        "H",
        "W",
        "x_stride_b",
        "x_stride_c",
        "x_stride_h",
        "x_stride_w",
        "grad_out_stride_b",
        "grad_out_stride_c",
        "grad_out_stride_h",
        "grad_out_stride_w",
        "n_cblocks",
        "n_chunks",
        "chunk_len",
    ]
)
def _kernel_grad_partial_kernel(
    x_ptr,
    grad_out_ptr,
    dk_part_ptr,
    dbeta_part_ptr,
    B,
    C,
    H,
    W,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    grad_out_stride_b,
    grad_out_stride_c,
    grad_out_stride_h,
    grad_out_stride_w,
    n_cblocks,
    n_chunks,
    chunk_len,
    K: tl.constexpr,
    KK_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
    INDEX64: tl.constexpr,
    VEC: tl.constexpr,
    PLANE_H: tl.constexpr,
    PLANE_W: tl.constexpr,
    PLANE_WP: tl.constexpr,
    STRIP: tl.constexpr,
):
    """Chunk partials of dk[b,c,t] = Σ gy·shifted x and dβ[b,c] = Σ gy, into [chunks, B, C, ...]. VEC (the
    conditions of _dynconv_kernel's): the MS-FFN's chunked weight-gradient stencil (ms_ffn._wgrad_tile_vec_k),
    per-thread partials per tap reduced once at the end. PLANE_W > 0: its whole-plane weight gradient
    (ms_ffn._wgrad_plane_k) over the one sample, a single chunk: K² per-thread partials, one cross-column sum per
    tap. STRIP > 0: the strips of _dynconv_kernel (ms_ffn._wgrad_strip_vec_k), one chunk of
    partials per (strip, column block)."""
    if VEC:  # strides Triton can prove multiples of 4 (see _multiple_of_4)
        x_stride_b, x_stride_c, x_stride_h = _chunk_strides(x_stride_b, x_stride_c, x_stride_h)
        grad_out_stride_b, grad_out_stride_c, grad_out_stride_h = _chunk_strides(
            grad_out_stride_b, grad_out_stride_c, grad_out_stride_h
        )
        chunk_len = _multiple_of_4(chunk_len)
    pid = tl.program_id(0)
    chunk = pid % n_chunks
    bc = pid // n_chunks
    b = (bc // n_cblocks).to(tl.int64)
    c = (bc % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    x = x_ptr + b * x_stride_b
    grad_out = grad_out_ptr + b * grad_out_stride_b
    KK: tl.constexpr = K * K
    if PLANE_W > 0:
        _wgrad_plane_k(
            grad_out,
            x,
            dk_part_ptr + b * C * KK,
            dbeta_part_ptr + b * C,
            c,
            c_ok,
            c,
            1,
            grad_out_stride_b,
            grad_out_stride_c,
            grad_out_stride_h,
            grad_out_stride_w,
            x_stride_b,
            x_stride_c,
            x_stride_h,
            x_stride_w,
            K,
            KK,
            True,
            ACC,
            BLOCK_C,
            PLANE_H,
            PLANE_W,
            PLANE_WP,
        )
    elif STRIP > 0:
        CHUNKS: tl.constexpr = BLOCK_P // 4
        h0, wq, q_ok, left_ok, right_ok = _strip_coords(chunk, W, STRIP, CHUNKS)
        partials, g_total = _wgrad_strip_vec_k(
            _wgrad_init(K, KK_PAD, ACC, BLOCK_C, BLOCK_P, True),
            grad_out,
            x,
            c,
            c_ok,
            h0,
            wq,
            q_ok,
            left_ok,
            right_ok,
            H,
            grad_out_stride_c,
            grad_out_stride_h,
            x_stride_c,
            x_stride_h,
            K,
            ACC,
            BLOCK_C,
            CHUNKS,
            STRIP,
        )
        part = (chunk * B + b) * C + c
        for t in tl.static_range(KK):
            tl.store(dk_part_ptr + part * KK + t, tl.sum(partials[t], axis=1), mask=c_ok)
        tl.store(dbeta_part_ptr + part, tl.sum(g_total, axis=1), mask=c_ok)
    else:
        p_start = chunk * chunk_len
        p_end = tl.minimum(p_start + chunk_len, H * W)
        # Elementwise accumulators: the cross-thread reduction over positions happens once, at the end.
        if VEC:
            acc_k = _wgrad_init(K, KK_PAD, ACC, BLOCK_C, BLOCK_P, True)
        else:
            acc_k = tl.zeros([BLOCK_C, KK_PAD, BLOCK_P], ACC)
        acc_beta = tl.zeros([BLOCK_C, BLOCK_P], ACC)
        for p0 in range(p_start, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            g_offs = _plane_offsets(c, p, W, grad_out_stride_c, grad_out_stride_h, grad_out_stride_w, INDEX64, VEC)
            grad = tl.load(grad_out + g_offs, mask=c_ok[:, None] & (p < p_end)[None, :], other=0.0).to(ACC)
            if VEC:
                hq, wq, q_ok, left_ok, right_ok = _chunk_coords(p0 // 4, p_end // 4, W, BLOCK_P // 4)
                acc_k = _wgrad_tile_vec_k(
                    acc_k,
                    grad,
                    x,
                    c,
                    c_ok,
                    hq,
                    wq,
                    q_ok,
                    left_ok,
                    right_ok,
                    H,
                    x_stride_c,
                    x_stride_h,
                    K,
                    ACC,
                    BLOCK_C,
                    BLOCK_P,
                )
            else:
                offs, mask = _tap_window(
                    c, c_ok, p, p_end, H, W, x_stride_c, x_stride_h, x_stride_w, K, KK_PAD, False, INDEX64
                )
                window = tl.load(x + offs, mask=mask, other=0.0).to(ACC)
                acc_k += window * grad[:, None, :]
            acc_beta += grad
        if VEC:
            dk = _tap_totals(acc_k, KK, KK_PAD)
        else:
            dk = tl.sum(acc_k, axis=2)
        t = tl.arange(0, KK_PAD)
        part = (chunk * B + b) * C
        tl.store(dk_part_ptr + (part + c[:, None]) * KK + t[None, :], dk, mask=c_ok[:, None] & (t < KK)[None, :])
        tl.store(dbeta_part_ptr + part + c, tl.sum(acc_beta, axis=1), mask=c_ok)


@triton.jit(do_not_specialize_on_alignment=["B", "C", "n_cblocks", "n_chunks", "samples_per_program"])
def _softmax_chain_kernel(
    dk_part_ptr,
    dbeta_part_ptr,
    kernel_logits_ptr,
    weight_ptr,
    bias_logits_ptr,
    bias_ptr,
    grad_kernel_logits_ptr,
    grad_weight_part_ptr,
    grad_bias_logits_ptr,
    grad_bias_part_ptr,
    B,
    C,
    n_cblocks,
    n_chunks,
    samples_per_program,
    G: tl.constexpr,
    K: tl.constexpr,
    KK_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per (sample group, channel block): for each sample, sum the chunk partials (fixed order), chain dk, dβ
    through the softmax over G and store the logits' gradients; the weight-bank (and bias-bank) gradient terms
    s_g·dk are summed over the group's samples in registers and stored once per group ([groups, G, C, K²]): a
    per-sample store was as large as the kernel logits, read back by the batch sum (stage 4: K² = H·W)."""
    pid = tl.program_id(0)
    group = (pid // n_cblocks).to(tl.int64)  # and so the samples' offsets
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    KK: tl.constexpr = K * K
    t = tl.arange(0, KK_PAD)
    kmask = c_ok[:, None] & (t < KK)[None, :]
    ct = c[:, None] * KK + t[None, :]
    grad_weight = (tl.zeros([BLOCK_C, KK_PAD], ACC),) * G
    grad_bias = (tl.zeros([BLOCK_C], ACC),) * G
    # The banks once for all the group's samples: the loop's stores may alias them, so per sample they were reloaded.
    weight_bank = _group_values(weight_ptr + ct, C * KK, kmask, G, ACC)
    if HAS_BIAS:
        bias_bank = _group_values(bias_ptr + c, C, c_ok, G, ACC)
    b_lo = group * samples_per_program
    for b in range(b_lo, tl.minimum(b_lo + samples_per_program, B)):
        dk = tl.zeros([BLOCK_C, KK_PAD], ACC)
        dbeta = tl.zeros([BLOCK_C], ACC)
        for chunk in range(n_chunks):
            part = (chunk * B + b) * C
            dk += tl.load(dk_part_ptr + part * KK + ct, mask=kmask, other=0.0)
            dbeta += tl.load(dbeta_part_ptr + part + c, mask=c_ok, other=0.0)
        k_offs = b * G * C * KK + ct
        terms = _softmax_backward(
            dk, kernel_logits_ptr + k_offs, weight_bank, grad_kernel_logits_ptr + k_offs, C * KK, kmask, G, ACC
        )
        grad_weight = _add_terms(grad_weight, terms, G)
        if HAS_BIAS:
            b_offs = b * G * C + c
            terms = _softmax_backward(
                dbeta, bias_logits_ptr + b_offs, bias_bank, grad_bias_logits_ptr + b_offs, C, c_ok, G, ACC
            )
            grad_bias = _add_terms(grad_bias, terms, G)
    for g in tl.static_range(G):
        tl.store(grad_weight_part_ptr + (group * G + g) * C * KK + ct, grad_weight[g], mask=kmask)
        if HAS_BIAS:
            tl.store(grad_bias_part_ptr + (group * G + g) * C + c, grad_bias[g], mask=c_ok)


# ------------------------------------------------------------------------------------------- launch


def _split_tile(C: int, HW: int, tile: int, channels_fastest: bool) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_P) sharing `tile` elements between channels and positions of x's layout."""
    c_pow2 = next_power_of_2(C)
    if channels_fastest:  # channels_last: consecutive channels are adjacent in memory
        block_c = min(c_pow2, 32, tile)
        block_p = min(next_power_of_2(HW), max(1, tile // block_c))
    else:
        block_p = min(next_power_of_2(HW), tile)
        block_c = min(c_pow2, max(1, tile // block_p))
    return block_c, block_p


def _chunks(B: int, n_cblocks: int, HW: int, block_p: int, settings: Settings) -> Tuple[int, int]:
    """(number of position chunks per plane, positions per chunk, a multiple of block_p)."""
    n_tiles = cdiv(HW, block_p)
    n_chunks = min(n_tiles, max(1, cdiv(settings.target_programs, B * n_cblocks)))
    tiles_per_chunk = cdiv(n_tiles, n_chunks)
    return cdiv(n_tiles, tiles_per_chunk), tiles_per_chunk * block_p


def _balanced_strip_rows(H: int, most_rows: int) -> int:
    """Rows per strip: as few strips as `most_rows` allows, the rows spread evenly over them. A strip computes all
    its rows (rows past H are masked at the store only), so 8-row strips over H = 28 (stage 2 at 224^2) would
    compute 32 rows; 7-row strips compute 28."""
    if most_rows <= 0:
        return 0
    return cdiv(H, cdiv(H, most_rows))


class _Plan:
    """Tiling and chunking of one plane-shaped pass over x's layout: a conv pass (forward, gx) or the dk pass."""

    def __init__(self, x: torch.Tensor, K: int, conv: bool, others: Tuple[torch.Tensor, ...] = ()):
        B, C, H, W = x.shape
        self.batch, self.channels = B, C
        self.settings = launch_settings(Settings, x.device)
        self.index64 = needs_int64(x, *others)
        self.kk_pad = next_power_of_2(K * K)
        # Planes of at most plane_max rows and columns (stages 3-4 at 224^2, either layout) run the whole-plane
        # stencils: a program per (sample, channel block), the plane padded to powers of 2, one chunk.
        self.plane = _plane_shape(H, W, self.index64, self.settings)
        self.plane_dense = bool(self.plane[1]) and _dense_rows(x, *others)
        # Elsewhere NCHW rows of a multiple of 4 pixels run the chunked stencils (ms_ffn._vectorisable), with
        # int32 in-plane offsets only, in strips of rows unless strip_rows is 0; the dk pass then tiles like a
        # conv pass (per-thread partials per tap).
        block_c, block_p = _split_tile(C, H * W, self.settings.conv_tile_elements, channels_last_input(x))
        self.chunked = not self.plane[1] and _vectorisable(block_p, K, self.index64, x, *others)
        self.strip = _balanced_strip_rows(H, self.settings.strip_rows) if self.chunked else 0
        # The conv passes of 16-bit maps there run on the tensor cores (`_toeplitz_conv_kernel`), in loads of
        # toeplitz_vector elements (8 where W and every stride allow, else the 4 the strips need).
        self.toeplitz = (
            self.strip > 0 and x.dtype in self.settings.toeplitz_dtypes and self.settings.toeplitz_min_pixels <= H * W
        )
        self.toeplitz_vector = (
            8 if all(W % 8 == 0 and st % 8 == 0 for t in (x, *others) for st in t.stride()[:3]) else 4
        )
        if self.plane[1]:
            self.block_p = next_power_of_2(H) * self.plane[2]
            self.block_c = min(next_power_of_2(C), max(1, self.settings.plane_columns // self.plane[2]))
            self.num_warps = max(1, min(8, self.block_c * self.plane[2] // 32))
            self.n_chunks, self.chunk_len = 1, H * W
        elif self.strip:  # a program per (sample, channel block, strip, column block)
            chunks = min(next_power_of_2(W // 4), self.settings.strip_row_chunks)
            self.block_p = 4 * chunks
            self.block_c = min(next_power_of_2(C), max(1, self.settings.strip_chunks // chunks))
            self.num_warps = max(1, min(8, self.block_c * chunks // 32))
            self.n_chunks = cdiv(H, self.strip) * cdiv(W // 4, chunks)
            self.chunk_len = self.strip * self.block_p
            if self.toeplitz:  # a program per plane (the tensor-core kernels)
                self.n_chunks, self.chunk_len = 1, H * W
        else:
            if conv or self.chunked:
                self.block_c, self.block_p = block_c, block_p
                self.num_warps = self.settings.conv_num_warps
            else:
                # a [channels, taps, positions] tile of settings.tile_elements
                tile = max(1, self.settings.tile_elements // self.kk_pad)
                self.block_c, self.block_p = _split_tile(C, H * W, tile, channels_last_input(x))
                self.num_warps = self.settings.num_warps
            self.n_chunks, self.chunk_len = _chunks(B, self.n_cblocks, H * W, self.block_p, self.settings)

    @property
    def n_cblocks(self) -> int:
        return cdiv(self.channels, self.block_c)

    @property
    def grid(self) -> Tuple[int]:
        """A program per (sample, channel block, position chunk)."""
        return (self.batch * self.n_cblocks * self.n_chunks,)

    def constexprs(self, conv: bool = True) -> dict:
        """The stencil choice's compile-time arguments, shared by the conv and dk kernels (conv=False: the dk pass,
        whose stencil takes no PLANE_DENSE)."""
        constexprs = dict(
            BLOCK_C=self.block_c,
            BLOCK_P=self.block_p,
            INDEX64=self.index64,
            VEC=self.chunked,
            PLANE_H=self.plane[0],
            PLANE_W=self.plane[1],
            PLANE_WP=self.plane[2],
            PLANE_DENSE=self.plane_dense,
            STRIP=self.strip,
            num_warps=self.num_warps,
        )
        if not conv:
            constexprs.pop("PLANE_DENSE")
        return constexprs

    def zero_plane(self, src: torch.Tensor) -> torch.Tensor:
        return _zero_plane(self.plane, self.plane_dense, src)


def _mix(logits: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Σ_g softmax_g(logits)[b, g] · bank[g] -> [B, *bank.shape[1:]] in the accumulation dtype (contiguous
    logits and bank)."""
    B, G = logits.shape[:2]
    out = torch.empty((B,) + tuple(bank.shape[1:]), dtype=accumulation_dtype(logits.dtype), device=logits.device)
    if out.numel() == 0:
        return out
    n = out.numel() // B
    n_blocks = cdiv(n, _MIX_BLOCK)
    with device_guard(logits):
        _mix_kernel[(B * n_blocks,)](
            logits,
            bank,
            out,
            n,
            n_blocks,
            G=G,
            BLOCK=_MIX_BLOCK,
            ACC=tl_accumulation_dtype(logits.dtype),
            num_warps=4,
        )
    return out


def _launch_dynconv(
    src: torch.Tensor,
    dst: torch.Tensor,
    kernel: torch.Tensor,
    beta: Optional[torch.Tensor],
    flip: bool,
    plan: _Plan,
) -> None:
    """dst = the conv of src with the per-sample kernels [B, C, K, K] (`_mix`'s) and biases [B, C] (or none), on
    plan (src's conv pass)."""
    _, C, H, W = src.shape
    K = kernel.shape[-1]
    has_bias = beta is not None
    beta = beta if has_bias else kernel
    if plan.toeplitz:
        _launch_toeplitz_conv(src, dst, kernel, beta, has_bias, flip, plan)
        return
    with device_guard(src):
        _dynconv_kernel[plan.grid](
            src,
            dst,
            kernel,
            beta,
            C,
            H,
            W,
            *src.stride(),
            *dst.stride(),
            plan.n_cblocks,
            plan.n_chunks,
            plan.chunk_len,
            plan.zero_plane(src),
            K=K,
            FLIP=flip,
            HAS_BIAS=has_bias,
            ACC=tl_accumulation_dtype(src.dtype),
            **plan.constexprs(),
            **(NO_REGISTER_BUDGET if plan.index64 else {}),  # ptxas's budget spilled 4 B (Triton 3.6, sm_86)
        )


def _launch_toeplitz_conv(
    src: torch.Tensor,
    dst: torch.Tensor,
    kernel: torch.Tensor,
    beta: torch.Tensor,
    has_bias: bool,
    flip: bool,
    plan: _Plan,
) -> None:
    """`_launch_dynconv` on the tensor cores: a program per (sample, channel) plane, tiles of toeplitz_rows x 16."""
    B, C, H, W = src.shape
    K = kernel.shape[-1]
    vector = plan.toeplitz_vector
    tile = _toeplitz_tile(K, H, plan)
    acc = tl_accumulation_dtype(src.dtype)
    flags = torch.empty((B * C,), dtype=accumulation_dtype(src.dtype), device=src.device)
    arguments = (
        src,
        dst,
        kernel,
        beta,
        flags,
        C,
        H,
        W // vector,
        *_strides_in_vectors(src, vector),
        *_strides_in_vectors(dst, vector),
    )
    with device_guard(src):
        _toeplitz_conv_kernel[(B * C,)](
            *arguments,
            K=K,
            FLIP=flip,
            HAS_BIAS=has_bias,
            ACC=acc,
            **tile,
            num_warps=plan.settings.toeplitz_num_warps,
            num_stages=plan.settings.toeplitz_num_stages,
            **NO_REGISTER_BUDGET,  # ptxas's budget spilled 8 B beside the forward's bias (sm_90 3.8, sm_80 3.6)
        )
        # The planes with a non-finite output again, tap by tap: a flag load per plane where there is none, on one warp.
        _toeplitz_redo_kernel[(B * C,)](
            *arguments,
            K=K,
            FLIP=flip,
            HAS_BIAS=has_bias,
            ACC=acc,
            BLOCK_M=tile["BLOCK_M"],
            BLOCK_N=tile["BLOCK_N"],
            VECTOR=vector,
            num_warps=1,
        )


def _strides_in_vectors(t: torch.Tensor, vector: int) -> Tuple[int, int, int]:
    """t's batch, channel and row strides in loads of `vector` elements (`_Plan.toeplitz_vector` divides them)."""
    return tuple(st // vector for st in t.stride()[:3])


def _toeplitz_tile(K: int, H: int, plan: _Plan) -> dict:
    """The tensor-core kernels' tile: toeplitz_rows x 16 outputs; per output row its K kernel rows (padded to a power of
    2) times a window of input columns from LEAD before the tile, LEAD >= K // 2 a multiple of the loads' vector."""
    vector = plan.toeplitz_vector
    lead = cdiv(K // 2, vector) * vector
    block_n = 16  # the fewest output columns a tl.dot takes
    return dict(
        BLOCK_M=max(16, min(plan.settings.toeplitz_rows, next_power_of_2(H))),
        BLOCK_N=block_n,
        WINDOW=next_power_of_2(lead + block_n + K // 2),
        ROWS=next_power_of_2(K),
        LEAD=lead,
        VECTOR=vector,
    )


def _launch_mixing_plane_forward(
    x: torch.Tensor,
    out: torch.Tensor,
    kernels: torch.Tensor,
    kernel_logits: torch.Tensor,
    weight: torch.Tensor,
    bias_logits: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    plan: _Plan,
) -> None:
    """out = idconv(x) on whole planes (plan.plane), the kernels mixed into `kernels` by the same launch (contiguous
    logits and banks)."""
    C = x.shape[1]
    G, K = weight.shape[0], weight.shape[-1]
    has_bias = bias is not None
    constexprs = plan.constexprs()
    for name in ("INDEX64", "VEC", "STRIP"):  # whole planes only: int32 offsets, no chunks or strips
        constexprs.pop(name)
    with device_guard(x):
        _mixing_plane_forward_kernel[plan.grid](
            x,
            out,
            kernel_logits,
            weight,
            kernels,
            bias_logits if has_bias else weight,
            bias if has_bias else weight,
            C,
            *x.stride(),
            *out.stride(),
            plan.n_cblocks,
            plan.zero_plane(x),
            G=G,
            K=K,
            KK_PAD=plan.kk_pad,
            HAS_BIAS=has_bias,
            ACC=tl_accumulation_dtype(x.dtype),
            **constexprs,
        )


# ------------------------------------------------------------------------------- torch.library ops


@custom_op("transxnet_triton::idconv", mutates_args=())
def idconv_keeping_kernels(
    x: torch.Tensor,
    kernel_logits: torch.Tensor,
    weight: torch.Tensor,
    bias_logits: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    keep_kernels: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, kernels): the per-sample kernels [B, C, K, K] the conv ran with (accumulation dtype), kept for the
    backward's gx pass when keep_kernels (else empty), which then does not mix them again from the logits: one
    read of the logits (G·B·C·K² values) and one write of the kernels fewer per backward, for an activation of
    B·C·K² values (stage 4 at 224²: as many as the map, in fp32; 1.6% of it at stage 1)."""
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out, _kernels_buffer(x, weight, keep_kernels)
    kernel_logits, weight = kernel_logits.contiguous(), weight.contiguous()
    if bias is not None:
        bias_logits, bias = bias_logits.contiguous(), bias.contiguous()
    plan = _Plan(x, weight.shape[-1], conv=True, others=(out,))
    if plan.plane[1]:
        # Whole planes mix the kernels in the conv's launch (written once, kept or scratch; not read back from DRAM).
        kernels = _kernels_buffer(x, weight, True)
        _launch_mixing_plane_forward(x, out, kernels, kernel_logits, weight, bias_logits, bias, plan)
    else:
        # The per-sample kernels and biases, synthesized once per call (B·C·K² values) so that the conv's inner loop
        # loads one weight per tap rather than redoing the G-way softmax per tile.
        kernels = _mix(kernel_logits, weight)
        beta = _mix(bias_logits, bias) if bias is not None else None
        _launch_dynconv(x, out, kernels, beta, flip=False, plan=plan)
    return out, kernels if keep_kernels else _kernels_buffer(x, weight, False)


def _kernels_buffer(x: torch.Tensor, weight: torch.Tensor, keep_kernels: bool) -> torch.Tensor:
    """An (uninitialised) kernels output: [B, C, K, K] in the accumulation dtype when kept, else empty."""
    shape = (*x.shape[:2], *weight.shape[-2:]) if keep_kernels else (0,)
    return x.new_empty(shape, dtype=accumulation_dtype(x.dtype))


@idconv_keeping_kernels.register_fake
def _(x, kernel_logits, weight, bias_logits, bias, keep_kernels):
    return torch.empty_like(x), _kernels_buffer(x, weight, keep_kernels)


@ops.idconv.register("triton", supports=supports)
def idconv(x, kernel_logits, weight, bias_logits, bias):
    """idconv, keeping the per-sample kernels for the backward where autograd records a graph."""
    sources = (x, kernel_logits, weight, bias_logits, bias)
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources)
    return idconv_keeping_kernels(x, kernel_logits, weight, bias_logits, bias, keep)[0]


@custom_op("transxnet_triton::idconv_backward", mutates_args=())
def idconv_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    kernel_logits: torch.Tensor,
    weight: torch.Tensor,
    bias_logits: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    kernels: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads of x, kernel_logits, weight, bias_logits, bias (the last two empty without a bias). kernels: the
    forward's per-sample kernels, or None to mix them again."""
    B, C, H, W = x.shape
    G, K = weight.shape[0], weight.shape[-1]
    has_bias = bias is not None
    acc = accumulation_dtype(x.dtype)
    grad_x = torch.empty_like(x)
    grad_kernel_logits = torch.empty(kernel_logits.shape, dtype=kernel_logits.dtype, device=x.device)
    grad_bias_logits = torch.empty(
        (B, G, C) if has_bias else (0,), dtype=bias_logits.dtype if has_bias else x.dtype, device=x.device
    )
    if x.numel() == 0:
        grad_kernel_logits.zero_()
        grad_bias_logits.zero_()
        grad_weight = torch.zeros_like(weight)
        grad_bias = torch.zeros_like(bias) if has_bias else torch.empty((0,), dtype=x.dtype, device=x.device)
        return grad_x, grad_kernel_logits, grad_weight, grad_bias_logits, grad_bias
    kernel_logits, weight = kernel_logits.contiguous(), weight.contiguous()
    if has_bias:
        bias_logits, bias = bias_logits.contiguous(), bias.contiguous()

    if kernels is None:
        kernels = _mix(kernel_logits, weight)
    _launch_dynconv(grad_out, grad_x, kernels, None, flip=True, plan=_Plan(grad_out, K, conv=True, others=(grad_x,)))

    plan = _Plan(x, K, conv=False, others=(grad_out,))
    dk_part = torch.empty((plan.n_chunks, B, C, K * K), dtype=acc, device=x.device)
    dbeta_part = torch.empty((plan.n_chunks, B, C), dtype=acc, device=x.device)
    with device_guard(x):
        if plan.toeplitz:
            vector, tile = plan.toeplitz_vector, _toeplitz_tile(K, H, plan)
            rows = tile["ROWS"]
            band = torch.empty((B * C, rows * rows * tile["BLOCK_N"]), dtype=acc, device=x.device)
            _toeplitz_kernel_grad_kernel[(B * C,)](
                x,
                grad_out,
                dk_part,
                dbeta_part,
                band,
                C,
                H,
                W // vector,
                *_strides_in_vectors(x, vector),
                *_strides_in_vectors(grad_out, vector),
                K=K,
                ACC=tl_accumulation_dtype(x.dtype),
                **tile,
                num_warps=plan.settings.toeplitz_num_warps,
                num_stages=plan.settings.toeplitz_num_stages,
            )
        else:
            _kernel_grad_partial_kernel[plan.grid](
                x,
                grad_out,
                dk_part,
                dbeta_part,
                B,
                C,
                H,
                W,
                *x.stride(),
                *grad_out.stride(),
                plan.n_cblocks,
                plan.n_chunks,
                plan.chunk_len,
                K=K,
                KK_PAD=plan.kk_pad,
                ACC=tl_accumulation_dtype(x.dtype),
                **plan.constexprs(conv=False),
                # Whole planes hold the K^2 weight-gradient partials at once: ptxas's budget (72 registers on 2 warps)
                # spilled 16 B (fp16, 7 x 7, sm_80, Triton 3.8).
                **(NO_REGISTER_BUDGET if plan.plane[1] else {}),
            )
        # A [channels, taps] tile of at most 512 elements over 4 warps (4 per thread): the program holds G
        # bank-gradient sums and G bank values beside the G-way softmax chain. Static audit, Triton 3.8, H100 bf16,
        # stage 4: 8 warps on 1024 elements (G <= 2) or 512 (G > 2; 4 per thread had spilled 16-28 B at G = 4) ran
        # one or two programs per SM; T 6.3 -> 5.4 us, B 18.0 -> 14.4.
        chain_block_c = min(next_power_of_2(C), max(1, _CHAIN_TILE // plan.kk_pad))
        chain_cblocks = cdiv(C, chain_block_c)
        # Sample groups: the bank-gradient terms are summed over a program's samples, so fewer groups store fewer
        # partials; the group length balances the busiest SM against chain_programs (`balanced_batch_groups`).
        settings, sm_count = plan.settings, launch_target(x.device).sm_count
        groups, samples = balanced_batch_groups(
            B, chain_cblocks, settings.chain_programs, sm_count, settings.chain_prologue_samples
        )
        grad_weight_part = torch.empty((groups, G, C, K, K), dtype=acc, device=x.device)
        grad_bias_part = torch.empty((groups, G, C), dtype=acc, device=x.device)
        _softmax_chain_kernel[(groups * chain_cblocks,)](
            dk_part,
            dbeta_part,
            kernel_logits,
            weight,
            bias_logits if has_bias else weight,
            bias if has_bias else weight,
            grad_kernel_logits,
            grad_weight_part,
            grad_bias_logits if has_bias else grad_kernel_logits,
            grad_bias_part,
            B,
            C,
            chain_cblocks,
            plan.n_chunks,
            samples,
            G=G,
            K=K,
            KK_PAD=plan.kk_pad,
            BLOCK_C=chain_block_c,
            HAS_BIAS=has_bias,
            ACC=tl_accumulation_dtype(x.dtype),
            num_warps=_CHAIN_WARPS,
        )
    # Per-group terms summed over the groups by torch's (deterministic) reduction.
    grad_weight = grad_weight_part.sum(0).to(weight.dtype)
    if has_bias:
        grad_bias = grad_bias_part.sum(0).to(bias.dtype)
    else:
        grad_bias = torch.empty((0,), dtype=x.dtype, device=x.device)
    return grad_x, grad_kernel_logits, grad_weight, grad_bias_logits, grad_bias


@idconv_backward.register_fake
def _(grad_out, x, kernel_logits, weight, bias_logits, bias, kernels):
    has_bias = bias is not None
    return (
        torch.empty_like(x),
        torch.empty(kernel_logits.shape, dtype=kernel_logits.dtype, device=x.device),
        torch.empty(weight.shape, dtype=weight.dtype, device=x.device),
        torch.empty(
            bias_logits.shape if has_bias else (0,), dtype=bias_logits.dtype if has_bias else x.dtype, device=x.device
        ),
        torch.empty(bias.shape if has_bias else (0,), dtype=bias.dtype if has_bias else x.dtype, device=x.device),
    )


def _setup_context(ctx, inputs, output):
    x, kernel_logits, weight, bias_logits, bias, keep_kernels = inputs
    kernels = output[1] if keep_kernels else None
    ctx.has_bias = bias is not None
    if ctx.has_bias:
        ctx.save_for_backward(x, kernel_logits, weight, kernels, bias_logits, bias)
    else:
        ctx.save_for_backward(x, kernel_logits, weight, kernels)
    ctx.set_materialize_grads(False)  # the kernels' gradient: never used


def _autograd_rule(ctx, grad_out, _grad_kernels):
    if grad_out is None:  # an undefined output gradient (autograd may pass one; gradcheck checks it)
        return (None,) * 6
    if ctx.has_bias:
        x, kernel_logits, weight, kernels, bias_logits, bias = ctx.saved_tensors
    else:
        (x, kernel_logits, weight, kernels), bias_logits, bias = ctx.saved_tensors, None, None
    grads = idconv_backward(grad_out, x, kernel_logits, weight, bias_logits, bias, kernels)
    return (*grads, None) if ctx.has_bias else (*grads[:3], None, None, None)


idconv_keeping_kernels.register_autograd(_autograd_rule, setup_context=_setup_context)
