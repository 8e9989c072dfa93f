"""Triton multi-scale depthwise conv and the fused MS-FFN middle.

Math (x: [B, C, H, W]; channel groups g = consecutive channel ranges, group g has an odd kernel k_g,
radius r_g = k_g // 2, weights w_g [c_g, 1, k_g, k_g], bias b_g [c_g]):

    conv(x)[b, c, h, w] = bias[c] + sum_{i,j < k} W[c, i, j] * x[b, c, h + i - r, w + j - r]   (zero padding)
    multiscale_dwconv(x) = conv(x)
    ms_ffn_middle(x)     = BN(y),  y = GELU(z),  z = conv(x) + x
    BN(y) = (y - mean) * rstd * gamma + beta; training: batch mean / biased variance over (B, H, W),
            running_var updated with the unbiased variance; eval: running statistics.

Backward (dz = dL/dz):
    dy      = gamma * rstd * (go - mean(go) - xhat * mean(go * xhat))   (training; eval drops the means)
    dz      = dy * GELU'(z)
    dx      = conv_transpose(dz) + dz       = sum_{i,j} W[c, i, j] * dz[h - i + r, w - j + r] + dz
    dW[c,i,j] = sum_{b,h,w} dz * x[b, c, h + i - r, w + j - r],   dbias[c] = sum dz
    dgamma  = sum go * xhat,  dbeta = sum go

Kernels. One launch covers every group: the per-group weights are packed inside the ops (which take the groups'
tensors and return their gradients, so autograd records one node per call) into a zero-padded table [C, kmax^2] by
`_pack_kernel` (one launch for up to four groups, where pads and cats took six); a small "block table" lists
channel blocks that never straddle a group, each with its kernel size k. The stencil helpers hold one
compiled copy per odd kernel size up to kmax and branch (uniformly over the program) to the block's:
k rows as a runtime loop, a row's k taps unrolled, so a tap's offset and column mask are compile-time
shifts of the tile's (the column masks are computed once per tile) and a block runs exactly k^2 taps,
never kmax^2. A program owns one channel block x one spatial tile and loops over a range of the
batch; per-channel reductions (BN statistics, dW, dbias) are
written as per-program partials and summed afterwards in a fixed order (deterministic, no atomics anywhere): dW
and dbias by torch, then unpacked into each group's gradient by `_pack_kernel` (`_group_gradients`); the forward's
BN statistics with BN's affine map by `_batch_norm_affine_kernel` (one launch, where torch took ~15 small ones) and
the running statistics' update by `_running_statistics_kernel` (one, where torch took nine); the backward's BN sums
with its per-channel coefficients by `_batch_norm_grad_kernel` (two launches, where torch took ~12). A training
call of `ms_ffn_middle` (forward + backward) on a GPU launches two torch kernels besides ours (the partial sums of
dW and dbias), where it launched ~40.
Layouts: any strides; on GPUs contiguous NCHW tiles one channel x a long run of pixels, channels_last tiles
up to 32 contiguous channels x a few pixels. Base pointers move in int64 per image; in-image offsets
are int32 unless one image spans >= 2^31 elements. fp16/bf16/fp32 accumulate in fp32, fp64 in fp64.

Stencils. Where each row is contiguous and W, the row/channel/batch strides are multiples of 4 (NCHW at T/S/B stages
1-2: W = 56, 28; `_vectorisable`), a thread owns chunks of 4 pixels of a row and per kernel row loads its chunk and
both neighbours (3 vector loads, masks per chunk). There the stencil passes run the strip kernels
(`_strip_forward_kernel`, `_strip_dz_kernel`, `_strip_dx_kernel`; `Settings.strip_rows`): a program per (strip of 4
rows x block of 8 chunks of a row, channel block of one kernel size, batch split), one launch per kernel size, a
thread owning one chunk in each of the strip's rows. `_dwconv_strip_vec_k` loads the K^2 taps once and each of the 4
+ K - 1 input rows once, adding it into every output row it reaches as FMAs between registers (the residual from the
same rows); `_wgrad_strip_rows_k` multiplies each x row once into K^2 per-thread dW partials (the dz pass from its
dz still in registers, unrounded), reduced across threads once per program (`_tap_totals`). The middle's backward
from the saved z on contiguous maps whose rows a program covers whole (W <= 64) runs dz, dx and dW in one pass per
kernel size (`_strip_dz_dx_kernel`, as `_strip_eval_kernel` does the eval forward: each thread computes its own
chunks of dz into its program's slot, the stencil and dW read them back), where `_strip_dz_kernel` stored dz for
`_strip_dx_kernel` to read. The passes without a
stencil (`_APPLY_SAVED`, training's statistics pass) keep the chunked tiles, as do all passes with strip_rows = 0:
`_dwconv_tile_vec_k` runs a kernel row's K taps on the 12 loaded registers and `_wgrad_tile_vec_k` keeps one
per-thread partial per tap. Planes of at most 16 x 16 (`Settings.plane_max`; stages 3-4 at 224^2, either layout) run
the whole-plane stencil `_dwconv_plane_k`: a thread owns one channel's column and all H of its outputs; per kernel
column it loads the shifted column once (H loads, one mask) and adds its K vertical taps to every output row as FMAs
between registers, rows outside the image skipped at compile time; one launch per kernel size (KMAX is the block's k,
heaviest first), the residual taken from the centre column. Where every map of the pass has contiguous rows (NCHW:
`_dense_rows`, the plan's plane_dense) its loads are unmasked at compile-time row offsets: a column's lanes outside the
image read a kept plane of zeros (`_Plan.zero_plane`, one pointer select per column shift) where a masked load paid an
instruction to zero its register, exact zero padding whatever the map holds; and a pass that only convolves (the
multi-scale forward, the dx passes, IDConv's) stores row by row from the stencil's row tiles
(`_dense_plane_conv_store`: one mask for all rows, compile-time offsets) where the [channels, plane] tile cost
per-element offsets, masks and registers. Their weight gradient (`_wgrad_plane_k`) sweeps the
program's images again after its per-image loop: per image the thread's own g column once and each shifted x column once
(read again; L2 should hold them), into K^2 per-thread partials held across the images, one cross-column sum per tap at
the end. The middle's backward from the saved z runs dz, dx and dW there in one pass per kernel size too
(`_plane_dz_dx_kernel`: each thread computes its column's dz into its program's slot, fp32, and takes dW from it; the
dense stencil reads the slot back after a barrier), where the dz pass stored dz (fp32 for half x: rounded, the
BatchNorm-cancelling dW sums missed the fp16 tolerance) and swept it again for dW, and the dx pass read it back.
Thread planes
(`Settings.thread_plane_pixels`: planes of at most 64 pixels, so stage 4 at 224^2, 7 x 7, int32 offsets, either layout):
the forward passes with a stencil (`_thread_plane_forward_kernel`) and the dx pass with or without the weight gradient
(`_thread_plane_dx_kernel`) give each thread a whole (channel, image) plane. It loads the plane once and computes every
output from registers, taps outside the image skipped at compile time in both directions (at 7 x 7 with K = 7, 28 FMAs
per output on average against 49; the column-per-thread plane stencil loads every value K times and keeps the column
taps), and the taps stay in registers across the program's images. Per-channel sums (BN statistics, dW, dbias) stay in
the thread: its channel's partial, no reduction across threads. `ms_ffn_middle_eval` there is one pass (`_EVAL`: fc1's
GELU and BatchNorm applied once to each loaded value, as no other thread needs it); on dense whole planes (stage 3) one
pass too (`_plane_eval_kernel`: each thread maps its own column once into its program's slot, which the stencil reads
back after a barrier), and so on NCHW strips at stages 1-2 (`_strip_eval_kernel`: a program covers whole rows and
walks down its image's strips, mapping each input row once). For fp16/bf16 maps the middle's dz
pass from the saved z (`_thread_plane_dz_kernel`) computes a thread's dz pixel by pixel from z and go, stores it and
keeps it in registers (unrounded) for the weight gradient's K^2 per-thread sums against the x plane: no barrier, no read
of dz back, dz in x's dtype, then `_thread_plane_dx_kernel` reads it; fp32 keeps the one-pass whole-plane kernel
(_THREAD_PLANE_DZ_MAX_ELEMENT_SIZE). The strip stencils serve IDConv at stages 1-2 too.
Elsewhere (channels_last, larger planes, K > 9) each tap is one predicated load and one FMA per output element
(`_dwconv_tile_k`, `_wgrad_tile_k`; about 8 issued instructions per tap and output on sm_90).

Passes over the big tensor (one pass = B*C*H*W elements read or written; e = element size):
    multiscale_dwconv  forward  read x, write out                                   2 passes
                       backward read go, x; write dx (dW fused into the dx pass)     3 passes
                                (thread planes: read go, write dx; read go, x         4 passes)
    ms_ffn_middle      forward  eval:  read x, write out                            2 passes
                                train (and eval with gradients): read x, write
                                       z = conv(x) + x (+ stats partials in
                                       training); read z, write out                 4 passes
                       backward eval:  read z, go, x; write dz (+dW, dgamma, dbeta);
                                       read dz, write dx                            6 passes
                                train: read z, go (BN grad sums), then as eval      8 passes
                                (contiguous whole-row strips, stages 1-2, and whole
                                planes, stages 3-4 where no thread plane runs: eval
                                read z, go, x; write dx (+dW, dgamma, dbeta), the
                                slots' dz written and read back once: 4 passes;
                                train 6)
    ms_ffn_middle_eval forward (inference): read x, write y = GELU(x) * s + t;
                                read y, write out (see ms_ffn_middle_eval)          4 passes
                                (thread planes: read x, write out                    2 passes;
                                NCHW whole planes and whole-row strips: read x,
                                write out, each program's slot for y written
                                back once               2 + (slot rows / rows) / images per program)
    Whole planes (H, W <= 16) add the weight gradient's second sweep over their program's images (x and go or
    dz again, L2-resident if the program's images fit) and, for half x, keep the middle's dz in fp32 (the dz
    write and the dx pass's read: one pass more each) where the middle's dz pass recomputes z.
    A training step runs the conv stencil once (forward) and the dW and dx stencils: z is saved in x's dtype
    instead of recomputed in the normalising pass and in the backward (four conv stencils in training before,
    two in eval with gradients), one pass more each way, because the stencils, not DRAM, bound these kernels
    (static audit, T stage 1 bf16 training on an H100: forward + backward 3550 -> 2505 µs when it was made). It
    costs one x-sized activation per MS-FFN while gradients are recorded (TransXNet-T, batch 128, bf16: 1.2 GB
    over its 18 blocks).
    The eager sequence (split, 4 convs, cat, add, GELU, BN) needs ~12 passes forward and ~20 backward.
    Minimal bytes: forward 2*N*e, forward+backward 5*N*e (x, out, go, dx, and x again for dW
    are unavoidable without keeping a tile of dz on chip across halo'd neighbours), N = B*C*H*W.
    Where the stencil is large (K = 7) the passes are bound by instruction issue rather than DRAM traffic, which is
    what the stencil forms above are built against; design choices the static audit weighed (each change's estimates
    before and after are in benchmarks/results/README.md):
    * the strip and whole-plane passes load the K^2 taps before the batch loop (`_stencil_taps`): the loop's stores
      may alias the weights, so the compiler reloaded every tap per image (147 of the K = 7 bf16 strip forward's
      1250 instructions per image and thread on sm_90);
    * the whole-plane weight gradient takes all K^2 partials per thread in one sweep over the program's images, not
      one sweep per kernel column, each of which reloaded the g column;
    * the thread-plane passes run four warps per SM, one per scheduler, and split the batch to balance the busiest
      SM (`Settings.thread_plane_warps`, `balanced_batch_groups`); one-warp programs left half the schedulers idle;
    * the exact GELU's erf is a rational form (`_normal_cdf`: 19 issued instructions per GELU on sm_90 on fp32 maps,
      13 on fp16 / bf16 maps with a shorter fit still ~100x below their rounding, against ~36 for libdevice's erf;
      GELU' takes its exponential as one FFMA into the SFU's ex2, `_gelu_grad`), and the training backward keeps its
      per-channel sums per thread until the end of the program (`_middle_grad_kernel`);
    * the passes without a stencil (training's normalising pass from z and BatchNorm-gradient sums, the two-launch
      eval's first map) take NCHW tiles of 64-pixel runs x 16 channels at stages 1-2 (`_nchw_tile`): in runs of the
      whole tile 23% of their lanes were past the plane, and the 16-bit passes are bound by issue (T stage 1 bf16 on
      an H100: training forward 288.4 -> 279.2 µs, backward 501.7 -> 468.5); at stages 3-4 on each plane as one run of
      H·W pixels (`_flat_planes`; 14 x 14 then moves in 4-pixel vectors) in one launch, where they ran on whole
      planes, a thread per column and a launch per kernel size (T stage 3 bf16 training on an H100: forward + backward
      228.4 -> 222.1 µs);
    * the training backward's dz and dx passes on stages 1-2 (NCHW, whole rows) are one (`_strip_dz_dx_kernel`):
      dz neither written nor read back, 8 passes -> 6 (T stage 1 on an H100: fp32 743.2 -> 605.4 µs, bf16 468.5 ->
      422.6; A100 fp32 1243.3 -> 1013.7; details in benchmarks/results/README.md); so are they on whole planes
      (`_plane_dz_dx_kernel`, stage 3, and stage 4 in fp32: T stage 3 on an H100 fp32 225.4 -> 179.5 µs, bf16 187.4
      -> 149.6; stage 4 fp32 117.8 -> 94.6), on rows contiguous in every map at compile-time row offsets (a 64-bit
      pointer per row made its 16-bit k = 7 variant spill on sm_90);
    * the BatchNorm affine map runs in tiles of 32 partial rows x 32 channels (one program sweeping the partial rows
      one at a time was a tail of its own at T's stage 1).

Static audit of `multiscale_dwconv` (`python -m benchmarks.audit_tables` writes this table from gpu_audit_3.8.0.json:
Triton 3.8.0, batch 128 at 224x224, the worst over layouts and modes; estimate / DRAM roofline, µs):

    stage  shape       phase     fp32 A100  fp32 H100  bf16 A100  bf16 H100
    T1     192x56x56   forward   309/308    185/184    206/154    131/92.0
    T1     192x56x56   backward  496/462    306/276    379/231    242/138
    T2     384x28x28   forward   155/154    94.1/92.0  107/77.1   67.8/46.0
    T2     384x28x28   backward  255/231    161/138    200/116    130/69.0
    T3     896x14x14   forward   91.4/89.9  54.8/53.7  59.3/45.0  39.2/26.8
    T3     896x14x14   backward  151/135    95.5/80.5  122/67.4   84.6/40.3
    T4     1792x7x7    forward   46.8/45.0  28.1/26.8  25.8/22.5  16.4/13.4
    T4     1792x7x7    backward  102/67.4   62.8/40.3  58.9/33.7  37.9/20.1
    S1     384x56x56   forward   618/617    370/368    411/308    261/184
    S1     384x56x56   backward  992/925    609/552    757/462    482/276
    S2     768x28x28   forward   310/308    185/184    206/154    131/92.0
    S2     768x28x28   backward  496/462    306/276    379/231    242/138
    S3     1280x14x14  forward   130/128    77.9/76.7  83.4/64.2  53.1/38.3
    S3     1280x14x14  backward  211/193    130/115    168/96.3   110/57.5
    S4     2048x7x7    forward   53.3/51.4  32.0/30.7  28.3/25.7  17.6/15.3
    S4     2048x7x7    backward  117/77.1   71.5/46.0  66.0/38.5  41.8/23.0
    B1     608x56x56   forward   978/976    590/583    645/488    421/291
    B1     608x56x56   backward  1546/1464  970/874    1171/732   776/437
    B2     1216x28x28  forward   490/488    297/291    324/244    213/146
    B2     1216x28x28  backward  779/732    492/437    592/366    396/219
    B3     1344x14x14  forward   137/135    81.7/80.5  89.4/67.4  55.9/40.3
    B3     1344x14x14  backward  223/202    139/121    181/101    119/60.4
    B4     2688x7x7    forward   69.6/67.4  41.8/40.3  37.7/33.7  23.6/20.1
    B4     2688x7x7    backward  149/101    91.4/60.4  83.1/50.6  55.7/30.2

Static audit of `ms_ffn_middle` (`python -m benchmarks.audit_tables` writes this table from gpu_audit_3.8.0.json: Triton
3.8.0, batch 128 at 224x224, the worst over layouts and modes; estimate / DRAM roofline, µs):

    stage  shape       phase     fp32 A100  fp32 H100  bf16 A100  bf16 H100
    T1     192x56x56   forward   645/308    390/184    424/154    265/92.0
    T1     192x56x56   backward  1006/462   601/276    662/231    396/138
    T2     384x28x28   forward   326/154    198/92.0   219/77.1   136/46.0
    T2     384x28x28   backward  513/231    307/138    341/116    204/69.0
    T3     896x14x14   forward   194/89.9   121/53.7   138/45.0   91.2/26.8
    T3     896x14x14   backward  288/135    178/80.5   196/67.4   131/40.3
    T4     1792x7x7    forward   92.4/45.0  55.7/26.8  56.3/22.5  35.9/13.4
    T4     1792x7x7    backward  151/67.4   93.9/40.3  110/33.7   70.2/20.1
    S1     384x56x56   forward   1287/617   780/368    844/308    529/184
    S1     384x56x56   backward  1998/925   1193/552   1312/462   784/276
    S2     768x28x28   forward   645/308    390/184    423/154    264/92.0
    S2     768x28x28   backward  1010/462   605/276    667/231    400/138
    S3     1280x14x14  forward   275/128    168/76.7   193/64.2   122/38.3
    S3     1280x14x14  backward  405/193    247/115    268/96.3   173/57.5
    S4     2048x7x7    forward   105/51.4   63.3/30.7  60.2/25.7  37.7/15.3
    S4     2048x7x7    backward  169/77.1   104/46.0   123/38.5   77.3/23.0
    B1     608x56x56   forward   2035/976   1245/583   1330/488   850/291
    B1     608x56x56   backward  3101/1464  1901/874   1983/732   1268/437
    B2     1216x28x28  forward   1019/488   625/291    668/244    429/146
    B2     1216x28x28  backward  1563/732   959/437    1005/366   643/219
    B3     1344x14x14  forward   292/135    177/80.5   207/67.4   130/40.3
    B3     1344x14x14  backward  427/202    262/121    291/101    185/60.4
    B4     2688x7x7    forward   138/67.4   82.9/40.3  81.6/33.7  50.6/20.1
    B4     2688x7x7    backward  220/101    138/60.4   156/50.6   104/30.2

Static audit of `ms_ffn_middle_eval` (`python -m benchmarks.audit_tables` writes this table from gpu_audit_3.8.0.json:
Triton 3.8.0, batch 128 at 224x224, the worst over layouts and modes; estimate / DRAM roofline, µs):

    stage  shape       phase    fp32 A100  fp32 H100  bf16 A100  bf16 H100
    T1     192x56x56   forward  402/308    235/184    400/154    213/92.0
    T2     384x28x28   forward  205/154    120/92.0   206/77.1   109/46.0
    T3     896x14x14   forward  108/89.9   68.7/53.7  91.0/45.0  61.8/26.8
    T4     1792x7x7    forward  51.0/45.0  31.3/26.8  42.5/22.5  27.1/13.4
    S1     384x56x56   forward  800/617    465/368    798/308    421/184
    S2     768x28x28   forward  405/308    237/184    400/154    214/92.0
    S3     1280x14x14  forward  151/128    93.5/76.7  128/64.2   82.2/38.3
    S4     2048x7x7    forward  54.7/51.4  33.3/30.7  42.5/25.7  27.1/15.3
    B1     608x56x56   forward  1197/976   753/583    1257/488   694/291
    B2     1216x28x28  forward  606/488    382/291    631/244    352/146
    B3     1344x14x14  forward  162/135    98.7/80.5  139/67.4   86.2/40.3
    B4     2688x7x7    forward  73.8/67.4  44.5/40.3  60.1/33.7  37.3/20.1
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .. import ops
from ..layout import channels_last_input
from ..library import custom_op
from .common import INTERPRETED as _INTERPRETED
from .common import (
    NO_REGISTER_BUDGET,
    LaunchTarget,
    accumulation_dtype,
    balanced_batch_groups,
    cdiv,
    device_guard,
    fewest_batch_groups,
    keep_bounded,
    kept_filled,
    kept_scalar,
    launch_settings,
    launch_target,
    needs_int64,
    next_power_of_2,
    supports,
    tl_accumulation_dtype,
)


@dataclass(frozen=True)
class Settings:
    """Launch settings (override with common.launch_overrides).

    tile_elements: elements of one program's [channels, positions] tile; target_programs: programs a launch should have
    (as the split rounds) once the batch is split across programs, the split's length balancing the busiest of the
    launch target's SMs (`balanced_batch_groups`, each program charged prologue_images images' worth for its setup: a
    rough figure; the SASS outside the image loop issues 0.15-2x one trip of it). The dx pass on thread planes that also
    sums the weight gradient keeps the fewest splits: its partials, [splits, C, K^2], are summed afterwards, and
    balanced (43 splits, not 26) they made B stage 4's bf16 multiscale_dwconv backward ~10% slower. max_channel_block:
    channels of a channels_last tile; nchw_channel_block: most channels of a contiguous-NCHW tile (they fill what a
    plane leaves of the tile); plane_max: the largest H and W the whole-plane stencil runs (0: never); plane_columns:
    (channel, column) pairs of a whole-plane tile, one per thread on GPUs; strip_rows: output rows of a strip program
    where the chunked stencils apply (0: the chunked tiles instead); strip_chunks: (channel, chunk of 4 pixels) pairs of
    a strip program, one per thread; strip_row_chunks: most chunks of a row a strip program covers (wider rows take
    several column blocks; 8 serves W = 28 and 56 with one compiled kernel, and a block costs no extra loads: every
    chunk reads both neighbours); whole_row_chunks: most chunks of a row (padded to a power of 2) a one-pass eval strip
    program covers (`_strip_eval_kernel` takes whole rows: W <= 64, stages 1-2 at 224^2; wider rows run
    ms_ffn_middle_eval's two launches); wgrad_strip_rows: at most this many rows in the dx pass that also accumulates
    the weight gradient, for fp32 and fp64 maps (its K^2 per-thread partials beside the stencil's taps and accumulators:
    8 rows spilled 4 B at K = 7 in fp32 on sm_90 under Triton 3.6; 6 rows take 245 registers there), binding where
    strip_rows is larger; one_pass_k7_strip_rows: at most this many rows in the one-pass backward's strips
    (`_strip_dz_dx_kernel`) at K >= 7 for fp32 and fp64 maps (beside its 49 taps and 49 dW partials, 4-row strips
    spilled 24-68 B in fp32 on sm_90; 2 rows take 247 registers there). strip_rows is 4, not 8: the strips are unrolled
    (STRIP + K - 1 input rows), and at 8 the k = 7 kernels took 20-35 s each to compile for sm_90, a GPU's first call
    paying them one after another; at 4 the strip kernels of T's training middle at stages 1-2 compile in 41-45% of the
    time (bf16 145 -> 60 s, fp32 149 -> 67 s on this project's 2-core machine) with fewer registers, for static
    estimates (Triton 3.8, H100) 0.95-1.09x those at 8 rows at the 224^2 stages 1-2 of T/S/B, up to 1.22x for the
    fp16/bf16 multiscale_dwconv backward at 800x1216 (not yet measured on a GPU). thread_plane_pixels: the forward
    passes with a stencil run on planes of at most this many pixels with a thread per channel plane
    (_thread_plane_forward_kernel; 0: never; 64 takes 7 x 7, stage 4 at 224^2, and 8 x 8), at most thread_plane_channels
    channels per program, and before the batch is split, programs of thread_plane_warps warps in all per launch (four
    per SM on GPUs, one per scheduler: programs of one warp, B's stage 4, were two per SM, leaving half the schedulers
    idle; the static estimates, Triton 3.8, before the balanced splits, of the B stage-4 bf16 multiscale_dwconv forward
    drop 35.0 -> 24.9 us on an H100 and of the MS-FFN middle 85.8 -> 65.1; at eight per SM the T and S stage-4 bf16
    backward estimate up to 1.8x more, and the audit models no latency that more warps would hide). affine_channels,
    affine_rows: the BatchNorm kernels' (the affine map, the running statistics, the backward's sums and coefficients)
    channels per program and partial rows per tile (on GPUs a warp's 32 contiguous channels x 32 rows: a program per 32
    channels, ~7 tiles per sweep at T's stage 1, where one program of all 192 channels swept the 196 partial rows one at
    a time). min_nchw_run: where set (GPUs), the passes without a stencil take NCHW tiles of the run of pixels, at least
    this long, that pads the plane least (`_nchw_tile`). On GPUs: small tiles, enough programs to fill the SMs several
    times over, NCHW tiles of one channel (a long coalesced run of pixels). Triton's interpreter runs programs one after
    another at ~0.7 ms per tile operation whatever the tile's size, so there few large programs are fastest: small NCHW
    planes share a tile (one channel per program made the whole-model training test 20 minutes)."""

    tile_elements: int
    target_programs: int
    max_channel_block: int = 32
    nchw_channel_block: int = 1
    plane_max: int = 16
    plane_columns: int = 64
    strip_rows: int = 4
    strip_chunks: int = 64
    strip_row_chunks: int = 8
    whole_row_chunks: int = 16
    wgrad_strip_rows: int = 6
    one_pass_k7_strip_rows: int = 2
    thread_plane_pixels: int = 64
    thread_plane_channels: int = 128
    thread_plane_warps: int = 1
    affine_channels: int = 1024
    affine_rows: int = 64
    prologue_images: float = 1.0
    min_nchw_run: int = 0

    @classmethod
    def for_target(cls, target: LaunchTarget) -> Settings:
        if target.interpreted:
            return cls(
                tile_elements=4096,
                target_programs=1,
                nchw_channel_block=32,
                plane_columns=512,
                strip_chunks=512,
                thread_plane_channels=512,
            )
        return cls(
            tile_elements=1024,
            target_programs=8 * target.sm_count,
            thread_plane_warps=4 * target.sm_count,
            affine_channels=32,
            affine_rows=32,
            min_nchw_run=64,
        )


# Forward kernel modes (see _forward_kernel; _EVAL, ms_ffn_middle_eval in one pass, only on thread planes).
_CONV, _APPLY, _STATS, _APPLY_SAVED, _PREACT, _EVAL = 0, 1, 2, 3, 4, 5


@triton.jit
def _normal_cdf(z, NARROW: tl.constexpr):
    """Phi(z) = (1 + erf(z / sqrt(2))) / 2, the exact GELU's: GELU(z) = z Phi(z). scripts/fit_gelu_erf.py fits the
    rational forms; the GELU epilogues, not DRAM, bound the MS-FFN passes, hence no libdevice erff (~30 instructions on
    sm_90: it selects one of two coefficient sets per element with predicated MOVs). fp64 maps: libdevice's erf.
    fp32 maps: the C++ kernels' form (csrc/kernels.h `gelu_erf`; a test pins the two sets of coefficients equal), erf =
    z P(z^2) / Q(z^2), P of degree 6 and Q of 4, on z clamped to +-5.8 and the result clamped to [-1, 1]: |erf error|
    <= 3.8e-7, exactly +-1 in the tails. NARROW (fp16 / bf16 maps, computed in fp32 and stored in 16 bits): P and Q of
    degree 3 with Phi's 1/2 folded into P, on z clamped to +-4.6787, where the form reaches erf = 1 (so no result
    clamp): |erf error| <= 2.9e-6, ~100x below an fp16 map's rounding of GELU(z) for z > 0 (an absolute 1.5e-6 |z| in
    the left tail), in 13 instructions per GELU on sm_90 against 19. Divisions approximate (~2 ulp, libdevice's
    fast_dividef: Q >= 1 needs no range fix-up)."""
    if z.dtype == tl.float64:
        return 0.5 * tl.erf(z * 0.70710678118654752440) + 0.5
    elif NARROW:
        zc = tl.clamp(z, -4.6787, 4.6787)
        v = zc * zc
        p = 3.286040737e-05 * v + 3.811840666e-03
        p = p * v + 2.740938403e-02
        p = p * v + 3.989391625e-01
        q = 1.155900070e-03 * v + 2.376504615e-02
        q = q * v + 2.353669107e-01
        q = q * v + 1.0
        return _fast_divide(zc * p, q) + 0.5
    else:
        zc = tl.clamp(z, -5.8, 5.8)
        v = zc * zc
        p = 2.201084176e-10 * v - 4.406808074e-08
        p = p * v + 6.584054972e-06
        p = p * v + 3.511301766e-04
        p = p * v + 9.085664526e-03
        p = p * v + 7.286975533e-02
        p = p * v + 7.978842854e-01
        q = 6.400325219e-05 * v + 1.861072727e-03
        q = q * v + 2.939036861e-02
        q = q * v + 2.579930723e-01
        q = q * v + 1.0
        return 0.5 * tl.clamp(zc * _fast_divide(p, q), -1.0, 1.0) + 0.5


@triton.jit
def _fast_divide(p, q):
    if _INTERPRETED:
        return p / q
    else:
        return libdevice.fast_dividef(p, q)


@triton.jit
def _gelu(z, NARROW: tl.constexpr):
    """NARROW: z comes from (and GELU(z) goes to) an fp16 / bf16 map, see `_normal_cdf`."""
    return z * _normal_cdf(z, NARROW)


@triton.jit
def _gelu_grad(z, NARROW: tl.constexpr):
    """GELU'(z) = Phi(z) + z phi(z), phi(z) = exp(-z^2 / 2) / sqrt(2 pi), below fp64 taken as 2^(-z^2 log2(e) / 2 -
    log2(sqrt(2 pi))): one FFMA into the SFU's exponential, where tl.exp's 2^(x log2 e) with the 1/sqrt(2 pi) after
    it issued 4 FMULs and a range test more (`_exp2_approx`)."""
    if z.dtype == tl.float64:
        return _normal_cdf(z, NARROW) + z * tl.exp(-0.5 * z * z) * 0.39894228040143267794
    else:
        return _normal_cdf(z, NARROW) + z * _exp2_approx(z * z * -0.72134752044448170368 - 1.32574806473616)


@triton.jit
def _exp2_approx(x):
    """2^x (fp32) by the SFU's ex2.approx.ftz (~2 ulp; a result below 2^-126 flushes to zero, which GELU' only meets
    past |z| ~ 13, where z phi(z) < 1e-36): tl.exp2's non-ftz form adds a range test and two FMULs around it."""
    if _INTERPRETED:
        return tl.exp2(x)
    else:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def _tap_row(c_base, h, w, pmask, di, stride_h, stride_w, H):
    """Row di of a tile's taps: per channel, pointers to (h + di, w), and which tile pixels have that row
    inside the image."""
    hh = h + di
    return c_base + (hh * stride_h + w * stride_w)[None, :], pmask & (hh >= 0) & (hh < H)


@triton.jit
def _tap_mask(cmask, h_ok, w, dj, W):
    """The mask of the tap at column shift dj in a row whose in-image pixels are h_ok. dj is a compile-time
    shift, so the column part is computed once per tile, outside the row loop."""
    return cmask[:, None] & (h_ok & (w + dj >= 0) & (w + dj < W))[None, :]


@triton.jit
def _dwconv_tile_k(
    src,
    weight_ptr,
    cs,
    cmask,
    h,
    w,
    pmask,
    stride_c,
    stride_h,
    stride_w,
    H,
    W,
    K: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """sum_{i,j<K} W[c,i,j] * src[c, h+i-r, w+j-r] (TRANSPOSE: src[c, h-i+r, w-j+r]) over one tile, for a
    kernel size known at compile time: rows are a runtime loop, a row's K taps unrolled, so a tap's
    column offset and column mask are compile-time shifts of the tile's (hoisted out of the row loop)."""
    R: tl.constexpr = K // 2
    acc = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    c_src = src + cs[:, None] * stride_c
    w_row = weight_ptr + cs * KK_STRIDE
    for i in range(0, K):
        if TRANSPOSE:
            row, h_ok = _tap_row(c_src, h, w, pmask, R - i, stride_h, stride_w, H)
        else:
            row, h_ok = _tap_row(c_src, h, w, pmask, i - R, stride_h, stride_w, H)
        for j in tl.static_range(K):
            if TRANSPOSE:
                dj = R - j
            else:
                dj = j - R
            tap = tl.load(w_row + (i * K + j), mask=cmask, other=0.0).to(ACC)
            v = tl.load(row + dj * stride_w, mask=_tap_mask(cmask, h_ok, w, dj, W), other=0.0).to(ACC)
            acc += tap[:, None] * v
    return acc


@triton.jit
def _multiple_of_4(n):
    """n, a multiple of 4 (the launcher checks it: _vectorisable), restated as one, so that Triton's divisibility
    analysis proves the alignment of the 4-pixel chunks addressed with it and moves them in vectors (without
    this the chunk loads stay scalar and go through shared memory)."""
    return n // 4 * 4


@triton.jit
def _chunk_strides(stride_b, stride_c, stride_h):
    """A tensor's batch, channel and row strides, each _multiple_of_4."""
    return _multiple_of_4(stride_b), _multiple_of_4(stride_c), _multiple_of_4(stride_h)


@triton.jit
def _lanes(t, BLOCK_C: tl.constexpr, CHUNKS: tl.constexpr):
    """The four lanes of a [BLOCK_C, CHUNKS, 4] tile, each [BLOCK_C, CHUNKS] (lane l = element l of every
    chunk; the lane axis is within a thread, so this moves no data)."""
    even, odd = tl.split(tl.reshape(t, [BLOCK_C, CHUNKS, 2, 2]))
    l0, l2 = tl.split(even)
    l1, l3 = tl.split(odd)
    return l0, l1, l2, l3


@triton.jit
def _chunk_coords(q0, q_end, W, CHUNKS: tl.constexpr):
    """Chunks q0 .. q0 + CHUNKS of 4 pixels of a plane of width W (a multiple of 4; chunk q holds pixels 4q ..
    4q + 3, all in one row): row, chunk column, mask (q < q_end), and whether the chunks to the left and right
    are in the row. The chunked path runs with int32 in-plane offsets only."""
    W4 = W // 4
    q = q0 + tl.arange(0, CHUNKS)
    wq = q % W4
    return q // W4, wq, q < q_end, wq >= 1, wq + 1 < W4


@triton.jit
def _row_lanes(
    src,
    c_chunks,
    hh,
    wq,
    cmask,
    qmask,
    left_ok,
    right_ok,
    H,
    stride_h,
    R: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    """Row hh around each chunk: pixels -4 .. 7 relative to the chunk's first, as 12 lane tiles [BLOCK_C, CHUNKS]
    (zero outside the image), from three vector loads: the chunk and its neighbours (only the chunk when R = 0;
    then entries 4 .. 7 are its pixels and 0 .. 3 repeat the first). Offsets are written as 4 * (chunk offset)
    + lane, so Triton can prove the 4-element alignment it vectorises on; c_chunks is the channels' offset in
    chunks."""
    row_ok = cmask[:, None] & (qmask & (hh >= 0) & (hh < H))[None, :]
    lane = tl.arange(0, 4)
    ptrs = src + ((c_chunks + (hh * (stride_h // 4) + wq)[None, :]) * 4)[:, :, None] + lane[None, None, :]
    c0, c1, c2, c3 = _lanes(tl.load(ptrs, mask=row_ok[:, :, None], other=0.0).to(ACC), BLOCK_C, CHUNKS)
    if R > 0:
        left = tl.load(ptrs - 4, mask=(row_ok & left_ok[None, :])[:, :, None], other=0.0).to(ACC)
        right = tl.load(ptrs + 4, mask=(row_ok & right_ok[None, :])[:, :, None], other=0.0).to(ACC)
        l0, l1, l2, l3 = _lanes(left, BLOCK_C, CHUNKS)
        r0, r1, r2, r3 = _lanes(right, BLOCK_C, CHUNKS)
        return (l0, l1, l2, l3, c0, c1, c2, c3, r0, r1, r2, r3)
    else:
        return (c0, c0, c0, c0, c0, c1, c2, c3)


@triton.jit
def _chunked_hw(p, W):
    """Row and column of pixels p of a plane whose W is a multiple of 4, the column written as 4 * chunk column
    + lane (p aligned to 4), so Triton sees runs of 4 aligned pixels and moves tiles of them in vectors."""
    q = p // 4
    return q // (W // 4), (q % (W // 4)) * 4 + p % 4


@triton.jit
def _dwconv_tile_vec_k(
    src,
    weight_ptr,
    cs,
    cmask,
    hq,
    wq,
    qmask,
    left_ok,
    right_ok,
    H,
    stride_c,
    stride_h,
    K: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """_dwconv_tile_k for a row-contiguous plane (stride_w 1) whose W, stride_h and stride_c are multiples of 4,
    and K <= 9: each thread owns chunks of 4 pixels of a row. Per kernel row it loads its chunk and the two
    neighbouring chunks (three vector loads; a chunk lies in one row, so its masks are per chunk), and the
    K taps of its 4 outputs are FMAs on those 12 registers: K * 4 FMAs per 3 loads, where the one-load-per-tap
    form issues K * 4 loads (scalar, as the shifts are unaligned), each with its own address and mask."""
    R: tl.constexpr = K // 2
    CHUNKS: tl.constexpr = BLOCK_HW // 4
    c_chunks = cs[:, None] * (stride_c // 4)
    w_row = weight_ptr + cs * KK_STRIDE
    acc0 = tl.zeros([BLOCK_C, CHUNKS], ACC)
    acc1 = tl.zeros([BLOCK_C, CHUNKS], ACC)
    acc2 = tl.zeros([BLOCK_C, CHUNKS], ACC)
    acc3 = tl.zeros([BLOCK_C, CHUNKS], ACC)
    for i in range(0, K):
        if TRANSPOSE:
            hh = hq + (R - i)
        else:
            hh = hq + (i - R)
        row = _row_lanes(src, c_chunks, hh, wq, cmask, qmask, left_ok, right_ok, H, stride_h, R, ACC, BLOCK_C, CHUNKS)
        for j in tl.static_range(K):
            # Output pixel v of the chunk takes row[4 + v + the tap's column shift] (indices are compile-time).
            tap = tl.load(w_row + (i * K + j), mask=cmask, other=0.0).to(ACC)[:, None]
            acc0 += tap * row[4 + (j - R) * (1 - 2 * TRANSPOSE)]
            acc1 += tap * row[5 + (j - R) * (1 - 2 * TRANSPOSE)]
            acc2 += tap * row[6 + (j - R) * (1 - 2 * TRANSPOSE)]
            acc3 += tap * row[7 + (j - R) * (1 - 2 * TRANSPOSE)]
    return tl.reshape(tl.join(tl.join(acc0, acc2), tl.join(acc1, acc3)), [BLOCK_C, BLOCK_HW])


@triton.jit
def _stencil_taps(weight_ptr, cs, cmask, K: tl.constexpr, KK_STRIDE: tl.constexpr, ACC: tl.constexpr):
    """The K^2 taps of each channel of cs (row-major, KK_STRIDE apart per channel; 0 for masked channels), each a
    [BLOCK_C, 1] column in ACC, as the register stencils take them."""
    w_row = weight_ptr + cs * KK_STRIDE
    taps = ()
    for t in tl.static_range(K * K):
        taps = taps + (tl.load(w_row + t, mask=cmask, other=0.0).to(ACC)[:, None],)
    return taps


@triton.jit
def _dwconv_strip_vec_k(
    src,
    taps,
    cs,
    cmask,
    h0,
    wq,
    qmask,
    left_ok,
    right_ok,
    H,
    stride_c,
    stride_h,
    K: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    ADD_SRC: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHUNKS: tl.constexpr,
    S: tl.constexpr,
):
    """_dwconv_tile_vec_k for a strip of S output rows h0 .. h0 + S - 1 over a block of CHUNKS chunks of a row
    (wq: their chunk columns; the conditions of the chunked stencil): a thread owns one chunk of 4 pixels in each
    of the S rows. The K^2 taps come in registers (`_stencil_taps`, which a caller looping over images calls
    before its loop: the loop's stores may alias the weights, so the compiler cannot hoist the loads itself),
    and each of the S + K - 1 input rows is loaded once (3 vector loads: the chunk and its neighbours, zero outside the
    image), feeding every output row it reaches by FMAs between registers (compile-time row indices), so a
    loaded row serves K output rows: about K^2 * 4 * S FMAs per (S + K - 1) row loads, where the chunked stencil
    reloads each input row and the taps for every output row. ADD_SRC: plus src itself (the residual), from the
    rows already loaded (a load of its own per row kept those registers live across the stencil: spills in fp32).
    Returns the S output rows, each [BLOCK_C, CHUNKS, 4] (lane = pixel within the chunk)."""
    R: tl.constexpr = K // 2
    c_chunks = cs[:, None] * (stride_c // 4)
    acc = (tl.zeros([BLOCK_C, CHUNKS], ACC),) * (4 * S)
    for r in tl.static_range(S + 2 * R):  # input row h0 + r - R
        hh = h0 + (r - R) + tl.zeros([CHUNKS], tl.int32)
        row = _row_lanes(src, c_chunks, hh, wq, cmask, qmask, left_ok, right_ok, H, stride_h, R, ACC, BLOCK_C, CHUNKS)
        new_acc = ()
        for o in tl.static_range(S):
            # Output row o reads input row o + the kernel row's shift: kernel row R + (r - R - o) * sign
            # (compile-time, written out each time: a name assigned it would be a runtime value on GPUs; outside
            # 0 .. K - 1 this input row does not reach output row o).
            for v in tl.static_range(4):
                a = acc[4 * o + v]
                if (R + (r - R - o) * (1 - 2 * TRANSPOSE) >= 0) & (R + (r - R - o) * (1 - 2 * TRANSPOSE) < K):
                    for j in tl.static_range(K):
                        tap = taps[(R + (r - R - o) * (1 - 2 * TRANSPOSE)) * K + j]
                        a += tap * row[4 + v + (j - R) * (1 - 2 * TRANSPOSE)]
                if ADD_SRC and (r - R == o):
                    a += row[4 + v]
                new_acc = new_acc + (a,)
        acc = new_acc
    rows = ()
    for o in tl.static_range(S):
        joined = tl.join(tl.join(acc[4 * o], acc[4 * o + 2]), tl.join(acc[4 * o + 1], acc[4 * o + 3]))
        rows = rows + (tl.reshape(joined, [BLOCK_C, CHUNKS, 4]),)
    return rows


@triton.jit
def _wgrad_strip_rows_k(
    partials,
    g_rows,
    x_src,
    x_chunks,
    cmask,
    h0,
    wq,
    qmask,
    left_ok,
    right_ok,
    H,
    x_stride_h,
    K: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHUNKS: tl.constexpr,
    S: tl.constexpr,
):
    """partials[i * K + j] += sum over a strip of S rows h0 .. h0 + S - 1 of g[h, w] * x[h + i - r, w + j - r],
    per thread (the layout of _dwconv_strip_vec_k: a thread owns one chunk of 4 pixels per row), for the caller
    to reduce across threads once. g_rows: the strip's g as 4 * S lane tiles [BLOCK_C, CHUNKS] (row o, lane v at
    4 * o + v; zero outside the image); x_chunks: the channels' offsets in chunks. Each of the S + K - 1 x rows is
    loaded once (3 vector loads) and multiplied into every partial it reaches."""
    R: tl.constexpr = K // 2
    for r in tl.static_range(S + 2 * R):  # x row h0 + r - R: kernel row r - o for g row o
        hh = h0 + (r - R) + tl.zeros([CHUNKS], tl.int32)
        row = _row_lanes(
            x_src, x_chunks, hh, wq, cmask, qmask, left_ok, right_ok, H, x_stride_h, R, ACC, BLOCK_C, CHUNKS
        )
        new_partials = ()
        for t in tl.static_range(K * K):
            a = partials[t]
            for o in tl.static_range(S):
                if r - o == t // K:
                    for v in tl.static_range(4):
                        a += g_rows[4 * o + v] * row[4 + v + t % K - R]
            new_partials = new_partials + (a,)
        partials = new_partials
    return partials


@triton.jit
def _wgrad_strip_vec_k(
    partials,
    g_src,
    x_src,
    cs,
    cmask,
    h0,
    wq,
    qmask,
    left_ok,
    right_ok,
    H,
    g_stride_c,
    g_stride_h,
    x_stride_c,
    x_stride_h,
    K: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHUNKS: tl.constexpr,
    S: tl.constexpr,
):
    """_wgrad_strip_rows_k with g read from g_src (one vector load per row): the updated partials and the thread's
    sum of g over the strip [BLOCK_C, CHUNKS]."""
    g_chunks = cs[:, None] * (g_stride_c // 4)
    g_rows = ()
    g_total = tl.zeros([BLOCK_C, CHUNKS], ACC)
    for o in tl.static_range(S):
        hh = h0 + o + tl.zeros([CHUNKS], tl.int32)
        lanes = _row_lanes(
            g_src, g_chunks, hh, wq, cmask, qmask, left_ok, right_ok, H, g_stride_h, 0, ACC, BLOCK_C, CHUNKS
        )
        g_rows = g_rows + (lanes[4], lanes[5], lanes[6], lanes[7])
        g_total += lanes[4] + lanes[5] + lanes[6] + lanes[7]
    partials = _wgrad_strip_rows_k(
        partials,
        g_rows,
        x_src,
        cs[:, None] * (x_stride_c // 4),
        cmask,
        h0,
        wq,
        qmask,
        left_ok,
        right_ok,
        H,
        x_stride_h,
        K,
        ACC,
        BLOCK_C,
        CHUNKS,
        S,
    )
    return partials, g_total


@triton.jit
def _strip_coords(chunk, W, STRIP: tl.constexpr, CHUNKS: tl.constexpr):
    """Position chunk `chunk` of a strip pass as (first row of its strip, then _chunk_coords' chunk column, mask
    and neighbour flags of its block of CHUNKS chunks of a row): chunks enumerate column blocks fastest."""
    n_column_blocks = tl.cdiv(W // 4, CHUNKS)
    _, wq, q_ok, left_ok, right_ok = _chunk_coords((chunk % n_column_blocks) * CHUNKS, W // 4, W, CHUNKS)
    return (chunk // n_column_blocks) * STRIP, wq, q_ok, left_ok, right_ok


@triton.jit
def _chunk_ptrs(base, c_chunks, hh, wq, stride_h):
    """Pointers [BLOCK_C, CHUNKS, 4] to the 4-pixel chunks at chunk columns wq of row hh, c_chunks being the
    channels' offsets in chunks [BLOCK_C, 1]: written as 4 * (chunk offset) + lane, as _row_lanes does, so that
    Triton proves the alignment it moves vectors on."""
    lane = tl.arange(0, 4)
    return base + ((c_chunks + (hh * (stride_h // 4) + wq)[None, :]) * 4)[:, :, None] + lane[None, None, :]


@triton.jit
def _rows_to_tile(rows, HP: tl.constexpr, WP: tl.constexpr, BLOCK_C: tl.constexpr):
    """HP row tiles [BLOCK_C, WP] (HP a power of 2) as one [BLOCK_C, HP * WP] tile, pixel h * WP + w: a tree of
    joins, each adding the top bit of the row index as a new innermost axis, then rows moved outside columns."""
    level_rows = rows
    for level in tl.static_range(HP.bit_length() - 1):
        joined = ()
        for m in tl.static_range(HP >> (level + 1)):
            pair = tl.join(level_rows[m], level_rows[m + (HP >> (level + 1))])
            joined = joined + (tl.reshape(pair, [BLOCK_C, WP, 2 << level]),)
        level_rows = joined
    return tl.reshape(tl.permute(tl.reshape(level_rows[0], [BLOCK_C, WP, HP]), (0, 2, 1)), [BLOCK_C, HP * WP])


@triton.jit
def _plane_column(src_columns, m, dj, stride_w, stride_h, H: tl.constexpr, ACC: tl.constexpr):
    """The H rows of column w + dj of each tile column w (masked by m: zero outside the image or channels)."""
    col = src_columns + dj * stride_w
    vals = ()
    for r in tl.static_range(H):
        vals = vals + (tl.load(col + r * stride_h, mask=m, other=0.0).to(ACC),)
    return vals


@triton.jit
def _dense_plane_column(column, H: tl.constexpr, W: tl.constexpr, ACC: tl.constexpr):
    """The H rows of `column` (pointers to row 0) of dense-row planes (row stride W, compile-time: the rows are
    immediate offsets from it), unmasked."""
    vals = ()
    for r in tl.static_range(H):
        vals = vals + (tl.load(column + r * W).to(ACC),)
    return vals


@triton.jit
def _dwconv_plane_k(
    src,
    taps,
    cs,
    cmask,
    stride_c,
    stride_h,
    stride_w,
    zero_plane,
    K: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    ADD_SRC: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    HP: tl.constexpr,
    WP: tl.constexpr,
    DENSE: tl.constexpr,
):
    """_dwconv_tile_k for a whole plane of compile-time H x W: a thread owns one channel's column w and all H of
    its outputs (HP row tiles [BLOCK_C, WP], rows >= H zero). Per kernel column it loads the column w + dj once
    (H loads, one mask per column shift) and adds its K vertical taps to every output row as FMAs between
    registers: rows outside the image are skipped at compile time, so no tap has a mask of its own, and each
    loaded value serves K outputs (the one-load-per-tap form: one load, its address and mask per tap). The K^2
    taps come in registers (`_stencil_taps`, loaded by the caller before its loop over images). ADD_SRC:
    plus src itself (the residual), from the centre column already loaded.
    DENSE (rows contiguous: stride_w 1 and stride_h W, which the launcher checks): the loads are not masked. A
    masked load pays an instruction to zero its register first (98 of the K = 7 bf16 forward's 1022 per image on
    sm_90); here a column's lanes outside the image read `zero_plane` (H * W zeros in src's dtype) instead, one
    pointer select per column shift, and lanes of padding channels read channel 0 (their outputs are not stored):
    the same zeros as masking, exactly, whatever the map holds."""
    R: tl.constexpr = K // 2
    w = tl.arange(0, WP)
    if DENSE:
        channels = src + tl.where(cmask, cs, 0)[:, None] * stride_c
    else:
        columns = src + cs[:, None] * stride_c + w[None, :] * stride_w
    acc = ()
    for _ in tl.static_range(HP):
        acc = acc + (tl.zeros([BLOCK_C, WP], ACC),)
    for j in tl.static_range(K):
        dj = (j - R) * (1 - 2 * TRANSPOSE)
        inside = (w + dj >= 0) & (w + dj < W)
        if DENSE:
            vals = _dense_plane_column(tl.where(inside[None, :], channels + (w + dj)[None, :], zero_plane), H, W, ACC)
        else:
            vals = _plane_column(columns, cmask[:, None] & inside[None, :], dj, stride_w, stride_h, H, ACC)
        for i in tl.static_range(K):
            tap = taps[i * K + j]
            # Output row ho takes input row ho + the tap's row shift (compile-time indices and bounds).
            new_acc = ()
            for ho in tl.static_range(HP):
                if (ho < H) & (ho + (i - R) * (1 - 2 * TRANSPOSE) >= 0) & (ho + (i - R) * (1 - 2 * TRANSPOSE) < H):
                    new_acc = new_acc + (acc[ho] + tap * vals[ho + (i - R) * (1 - 2 * TRANSPOSE)],)
                else:
                    new_acc = new_acc + (acc[ho],)
            acc = new_acc
        if ADD_SRC and j == R:
            new_acc = ()
            for ho in tl.static_range(HP):
                if ho < H:
                    new_acc = new_acc + (acc[ho] + vals[ho],)
                else:
                    new_acc = new_acc + (acc[ho],)
            acc = new_acc
    return acc


@triton.jit
def _wgrad_plane_k(
    g_b,
    x_b,
    pdw_ptr,
    pdb_ptr,
    cs,
    cmask,
    part,
    n_images,
    g_stride_b,
    g_stride_c,
    g_stride_h,
    g_stride_w,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    K: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    WP: tl.constexpr,
):
    """Partial dW[c, i, j] = sum over n_images images and the plane of g * x shifted by (i - r, j - r) for a
    whole plane of compile-time H x W (the layout of _dwconv_plane_k: a thread owns one channel's column w),
    stored at rows `part` of pdw (and, BIAS, sum g at pdb). Per image the thread loads its own g column once and
    each x column w + j - r once (H loads, one mask per column), and each of the K^2 taps adds
    sum_h g[h] * x[h + i - r] (compile-time bounds) to its own per-thread partial; after the images, one
    cross-column sum per tap. (With the kernel column outermost and K partials at a time, the g column was
    loaded K times per image: 7 sweeps of ~287 issued instructions per image against one of 1096, K = 7, bf16,
    sm_90. The K^2 partials held across the images spill on no audited target.)"""
    w = tl.arange(0, WP)
    g_columns = g_b + cs[:, None] * g_stride_c + w[None, :] * g_stride_w
    x_columns = x_b + cs[:, None] * x_stride_c + w[None, :] * x_stride_w
    g_mask = cmask[:, None] & (w < W)[None, :]
    partials = (tl.zeros([BLOCK_C, WP], ACC),) * (K * K)
    if BIAS:
        g_total = tl.zeros([BLOCK_C, WP], ACC)
    for _image in range(n_images):
        g_vals = _plane_column(g_columns, g_mask, 0, 0, g_stride_h, H, ACC)
        partials = _wgrad_plane_image(partials, g_vals, x_columns, cmask, x_stride_h, x_stride_w, K, ACC, H, W, WP)
        if BIAS:
            for ho in tl.static_range(H):
                g_total += g_vals[ho]
        g_columns += g_stride_b
        x_columns += x_stride_b
    _store_plane_wgrad(pdw_ptr, part, partials, cmask, K, KK_STRIDE)
    if BIAS:
        tl.store(pdb_ptr + part, tl.sum(g_total, axis=1), mask=cmask)


@triton.jit
def _wgrad_plane_image(
    partials,
    g_vals,
    x_columns,
    cmask,
    x_stride_h,
    x_stride_w,
    K: tl.constexpr,
    ACC: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    WP: tl.constexpr,
):
    """One image's terms of the whole-plane weight gradient's per-thread partials (`_wgrad_plane_k`'s layout: a thread
    owns one channel's column w; g_vals its H rows of g, x_columns pointers to row 0 of x's column w): each x column
    w + j - r loaded once, and each tap adds sum_h g[h] * x[h + i - r] over compile-time bounds. The partials are
    kernel-column-major, partials[j * K + i] tap (i, j), in the order the column loads produce them."""
    R: tl.constexpr = K // 2
    w = tl.arange(0, WP)
    new_partials = ()
    for j in tl.static_range(K):
        x_mask = cmask[:, None] & ((w + j - R >= 0) & (w + j - R < W))[None, :]
        x_vals = _plane_column(x_columns, x_mask, j - R, x_stride_w, x_stride_h, H, ACC)
        for i in tl.static_range(K):
            acc = partials[j * K + i]
            for ho in tl.static_range(H):
                if (ho + i - R >= 0) & (ho + i - R < H):
                    acc += g_vals[ho] * x_vals[ho + i - R]
            new_partials = new_partials + (acc,)
    return new_partials


@triton.jit
def _store_plane_wgrad(pdw_ptr, part, partials, cmask, K: tl.constexpr, KK_STRIDE: tl.constexpr):
    """Stores `_wgrad_plane_image`'s partials at rows `part` of pdw: one cross-column sum per tap."""
    for j in tl.static_range(K):
        for i in tl.static_range(K):
            tl.store(pdw_ptr + part * KK_STRIDE + (i * K + j), tl.sum(partials[j * K + i], axis=1), mask=cmask)


@triton.jit
def _dense_plane_conv_store(
    src,
    dst,
    taps,
    shift,
    cs,
    cmask,
    src_stride_c,
    dst_stride_c,
    zero_plane,
    K: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    ADD_SRC: tl.constexpr,
    SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    WP: tl.constexpr,
):
    """dst = the whole-plane stencil of src (`_dwconv_plane_k`, DENSE: both maps' rows contiguous) (+ shift [BLOCK_C]
    where SHIFT), stored row by row from the stencil's row tiles: one mask for every row and each row at a
    compile-time offset (the [channels, plane] tile's per-element offsets and masks took 31 of the K = 7 bf16
    forward's 937 instructions per image on sm_90, and ~40 registers)."""
    rows = _dwconv_plane_k(
        src, taps, cs, cmask, src_stride_c, W, 1, zero_plane, K, TRANSPOSE, ADD_SRC, ACC, BLOCK_C, H, W, H, WP, True
    )
    w = tl.arange(0, WP)
    row_offs = cs[:, None] * dst_stride_c + w[None, :]
    row_mask = cmask[:, None] & (w < W)[None, :]
    for r in tl.static_range(H):
        out = rows[r]
        if SHIFT:
            out += shift[:, None]
        tl.store(dst + row_offs + r * W, out.to(dst.dtype.element_ty), mask=row_mask)


@triton.jit
def _plane_taps(
    weight_ptr, cs, cmask, KMAX: tl.constexpr, KK_STRIDE: tl.constexpr, ACC: tl.constexpr, PLANE_W: tl.constexpr
):
    """The whole-plane stencil's taps for `_dwconv_tile` (its launches' blocks are all KMAX wide), loaded once by a
    kernel before its loop over images; nothing for the other stencils, which load theirs per tap."""
    if PLANE_W > 0:
        return _stencil_taps(weight_ptr, cs, cmask, KMAX, KK_STRIDE, ACC)
    else:
        return ()


@triton.jit
def _dwconv_tile(
    src,
    weight_ptr,
    plane_taps,
    cs,
    cmask,
    h,
    w,
    pmask,
    k,
    stride_c,
    stride_h,
    stride_w,
    H,
    W,
    zero_plane,
    KMAX: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    ADD_SRC: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    VEC: tl.constexpr,
    PLANE_H: tl.constexpr,
    PLANE_W: tl.constexpr,
    PLANE_WP: tl.constexpr,
    PLANE_DENSE: tl.constexpr,
):
    """_dwconv_tile_k (_dwconv_tile_vec_k when VEC) for the channel block's kernel size k (odd, <= KMAX): one
    compiled copy per odd size, picked by a branch that is uniform over the program. PLANE_W > 0: the whole-plane
    stencil _dwconv_plane_k, whose launches hold blocks of one kernel size, KMAX, on plane_taps (`_plane_taps`).
    ADD_SRC: plus the tile of src itself (the residual; the whole-plane stencil takes it from its centre column
    instead of loading it again, which also keeps the tile's own offsets out of its registers)."""
    if PLANE_W > 0:
        HP: tl.constexpr = BLOCK_HW // PLANE_WP
        rows = _dwconv_plane_k(
            src,
            plane_taps,
            cs,
            cmask,
            stride_c,
            stride_h,
            stride_w,
            zero_plane,
            KMAX,
            TRANSPOSE,
            ADD_SRC,
            ACC,
            BLOCK_C,
            PLANE_H,
            PLANE_W,
            HP,
            PLANE_WP,
            PLANE_DENSE,
        )
        acc = _rows_to_tile(rows, HP, PLANE_WP, BLOCK_C)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
        if VEC:  # outside the per-size branches, so it is computed once per program (hoisted out of the batch loop)
            hq, wq, qmask, left_ok, right_ok = _chunk_coords(
                tl.program_id(0) * (BLOCK_HW // 4), H * (W // 4), W, BLOCK_HW // 4
            )
        for K in tl.static_range(1, KMAX + 1, 2):
            if k == K:
                if VEC:
                    acc = _dwconv_tile_vec_k(
                        src,
                        weight_ptr,
                        cs,
                        cmask,
                        hq,
                        wq,
                        qmask,
                        left_ok,
                        right_ok,
                        H,
                        stride_c,
                        stride_h,
                        K,
                        KK_STRIDE,
                        TRANSPOSE,
                        ACC,
                        BLOCK_C,
                        BLOCK_HW,
                    )
                else:
                    acc = _dwconv_tile_k(
                        src,
                        weight_ptr,
                        cs,
                        cmask,
                        h,
                        w,
                        pmask,
                        stride_c,
                        stride_h,
                        stride_w,
                        H,
                        W,
                        K,
                        KK_STRIDE,
                        TRANSPOSE,
                        ACC,
                        BLOCK_C,
                        BLOCK_HW,
                    )
        if ADD_SRC:
            src_tile = cs[:, None] * stride_c + (h * stride_h + w * stride_w)[None, :]
            acc += tl.load(src + src_tile, mask=cmask[:, None] & pmask[None, :], other=0.0).to(ACC)
    return acc


@triton.jit
def _wgrad_tile_k(
    acc_w,
    g,
    x_b,
    cs,
    cmask,
    h,
    w,
    pmask,
    stride_c,
    stride_h,
    stride_w,
    H,
    W,
    K: tl.constexpr,
    KK_POW2: tl.constexpr,
    ACC: tl.constexpr,
):
    """acc_w[c, i*K+j] += sum_tile g[c, p] * x[c, h+i-r, w+j-r]  (g is zero outside the tile); rows a
    runtime loop, a row's taps unrolled as in _dwconv_tile_k."""
    R: tl.constexpr = K // 2
    taps = tl.arange(0, KK_POW2)
    c_x = x_b + cs[:, None] * stride_c
    for i in range(0, K):
        row, h_ok = _tap_row(c_x, h, w, pmask, i - R, stride_h, stride_w, H)
        for j in tl.static_range(K):
            v = tl.load(row + (j - R) * stride_w, mask=_tap_mask(cmask, h_ok, w, j - R, W), other=0.0).to(ACC)
            part = tl.sum(g * v, axis=1)
            acc_w += tl.where(taps[None, :] == i * K + j, part[:, None], 0.0)
    return acc_w


@triton.jit
def _wgrad_tile_vec_k(
    acc_taps,
    g,
    x_b,
    cs,
    cmask,
    hq,
    wq,
    qmask,
    left_ok,
    right_ok,
    H,
    stride_c,
    stride_h,
    K: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """_wgrad_tile_k on chunks of 4 pixels (the conditions of _dwconv_tile_vec_k): acc_taps[i*K+j], one
    [BLOCK_C, chunks] per-thread partial per tap, += g * the tap's shifted x, summed over the 4 lanes. Rows and
    taps are unrolled so each tap has its own register accumulator: no reduction across threads until the
    program's last image (_tap_totals), where the one-load-per-tap form reduces once per tap and image."""
    R: tl.constexpr = K // 2
    CHUNKS: tl.constexpr = BLOCK_HW // 4
    g0, g1, g2, g3 = _lanes(tl.reshape(g, [BLOCK_C, CHUNKS, 4]), BLOCK_C, CHUNKS)
    c_chunks = cs[:, None] * (stride_c // 4)
    for i in tl.static_range(K):
        hh = hq + (i - R)
        row = _row_lanes(x_b, c_chunks, hh, wq, cmask, qmask, left_ok, right_ok, H, stride_h, R, ACC, BLOCK_C, CHUNKS)
        for j in tl.static_range(K):
            part = g0 * row[4 + j - R] + g1 * row[5 + j - R] + g2 * row[6 + j - R] + g3 * row[7 + j - R]
            acc_taps = acc_taps[: i * K + j] + (acc_taps[i * K + j] + part,) + acc_taps[i * K + j + 1 :]
    return acc_taps


@triton.jit
def _tap_totals(acc_taps, KK: tl.constexpr, KK_POW2: tl.constexpr):
    """[BLOCK_C, KK_POW2] per-channel tap sums of _wgrad_tile_vec_k's per-thread partials."""
    taps = tl.arange(0, KK_POW2)
    acc_w = tl.zeros([acc_taps[0].shape[0], KK_POW2], acc_taps[0].dtype)
    for t in tl.static_range(KK):
        acc_w += tl.where(taps[None, :] == t, tl.sum(acc_taps[t], axis=1)[:, None], 0.0)
    return acc_w


@triton.jit
def _wgrad_tile(
    acc_w,
    g,
    x_b,
    cs,
    cmask,
    h,
    w,
    pmask,
    k,
    stride_c,
    stride_h,
    stride_w,
    H,
    W,
    KMAX: tl.constexpr,
    KK_POW2: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    VEC: tl.constexpr,
):
    """_wgrad_tile_k (VEC: _wgrad_tile_vec_k, acc_w then being its tuple of per-tap partials) for the channel
    block's kernel size k, as _dwconv_tile picks _dwconv_tile_k."""
    if VEC:
        hq, wq, qmask, left_ok, right_ok = _chunk_coords(
            tl.program_id(0) * (BLOCK_HW // 4), H * (W // 4), W, BLOCK_HW // 4
        )
    for K in tl.static_range(1, KMAX + 1, 2):
        if k == K:
            if VEC:
                acc_w = _wgrad_tile_vec_k(
                    acc_w,
                    g,
                    x_b,
                    cs,
                    cmask,
                    hq,
                    wq,
                    qmask,
                    left_ok,
                    right_ok,
                    H,
                    stride_c,
                    stride_h,
                    K,
                    ACC,
                    BLOCK_C,
                    BLOCK_HW,
                )
            else:
                acc_w = _wgrad_tile_k(
                    acc_w, g, x_b, cs, cmask, h, w, pmask, stride_c, stride_h, stride_w, H, W, K, KK_POW2, ACC
                )
    return acc_w


@triton.jit
def _partial_rows(C, cs):
    """Rows of this program's per-channel partials: one [C] row per (batch split, spatial tile)."""
    return (tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)) * C + cs


@triton.jit
def _tile_coords(
    blocks_ptr,
    H,
    W,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    INDEX64: tl.constexpr,
    VEC: tl.constexpr,
    PLANE_WP: tl.constexpr,
):
    """This program's spatial tile (grid axis 0, the large one: h, w, mask) and channel block (axis 1:
    channels, mask, kernel size); VEC: h, w from _chunked_hw; PLANE_WP > 0: the whole plane, rows PLANE_WP
    apart (the layout of _rows_to_tile)."""
    blk = tl.program_id(1)
    c0 = tl.load(blocks_ptr + 3 * blk)
    c1 = tl.load(blocks_ptr + 3 * blk + 1)
    k = tl.load(blocks_ptr + 3 * blk + 2)
    cs = c0 + tl.arange(0, BLOCK_C)
    cmask = cs < c1
    p = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    pmask = p < H * W
    if VEC:
        h, w = _chunked_hw(p, W)
    elif PLANE_WP > 0:
        h = p // PLANE_WP
        w = p % PLANE_WP
        pmask = (h < H) & (w < W)
    else:
        h = p // W
        w = p % W
    if INDEX64:
        cs = cs.to(tl.int64)
        h = h.to(tl.int64)
        w = w.to(tl.int64)
    return cs, cmask, k, h, w, pmask


@triton.jit(
    do_not_specialize_on_alignment=[
        "B",
        "C",
        "H",
        "W",
        "b_per_prog",
        "x_stride_b",
        "x_stride_c",
        "x_stride_h",
        "x_stride_w",
        "out_stride_b",
        "out_stride_c",
        "out_stride_h",
        "out_stride_w",
    ]
)
def _forward_kernel(
    x_ptr,
    out_ptr,
    weight_ptr,
    bias_ptr,
    blocks_ptr,
    scale_ptr,
    shift_ptr,
    pcnt_ptr,
    pmean_ptr,
    pm2_ptr,
    B,
    C,
    H,
    W,
    b_per_prog,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    out_stride_b,
    out_stride_c,
    out_stride_h,
    out_stride_w,
    zero_plane_ptr,
    MODE: tl.constexpr,
    KMAX: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    INDEX64: tl.constexpr,
    ACC: tl.constexpr,
    VEC: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    PLANE_H: tl.constexpr,
    PLANE_W: tl.constexpr,
    PLANE_WP: tl.constexpr,
    PLANE_DENSE: tl.constexpr,
):
    """MODE _CONV: out = conv(x).  _APPLY: out = GELU(conv(x) + x) * scale + shift.
    _STATS: out = z = conv(x) + x (the pre-activation, in out's dtype) and per-program (count, mean, M2) of
    GELU(z), merged with Chan's formula.  _APPLY_SAVED: x holds that z; out = GELU(z) * scale + shift
    (no stencil).  _PREACT: out = z (eval with gradients: z saved for _APPLY_SAVED and the backward)."""
    NARROW: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth == 16  # the 16-bit GELU (`_normal_cdf`)
    if VEC:  # strides Triton can prove multiples of 4 (see _multiple_of_4)
        x_stride_b, x_stride_c, x_stride_h = _chunk_strides(x_stride_b, x_stride_c, x_stride_h)
        out_stride_b, out_stride_c, out_stride_h = _chunk_strides(out_stride_b, out_stride_c, out_stride_h)
    cs, cmask, k, h, w, pmask = _tile_coords(blocks_ptr, H, W, BLOCK_C, BLOCK_HW, INDEX64, VEC, PLANE_WP)
    mask = cmask[:, None] & pmask[None, :]
    bias = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(ACC)
    x_tile = cs[:, None] * x_stride_c + (h * x_stride_h + w * x_stride_w)[None, :]
    o_tile = cs[:, None] * out_stride_c + (h * out_stride_h + w * out_stride_w)[None, :]
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    x_b = x_ptr + b_lo.to(tl.int64) * x_stride_b
    o_b = out_ptr + b_lo.to(tl.int64) * out_stride_b
    if MODE == 1 or MODE == 3:
        scale = tl.load(scale_ptr + cs, mask=cmask, other=0.0).to(ACC)
        shift = tl.load(shift_ptr + cs, mask=cmask, other=0.0).to(ACC)
    if MODE == 2:
        n = tl.zeros([BLOCK_C], ACC)
        mean = tl.zeros([BLOCK_C], ACC)
        m2 = tl.zeros([BLOCK_C], ACC)
        n_tile = tl.sum(pmask.to(ACC), axis=0)
    plane_taps = _plane_taps(weight_ptr, cs, cmask, KMAX, KK_STRIDE, ACC, PLANE_W)
    for _ in range(b_lo, b_hi):
        if MODE == 0 and PLANE_DENSE:  # the conv alone: stored row by row
            _dense_plane_conv_store(
                x_b,
                o_b,
                plane_taps,
                bias,
                cs,
                cmask,
                x_stride_c,
                out_stride_c,
                zero_plane_ptr,
                KMAX,
                False,
                False,
                True,
                ACC,
                BLOCK_C,
                PLANE_H,
                PLANE_W,
                PLANE_WP,
            )
        elif MODE == 3:
            z = tl.load(x_b + x_tile, mask=mask, other=0.0).to(ACC)
        else:
            z = (
                _dwconv_tile(
                    x_b,
                    weight_ptr,
                    plane_taps,
                    cs,
                    cmask,
                    h,
                    w,
                    pmask,
                    k,
                    x_stride_c,
                    x_stride_h,
                    x_stride_w,
                    H,
                    W,
                    zero_plane_ptr,
                    KMAX,
                    KK_STRIDE,
                    False,
                    MODE != 0,
                    ACC,
                    BLOCK_C,
                    BLOCK_HW,
                    VEC,
                    PLANE_H,
                    PLANE_W,
                    PLANE_WP,
                    PLANE_DENSE,
                )
                + bias[:, None]
            )
        if MODE == 4 or (MODE == 0 and not PLANE_DENSE):  # (dense planes stored MODE 0's rows above)
            tl.store(o_b + o_tile, z.to(out_ptr.dtype.element_ty), mask=mask)
        elif MODE != 0:
            if MODE == 2:  # saved for _APPLY_SAVED and the backward; the statistics keep z's full precision
                tl.store(o_b + o_tile, z.to(out_ptr.dtype.element_ty), mask=mask)
            y = _gelu(z, NARROW)
            if MODE != 2:
                tl.store(o_b + o_tile, (y * scale[:, None] + shift[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
            else:
                mean_tile = tl.sum(tl.where(mask, y, 0.0), axis=1) / n_tile
                d = tl.where(mask, y - mean_tile[:, None], 0.0)
                m2_tile = tl.sum(d * d, axis=1)
                delta = mean_tile - mean
                n_new = n + n_tile
                mean += delta * (n_tile / n_new)
                m2 += m2_tile + delta * delta * (n * n_tile / n_new)
                n = n_new
        x_b += x_stride_b
        o_b += out_stride_b
    if MODE == 2:
        part = _partial_rows(C, cs)
        tl.store(pcnt_ptr + part, n, mask=cmask)
        tl.store(pmean_ptr + part, mean, mask=cmask)
        tl.store(pm2_ptr + part, m2, mask=cmask)


@triton.jit(
    do_not_specialize_on_alignment=[
        "B",
        "b_per_prog",
        "x_stride_b",
        "x_stride_c",
        "out_stride_b",
        "out_stride_c",
    ]
)
def _plane_eval_kernel(
    x_ptr,
    out_ptr,
    slots_ptr,
    weight_ptr,
    bias_ptr,
    blocks_ptr,
    in_scale_ptr,
    in_shift_ptr,
    scale_ptr,
    shift_ptr,
    zero_plane_ptr,
    B,
    b_per_prog,
    x_stride_b,
    x_stride_c,
    out_stride_b,
    out_stride_c,
    KMAX: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PLANE_H: tl.constexpr,
    PLANE_W: tl.constexpr,
    PLANE_WP: tl.constexpr,
):
    """ms_ffn_middle_eval on dense whole planes (stage 3 at 224^2) in one pass over the map: per image, each thread
    maps its own column once, y = GELU(x) * in_scale + in_shift, and stores it in x's dtype (as the two-launch form
    stores y) into the program's slot of `slots_ptr` ([programs, BLOCK_C, H, W]); after a barrier the whole-plane
    stencil runs on the slot (`_dwconv_plane_k`, dense: neighbours' columns read back from L1/L2, the residual from
    the centre column), and out = GELU(conv(y) + bias + y) * scale + shift is stored row by row. A second barrier
    keeps the next image's slot stores behind this image's stencil loads. KMAX = 1 needs no neighbour: y stays in
    registers, no slot. One slot per program, rewritten per image, so the slots' DRAM traffic is one write-back of
    1 / (images per program) of a pass, where the two-launch form wrote y and read it back (two passes)."""
    NARROW: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth == 16  # the 16-bit GELU (`_normal_cdf`)
    blk = tl.program_id(1)
    c0 = tl.load(blocks_ptr + 3 * blk)
    c1 = tl.load(blocks_ptr + 3 * blk + 1)
    cs = c0 + tl.arange(0, BLOCK_C)
    cmask = cs < c1
    w = tl.arange(0, PLANE_WP)
    inside = (w < PLANE_W)[None, :]
    row_mask = cmask[:, None] & inside
    taps = _stencil_taps(weight_ptr, cs, cmask, KMAX, KK_STRIDE, ACC)
    bias = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None]
    in_scale = tl.load(in_scale_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None]
    in_shift = tl.load(in_shift_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None]
    scale = tl.load(scale_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None]
    shift = tl.load(shift_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None]
    # Padding channels read channel 0 (their outputs are not stored); lanes past W read the zero plane.
    x_columns = tl.where(cmask, cs, 0)[:, None] * x_stride_c + w[None, :]
    out_rows = cs[:, None] * out_stride_c + w[None, :]
    slot_channel = tl.arange(0, BLOCK_C)
    slot = slots_ptr + (blk * tl.num_programs(2) + tl.program_id(2)) * (BLOCK_C * PLANE_H * PLANE_W)
    slot_rows = slot_channel[:, None] * (PLANE_H * PLANE_W) + w[None, :]
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    x_b = x_ptr + b_lo.to(tl.int64) * x_stride_b
    o_b = out_ptr + b_lo.to(tl.int64) * out_stride_b
    for _ in range(b_lo, b_hi):
        xs = _dense_plane_column(tl.where(inside, x_b + x_columns, zero_plane_ptr), PLANE_H, PLANE_W, ACC)
        ys = ()
        for r in tl.static_range(PLANE_H):
            y = (_gelu(xs[r], NARROW) * in_scale + in_shift).to(slots_ptr.dtype.element_ty)
            if KMAX == 1:
                ys = ys + (taps[0] * y.to(ACC) + y.to(ACC),)
            else:
                tl.store(slot + slot_rows + r * PLANE_W, y, mask=row_mask)
        if KMAX == 1:
            rows = ys
        else:
            tl.debug_barrier()  # every thread's slot stores before any thread's stencil loads
            rows = _dwconv_plane_k(
                slot,
                taps,
                slot_channel,
                cmask,
                PLANE_H * PLANE_W,
                PLANE_W,
                1,
                zero_plane_ptr,
                KMAX,
                False,
                True,
                ACC,
                BLOCK_C,
                PLANE_H,
                PLANE_W,
                PLANE_H,
                PLANE_WP,
                True,
            )
        for r in tl.static_range(PLANE_H):
            out = _gelu(rows[r] + bias, NARROW) * scale + shift
            tl.store(o_b + out_rows + r * PLANE_W, out.to(out_ptr.dtype.element_ty), mask=row_mask)
        if KMAX > 1:
            tl.debug_barrier()  # every thread's stencil loads before the next image's slot stores
        x_b += x_stride_b
        o_b += out_stride_b


@triton.jit
def _wgrad_init(
    KMAX: tl.constexpr,
    KK_POW2: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    VEC: tl.constexpr,
):
    """Zeroed weight-gradient accumulators: per-thread partials per tap (VEC) or per-channel tap sums."""
    if VEC:
        return (tl.zeros([BLOCK_C, BLOCK_HW // 4], ACC),) * (KMAX * KMAX)
    else:
        return tl.zeros([BLOCK_C, KK_POW2], ACC)


@triton.jit
def _store_wgrad_partials(pdw_ptr, pdb_ptr, acc_w, acc_b, cs, cmask, C, KK_STRIDE: tl.constexpr, KK_POW2: tl.constexpr):
    part = _partial_rows(C, cs)
    taps = tl.arange(0, KK_POW2)
    tl.store(
        pdw_ptr + part[:, None] * KK_STRIDE + taps[None, :], acc_w, mask=cmask[:, None] & (taps[None, :] < KK_STRIDE)
    )
    tl.store(pdb_ptr + part, acc_b, mask=cmask)


@triton.jit(
    do_not_specialize_on_alignment=[
        "B",
        "C",
        "H",
        "W",
        "b_per_prog",
        "x_stride_b",
        "x_stride_c",
        "x_stride_h",
        "x_stride_w",
        "grad_out_stride_b",
        "grad_out_stride_c",
        "grad_out_stride_h",
        "grad_out_stride_w",
        "dz_stride_b",
        "dz_stride_c",
        "dz_stride_h",
        "dz_stride_w",
    ]
)
def _middle_grad_kernel(
    x_ptr,
    z_ptr,
    grad_out_ptr,
    dz_ptr,
    weight_ptr,
    bias_ptr,
    blocks_ptr,
    mean_ptr,
    rstd_ptr,
    cgo_ptr,
    cxhat_ptr,
    cconst_ptr,
    psgo_ptr,
    psgx_ptr,
    pdw_ptr,
    pdb_ptr,
    B,
    C,
    H,
    W,
    b_per_prog,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    grad_out_stride_b,
    grad_out_stride_c,
    grad_out_stride_h,
    grad_out_stride_w,
    dz_stride_b,
    dz_stride_c,
    dz_stride_h,
    dz_stride_w,
    zero_plane_ptr,
    STATS: tl.constexpr,
    DZ: tl.constexpr,
    Z_SAVED: tl.constexpr,
    KMAX: tl.constexpr,
    KK_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    INDEX64: tl.constexpr,
    ACC: tl.constexpr,
    VEC: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    PLANE_H: tl.constexpr,
    PLANE_W: tl.constexpr,
    PLANE_WP: tl.constexpr,
    PLANE_DENSE: tl.constexpr,
):
    """z = conv(x) + x (Z_SAVED: the forward's, read from z_ptr, laid out as dz; else recomputed),
    y = GELU(z), xhat = (y - mean) * rstd on the tile, then STATS: partial sums of go and go * xhat;
    DZ: dz = (cgo*go + cxhat*xhat + cconst) * GELU'(z), stored, with partial dW and dbias."""
    NARROW: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth == 16  # the 16-bit GELU (`_normal_cdf`)
    if VEC:  # strides Triton can prove multiples of 4 (see _multiple_of_4)
        x_stride_b, x_stride_c, x_stride_h = _chunk_strides(x_stride_b, x_stride_c, x_stride_h)
        grad_out_stride_b, grad_out_stride_c, grad_out_stride_h = _chunk_strides(
            grad_out_stride_b, grad_out_stride_c, grad_out_stride_h
        )
        dz_stride_b, dz_stride_c, dz_stride_h = _chunk_strides(dz_stride_b, dz_stride_c, dz_stride_h)
    cs, cmask, k, h, w, pmask = _tile_coords(blocks_ptr, H, W, BLOCK_C, BLOCK_HW, INDEX64, VEC, PLANE_WP)
    mask = cmask[:, None] & pmask[None, :]
    bias = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + cs, mask=cmask, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + cs, mask=cmask, other=0.0).to(ACC)
    g_tile = cs[:, None] * grad_out_stride_c + (h * grad_out_stride_h + w * grad_out_stride_w)[None, :]
    d_tile = cs[:, None] * dz_stride_c + (h * dz_stride_h + w * dz_stride_w)[None, :]
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    x_b = x_ptr + b_lo.to(tl.int64) * x_stride_b
    g_b = grad_out_ptr + b_lo.to(tl.int64) * grad_out_stride_b
    d_b = dz_ptr + b_lo.to(tl.int64) * dz_stride_b
    z_b = z_ptr + b_lo.to(tl.int64) * dz_stride_b
    # The per-channel sums (go, go * xhat, dz) accumulate per thread, one value per tile element, and are reduced
    # across the program once after the loop: a reduction per image cost ~60 issued instructions per thread for
    # its 4 elements (shuffles, shared memory, barriers).
    if STATS:
        t_go = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
        t_gx = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    if DZ:
        cgo = tl.load(cgo_ptr + cs, mask=cmask, other=0.0).to(ACC)
        cxhat = tl.load(cxhat_ptr + cs, mask=cmask, other=0.0).to(ACC)
        cconst = tl.load(cconst_ptr + cs, mask=cmask, other=0.0).to(ACC)
        if PLANE_W == 0:
            acc_w = _wgrad_init(KMAX, KK_POW2, ACC, BLOCK_C, BLOCK_HW, VEC)
        t_dz = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    plane_taps = _plane_taps(weight_ptr, cs, cmask, KMAX, KK_STRIDE, ACC, PLANE_W)
    for _ in range(b_lo, b_hi):
        if Z_SAVED:
            z = tl.load(z_b + d_tile, mask=mask, other=0.0).to(ACC)
        else:
            z = _dwconv_tile(
                x_b,
                weight_ptr,
                plane_taps,
                cs,
                cmask,
                h,
                w,
                pmask,
                k,
                x_stride_c,
                x_stride_h,
                x_stride_w,
                H,
                W,
                zero_plane_ptr,
                KMAX,
                KK_STRIDE,
                False,
                True,
                ACC,
                BLOCK_C,
                BLOCK_HW,
                VEC,
                PLANE_H,
                PLANE_W,
                PLANE_WP,
                PLANE_DENSE,
            )
            z += bias[:, None]
        go = tl.load(g_b + g_tile, mask=mask, other=0.0).to(ACC)
        xhat = (_gelu(z, NARROW) - mean[:, None]) * rstd[:, None]
        if STATS:
            t_go += go
            t_gx += tl.where(mask, go * xhat, 0.0)
        if DZ:
            dz = (cgo[:, None] * go + cxhat[:, None] * xhat + cconst[:, None]) * _gelu_grad(z, NARROW)
            dz = tl.where(mask, dz, 0.0)
            tl.store(d_b + d_tile, dz.to(dz_ptr.dtype.element_ty), mask=mask)
            t_dz += dz
            if PLANE_W == 0:
                acc_w = _wgrad_tile(
                    acc_w,
                    dz,
                    x_b,
                    cs,
                    cmask,
                    h,
                    w,
                    pmask,
                    k,
                    x_stride_c,
                    x_stride_h,
                    x_stride_w,
                    H,
                    W,
                    KMAX,
                    KK_POW2,
                    ACC,
                    BLOCK_C,
                    BLOCK_HW,
                    VEC,
                )
        x_b += x_stride_b
        z_b += dz_stride_b
        g_b += grad_out_stride_b
        d_b += dz_stride_b
    if STATS:
        part = _partial_rows(C, cs)
        tl.store(psgo_ptr + part, tl.sum(t_go, axis=1), mask=cmask)
        tl.store(psgx_ptr + part, tl.sum(t_gx, axis=1), mask=cmask)
    if DZ:
        acc_b = tl.sum(t_dz, axis=1)
        if PLANE_W > 0:  # dW from the dz just stored (the op gives the plane path an fp32 dz for half x)
            tl.store(pdb_ptr + _partial_rows(C, cs), acc_b, mask=cmask)
            tl.debug_barrier()  # the plane layout reads dz elements other threads of the program stored
            _wgrad_plane_k(
                dz_ptr + b_lo.to(tl.int64) * dz_stride_b,
                x_ptr + b_lo.to(tl.int64) * x_stride_b,
                pdw_ptr,
                pdb_ptr,
                cs,
                cmask,
                _partial_rows(C, cs),
                b_hi - b_lo,
                dz_stride_b,
                dz_stride_c,
                dz_stride_h,
                dz_stride_w,
                x_stride_b,
                x_stride_c,
                x_stride_h,
                x_stride_w,
                KMAX,
                KK_STRIDE,
                False,
                ACC,
                BLOCK_C,
                PLANE_H,
                PLANE_W,
                PLANE_WP,
            )
        else:
            if VEC:
                acc_w = _tap_totals(acc_w, KMAX * KMAX, KK_POW2)
            _store_wgrad_partials(pdw_ptr, pdb_ptr, acc_w, acc_b, cs, cmask, C, KK_STRIDE, KK_POW2)


@triton.jit(
    do_not_specialize_on_alignment=[
        "B",
        "C",
        "H",
        "W",
        "b_per_prog",
        "src_stride_b",
        "src_stride_c",
        "src_stride_h",
        "src_stride_w",
        "x_stride_b",
        "x_stride_c",
        "x_stride_h",
        "x_stride_w",
        "dx_stride_b",
        "dx_stride_c",
        "dx_stride_h",
        "dx_stride_w",
    ]
)
def _dx_kernel(
    src_ptr,
    x_ptr,
    dx_ptr,
    weight_ptr,
    blocks_ptr,
    pdw_ptr,
    pdb_ptr,
    B,
    C,
    H,
    W,
    b_per_prog,
    src_stride_b,
    src_stride_c,
    src_stride_h,
    src_stride_w,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    dx_stride_b,
    dx_stride_c,
    dx_stride_h,
    dx_stride_w,
    zero_plane_ptr,
    RESIDUAL: tl.constexpr,
    WGRAD: tl.constexpr,
    KMAX: tl.constexpr,
    KK_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    INDEX64: tl.constexpr,
    ACC: tl.constexpr,
    VEC: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    PLANE_H: tl.constexpr,
    PLANE_W: tl.constexpr,
    PLANE_WP: tl.constexpr,
    PLANE_DENSE: tl.constexpr,
):
    """dx = conv_transpose(src) (+ src if RESIDUAL); WGRAD: partial dW = sum src * shifted x, dbias."""
    if VEC:  # strides Triton can prove multiples of 4 (see _multiple_of_4)
        src_stride_b, src_stride_c, src_stride_h = _chunk_strides(src_stride_b, src_stride_c, src_stride_h)
        x_stride_b, x_stride_c, x_stride_h = _chunk_strides(x_stride_b, x_stride_c, x_stride_h)
        dx_stride_b, dx_stride_c, dx_stride_h = _chunk_strides(dx_stride_b, dx_stride_c, dx_stride_h)
    cs, cmask, k, h, w, pmask = _tile_coords(blocks_ptr, H, W, BLOCK_C, BLOCK_HW, INDEX64, VEC, PLANE_WP)
    mask = cmask[:, None] & pmask[None, :]
    s_tile = cs[:, None] * src_stride_c + (h * src_stride_h + w * src_stride_w)[None, :]
    dx_tile = cs[:, None] * dx_stride_c + (h * dx_stride_h + w * dx_stride_w)[None, :]
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    s_b = src_ptr + b_lo.to(tl.int64) * src_stride_b
    x_b = x_ptr + b_lo.to(tl.int64) * x_stride_b
    dx_b = dx_ptr + b_lo.to(tl.int64) * dx_stride_b
    if WGRAD and PLANE_W == 0:
        acc_w = _wgrad_init(KMAX, KK_POW2, ACC, BLOCK_C, BLOCK_HW, VEC)
        acc_b = tl.zeros([BLOCK_C], ACC)
    plane_taps = _plane_taps(weight_ptr, cs, cmask, KMAX, KK_STRIDE, ACC, PLANE_W)
    for _ in range(b_lo, b_hi):
        if PLANE_DENSE:
            _dense_plane_conv_store(
                s_b,
                dx_b,
                plane_taps,
                cs,
                cs,
                cmask,
                src_stride_c,
                dx_stride_c,
                zero_plane_ptr,
                KMAX,
                True,
                RESIDUAL,
                False,
                ACC,
                BLOCK_C,
                PLANE_H,
                PLANE_W,
                PLANE_WP,
            )
        else:
            dx = _dwconv_tile(
                s_b,
                weight_ptr,
                plane_taps,
                cs,
                cmask,
                h,
                w,
                pmask,
                k,
                src_stride_c,
                src_stride_h,
                src_stride_w,
                H,
                W,
                zero_plane_ptr,
                KMAX,
                KK_STRIDE,
                True,
                RESIDUAL,
                ACC,
                BLOCK_C,
                BLOCK_HW,
                VEC,
                PLANE_H,
                PLANE_W,
                PLANE_WP,
                PLANE_DENSE,
            )
            tl.store(dx_b + dx_tile, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WGRAD and PLANE_W == 0:
            g = tl.load(s_b + s_tile, mask=mask, other=0.0).to(ACC)
            acc_b += tl.sum(g, axis=1)
            acc_w = _wgrad_tile(
                acc_w,
                g,
                x_b,
                cs,
                cmask,
                h,
                w,
                pmask,
                k,
                x_stride_c,
                x_stride_h,
                x_stride_w,
                H,
                W,
                KMAX,
                KK_POW2,
                ACC,
                BLOCK_C,
                BLOCK_HW,
                VEC,
            )
        s_b += src_stride_b
        x_b += x_stride_b
        dx_b += dx_stride_b
    if WGRAD and PLANE_W > 0:  # a second sweep over the program's images: src and x again (from L2)
        _wgrad_plane_k(
            src_ptr + b_lo.to(tl.int64) * src_stride_b,
            x_ptr + b_lo.to(tl.int64) * x_stride_b,
            pdw_ptr,
            pdb_ptr,
            cs,
            cmask,
            _partial_rows(C, cs),
            b_hi - b_lo,
            src_stride_b,
            src_stride_c,
            src_stride_h,
            src_stride_w,
            x_stride_b,
            x_stride_c,
            x_stride_h,
            x_stride_w,
            KMAX,
            KK_STRIDE,
            True,
            ACC,
            BLOCK_C,
            PLANE_H,
            PLANE_W,
            PLANE_WP,
        )
    elif WGRAD:
        if VEC:
            acc_w = _tap_totals(acc_w, KMAX * KMAX, KK_POW2)
        _store_wgrad_partials(pdw_ptr, pdb_ptr, acc_w, acc_b, cs, cmask, C, KK_STRIDE, KK_POW2)


@triton.jit
def _copy_group_taps(
    group_ptr,
    group_bias_ptr,
    table_ptr,
    bias_ptr,
    first,
    count,
    K: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    TO_TABLE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One group's channels of this program (axis 0: blocks of BLOCK_R) between the group's [count, K*K] weights and
    [count] bias and rows first.. of the packed [C, KK_STRIDE] table and [C] bias. TO_TABLE: the group's into the
    table, the taps past K*K written as zeros; else the table's (the summed gradients) into the group's, the padding
    taps dropped, in the group's dtype."""
    channels = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = channels[:, None]
    taps = tl.arange(0, BLOCK_T)[None, :]
    group_offs = rows * (K * K) + taps
    table_offs = (first + rows) * KK_STRIDE + taps
    in_group = (rows < count) & (taps < K * K)
    # explicit casts to the stored dtype: the interpreter's implicit one on a store to a 16-bit pointer is wrong
    if TO_TABLE:
        values = tl.load(group_ptr + group_offs, mask=in_group, other=0.0).to(table_ptr.dtype.element_ty)
        tl.store(table_ptr + table_offs, values, mask=(rows < count) & (taps < KK_STRIDE))
        bias = tl.load(group_bias_ptr + channels, mask=channels < count).to(bias_ptr.dtype.element_ty)
        tl.store(bias_ptr + first + channels, bias, mask=channels < count)
    else:
        values = tl.load(table_ptr + table_offs, mask=in_group).to(group_ptr.dtype.element_ty)
        tl.store(group_ptr + group_offs, values, mask=in_group)
        bias = tl.load(bias_ptr + first + channels, mask=channels < count).to(group_bias_ptr.dtype.element_ty)
        tl.store(group_bias_ptr + channels, bias, mask=channels < count)


@triton.jit
def _pack_kernel(
    w0_ptr,
    w1_ptr,
    w2_ptr,
    w3_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    b3_ptr,
    table_ptr,
    bias_ptr,
    first0,
    first1,
    first2,
    first3,
    count0,
    count1,
    count2,
    count3,
    K0: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    K3: tl.constexpr,
    GROUPS: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    TO_TABLE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Up to four channel groups (grid axis 1) of the multi-scale weights packed into the zero-padded table, or the
    table's gradient unpacked into theirs (`_copy_group_taps`). Four explicit slots because a Triton kernel takes no
    list of pointers; the branch on the program's group is uniform over the program."""
    group = tl.program_id(1)
    if group == 0:
        _copy_group_taps(w0_ptr, b0_ptr, table_ptr, bias_ptr, first0, count0, K0, KK_STRIDE, TO_TABLE, BLOCK_R, BLOCK_T)
    if GROUPS > 1:
        if group == 1:
            _copy_group_taps(
                w1_ptr, b1_ptr, table_ptr, bias_ptr, first1, count1, K1, KK_STRIDE, TO_TABLE, BLOCK_R, BLOCK_T
            )
    if GROUPS > 2:
        if group == 2:
            _copy_group_taps(
                w2_ptr, b2_ptr, table_ptr, bias_ptr, first2, count2, K2, KK_STRIDE, TO_TABLE, BLOCK_R, BLOCK_T
            )
    if GROUPS > 3:
        if group == 3:
            _copy_group_taps(
                w3_ptr, b3_ptr, table_ptr, bias_ptr, first3, count3, K3, KK_STRIDE, TO_TABLE, BLOCK_R, BLOCK_T
            )


@triton.jit
def _partials_tile(first, cs, cmask, P, C, BLOCK_P: tl.constexpr):
    """Offsets and mask of rows first .. first + BLOCK_P - 1 of a [P, C] partials buffer, channels cs."""
    rows = first + tl.arange(0, BLOCK_P)
    return rows[:, None] * C + cs[None, :], (rows < P)[:, None] & cmask[None, :]


@triton.jit
def _batch_norm_root(var, eps_ptr):
    """sqrt(var + eps), correctly rounded: sqrt_rn is fp32's correctly rounded square root; fp64's plain one is."""
    if var.dtype == tl.float64:
        return tl.sqrt(var + tl.load(eps_ptr))
    return tl.sqrt_rn(var + tl.load(eps_ptr))


@triton.jit
def _batch_norm_affine_kernel(
    pcnt_ptr,
    pmean_ptr,
    pm2_ptr,
    mean_ptr,
    var_ptr,
    weight_ptr,
    bias_ptr,
    eps_ptr,
    scale_ptr,
    shift_ptr,
    P,
    C,
    FROM_PARTIALS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """BatchNorm's per-channel affine map, scale = weight / sqrt(var + eps) and shift = bias - mean * scale, for a
    block of channels. FROM_PARTIALS (training): mean and the biased variance combined from the statistics pass's
    (count, mean, M2) partials [P, C], mean = sum c*m / n, var = sum (M2 + c*(m - mean)^2) / n, and stored; else
    mean_ptr and var_ptr hold them already (eval: copies of the running statistics). The partials are swept in
    tiles of BLOCK_P rows, each tile's rows summed in place and the rows reduced once at the end (a fixed order):
    a sweep row by row took P trips of a few loads each, on as few programs as channel blocks."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    if FROM_PARTIALS:
        n_tile = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        total_tile = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        for p0 in range(0, P, BLOCK_P):
            offs, tile_mask = _partials_tile(p0, cs, cmask, P, C, BLOCK_P)
            count = tl.load(pcnt_ptr + offs, mask=tile_mask, other=0.0)
            n_tile += count
            total_tile += count * tl.load(pmean_ptr + offs, mask=tile_mask, other=0.0)
        n = tl.sum(n_tile, axis=0)
        mean = tl.sum(total_tile, axis=0) / n
        m2_tile = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        for q0 in range(0, P, BLOCK_P):  # a second sweep: the deviations from the batch mean, not a running one
            offs, tile_mask = _partials_tile(q0, cs, cmask, P, C, BLOCK_P)
            d = tl.load(pmean_ptr + offs, mask=tile_mask, other=0.0) - mean[None, :]
            m2_tile += tl.load(pm2_ptr + offs, mask=tile_mask, other=0.0) + tl.load(
                pcnt_ptr + offs, mask=tile_mask, other=0.0
            ) * (d * d)
        var = tl.sum(m2_tile, axis=0) / n
        tl.store(mean_ptr + cs, mean, mask=cmask)
        tl.store(var_ptr + cs, var, mask=cmask)
    else:
        mean = tl.load(mean_ptr + cs, mask=cmask, other=0.0)
        var = tl.load(var_ptr + cs, mask=cmask, other=0.0)
    scale = tl.load(weight_ptr + cs, mask=cmask, other=0.0).to(ACC) / _batch_norm_root(var, eps_ptr)
    tl.store(scale_ptr + cs, scale, mask=cmask)
    tl.store(shift_ptr + cs, tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(ACC) - mean * scale, mask=cmask)


@triton.jit
def _batch_norm_grad_kernel(
    var_ptr,
    eps_ptr,
    weight_ptr,
    sgo_ptr,
    sgx_ptr,
    coef_ptr,
    dgamma_ptr,
    dbeta_ptr,
    P,
    count,
    C,
    SUMS: tl.constexpr,
    COEFFICIENTS: tl.constexpr,
    CENTRED: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """BatchNorm's per-channel backward terms for a block of channels. SUMS: dbeta = sum go and dgamma = sum go*xhat
    from the partials [P, C] of a pass (tiles of BLOCK_P rows, a fixed order), stored in the weight's dtype.
    COEFFICIENTS: the dz passes' coefficients coef [4, C] = (rstd, cgo, cxhat, cconst), rstd = 1 / sqrt(var + eps),
    cgo = gamma * rstd and, CENTRED (training: the batch statistics depend on every value), cxhat = -cgo * dgamma / n
    and cconst = -cgo * dbeta / n from this launch's sums; else zeros (eval). On a GPU these were ~12 small torch
    launches per backward."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    if SUMS:
        go_tile = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        gx_tile = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        for p0 in range(0, P, BLOCK_P):
            offs, tile_mask = _partials_tile(p0, cs, cmask, P, C, BLOCK_P)
            go_tile += tl.load(sgo_ptr + offs, mask=tile_mask, other=0.0)
            gx_tile += tl.load(sgx_ptr + offs, mask=tile_mask, other=0.0)
        dbeta = tl.sum(go_tile, axis=0)
        dgamma = tl.sum(gx_tile, axis=0)
        tl.store(dbeta_ptr + cs, dbeta, mask=cmask)
        tl.store(dgamma_ptr + cs, dgamma, mask=cmask)
    if COEFFICIENTS:
        rstd = 1 / _batch_norm_root(tl.load(var_ptr + cs, mask=cmask, other=1.0), eps_ptr)
        cgo = tl.load(weight_ptr + cs, mask=cmask, other=0.0).to(ACC) * rstd
        tl.store(coef_ptr + cs, rstd, mask=cmask)
        tl.store(coef_ptr + C + cs, cgo, mask=cmask)
        if CENTRED:
            n = tl.cast(count, ACC)
            tl.store(coef_ptr + 2 * C + cs, -cgo * dgamma / n, mask=cmask)
            tl.store(coef_ptr + 3 * C + cs, -cgo * dbeta / n, mask=cmask)
        else:
            tl.store(coef_ptr + 2 * C + cs, tl.zeros([BLOCK_C], ACC), mask=cmask)
            tl.store(coef_ptr + 3 * C + cs, tl.zeros([BLOCK_C], ACC), mask=cmask)


@triton.jit
def _running_statistics_kernel(
    mean_ptr,
    var_ptr,
    running_mean_ptr,
    running_var_ptr,
    momentum_hi,
    momentum_lo,
    count,
    C,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """BatchNorm's running statistics (None: not tracked) updated in place as F.batch_norm does, running =
    momentum * batch + (1 - momentum) * running, with the batch variance unbiased by count / (count - 1), in ACC.
    The momentum comes as two fp32 arguments (Triton's float arguments are fp32) whose sum is the Python float to
    ~2^-48, so fp64 statistics move by an fp64 momentum."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    momentum = tl.cast(momentum_hi, ACC) + tl.cast(momentum_lo, ACC)
    if running_mean_ptr is not None:
        mean = tl.load(mean_ptr + cs, mask=cmask, other=0.0)
        old_mean = tl.load(running_mean_ptr + cs, mask=cmask, other=0.0).to(ACC)
        tl.store(running_mean_ptr + cs, momentum * mean + (1 - momentum) * old_mean, mask=cmask)
    if running_var_ptr is not None:
        n = tl.cast(count, ACC)
        unbiased = tl.load(var_ptr + cs, mask=cmask, other=0.0) * (n / (n - 1))
        old_var = tl.load(running_var_ptr + cs, mask=cmask, other=0.0).to(ACC)
        tl.store(running_var_ptr + cs, momentum * unbiased + (1 - momentum) * old_var, mask=cmask)


# ------------------------------------------------------------------------------------------- strips


@triton.jit
def _strip_block(blocks_ptr, W, BLOCK_C: tl.constexpr, CHUNKS: tl.constexpr, STRIP: tl.constexpr):
    """This program's channel block (grid axis 1: channels, mask) and strip (axis 0: _strip_coords' first row,
    chunk columns, mask and neighbour flags)."""
    blk = tl.program_id(1)
    cs = tl.load(blocks_ptr + 3 * blk) + tl.arange(0, BLOCK_C)
    cmask = cs < tl.load(blocks_ptr + 3 * blk + 1)
    h0, wq, qmask, left_ok, right_ok = _strip_coords(tl.program_id(0), W, STRIP, CHUNKS)
    return cs, cmask, h0, wq, qmask, left_ok, right_ok


@triton.jit
def _chunk_mask(cmask, qmask, hh, H):
    """[BLOCK_C, CHUNKS, 1]: the strip's chunks of row hh that are in the image, for the block's channels."""
    return (cmask[:, None] & (qmask & (hh < H))[None, :])[:, :, None]


@triton.jit
def _lane_sum(t, BLOCK_C: tl.constexpr, CHUNKS: tl.constexpr):
    """[BLOCK_C, CHUNKS]: a [BLOCK_C, CHUNKS, 4] tile summed over its lanes within each thread (adds of split
    lanes: a tl.sum over the lane axis, accumulated in the image loop, crashed Triton 3.8's thread-locality
    pass)."""
    l0, l1, l2, l3 = _lanes(t, BLOCK_C, CHUNKS)
    return (l0 + l1) + (l2 + l3)


@triton.jit
def _strip_sum(t):
    """Per-channel sum of a [BLOCK_C, CHUNKS, 4] tile (one reduction across threads)."""
    return tl.sum(tl.sum(t, axis=2), axis=1)


@triton.jit(
    # batch counts of 1 (batch 1, or one image per program) would compile a second copy of every kernel
    do_not_specialize=["B", "b_per_prog"],
    do_not_specialize_on_alignment=[
        "C",
        "H",
        "W",
        "x_stride_b",
        "x_stride_c",
        "x_stride_h",
        "out_stride_b",
        "out_stride_c",
        "out_stride_h",
    ],
)
def _strip_forward_kernel(
    x_ptr,
    out_ptr,
    weight_ptr,
    bias_ptr,
    blocks_ptr,
    scale_ptr,
    shift_ptr,
    pcnt_ptr,
    pmean_ptr,
    pm2_ptr,
    B,
    C,
    H,
    W,
    b_per_prog,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    out_stride_b,
    out_stride_c,
    out_stride_h,
    MODE: tl.constexpr,
    K: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHUNKS: tl.constexpr,
    STRIP: tl.constexpr,
    ACC: tl.constexpr,
):
    """_forward_kernel's stencil modes (_CONV, _APPLY, _STATS, _PREACT) on strips of STRIP rows of NCHW maps whose
    rows are a multiple of 4 pixels: a program per (strip x block of CHUNKS chunks of a row, channel block of
    kernel size K, batch split), a thread per (channel, chunk); _dwconv_strip_vec_k computes the strip's rows
    (with the residual, taken from its loaded rows), and _STATS reduces (count, mean, M2) of GELU(z) across
    threads once per strip and image (the strip's values stay in registers for the second moment)."""
    NARROW: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth == 16  # the 16-bit GELU (`_normal_cdf`)
    x_stride_b, x_stride_c, x_stride_h = _chunk_strides(x_stride_b, x_stride_c, x_stride_h)
    out_stride_b, out_stride_c, out_stride_h = _chunk_strides(out_stride_b, out_stride_c, out_stride_h)
    cs, cmask, h0, wq, qmask, left_ok, right_ok = _strip_block(blocks_ptr, W, BLOCK_C, CHUNKS, STRIP)
    o_chunks = cs[:, None] * (out_stride_c // 4)
    bias = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    x_b = x_ptr + b_lo.to(tl.int64) * x_stride_b
    o_b = out_ptr + b_lo.to(tl.int64) * out_stride_b
    if MODE == 1:
        scale = tl.load(scale_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
        shift = tl.load(shift_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    if MODE == 2:
        n = tl.zeros([BLOCK_C], ACC)
        mean = tl.zeros([BLOCK_C], ACC)
        m2 = tl.zeros([BLOCK_C], ACC)
        # pixels of the strip in the image (the same for every image and channel)
        n_strip = (tl.minimum(H - h0, STRIP) * 4 * tl.sum(qmask.to(tl.int32), axis=0)).to(ACC)
    taps = _stencil_taps(weight_ptr, cs, cmask, K, KK_STRIDE, ACC)
    for _ in range(b_lo, b_hi):
        rows = _dwconv_strip_vec_k(
            x_b,
            taps,
            cs,
            cmask,
            h0,
            wq,
            qmask,
            left_ok,
            right_ok,
            H,
            x_stride_c,
            x_stride_h,
            K,
            False,
            MODE != 0,
            ACC,
            BLOCK_C,
            CHUNKS,
            STRIP,
        )
        if MODE == 2:
            ys = ()
            y_total = tl.zeros([BLOCK_C, CHUNKS, 4], ACC)
        for o in tl.static_range(STRIP):
            ok = _chunk_mask(cmask, qmask, h0 + o, H)
            z = rows[o] + bias
            out_ptrs = _chunk_ptrs(o_b, o_chunks, h0 + o, wq, out_stride_h)
            if MODE == 1:
                tl.store(out_ptrs, (_gelu(z, NARROW) * scale + shift).to(out_ptr.dtype.element_ty), mask=ok)
            else:  # the conv, or z (saved for _APPLY_SAVED and the backward)
                tl.store(out_ptrs, z.to(out_ptr.dtype.element_ty), mask=ok)
            if MODE == 2:  # the statistics keep z's full precision
                y = tl.where(ok, _gelu(z, NARROW), 0.0)
                ys = ys + (y,)
                y_total += y
        if MODE == 2:
            mean_strip = _strip_sum(y_total) / n_strip
            sq_total = tl.zeros([BLOCK_C, CHUNKS, 4], ACC)
            for o in tl.static_range(STRIP):
                d = tl.where(_chunk_mask(cmask, qmask, h0 + o, H), ys[o] - mean_strip[:, None, None], 0.0)
                sq_total += d * d
            delta = mean_strip - mean
            n_new = n + n_strip
            mean += delta * (n_strip / n_new)
            m2 += _strip_sum(sq_total) + delta * delta * (n * n_strip / n_new)
            n = n_new
        x_b += x_stride_b
        o_b += out_stride_b
    if MODE == 2:
        part = _partial_rows(C, cs)
        tl.store(pcnt_ptr + part, n, mask=cmask)
        tl.store(pmean_ptr + part, mean, mask=cmask)
        tl.store(pm2_ptr + part, m2, mask=cmask)


@triton.jit
def _mapped_chunk(x_b, x_chunks, hh, wq, x_stride_h, mask, H, in_scale, in_shift, slots_ptr, ACC: tl.constexpr):
    """y = GELU(x) * in_scale + in_shift of the thread's chunk of row hh, in the slots' dtype; zero on rows outside
    the image (the conv's zero padding of y)."""
    NARROW: tl.constexpr = x_b.dtype.element_ty.primitive_bitwidth == 16  # the 16-bit GELU (`_normal_cdf`)
    inside = (hh >= 0) & (hh < H)
    x = tl.load(_chunk_ptrs(x_b, x_chunks, hh, wq, x_stride_h), mask=mask & inside, other=0.0).to(ACC)
    return tl.where(inside, _gelu(x, NARROW) * in_scale + in_shift, 0.0).to(slots_ptr.dtype.element_ty)


@triton.jit(
    do_not_specialize=["B", "b_per_prog"],
    do_not_specialize_on_alignment=[
        "H",
        "W",
        "x_stride_b",
        "x_stride_c",
        "x_stride_h",
        "out_stride_b",
        "out_stride_c",
        "out_stride_h",
    ],
)
def _strip_eval_kernel(
    x_ptr,
    out_ptr,
    slots_ptr,
    weight_ptr,
    bias_ptr,
    blocks_ptr,
    in_scale_ptr,
    in_shift_ptr,
    scale_ptr,
    shift_ptr,
    B,
    H,
    W,
    b_per_prog,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    out_stride_b,
    out_stride_c,
    out_stride_h,
    K: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHUNKS: tl.constexpr,
    STRIP: tl.constexpr,
    ACC: tl.constexpr,
):
    """ms_ffn_middle_eval in one pass on NCHW maps whose rows a program covers whole (W a multiple of 4 and at most
    4 * CHUNKS; stages 1-2 at 224^2): a program per (channel block, batch split) walks down each image's strips of
    STRIP rows. Its slot ([BLOCK_C, STRIP + K - 1, W] of `slots_ptr`, x's dtype, as the two-launch form stores y)
    holds the strip's input rows: per strip each thread maps its own chunk of the STRIP new rows, y = GELU(x) *
    in_scale + in_shift (zero on rows outside the image: the conv's padding), below the K - 1 rows kept from the
    strip above; after a barrier the strip stencil runs on the slot (`_dwconv_strip_vec_k`: the slot's rows all
    count as inside, a row's ends are the image's) and out = GELU(conv(y) + bias + y) * scale + shift is stored;
    after a second barrier each thread moves its own chunks of the last K - 1 rows to the top. So each input
    element's GELU runs once, where a program per strip mapped its halo rows again ((STRIP + K - 1) / STRIP times:
    2.5x at K = 7 with 4 rows, 1.86x with 7). K = 1: no slot, y stays in registers."""
    NARROW: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth == 16  # the 16-bit GELU (`_normal_cdf`)
    R: tl.constexpr = K // 2
    SLOT_ROWS: tl.constexpr = STRIP + 2 * R
    x_stride_b, x_stride_c, x_stride_h = _chunk_strides(x_stride_b, x_stride_c, x_stride_h)
    out_stride_b, out_stride_c, out_stride_h = _chunk_strides(out_stride_b, out_stride_c, out_stride_h)
    W = _multiple_of_4(W)
    cs, cmask, _, wq, qmask, left_ok, right_ok = _strip_block(blocks_ptr, W, BLOCK_C, CHUNKS, STRIP)
    taps = _stencil_taps(weight_ptr, cs, cmask, K, KK_STRIDE, ACC)
    bias = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    in_scale = tl.load(in_scale_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    in_shift = tl.load(in_shift_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    scale = tl.load(scale_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    shift = tl.load(shift_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    x_chunks = cs[:, None] * (x_stride_c // 4)
    o_chunks = cs[:, None] * (out_stride_c // 4)
    slot_channel = tl.arange(0, BLOCK_C)
    slot_chunks = slot_channel[:, None] * (SLOT_ROWS * W // 4)
    slot = slots_ptr + (tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)).to(tl.int64) * (
        BLOCK_C * SLOT_ROWS * W
    )
    slot_mask = (cmask[:, None] & qmask[None, :])[:, :, None]
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    x_b = x_ptr + b_lo.to(tl.int64) * x_stride_b
    o_b = out_ptr + b_lo.to(tl.int64) * out_stride_b
    for _ in range(b_lo, b_hi):
        if K > 1:  # slot rows 0 .. 2R - 1: image rows -R .. R - 1, above the first strip's new rows
            for r in tl.static_range(2 * R):
                y = _mapped_chunk(
                    x_b, x_chunks, r - R, wq, x_stride_h, slot_mask, H, in_scale, in_shift, slots_ptr, ACC
                )
                tl.store(_chunk_ptrs(slot, slot_chunks, r, wq, W), y, mask=slot_mask)
        for h0 in range(0, H, STRIP):
            if K == 1:
                rows = ()
                for o in tl.static_range(STRIP):
                    y = _mapped_chunk(
                        x_b, x_chunks, h0 + o, wq, x_stride_h, slot_mask, H, in_scale, in_shift, slots_ptr, ACC
                    )
                    rows = rows + (taps[0][:, :, None] * y.to(ACC) + y.to(ACC),)
            else:
                for r in tl.static_range(STRIP):  # the strip's new rows h0 + R .., each mapped once
                    y = _mapped_chunk(
                        x_b, x_chunks, h0 + R + r, wq, x_stride_h, slot_mask, H, in_scale, in_shift, slots_ptr, ACC
                    )
                    tl.store(_chunk_ptrs(slot, slot_chunks, 2 * R + r, wq, W), y, mask=slot_mask)
                tl.debug_barrier()  # every thread's slot stores before any thread's stencil loads
                rows = _dwconv_strip_vec_k(
                    slot,
                    taps,
                    slot_channel,
                    cmask,
                    R,
                    wq,
                    qmask,
                    left_ok,
                    right_ok,
                    SLOT_ROWS,
                    SLOT_ROWS * W,
                    W,
                    K,
                    False,
                    True,
                    ACC,
                    BLOCK_C,
                    CHUNKS,
                    STRIP,
                )
            for o in tl.static_range(STRIP):
                out = _gelu(rows[o] + bias, NARROW) * scale + shift
                tl.store(
                    _chunk_ptrs(o_b, o_chunks, h0 + o, wq, out_stride_h),
                    out.to(out_ptr.dtype.element_ty),
                    mask=_chunk_mask(cmask, qmask, h0 + o, H),
                )
            if K > 1:
                tl.debug_barrier()  # every thread's stencil loads before the slot changes
                # The next strip's top rows are this one's last 2R: each thread moves its own chunks (in order, so an
                # overlap, 2R > STRIP, reads each row before it is overwritten).
                for r in tl.static_range(2 * R):
                    kept = tl.load(_chunk_ptrs(slot, slot_chunks, STRIP + r, wq, W), mask=slot_mask)
                    tl.store(_chunk_ptrs(slot, slot_chunks, r, wq, W), kept, mask=slot_mask)
        x_b += x_stride_b
        o_b += out_stride_b


@triton.jit(
    # batch counts of 1 (batch 1, or one image per program) would compile a second copy of every kernel
    do_not_specialize=["B", "b_per_prog"],
    do_not_specialize_on_alignment=[
        "C",
        "H",
        "W",
        "x_stride_b",
        "x_stride_c",
        "x_stride_h",
        "grad_out_stride_b",
        "grad_out_stride_c",
        "grad_out_stride_h",
        "dz_stride_b",
        "dz_stride_c",
        "dz_stride_h",
    ],
)
def _strip_dz_kernel(
    x_ptr,
    z_ptr,
    grad_out_ptr,
    dz_ptr,
    blocks_ptr,
    mean_ptr,
    rstd_ptr,
    cgo_ptr,
    cxhat_ptr,
    cconst_ptr,
    psgo_ptr,
    psgx_ptr,
    pdw_ptr,
    pdb_ptr,
    B,
    C,
    H,
    W,
    b_per_prog,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    grad_out_stride_b,
    grad_out_stride_c,
    grad_out_stride_h,
    dz_stride_b,
    dz_stride_c,
    dz_stride_h,
    STATS: tl.constexpr,
    K: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    KK_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHUNKS: tl.constexpr,
    STRIP: tl.constexpr,
    ACC: tl.constexpr,
):
    """_middle_grad_kernel's dz pass (DZ, Z_SAVED; STATS too in eval) on the strips of _strip_forward_kernel: per
    row of the strip z and go are read (one vector load each), dz = (cgo*go + cxhat*xhat + cconst) * GELU'(z) is
    stored, and the strip's dz, still in registers (unrounded), feeds _wgrad_strip_rows_k's per-thread dW
    partials, each x row loaded once per strip. Sums of go, go*xhat and dz stay per thread until the end."""
    NARROW: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth == 16  # the 16-bit GELU (`_normal_cdf`)
    x_stride_b, x_stride_c, x_stride_h = _chunk_strides(x_stride_b, x_stride_c, x_stride_h)
    grad_out_stride_b, grad_out_stride_c, grad_out_stride_h = _chunk_strides(
        grad_out_stride_b, grad_out_stride_c, grad_out_stride_h
    )
    dz_stride_b, dz_stride_c, dz_stride_h = _chunk_strides(dz_stride_b, dz_stride_c, dz_stride_h)
    cs, cmask, h0, wq, qmask, left_ok, right_ok = _strip_block(blocks_ptr, W, BLOCK_C, CHUNKS, STRIP)
    x_chunks = cs[:, None] * (x_stride_c // 4)
    g_chunks = cs[:, None] * (grad_out_stride_c // 4)
    d_chunks = cs[:, None] * (dz_stride_c // 4)
    mean = tl.load(mean_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    rstd = tl.load(rstd_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    cgo = tl.load(cgo_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    cxhat = tl.load(cxhat_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    cconst = tl.load(cconst_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    x_b = x_ptr + b_lo.to(tl.int64) * x_stride_b
    g_b = grad_out_ptr + b_lo.to(tl.int64) * grad_out_stride_b
    d_b = dz_ptr + b_lo.to(tl.int64) * dz_stride_b
    z_b = z_ptr + b_lo.to(tl.int64) * dz_stride_b
    if STATS:
        t_go = tl.zeros([BLOCK_C, CHUNKS], ACC)
        t_gx = tl.zeros([BLOCK_C, CHUNKS], ACC)
    t_dz = tl.zeros([BLOCK_C, CHUNKS], ACC)
    acc_w = _wgrad_init(K, KK_POW2, ACC, BLOCK_C, 4 * CHUNKS, True)
    for _ in range(b_lo, b_hi):
        dz_rows = ()
        for o in tl.static_range(STRIP):
            ok = _chunk_mask(cmask, qmask, h0 + o, H)
            z = tl.load(_chunk_ptrs(z_b, d_chunks, h0 + o, wq, dz_stride_h), mask=ok, other=0.0).to(ACC)
            go = tl.load(_chunk_ptrs(g_b, g_chunks, h0 + o, wq, grad_out_stride_h), mask=ok, other=0.0).to(ACC)
            xhat = (_gelu(z, NARROW) - mean) * rstd
            if STATS:  # go is zero outside the image
                t_go += _lane_sum(go, BLOCK_C, CHUNKS)
                t_gx += _lane_sum(go * xhat, BLOCK_C, CHUNKS)
            dz = tl.where(ok, (cgo * go + cxhat * xhat + cconst) * _gelu_grad(z, NARROW), 0.0)
            tl.store(_chunk_ptrs(d_b, d_chunks, h0 + o, wq, dz_stride_h), dz.to(dz_ptr.dtype.element_ty), mask=ok)
            l0, l1, l2, l3 = _lanes(dz, BLOCK_C, CHUNKS)
            t_dz += (l0 + l1) + (l2 + l3)
            dz_rows = dz_rows + (l0, l1, l2, l3)
        acc_w = _wgrad_strip_rows_k(
            acc_w,
            dz_rows,
            x_b,
            x_chunks,
            cmask,
            h0,
            wq,
            qmask,
            left_ok,
            right_ok,
            H,
            x_stride_h,
            K,
            ACC,
            BLOCK_C,
            CHUNKS,
            STRIP,
        )
        x_b += x_stride_b
        z_b += dz_stride_b
        g_b += grad_out_stride_b
        d_b += dz_stride_b
    if STATS:
        part = _partial_rows(C, cs)
        tl.store(psgo_ptr + part, tl.sum(t_go, axis=1), mask=cmask)
        tl.store(psgx_ptr + part, tl.sum(t_gx, axis=1), mask=cmask)
    acc_w = _tap_totals(acc_w, K * K, KK_POW2)
    _store_wgrad_partials(pdw_ptr, pdb_ptr, acc_w, tl.sum(t_dz, axis=1), cs, cmask, C, KK_STRIDE, KK_POW2)


@triton.jit(
    # batch counts of 1 (batch 1, or one image per program) would compile a second copy of every kernel
    do_not_specialize=["B", "b_per_prog"],
    do_not_specialize_on_alignment=[
        "C",
        "H",
        "W",
        "src_stride_b",
        "src_stride_c",
        "src_stride_h",
        "x_stride_b",
        "x_stride_c",
        "x_stride_h",
        "dx_stride_b",
        "dx_stride_c",
        "dx_stride_h",
    ],
)
def _strip_dx_kernel(
    src_ptr,
    x_ptr,
    dx_ptr,
    weight_ptr,
    blocks_ptr,
    pdw_ptr,
    pdb_ptr,
    B,
    C,
    H,
    W,
    b_per_prog,
    src_stride_b,
    src_stride_c,
    src_stride_h,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    dx_stride_b,
    dx_stride_c,
    dx_stride_h,
    RESIDUAL: tl.constexpr,
    WGRAD: tl.constexpr,
    K: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    KK_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHUNKS: tl.constexpr,
    STRIP: tl.constexpr,
    ACC: tl.constexpr,
):
    """_dx_kernel on the strips of _strip_forward_kernel: dx = conv_transpose(src) (+ src if RESIDUAL, from the
    stencil's loaded rows); WGRAD: per-thread dW partials from _wgrad_strip_vec_k (src's rows again, from L1/L2, and
    each x row once per strip), reduced across threads once per program, and dbias."""
    src_stride_b, src_stride_c, src_stride_h = _chunk_strides(src_stride_b, src_stride_c, src_stride_h)
    x_stride_b, x_stride_c, x_stride_h = _chunk_strides(x_stride_b, x_stride_c, x_stride_h)
    dx_stride_b, dx_stride_c, dx_stride_h = _chunk_strides(dx_stride_b, dx_stride_c, dx_stride_h)
    cs, cmask, h0, wq, qmask, left_ok, right_ok = _strip_block(blocks_ptr, W, BLOCK_C, CHUNKS, STRIP)
    dx_chunks = cs[:, None] * (dx_stride_c // 4)
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    s_b = src_ptr + b_lo.to(tl.int64) * src_stride_b
    x_b = x_ptr + b_lo.to(tl.int64) * x_stride_b
    dx_b = dx_ptr + b_lo.to(tl.int64) * dx_stride_b
    if WGRAD:
        acc_w = _wgrad_init(K, KK_POW2, ACC, BLOCK_C, 4 * CHUNKS, True)
        t_g = tl.zeros([BLOCK_C, CHUNKS], ACC)
    taps = _stencil_taps(weight_ptr, cs, cmask, K, KK_STRIDE, ACC)
    for _ in range(b_lo, b_hi):
        rows = _dwconv_strip_vec_k(
            s_b,
            taps,
            cs,
            cmask,
            h0,
            wq,
            qmask,
            left_ok,
            right_ok,
            H,
            src_stride_c,
            src_stride_h,
            K,
            True,
            RESIDUAL,
            ACC,
            BLOCK_C,
            CHUNKS,
            STRIP,
        )
        for o in tl.static_range(STRIP):
            dx_ptrs = _chunk_ptrs(dx_b, dx_chunks, h0 + o, wq, dx_stride_h)
            tl.store(dx_ptrs, rows[o].to(dx_ptr.dtype.element_ty), mask=_chunk_mask(cmask, qmask, h0 + o, H))
        if WGRAD:
            acc_w, g_total = _wgrad_strip_vec_k(
                acc_w,
                s_b,
                x_b,
                cs,
                cmask,
                h0,
                wq,
                qmask,
                left_ok,
                right_ok,
                H,
                src_stride_c,
                src_stride_h,
                x_stride_c,
                x_stride_h,
                K,
                ACC,
                BLOCK_C,
                CHUNKS,
                STRIP,
            )
            t_g += g_total
        s_b += src_stride_b
        x_b += x_stride_b
        dx_b += dx_stride_b
    if WGRAD:
        acc_w = _tap_totals(acc_w, K * K, KK_POW2)
        _store_wgrad_partials(pdw_ptr, pdb_ptr, acc_w, tl.sum(t_g, axis=1), cs, cmask, C, KK_STRIDE, KK_POW2)


@triton.jit
def _dz_chunk(
    z_b, g_b, chunks, hh, wq, stride_h, mask, H, cgo, slope, offset, mean, rstd, STATS: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """(dz, go, xhat) of the thread's chunk of row hh: dz = (cgo*go + cxhat*xhat + cconst) * GELU'(z) in ACC, taken as
    (cgo*go + slope*GELU(z) + offset) * GELU'(z) (slope = cxhat*rstd, offset = cconst - slope*mean), zero on rows
    outside the image (the transposed conv's zero padding of dz), go too; xhat = (GELU(z) - mean) * rstd where STATS
    (BatchNorm's gradient sums), else 0."""
    NARROW: tl.constexpr = z_b.dtype.element_ty.primitive_bitwidth == 16  # the 16-bit GELU (`_normal_cdf`)
    inside = (hh >= 0) & (hh < H)
    ok = mask & inside
    z = tl.load(_chunk_ptrs(z_b, chunks, hh, wq, stride_h), mask=ok, other=0.0).to(ACC)
    go = tl.load(_chunk_ptrs(g_b, chunks, hh, wq, stride_h), mask=ok, other=0.0).to(ACC)
    y = _gelu(z, NARROW)
    xhat = (y - mean) * rstd if STATS else 0.0
    return tl.where(ok, (cgo * go + slope * y + offset) * _gelu_grad(z, NARROW), 0.0), go, xhat


@triton.jit(
    do_not_specialize=["B", "b_per_prog"],
    do_not_specialize_on_alignment=[
        "C",
        "H",
        "W",
        "stride_b",
        "stride_c",
        "stride_h",
    ],
)
def _strip_dz_dx_kernel(
    x_ptr,
    z_ptr,
    grad_out_ptr,
    dx_ptr,
    slots_ptr,
    weight_ptr,
    blocks_ptr,
    mean_ptr,
    rstd_ptr,
    cgo_ptr,
    cxhat_ptr,
    cconst_ptr,
    psgo_ptr,
    psgx_ptr,
    pdw_ptr,
    pdb_ptr,
    B,
    C,
    H,
    W,
    b_per_prog,
    stride_b,
    stride_c,
    stride_h,
    STATS: tl.constexpr,
    K: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    KK_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHUNKS: tl.constexpr,
    STRIP: tl.constexpr,
    ACC: tl.constexpr,
):
    """The middle's backward from the saved z in one pass on contiguous NCHW maps whose rows a program covers whole
    (as `_strip_eval_kernel`; x, z, go and dx share one set of strides): dz = (cgo*go + cxhat*xhat + cconst) *
    GELU'(z), dx = conv_transpose(dz) + dz, the weight gradient's per-thread partials and dbias (STATS: BatchNorm's
    gradient sums too, in eval), reading z, go and x and writing dx, where `_strip_dz_kernel` then `_strip_dx_kernel`
    also wrote dz and read it back. A program per (channel block, batch split) walks down each image's strips of STRIP
    rows through its slot ([BLOCK_C, STRIP + K - 1, 4 * CHUNKS] of `slots_ptr`, in ACC: dz unrounded for both the
    stencil and dW): per strip each thread computes its own chunk of the STRIP new dz rows into the slot, below the
    K - 1 rows kept from the strip above; after a barrier the strip stencil runs on the slot (flipped taps, plus dz
    itself) and dx is stored, then each thread reads its own chunks of the strip's rows back for dW against x's rows
    (`_wgrad_strip_rows_k`); after a second barrier each thread moves its own chunks of the last K - 1 rows to the
    top. Each dz is computed once. K = 1: no slot, dz stays in registers."""
    R: tl.constexpr = K // 2
    SLOT_ROWS: tl.constexpr = STRIP + 2 * R
    SLOT_W: tl.constexpr = 4 * CHUNKS  # a slot row's stride, at compile time: its rows at constant offsets
    stride_b, stride_c, stride_h = _chunk_strides(stride_b, stride_c, stride_h)
    W = _multiple_of_4(W)
    cs, cmask, _, wq, qmask, left_ok, right_ok = _strip_block(blocks_ptr, W, BLOCK_C, CHUNKS, STRIP)
    # K = 7: the 49 taps, held for the whole program beside the 49 weight-gradient partials, spilled (fp32 on sm_90:
    # 72-200 B in strips of 4 rows, 28 B in strips of 2); loaded per strip instead, from L1 (the loop's stores keep
    # the compiler from hoisting them), about 2% more instructions a strip.
    HELD_TAPS: tl.constexpr = K < 7
    if HELD_TAPS:
        taps = _stencil_taps(weight_ptr, cs, cmask, K, KK_STRIDE, ACC)
    mean = tl.load(mean_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    rstd = tl.load(rstd_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    cgo = tl.load(cgo_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None]
    slope = tl.load(cxhat_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None] * rstd
    offset = tl.load(cconst_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None, None] - slope * mean
    chunks = cs[:, None] * (stride_c // 4)
    slot_channel = tl.arange(0, BLOCK_C)
    slot_chunks = slot_channel[:, None] * (SLOT_ROWS * CHUNKS)
    slot = slots_ptr + (tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)).to(tl.int64) * (
        BLOCK_C * SLOT_ROWS * SLOT_W
    )
    chunk_ok = (cmask[:, None] & qmask[None, :])[:, :, None]
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    image = b_lo.to(tl.int64) * stride_b
    if STATS:
        t_go = tl.zeros([BLOCK_C, CHUNKS], ACC)
        t_gx = tl.zeros([BLOCK_C, CHUNKS], ACC)
    t_dz = tl.zeros([BLOCK_C, CHUNKS], ACC)
    acc_w = _wgrad_init(K, KK_POW2, ACC, BLOCK_C, 4 * CHUNKS, True)
    for _ in range(b_lo, b_hi):
        if K > 1:  # slot rows 0 .. 2R - 1: image rows -R .. R - 1, above the first strip's new rows
            for r in tl.static_range(2 * R):  # (rows above the image fold to zeros at compile time)
                dz, go, xhat = _dz_chunk(
                    z_ptr + image, grad_out_ptr + image, chunks, r - R, wq, stride_h, chunk_ok, H,
                    cgo, slope, offset, mean, rstd, STATS, ACC,
                )  # fmt: skip
                if STATS:  # go is zero outside the image
                    t_go += _lane_sum(go, BLOCK_C, CHUNKS)
                    t_gx += _lane_sum(go * xhat, BLOCK_C, CHUNKS)
                tl.store(_chunk_ptrs(slot, slot_chunks, r, wq, SLOT_W), dz, mask=chunk_ok)
        for h0 in range(0, H, STRIP):
            dz_rows = ()
            if K == 1:
                for o in tl.static_range(STRIP):
                    dz, go, xhat = _dz_chunk(
                        z_ptr + image, grad_out_ptr + image, chunks, h0 + o, wq, stride_h, chunk_ok, H,
                        cgo, slope, offset, mean, rstd, STATS, ACC,
                    )  # fmt: skip
                    if STATS:
                        t_go += _lane_sum(go, BLOCK_C, CHUNKS)
                        t_gx += _lane_sum(go * xhat, BLOCK_C, CHUNKS)
                    dx = taps[0][:, :, None] * dz + dz
                    tl.store(
                        _chunk_ptrs(dx_ptr + image, chunks, h0 + o, wq, stride_h),
                        dx.to(dx_ptr.dtype.element_ty),
                        mask=_chunk_mask(cmask, qmask, h0 + o, H),
                    )
                    dz_rows = dz_rows + _lanes(dz, BLOCK_C, CHUNKS)
            else:
                for r in tl.static_range(STRIP):  # the strip's new rows h0 + R .., each computed once
                    dz, go, xhat = _dz_chunk(
                        z_ptr + image, grad_out_ptr + image, chunks, h0 + R + r, wq, stride_h, chunk_ok, H,
                        cgo, slope, offset, mean, rstd, STATS, ACC,
                    )  # fmt: skip
                    if STATS:
                        t_go += _lane_sum(go, BLOCK_C, CHUNKS)
                        t_gx += _lane_sum(go * xhat, BLOCK_C, CHUNKS)
                    tl.store(_chunk_ptrs(slot, slot_chunks, 2 * R + r, wq, SLOT_W), dz, mask=chunk_ok)
                tl.debug_barrier()  # every thread's slot stores before any thread's stencil loads
                if not HELD_TAPS:
                    taps = _stencil_taps(weight_ptr, cs, cmask, K, KK_STRIDE, ACC)
                rows = _dwconv_strip_vec_k(
                    slot,
                    taps,
                    slot_channel,
                    cmask,
                    R,
                    wq,
                    qmask,
                    left_ok,
                    right_ok,
                    SLOT_ROWS,
                    SLOT_ROWS * SLOT_W,
                    SLOT_W,
                    K,
                    True,
                    True,
                    ACC,
                    BLOCK_C,
                    CHUNKS,
                    STRIP,
                )
                for o in tl.static_range(STRIP):
                    tl.store(
                        _chunk_ptrs(dx_ptr + image, chunks, h0 + o, wq, stride_h),
                        rows[o].to(dx_ptr.dtype.element_ty),
                        mask=_chunk_mask(cmask, qmask, h0 + o, H),
                    )
                    # the thread's own chunk of the strip's dz row, back from the slot for the weight gradient
                    dz = tl.load(_chunk_ptrs(slot, slot_chunks, R + o, wq, SLOT_W), mask=chunk_ok, other=0.0)
                    dz_rows = dz_rows + _lanes(dz, BLOCK_C, CHUNKS)
            for v in tl.static_range(4 * STRIP):
                t_dz += dz_rows[v]
            acc_w = _wgrad_strip_rows_k(
                acc_w,
                dz_rows,
                x_ptr + image,
                chunks,
                cmask,
                h0,
                wq,
                qmask,
                left_ok,
                right_ok,
                H,
                stride_h,
                K,
                ACC,
                BLOCK_C,
                CHUNKS,
                STRIP,
            )
            if K > 1:
                tl.debug_barrier()  # every thread's stencil loads before the slot changes
                # The next strip's top rows are this one's last 2R: each thread moves its own chunks (in order, so an
                # overlap, 2R > STRIP, reads each row before it is overwritten).
                for r in tl.static_range(2 * R):
                    kept = tl.load(_chunk_ptrs(slot, slot_chunks, STRIP + r, wq, SLOT_W), mask=chunk_ok)
                    tl.store(_chunk_ptrs(slot, slot_chunks, r, wq, SLOT_W), kept, mask=chunk_ok)
        image += stride_b
    if STATS:
        part = _partial_rows(C, cs)
        tl.store(psgo_ptr + part, tl.sum(t_go, axis=1), mask=cmask)
        tl.store(psgx_ptr + part, tl.sum(t_gx, axis=1), mask=cmask)
    acc_w = _tap_totals(acc_w, K * K, KK_POW2)
    _store_wgrad_partials(pdw_ptr, pdb_ptr, acc_w, tl.sum(t_dz, axis=1), cs, cmask, C, KK_STRIDE, KK_POW2)


@triton.jit(
    do_not_specialize=["B", "b_per_prog"],
    do_not_specialize_on_alignment=[
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
        "dx_stride_b",
        "dx_stride_c",
        "dx_stride_h",
        "dx_stride_w",
    ],
)
def _plane_dz_dx_kernel(
    x_ptr,
    z_ptr,
    grad_out_ptr,
    dx_ptr,
    slots_ptr,
    weight_ptr,
    blocks_ptr,
    mean_ptr,
    rstd_ptr,
    cgo_ptr,
    cxhat_ptr,
    cconst_ptr,
    psgo_ptr,
    psgx_ptr,
    pdw_ptr,
    pdb_ptr,
    B,
    C,
    H,
    W,
    b_per_prog,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    grad_out_stride_b,
    grad_out_stride_c,
    grad_out_stride_h,
    grad_out_stride_w,
    dx_stride_b,
    dx_stride_c,
    dx_stride_h,
    dx_stride_w,
    zero_plane_ptr,
    STATS: tl.constexpr,
    KMAX: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PLANE_H: tl.constexpr,
    PLANE_W: tl.constexpr,
    PLANE_WP: tl.constexpr,
    PLANE_DENSE: tl.constexpr,
):
    """The middle's backward from the saved z in one pass on whole planes (the whole-plane plan: stages 3-4 at 224^2
    where the thread planes do not run the dz pass): dz = (cgo*go + cxhat*xhat + cconst) * GELU'(z), dx =
    conv_transpose(dz) + dz, the weight gradient's per-thread partials and dbias (STATS: BatchNorm's gradient sums
    too, in eval), reading z (laid out as dx), go and x and writing dx, where `_middle_grad_kernel` wrote dz and
    `_dx_kernel` read it back. A program per (channel block, batch split), a thread per (channel, column) as in
    `_dwconv_plane_k`; per image each thread computes its column's H rows of dz into the program's slot ([BLOCK_C,
    H * W] of `slots_ptr`, in ACC: dz unrounded for the stencil and dW) and takes this image's dW terms from them
    against x's columns (`_wgrad_plane_image`); after a barrier the dense whole-plane stencil runs on the slot (flipped
    taps, plus dz itself; lanes outside the plane read `zero_plane_ptr`, H * W zeros in ACC) and dx is stored; a
    second barrier keeps the next image's slot stores after every thread's stencil loads.
    Each dz is computed once; dz is neither written to nor read from the map's memory. K = 1: no slot, dx from the
    dz rows in registers."""
    NARROW: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth == 16  # the 16-bit GELU (`_normal_cdf`)
    K: tl.constexpr = KMAX
    PLANE: tl.constexpr = PLANE_H * PLANE_W
    if PLANE_DENSE:  # every map's rows contiguous (`_dense_rows`): rows at compile-time offsets, no pointer per row
        x_stride_h, x_stride_w = PLANE_W, 1
        grad_out_stride_h, grad_out_stride_w = PLANE_W, 1
        dx_stride_h, dx_stride_w = PLANE_W, 1
    # axis 0 of a whole-plane grid is 1: w = 0 .. PLANE_WP - 1, wmask = w < W
    cs, cmask, _, _, w, wmask = _tile_coords(blocks_ptr, H, W, BLOCK_C, PLANE_WP, False, False, PLANE_WP)
    col_mask = cmask[:, None] & wmask[None, :]
    mean = tl.load(mean_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None]
    rstd = tl.load(rstd_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None]
    cgo = tl.load(cgo_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None]
    slope = tl.load(cxhat_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None] * rstd
    offset = tl.load(cconst_ptr + cs, mask=cmask, other=0.0).to(ACC)[:, None] - slope * mean
    # K = 7: the 49 taps held for the whole program beside the 49 weight-gradient partials take 255 registers (16-bit
    # maps, 14 x 14, sm_86/90; no spill, but none to spare for the eval variant's sums); loaded per image instead, from
    # L1 (as `_strip_dz_dx_kernel` does per strip): 217 registers, ~5% more instructions (sm_90, bf16)
    HELD_TAPS: tl.constexpr = K < 7
    if HELD_TAPS:
        taps = _stencil_taps(weight_ptr, cs, cmask, K, KK_STRIDE, ACC)
    x_cols = cs[:, None] * x_stride_c + w[None, :] * x_stride_w
    g_cols = cs[:, None] * grad_out_stride_c + w[None, :] * grad_out_stride_w
    d_cols = cs[:, None] * dx_stride_c + w[None, :] * dx_stride_w
    slot_channel = tl.arange(0, BLOCK_C)
    slot = slots_ptr + (tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)).to(tl.int64) * (BLOCK_C * PLANE)
    slot_cols = slot_channel[:, None] * PLANE + w[None, :]
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    x_b = x_ptr + b_lo.to(tl.int64) * x_stride_b
    g_b = grad_out_ptr + b_lo.to(tl.int64) * grad_out_stride_b
    z_b = z_ptr + b_lo.to(tl.int64) * dx_stride_b
    dx_b = dx_ptr + b_lo.to(tl.int64) * dx_stride_b
    if STATS:
        t_go = tl.zeros([BLOCK_C, PLANE_WP], ACC)
        t_gx = tl.zeros([BLOCK_C, PLANE_WP], ACC)
    t_dz = tl.zeros([BLOCK_C, PLANE_WP], ACC)
    partials = (tl.zeros([BLOCK_C, PLANE_WP], ACC),) * (K * K)
    for _ in range(b_lo, b_hi):
        dz_rows = ()
        for r in tl.static_range(PLANE_H):
            z = tl.load(z_b + d_cols + r * dx_stride_h, mask=col_mask, other=0.0).to(ACC)
            go = tl.load(g_b + g_cols + r * grad_out_stride_h, mask=col_mask, other=0.0).to(ACC)
            y = _gelu(z, NARROW)
            dz = tl.where(col_mask, (cgo * go + slope * y + offset) * _gelu_grad(z, NARROW), 0.0)
            if STATS:  # go is zero outside the plane
                t_go += go
                t_gx += tl.where(col_mask, go * ((y - mean) * rstd), 0.0)
            t_dz += dz
            if K == 1:
                dx = taps[0] * dz + dz
                tl.store(dx_b + d_cols + r * dx_stride_h, dx.to(dx_ptr.dtype.element_ty), mask=col_mask)
            else:
                tl.store(slot + slot_cols + r * PLANE_W, dz, mask=col_mask)
            dz_rows = dz_rows + (dz,)
        # dW before the stencil, so that the dz rows are not held across it
        partials = _wgrad_plane_image(
            partials, dz_rows, x_b + x_cols, cmask, x_stride_h, x_stride_w, K, ACC, PLANE_H, PLANE_W, PLANE_WP
        )
        if K > 1:
            tl.debug_barrier()  # every thread's slot stores before any thread's stencil loads
            if not HELD_TAPS:
                taps = _stencil_taps(weight_ptr, cs, cmask, K, KK_STRIDE, ACC)
            rows = _dwconv_plane_k(
                slot,
                taps,
                slot_channel,
                cmask,
                PLANE,
                PLANE_W,
                1,
                zero_plane_ptr,
                K,
                True,
                True,
                ACC,
                BLOCK_C,
                PLANE_H,
                PLANE_W,
                PLANE_H,
                PLANE_WP,
                True,
            )
            for r in tl.static_range(PLANE_H):
                tl.store(dx_b + d_cols + r * dx_stride_h, rows[r].to(dx_ptr.dtype.element_ty), mask=col_mask)
            tl.debug_barrier()  # every thread's stencil loads before the next image's slot stores
        x_b += x_stride_b
        g_b += grad_out_stride_b
        z_b += dx_stride_b
        dx_b += dx_stride_b
    part = _partial_rows(C, cs)
    if STATS:
        tl.store(psgo_ptr + part, tl.sum(t_go, axis=1), mask=cmask)
        tl.store(psgx_ptr + part, tl.sum(t_gx, axis=1), mask=cmask)
    tl.store(pdb_ptr + part, tl.sum(t_dz, axis=1), mask=cmask)
    _store_plane_wgrad(pdw_ptr, part, partials, cmask, K, KK_STRIDE)


# ---------------------------------------------------------------------------------------- thread planes


@triton.jit
def _thread_plane_taps(weight_ptr, cs, cmask, K: tl.constexpr, KK_STRIDE: tl.constexpr, ACC: tl.constexpr):
    """The K^2 taps of each thread's channel, [BLOCK_C] each, loaded once per program (not per image)."""
    taps = ()
    for t in tl.static_range(K * K):
        taps = taps + (tl.load(weight_ptr + cs * KK_STRIDE + t, mask=cmask, other=0.0).to(ACC),)
    return taps


@triton.jit
def _values_tile(values, BLOCK_C: tl.constexpr, P: tl.constexpr):
    """P per-thread values [BLOCK_C] (P a power of 2) as one [BLOCK_C, P] tile, value p in column p: a tree of
    joins, each appending the second of a pair after the first (the join's new in-thread axis moved outside the
    columns), so a store of the tile can move it to a coalesced layout in one conversion."""
    level = ()
    for p in tl.static_range(P):
        level = level + (values[p][:, None],)
    for depth in tl.static_range(P.bit_length() - 1):
        joined = ()
        for m in tl.static_range(P >> (depth + 1)):
            pair = tl.permute(tl.join(level[2 * m], level[2 * m + 1]), (0, 2, 1))
            joined = joined + (tl.reshape(pair, [BLOCK_C, 2 << depth]),)
        level = joined
    return level[0]


@triton.jit
def _channel_block(blocks_ptr, BLOCK_C: tl.constexpr):
    """This program's channel block (grid axis 1, a row of the block table): its channels and their mask."""
    blk = tl.program_id(1)
    cs = tl.load(blocks_ptr + 3 * blk) + tl.arange(0, BLOCK_C)
    return cs, cs < tl.load(blocks_ptr + 3 * blk + 1)


@triton.jit
def _plane_values(c_base, cmask, stride_h, stride_w, H: tl.constexpr, W: tl.constexpr, ACC: tl.constexpr):
    """Each thread's H x W plane of its channel (c_base: [BLOCK_C] pointers to pixel (0, 0)), as H * W values
    [BLOCK_C] in row-major order: one load per thread and pixel, no mask but the channel's."""
    values = ()
    for p in tl.static_range(H * W):
        values = values + (tl.load(c_base + (p // W) * stride_h + (p % W) * stride_w, mask=cmask, other=0.0).to(ACC),)
    return values


@triton.jit
def _store_pixel_group(
    base, values, first, cs, cmask, stride_c, stride_h, stride_w, H: tl.constexpr, W: tl.constexpr, GP: tl.constexpr
):
    """Stores GP per-thread values [BLOCK_C] as pixels first .. first + GP - 1 of each thread's plane (those past
    H * W masked), through _values_tile's [BLOCK_C, GP] tile."""
    pix = first + tl.arange(0, GP)
    tile = cs[:, None] * stride_c + ((pix // W) * stride_h + (pix % W) * stride_w)[None, :]
    mask = cmask[:, None] & (pix < H * W)[None, :]
    tl.store(base + tile, _values_tile(values, cs.shape[0], GP).to(base.dtype.element_ty), mask=mask)


@triton.jit
def _thread_plane_wgrad(
    acc_w, g, x_c, cmask, x_stride_h, x_stride_w, K: tl.constexpr, H: tl.constexpr, W: tl.constexpr
):
    """acc_w (K^2 per-thread sums [BLOCK_C]) += the weight gradient of one image: dW[i, j] += sum_p g[p] * x[p
    shifted by tap (i, j)], g the thread's plane of the output gradient, x its plane, read a row at a time (row r
    meets output row ho through kernel row r - ho + R); taps reaching outside the image skipped at compile time."""
    R: tl.constexpr = K // 2
    for r in tl.static_range(H):
        xr = _plane_values(x_c + r * x_stride_h, cmask, x_stride_h, x_stride_w, 1, W, g[0].dtype)
        new_w = ()
        for i in tl.static_range(K):
            for j in tl.static_range(K):
                a = acc_w[i * K + j]
                if (r - i + R >= 0) & (r - i + R < H):
                    for wo in tl.static_range(W):
                        if (wo + j - R >= 0) & (wo + j - R < W):
                            a += g[(r - i + R) * W + wo] * xr[wo + j - R]
                new_w = new_w + (a,)
        acc_w = new_w
    return acc_w


@triton.jit(
    # batch counts of 1 (batch 1, or one image per program) would compile a second copy of every kernel
    do_not_specialize=["B", "b_per_prog"],
    do_not_specialize_on_alignment=[
        "C",
        "x_stride_b",
        "x_stride_c",
        "x_stride_h",
        "out_stride_b",
        "out_stride_c",
        "out_stride_h",
    ],
)
def _thread_plane_forward_kernel(
    x_ptr,
    out_ptr,
    weight_ptr,
    bias_ptr,
    blocks_ptr,
    scale_ptr,
    shift_ptr,
    in_scale_ptr,
    in_shift_ptr,
    pcnt_ptr,
    pmean_ptr,
    pm2_ptr,
    B,
    C,
    b_per_prog,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    out_stride_b,
    out_stride_c,
    out_stride_h,
    out_stride_w,
    MODE: tl.constexpr,
    K: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """_forward_kernel's stencil modes (_CONV, _APPLY, _STATS, _PREACT) and _EVAL on planes of at most
    Settings.thread_plane_pixels pixels, a thread per channel: a program per (channel block of kernel size K,
    batch split). Per image a thread loads its channel's H x W plane once (H * W loads, no mask but the
    channel's) and computes every output from registers: out-of-image taps are skipped at compile time, so each
    output runs only its in-image taps as FMAs (at 7 x 7 with K = 7, 28 on average against 49 padded), the taps
    themselves loaded once per program. _EVAL first maps each loaded value y = GELU(x) * in_scale + in_shift
    (ms_ffn_middle_eval's fc1 GELU and BatchNorm: once per element, as no neighbour's thread needs it), then
    _APPLY. _STATS reduces (count, mean, M2) of GELU(z) in the thread: its channel's partial over its images
    (the plane's from sums of GELU(z) - its first value, then merged with Chan's formula).
    The outputs leave in [BLOCK_C, 8] tiles of consecutive pixels (_values_tile), which a store moves to a
    coalesced layout; the plane's loads are one per thread and pixel (lanes: channels; in NCHW 2-4 bytes each,
    a plane apart, served from L1 after the first touch of each sector)."""
    NARROW: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth == 16  # the 16-bit GELU (`_normal_cdf`)
    R: tl.constexpr = K // 2
    cs, cmask = _channel_block(blocks_ptr, BLOCK_C)
    taps = _thread_plane_taps(weight_ptr, cs, cmask, K, KK_STRIDE, ACC)
    bias = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(ACC)
    if MODE == 1 or MODE == 5:
        scale = tl.load(scale_ptr + cs, mask=cmask, other=0.0).to(ACC)
        shift = tl.load(shift_ptr + cs, mask=cmask, other=0.0).to(ACC)
    if MODE == 5:
        in_scale = tl.load(in_scale_ptr + cs, mask=cmask, other=0.0).to(ACC)
        in_shift = tl.load(in_shift_ptr + cs, mask=cmask, other=0.0).to(ACC)
    if MODE == 2:
        n = tl.zeros([BLOCK_C], ACC)
        mean = tl.zeros([BLOCK_C], ACC)
        m2 = tl.zeros([BLOCK_C], ACC)
    GP: tl.constexpr = min(P, 8)
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    x_c = x_ptr + b_lo.to(tl.int64) * x_stride_b + cs * x_stride_c
    o_b = out_ptr + b_lo.to(tl.int64) * out_stride_b
    for _ in range(b_lo, b_hi):
        src = _plane_values(x_c, cmask, x_stride_h, x_stride_w, H, W, ACC)
        if MODE == 5:
            mapped = ()
            for p in tl.static_range(H * W):
                mapped = mapped + (_gelu(src[p], NARROW) * in_scale + in_shift,)
            src = mapped
        # The outputs leave in groups of GP pixels: only a group's are live beside the taps and the plane (groups
        # of 16 or 32, or the whole plane, spilled 4-112 B at K = 7 in _STATS on sm_90; of 8, none).
        for grp in tl.static_range(P // GP):
            outs = ()
            for q in tl.static_range(GP):
                if grp * GP + q < H * W:
                    z = bias
                    # Output p = grp * GP + q takes input p + the tap's shift; taps outside the image are skipped
                    # (compile-time bounds, written out each time: a name assigned them would be a runtime value on
                    # GPUs).
                    for i in tl.static_range(K):
                        if ((grp * GP + q) // W + i - R >= 0) & ((grp * GP + q) // W + i - R < H):
                            for j in tl.static_range(K):
                                if ((grp * GP + q) % W + j - R >= 0) & ((grp * GP + q) % W + j - R < W):
                                    z += taps[i * K + j] * src[grp * GP + q + (i - R) * W + (j - R)]
                    if MODE != 0:
                        z += src[grp * GP + q]
                    if MODE == 1 or MODE == 5:
                        outs = outs + (_gelu(z, NARROW) * scale + shift,)
                    else:
                        outs = outs + (z,)
                    if MODE == 2:  # the statistics keep z's full precision
                        if grp * GP + q == 0:
                            y_shift = _gelu(z, NARROW)
                            y_total = tl.zeros([BLOCK_C], ACC)
                            sq_total = tl.zeros([BLOCK_C], ACC)
                        else:
                            d = _gelu(z, NARROW) - y_shift
                            y_total += d
                            sq_total += d * d
                else:
                    outs = outs + (tl.zeros([BLOCK_C], ACC),)
            _store_pixel_group(o_b, outs, grp * GP, cs, cmask, out_stride_c, out_stride_h, out_stride_w, H, W, GP)
        if MODE == 2:
            # The plane's mean and M2 from sums of y - y[0] (shifted by a value of the plane, so its square sums
            # do not cancel): a second sweep about the mean would keep y or z live beside the taps and the plane,
            # which spilled (K = 7, 0.1-0.2 KB a thread on sm_80/90).
            mean_plane = y_shift + y_total / (H * W)
            m2_plane = sq_total - y_total * y_total / (H * W)
            delta = mean_plane - mean
            n_new = n + H * W
            mean += delta * ((H * W) / n_new)
            m2 += m2_plane + delta * delta * (n * (H * W) / n_new)
            n = n_new
        x_c += x_stride_b
        o_b += out_stride_b
    if MODE == 2:
        part = _partial_rows(C, cs)
        tl.store(pcnt_ptr + part, n, mask=cmask)
        tl.store(pmean_ptr + part, mean, mask=cmask)
        tl.store(pm2_ptr + part, m2, mask=cmask)


@triton.jit(
    # batch counts of 1 (batch 1, or one image per program) would compile a second copy of every kernel
    do_not_specialize=["B", "b_per_prog"],
    do_not_specialize_on_alignment=[
        "C",
        "src_stride_b",
        "src_stride_c",
        "src_stride_h",
        "x_stride_b",
        "x_stride_c",
        "x_stride_h",
        "dx_stride_b",
        "dx_stride_c",
        "dx_stride_h",
    ],
)
def _thread_plane_dx_kernel(
    src_ptr,
    x_ptr,
    dx_ptr,
    weight_ptr,
    blocks_ptr,
    pdw_ptr,
    pdb_ptr,
    B,
    C,
    b_per_prog,
    src_stride_b,
    src_stride_c,
    src_stride_h,
    src_stride_w,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    dx_stride_b,
    dx_stride_c,
    dx_stride_h,
    dx_stride_w,
    RESIDUAL: tl.constexpr,
    WGRAD: tl.constexpr,
    DX: tl.constexpr,
    K: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """_dx_kernel on thread planes. DX: dx = conv_transpose(src) (+ src with RESIDUAL), src being grad_out or dz;
    WGRAD: the weight and bias gradients' per-program partials, dW[i, j] = sum src * x shifted by the tap (K^2
    per-thread sums over the program's images: its channel's partial, no reduction across threads;
    _thread_plane_wgrad). Per image a thread loads its channel's src plane once; taps reaching outside the image
    are skipped at compile time in both sums, and dx leaves in groups of 8 pixels as the forward's outputs do.
    One launch does one of the two (_launch_dx): with both, the K^2 sums beside the taps, src and the outputs
    spilled (sm_90: K = 7 0.2-0.8 KB a thread, K = 3 32-44 B; K = 1 16 B in fp32 under Triton 3.6), at the cost
    of reading src once more."""
    R: tl.constexpr = K // 2
    tl.static_assert(DX != WGRAD, "one launch computes dx or the weight gradient")
    cs, cmask = _channel_block(blocks_ptr, BLOCK_C)
    if DX:
        taps = _thread_plane_taps(weight_ptr, cs, cmask, K, KK_STRIDE, ACC)
    GP: tl.constexpr = min(P, 8)
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    s_c = src_ptr + b_lo.to(tl.int64) * src_stride_b + cs * src_stride_c
    x_c = x_ptr + b_lo.to(tl.int64) * x_stride_b + cs * x_stride_c
    dx_b = dx_ptr + b_lo.to(tl.int64) * dx_stride_b
    if WGRAD:
        acc_w = (tl.zeros([BLOCK_C], ACC),) * (K * K)
        acc_b = tl.zeros([BLOCK_C], ACC)
    for _ in range(b_lo, b_hi):
        g = _plane_values(s_c, cmask, src_stride_h, src_stride_w, H, W, ACC)
        if DX:
            for grp in tl.static_range(P // GP):
                outs = ()
                for q in tl.static_range(GP):
                    if grp * GP + q < H * W:
                        # Output p takes src at p minus the tap's shift (the transposed conv); compile-time bounds.
                        d = tl.zeros([BLOCK_C], ACC)
                        for i in tl.static_range(K):
                            if ((grp * GP + q) // W - i + R >= 0) & ((grp * GP + q) // W - i + R < H):
                                for j in tl.static_range(K):
                                    if ((grp * GP + q) % W - j + R >= 0) & ((grp * GP + q) % W - j + R < W):
                                        d += taps[i * K + j] * g[grp * GP + q - (i - R) * W - (j - R)]
                        if RESIDUAL:
                            d += g[grp * GP + q]
                        outs = outs + (d,)
                    else:
                        outs = outs + (tl.zeros([BLOCK_C], ACC),)
                _store_pixel_group(dx_b, outs, grp * GP, cs, cmask, dx_stride_c, dx_stride_h, dx_stride_w, H, W, GP)
        if WGRAD:
            acc_w = _thread_plane_wgrad(acc_w, g, x_c, cmask, x_stride_h, x_stride_w, K, H, W)
            for p in tl.static_range(H * W):
                acc_b += g[p]
        s_c += src_stride_b
        x_c += x_stride_b
        dx_b += dx_stride_b
    if WGRAD:
        _store_thread_plane_wgrad(pdw_ptr, pdb_ptr, acc_w, acc_b, C, cs, cmask, K, KK_STRIDE)


@triton.jit(
    # batch counts of 1 (batch 1, or one image per program) would compile a second copy of every kernel
    do_not_specialize=["B", "b_per_prog"],
    do_not_specialize_on_alignment=[
        "C",
        "x_stride_b",
        "x_stride_c",
        "x_stride_h",
        "grad_out_stride_b",
        "grad_out_stride_c",
        "grad_out_stride_h",
        "dz_stride_b",
        "dz_stride_c",
        "dz_stride_h",
    ],
)
def _thread_plane_dz_kernel(
    x_ptr,
    z_ptr,
    grad_out_ptr,
    dz_ptr,
    blocks_ptr,
    mean_ptr,
    rstd_ptr,
    cgo_ptr,
    cxhat_ptr,
    cconst_ptr,
    pdw_ptr,
    pdb_ptr,
    B,
    C,
    b_per_prog,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    grad_out_stride_b,
    grad_out_stride_c,
    grad_out_stride_h,
    grad_out_stride_w,
    dz_stride_b,
    dz_stride_c,
    dz_stride_h,
    dz_stride_w,
    K: tl.constexpr,
    KK_STRIDE: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """_middle_grad_kernel's dz pass from the saved z on thread planes: per image a thread computes its plane's
    dz = (cgo*go + cxhat*xhat + cconst) * GELU'(z), xhat = (GELU(z) - mean) * rstd, pixel by pixel from z and
    go (laid out as dz), stores each value as it is computed and keeps the plane in registers (unrounded) for
    the weight gradient's K^2 per-thread sums against its x plane (_thread_plane_wgrad). Every per-channel sum
    is the thread's channel's partial over the program's images: no reduction across threads, and no read of dz
    back (the whole-plane dz pass reads it back after a barrier, kept in fp32 for half x). BatchNorm's gradient
    sums are a pass of their own (_middle_grad_kernel's STATS) in eval with gradients too, where the other
    stencils fold them into the dz pass: here, beside the K^2 sums, they spilled 4-8 B a thread (fp32, sm_90,
    Triton 3.6). The stores are per thread and pixel, as the
    loads are: stored in groups of 8 pixels (_store_pixel_group's layout conversion, as the other thread-plane
    kernels do) beside the K^2 sums, dz spilled 4-52 B a thread (sm_90, K = 1 to 7, fp16/bf16 and fp32)."""
    NARROW: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth == 16  # the 16-bit GELU (`_normal_cdf`)
    cs, cmask = _channel_block(blocks_ptr, BLOCK_C)
    mean = tl.load(mean_ptr + cs, mask=cmask, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + cs, mask=cmask, other=0.0).to(ACC)
    cgo = tl.load(cgo_ptr + cs, mask=cmask, other=0.0).to(ACC)
    cxhat = tl.load(cxhat_ptr + cs, mask=cmask, other=0.0).to(ACC)
    cconst = tl.load(cconst_ptr + cs, mask=cmask, other=0.0).to(ACC)
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    x_c = x_ptr + b_lo.to(tl.int64) * x_stride_b + cs * x_stride_c
    z_c = z_ptr + b_lo.to(tl.int64) * dz_stride_b + cs * dz_stride_c
    g_c = grad_out_ptr + b_lo.to(tl.int64) * grad_out_stride_b + cs * grad_out_stride_c
    dz_c = dz_ptr + b_lo.to(tl.int64) * dz_stride_b + cs * dz_stride_c
    acc_w = (tl.zeros([BLOCK_C], ACC),) * (K * K)
    acc_b = tl.zeros([BLOCK_C], ACC)
    for _ in range(b_lo, b_hi):
        dz = ()
        for p in tl.static_range(H * W):
            at = (p // W) * dz_stride_h + (p % W) * dz_stride_w  # z is laid out as dz
            z = tl.load(z_c + at, mask=cmask, other=0.0).to(ACC)
            go_at = g_c + (p // W) * grad_out_stride_h + (p % W) * grad_out_stride_w
            go = tl.load(go_at, mask=cmask, other=0.0).to(ACC)
            xhat = (_gelu(z, NARROW) - mean) * rstd
            d = (cgo * go + cxhat * xhat + cconst) * _gelu_grad(z, NARROW)
            tl.store(dz_c + at, d.to(dz_ptr.dtype.element_ty), mask=cmask)
            acc_b += d
            dz = dz + (d,)
        acc_w = _thread_plane_wgrad(acc_w, dz, x_c, cmask, x_stride_h, x_stride_w, K, H, W)
        x_c += x_stride_b
        z_c += dz_stride_b
        g_c += grad_out_stride_b
        dz_c += dz_stride_b
    _store_thread_plane_wgrad(pdw_ptr, pdb_ptr, acc_w, acc_b, C, cs, cmask, K, KK_STRIDE)


@triton.jit
def _store_thread_plane_wgrad(pdw_ptr, pdb_ptr, acc_w, acc_b, C, cs, cmask, K: tl.constexpr, KK_STRIDE: tl.constexpr):
    """The program's weight and bias gradient partials (_thread_plane_wgrad's sums) into its partial rows."""
    part = _partial_rows(C, cs)
    for t in tl.static_range(K * K):
        tl.store(pdw_ptr + part * KK_STRIDE + t, acc_w[t], mask=cmask)
    tl.store(pdb_ptr + part, acc_b, mask=cmask)


# ------------------------------------------------------------------------------------------- launch


class _Launch(NamedTuple):
    blocks: torch.Tensor  # int32 [n_blocks, 3]: first channel, end channel, kernel size
    grid: Tuple[int, int, int]  # (spatial tiles, channel blocks, batch splits): the large count on axis 0
    b_per_prog: int
    kmax: int  # KMAX: the largest kernel size of its blocks (a whole-plane launch's blocks all have it)


class _Plan(NamedTuple):
    block_c: int
    block_hw: int
    launches: Tuple[_Launch, ...]  # one, or one per kernel size for the whole-plane stencil, heaviest first
    kk_stride: int  # the packed weight table's row length: its largest kernel size, squared
    kk_pow2: int
    index64: bool
    acc: torch.dtype
    num_warps: int
    vec: bool  # _dwconv_tile_vec_k's chunked stencil (see _vectorisable)
    plane: Tuple[int, int, int]  # (H, W, W padded to a power of 2): _dwconv_plane_k's stencil; zeros if not
    strip: int  # rows of a strip of the _strip_* kernels (block_hw: 4 x their chunks of a row); 0 if not
    thread_plane: Tuple[int, int, int]  # (H, W, H * W padded to a power of 2): a thread per plane; zeros if not
    plane_dense: bool  # whole planes whose rows are contiguous in every map (`_dense_rows`): unmasked loads

    @property
    def partials(self) -> int:
        """Rows of per-channel partials: one per (spatial tile, batch split) of a launch."""
        return max(launch.grid[0] * launch.grid[2] for launch in self.launches)

    def partial_buffer(self, *shape: int, device: torch.device) -> torch.Tensor:
        """[partials, *shape] per-program partials in the accumulation dtype. With one launch per kernel size, a
        launch with fewer programs along axes 0 and 2 leaves its channels' last rows unwritten: those are zero (a
        fill, one launch more on a GPU, only then). A smaller kernel's launch also leaves its channels' padding taps
        of the dW partials unwritten, which nothing reads (`_group_gradients` drops them)."""
        unwritten_rows = any(launch.grid[0] * launch.grid[2] < self.partials for launch in self.launches)
        allocate = torch.zeros if unwritten_rows else torch.empty
        return allocate((self.partials, *shape), dtype=self.acc, device=device)

    def constexprs(self, launch: _Launch) -> dict:
        return dict(
            KMAX=launch.kmax,
            KK_STRIDE=self.kk_stride,
            BLOCK_C=self.block_c,
            BLOCK_HW=self.block_hw,
            INDEX64=self.index64,
            ACC=tl_accumulation_dtype(self.acc),
            VEC=self.vec,
            PLANE_H=self.plane[0],
            PLANE_W=self.plane[1],
            PLANE_WP=self.plane[2],
            PLANE_DENSE=self.plane_dense,
            num_warps=self.num_warps,
        )

    def zero_plane(self, src: torch.Tensor) -> torch.Tensor:
        return _zero_plane(self.plane, self.plane_dense, src)

    def thread_plane_constexprs(self, launch: _Launch) -> dict:
        H, W, P = self.thread_plane
        return dict(
            K=launch.kmax,
            KK_STRIDE=self.kk_stride,
            H=H,
            W=W,
            P=P,
            BLOCK_C=self.block_c,
            ACC=tl_accumulation_dtype(self.acc),
            num_warps=self.num_warps,
        )

    def strip_constexprs(self, launch: _Launch) -> dict:
        return dict(
            K=launch.kmax,
            KK_STRIDE=self.kk_stride,
            BLOCK_C=self.block_c,
            CHUNKS=self.block_hw // 4,
            STRIP=self.strip,
            ACC=tl_accumulation_dtype(self.acc),
            num_warps=self.num_warps,
        )


_BLOCK_TABLES: Dict[Tuple, Tuple[Tuple[int, torch.Tensor], ...]] = {}


def _block_tables(
    widths: Sequence[int], ksizes: Sequence[int], block_c: int, by_size: bool, device: torch.device
) -> Tuple[Tuple[int, torch.Tensor], ...]:
    """(largest kernel size, block table) of each launch: channel blocks that never straddle a group, with their
    kernel size; one table for all sizes, or (by_size) one per size."""
    key = (tuple(widths), tuple(ksizes), block_c, by_size, device)
    tables = _BLOCK_TABLES.get(key)
    if tables is None:
        rows, c0 = [], 0
        for width, k in zip(widths, ksizes):
            for start in range(c0, c0 + width, block_c):
                rows.append((start, min(start + block_c, c0 + width), k))
            c0 += width
        # Heaviest blocks first: the grid runs channel blocks in table order, so the k = 7 blocks do not form
        # the launch's tail (stable: channel order within a size).
        rows.sort(key=lambda row: -row[2])
        groups = (
            [[row for row in rows if row[2] == k] for k in sorted(set(ksizes), reverse=True)] if by_size else [rows]
        )
        tables = tuple(
            (group[0][2], torch.tensor(group, dtype=torch.int32).reshape(-1, 3).to(device)) for group in groups
        )
        _BLOCK_TABLES[key] = tables
    return tables


def _vectorisable(block_hw: int, kmax: int, index64: bool, x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the stencils may run on chunks of 4 pixels of a row (_dwconv_tile_vec_k): x is not channels_last
    (those tiles run channels fastest), offsets are int32 (with int64 ones, planes of 2^31 elements, the chunked
    _dx_kernel spilled), every tensor a kernel reads or writes has unit column stride and row, channel and batch
    strides that are multiples of 4 (so a chunk never straddles a row and its 4 elements are contiguous), W is a
    multiple of 4, the tile holds whole chunks, and the taps reach at most one chunk to each side (kmax <= 9)."""
    return (
        not channels_last_input(x)
        and not index64
        and x.shape[3] % 4 == 0
        and block_hw % 4 == 0
        and kmax <= 9
        and all(t.stride(3) == 1 and all(st % 4 == 0 for st in t.stride()[:3]) for t in (x, *others))
    )


def _channel_block_dividing(widths: Sequence[int]) -> int:
    """Channels of a thread-plane block: the largest power of 2 dividing every group's width, at least a warp's 32
    (T/S/B's stage 4: 448, 512, 672 channels per group: blocks of 64, 128, 32, none half empty); for groups
    narrower than a warp, their widest, rounded up to a power of 2."""
    if max(widths) < 32:
        return next_power_of_2(max(widths))
    divisor = 1
    while divisor < 1024 and all(w % (2 * divisor) == 0 for w in widths):
        divisor *= 2
    return max(32, divisor)


def _plane_shape(H: int, W: int, index64: bool, settings: Settings) -> Tuple[int, int, int]:
    """(H, W, W padded) when the whole-plane stencil runs: planes of at most settings.plane_max rows and columns
    (they are unrolled: one compiled kernel per plane shape) with int32 offsets; else zeros."""
    if index64 or max(H, W) > settings.plane_max:
        return (0, 0, 0)
    return (H, W, next_power_of_2(W))


# Launch plans by everything they depend on. Planning is ~50-100 us of Python per pass, paid by every call on the
# host while a GPU call of the small stages runs in about as long; a model calls with a few layouts, so the memo
# stays small (cleared past _PLANS_MAX for callers with ever-changing shapes).
_PLANS: Dict[Tuple, _Plan] = {}
_PLANS_MAX = 4096


def _plan(
    x: torch.Tensor,
    widths: Sequence[int],
    ksizes: Sequence[int],
    *others: torch.Tensor,
    strips: bool = True,
    wgrad_dx: bool = False,
    thread_planes: bool = False,
    whole_rows: bool = False,
    pointwise: bool = False,
) -> _Plan:
    """Launch plan for the kernels reading x and writing or reading others. strips=False: no strip plan (the _strip_*
    kernels do not run the passes without a stencil, nor the dz pass that recomputes z); pointwise: for a pass without
    a stencil (no strips; on GPUs, NCHW tiles whose run of pixels pads the plane least, `_nchw_tile`); wgrad_dx: for
    the dx pass that also accumulates the weight gradient (`Settings.wgrad_strip_rows`); thread_planes: for the
    passes with a thread-plane kernel (_launch_forward's stencil modes, _launch_dx, the middle's dz pass from the
    saved z), which run a thread per plane on small planes (`Settings.thread_plane_pixels`); whole_rows: strips whose
    programs cover whole rows (`_strip_eval_kernel`), and none where rows are wider than `Settings.whole_row_chunks`.
    Memoised on shapes, strides, dtype, device, the groups and the launch target and settings in effect (test and
    audit overrides included)."""
    target, settings = launch_target(x.device), launch_settings(Settings, x.device)
    key = (
        x.shape,
        x.stride(),
        x.dtype,
        x.device,
        tuple((t.shape, t.stride()) for t in others),
        tuple(widths),
        tuple(ksizes),
        strips,
        wgrad_dx,
        thread_planes,
        whole_rows,
        pointwise,
        target,
        settings,
    )
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(
            x,
            widths,
            ksizes,
            others,
            strips and not pointwise,
            wgrad_dx,
            thread_planes,
            whole_rows,
            pointwise,
            settings,
            target.sm_count,
        )
    return plan


def _make_plan(
    x: torch.Tensor,
    widths: Sequence[int],
    ksizes: Sequence[int],
    others: Sequence[torch.Tensor],
    strips: bool,
    wgrad_dx: bool,
    thread_planes: bool,
    whole_rows: bool,
    pointwise: bool,
    settings: Settings,
    sm_count: int,
) -> _Plan:
    B, _, H, W = x.shape
    hw = H * W
    index64 = needs_int64(x, *others)
    thread_plane = (0, 0, 0)
    if thread_planes and not index64 and 0 < hw <= settings.thread_plane_pixels:
        thread_plane = (H, W, next_power_of_2(hw))
    # whole planes for the stencils only: a pass without one takes the NCHW tiles (on `_flat_planes`'s runs)
    plane = (0, 0, 0) if thread_plane[2] or pointwise else _plane_shape(H, W, index64, settings)
    strip = 0
    if thread_plane[2]:  # a thread per (channel, image) plane
        block_hw = thread_plane[2]
        block_c = min(_channel_block_dividing(widths), settings.thread_plane_channels)
        num_warps = max(1, min(8, block_c // 32))
        n_hw = 1
    elif plane[1]:  # whole planes, one (channel, column) per thread
        block_hw = next_power_of_2(H) * plane[2]
        block_c = min(next_power_of_2(max(widths)), max(1, settings.plane_columns // plane[2]))
        num_warps = max(1, min(8, block_c * plane[2] // 32))
        n_hw = 1
    elif (
        strips
        and settings.strip_rows
        and _vectorisable(4, max(ksizes), index64, x, *others)
        and not (whole_rows and next_power_of_2(W // 4) > settings.whole_row_chunks)
    ):
        # strips of rows x blocks of chunks of a row (whole_rows: the whole row), one (channel, chunk) per thread
        strip = settings.strip_rows
        if wgrad_dx and x.element_size() >= 4:
            strip = min(strip, settings.wgrad_strip_rows)
        chunks = next_power_of_2(W // 4) if whole_rows else min(next_power_of_2(W // 4), settings.strip_row_chunks)
        block_hw = 4 * chunks
        block_c = min(next_power_of_2(max(widths)), max(1, settings.strip_chunks // chunks))
        num_warps = max(1, min(8, block_c * chunks // 32))
        n_hw = 1 if whole_rows else cdiv(H, strip) * cdiv(W // 4, chunks)  # whole rows: a program walks its strips
    else:
        if channels_last_input(x):
            block_c = min(settings.max_channel_block, next_power_of_2(max(widths)))
            block_hw = max(1, min(next_power_of_2(hw), settings.tile_elements // block_c))
        else:
            block_c, block_hw = _nchw_tile(hw, max(widths), settings, least_padding=pointwise)
        num_warps = max(1, min(8, block_c * block_hw // 128))  # 4 tile elements per thread: K masks per tap row
        n_hw = cdiv(hw, block_hw)
    launches = []
    # Thread-plane programs take up to ~250 registers a thread: a few warps per SM, each program loading its taps
    # once for all its images (see Settings.thread_plane_warps).
    target_programs = max(1, settings.thread_plane_warps // num_warps) if thread_plane[2] else settings.target_programs
    for kmax, blocks in _block_tables(widths, ksizes, block_c, bool(plane[1] or strip or thread_plane[2]), x.device):
        if wgrad_dx and thread_plane[2]:
            splits, b_per_prog = fewest_batch_groups(B, blocks.shape[0] * n_hw, target_programs)
        else:
            splits, b_per_prog = balanced_batch_groups(
                B, blocks.shape[0] * n_hw, target_programs, sm_count, settings.prologue_images
            )
        launches.append(_Launch(blocks, (n_hw, blocks.shape[0], splits), b_per_prog, kmax))
    kk_stride = max(ksizes) ** 2
    return _Plan(
        block_c,
        block_hw,
        tuple(launches),
        kk_stride,
        next_power_of_2(kk_stride),
        index64,
        accumulation_dtype(x.dtype),
        num_warps,
        not plane[1]
        and not strip
        and not thread_plane[2]
        and _vectorisable(block_hw, max(ksizes), index64, x, *others),
        plane,
        strip,
        thread_plane,
        bool(plane[1]) and _dense_rows(x, *others),
    )


def _nchw_tile(hw: int, widest: int, settings: Settings, least_padding: bool) -> Tuple[int, int]:
    """(block_c, block_hw) of a contiguous-NCHW tile: a run of block_hw pixels of each of block_c channels. The
    plane padded to a power of 2 (at most the tile), channels filling what it leaves of the tile up to
    nchw_channel_block; with least_padding (passes without a stencil) and min_nchw_run (GPUs), the power of 2 of
    at least that many pixels, at most the tile, that pads the plane least (the larger on a tie), channels filling the
    rest of the tile. A tile's lanes past the plane's end issue every instruction for nothing: with runs of the whole
    tile, 56 x 56 and 28 x 28 planes left 23% of them idle (3136 pixels in 4 x 1024, 784 in 1024; in runs of 64,
    none). The stencil passes keep their tiles (in 16 x 64 tiles the weight-gradient dx pass spilled 8 B on sm_80)."""
    if not (least_padding and settings.min_nchw_run):
        block_c = min(settings.nchw_channel_block, max(1, settings.tile_elements // next_power_of_2(hw)))
        block_c = min(block_c, next_power_of_2(widest))
        return block_c, max(1, min(next_power_of_2(hw), settings.tile_elements // block_c))
    run = min(next_power_of_2(hw), settings.tile_elements)
    candidates = [run >> i for i in range(run.bit_length()) if run >> i >= min(settings.min_nchw_run, run)]
    block_hw = min(candidates, key=lambda r: (cdiv(hw, r) * r, -r))
    return min(next_power_of_2(widest), settings.tile_elements // block_hw), block_hw


def _zero_plane(plane: Tuple[int, int, int], dense: bool, src: torch.Tensor) -> torch.Tensor:
    """The zeros a dense whole-plane stencil (`_dwconv_plane_k`) on `plane` reads outside the image: H * W of them in
    the dtype of the map it reads, src, kept; src itself (not read) where the planes are not dense."""
    if not dense:
        return src
    return kept_filled(0.0, plane[0] * plane[1], src.dtype, src.device)


def _dense_rows(*maps: torch.Tensor) -> bool:
    """Whether every map's rows are contiguous (column stride 1, row stride W; a size-1 dim's stride is never used):
    the whole-plane stencil then addresses them with compile-time strides and unmasked loads (`_dwconv_plane_k`)."""
    return all((t.shape[3] == 1 or t.stride(3) == 1) and (t.shape[2] == 1 or t.stride(2) == t.shape[3]) for t in maps)


def _flat_planes(*maps: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The maps as [B, C, 1, H·W] views where every plane of each is one contiguous run (NCHW rows back to back,
    `_dense_rows`), else as they are: a pass without a stencil never needs the rows, and as one run per channel a plane
    of 14 x 14 (stage 3 at 224^2) moves in 4-pixel vectors on the chunked NCHW tiles (`_vectorisable`: rows of 14 are
    not whole 4-pixel chunks)."""
    if any(channels_last_input(t) for t in maps) or not _dense_rows(*maps):
        return maps
    B, C, H, W = maps[0].shape
    return tuple(t.as_strided((B, C, 1, H * W), (t.stride(0), t.stride(1), H * W, 1)) for t in maps)


def _launch_forward(
    mode: int,
    x: torch.Tensor,
    w_table: torch.Tensor,
    bias: torch.Tensor,
    plan: _Plan,
    out: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    stats: Tuple[torch.Tensor, ...] = (),
    in_scale: Optional[torch.Tensor] = None,
    in_shift: Optional[torch.Tensor] = None,
) -> None:
    B, C, H, W = x.shape
    unused = bias  # pointer arguments a mode does not read
    out_t = out if out is not None else x
    pcnt, pmean, pm2 = stats if stats else (unused, unused, unused)
    assert (mode == _EVAL) == (in_scale is not None), "_EVAL takes the input affine, and only it"
    with device_guard(x):
        for launch in plan.launches:
            if plan.thread_plane[2]:
                assert mode != _APPLY_SAVED, "no stencil: run it on a plan without thread planes"
                _thread_plane_forward_kernel[launch.grid](
                    x,
                    out_t,
                    w_table,
                    bias,
                    launch.blocks,
                    scale if scale is not None else unused,
                    shift if shift is not None else unused,
                    in_scale if in_scale is not None else unused,
                    in_shift if in_shift is not None else unused,
                    pcnt,
                    pmean,
                    pm2,
                    B,
                    C,
                    launch.b_per_prog,
                    *x.stride(),
                    *out_t.stride(),
                    MODE=mode,
                    **plan.thread_plane_constexprs(launch),
                    **NO_REGISTER_BUDGET,
                )
                continue
            assert mode != _EVAL, "_EVAL runs on thread planes only"
            args = (
                x,
                out_t,
                w_table,
                bias,
                launch.blocks,
                scale if scale is not None else unused,
                shift if shift is not None else unused,
                pcnt,
                pmean,
                pm2,
                B,
                C,
                H,
                W,
                launch.b_per_prog,
            )
            if plan.strip:  # rows are contiguous: no column strides
                assert mode != _APPLY_SAVED, "no stencil: run it on a plan without strips"
                _strip_forward_kernel[launch.grid](
                    *args,
                    *x.stride()[:3],
                    *out_t.stride()[:3],
                    MODE=mode,
                    **plan.strip_constexprs(launch),
                    **NO_REGISTER_BUDGET,
                )
            else:
                _forward_kernel[launch.grid](
                    *args,
                    *x.stride(),
                    *out_t.stride(),
                    plan.zero_plane(x),
                    MODE=mode,
                    **plan.constexprs(launch),
                    **NO_REGISTER_BUDGET,
                )


def _strip_slots(plan: _Plan, slot_elements: int, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    """The one-pass kernels' slots: slot_elements of dtype per program of the largest launch with a stencil (K > 1;
    the launches run in stream order, so they share the buffer), flat (a tensor with an axis of C would count as a
    map's channels in the audit's bytes); x itself where only K = 1 runs (no slot)."""
    grids = [launch.grid for launch in plan.launches if launch.kmax > 1]
    programs = max((g[0] * g[1] * g[2] for g in grids), default=0)
    return torch.empty(programs * slot_elements, dtype=dtype, device=x.device) if programs else x


def _launch_plane_eval(
    x: torch.Tensor,
    w_table: torch.Tensor,
    bias: torch.Tensor,
    plan: _Plan,
    out: torch.Tensor,
    in_scale: torch.Tensor,
    in_shift: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> None:
    """ms_ffn_middle_eval in one pass on dense whole planes (`_plane_eval_kernel`), a launch per kernel size."""
    assert plan.plane[1] and plan.plane_dense and not plan.index64, plan
    H, W = plan.plane[:2]
    slots = _strip_slots(plan, plan.block_c * H * W, x.dtype, x)
    assert slots.numel() < 2**31, "the kernel addresses its slots in int32"  # programs ~ the SMs' fill, planes <= 256
    zero_plane = plan.zero_plane(x)
    with device_guard(x):
        for launch in plan.launches:
            assert launch.grid[0] == 1, launch.grid  # a program's tile is the whole plane
            _plane_eval_kernel[launch.grid](
                x,
                out,
                slots,
                w_table,
                bias,
                launch.blocks,
                in_scale,
                in_shift,
                scale,
                shift,
                zero_plane,
                x.shape[0],
                launch.b_per_prog,
                x.stride(0),
                x.stride(1),
                out.stride(0),
                out.stride(1),
                KMAX=launch.kmax,
                KK_STRIDE=plan.kk_stride,
                ACC=tl_accumulation_dtype(plan.acc),
                BLOCK_C=plan.block_c,
                PLANE_H=H,
                PLANE_W=W,
                PLANE_WP=plan.plane[2],
                num_warps=plan.num_warps,
                **NO_REGISTER_BUDGET,
            )


def _launch_strip_eval(
    x: torch.Tensor,
    w_table: torch.Tensor,
    bias: torch.Tensor,
    plan: _Plan,
    out: torch.Tensor,
    in_scale: torch.Tensor,
    in_shift: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> None:
    """ms_ffn_middle_eval in one pass on whole-row strips (`_strip_eval_kernel`), a launch per kernel size."""
    B, _, H, W = x.shape
    assert plan.strip and plan.block_hw >= W, plan  # a program's block of chunks is the whole row
    slot_rows = plan.strip + max(launch.kmax for launch in plan.launches) - 1
    slots = _strip_slots(plan, plan.block_c * slot_rows * W, x.dtype, x)
    with device_guard(x):
        for launch in plan.launches:
            _strip_eval_kernel[launch.grid](
                x,
                out,
                slots,
                w_table,
                bias,
                launch.blocks,
                in_scale,
                in_shift,
                scale,
                shift,
                B,
                H,
                W,
                launch.b_per_prog,
                *x.stride()[:3],
                *out.stride()[:3],
                **plan.strip_constexprs(launch),
                **NO_REGISTER_BUDGET,
            )


def _per_channel_block(C: int, device: torch.device) -> int:
    """Channels per program of the BatchNorm kernels (the affine map, the running statistics, the backward's sums
    and coefficients): a grid of cdiv(C, it) programs."""
    return min(launch_settings(Settings, device).affine_channels, next_power_of_2(C))


def _batch_norm_affine(
    plan: _Plan,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    stats: Tuple[torch.Tensor, ...] = (),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [C] in the accumulation dtype, from the statistics pass's partials (training: mean and var are
    written) or from mean and var as given (eval), in one launch: the torch form was ~15 small launches per call."""
    C = mean.shape[0]
    scale, shift = torch.empty_like(mean), torch.empty_like(mean)
    pcnt, pmean, pm2 = stats if stats else (mean, mean, mean)
    block_c = _per_channel_block(C, mean.device)
    with device_guard(mean):
        _batch_norm_affine_kernel[(cdiv(C, block_c),)](
            pcnt,
            pmean,
            pm2,
            mean,
            var,
            weight.contiguous(),
            bias.contiguous(),
            kept_scalar(eps, plan.acc, mean.device),
            scale,
            shift,
            pcnt.shape[0] if stats else 0,
            C,
            FROM_PARTIALS=bool(stats),
            BLOCK_P=launch_settings(Settings, mean.device).affine_rows,
            BLOCK_C=block_c,
            ACC=tl_accumulation_dtype(plan.acc),
            num_warps=4,
        )
    return scale, shift


def _batch_norm_grad(
    plan: _Plan,
    coef: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    count: int,
    sums: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    coefficients: bool = True,
    centred: bool = False,
) -> None:
    """One `_batch_norm_grad_kernel` launch: coef [4, C] written where `coefficients`; sums = (sgo, sgx partials,
    dgamma, dbeta outputs) summed where given."""
    C = var.shape[0]
    sgo, sgx, dgamma, dbeta = sums if sums is not None else (coef, coef, coef, coef)
    block_c = _per_channel_block(C, var.device)
    with device_guard(var):
        _batch_norm_grad_kernel[(cdiv(C, block_c),)](
            var,
            kept_scalar(eps, plan.acc, var.device),
            weight.contiguous(),
            sgo,
            sgx,
            coef,
            dgamma,
            dbeta,
            sgo.shape[0] if sums is not None else 0,
            count,
            C,
            SUMS=sums is not None,
            COEFFICIENTS=coefficients,
            CENTRED=centred,
            BLOCK_P=launch_settings(Settings, var.device).affine_rows,
            BLOCK_C=block_c,
            ACC=tl_accumulation_dtype(plan.acc),
            num_warps=4,
        )


def _wgrad_partials(plan: _Plan, C: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    return (
        plan.partial_buffer(C, plan.kk_stride, device=device),
        plan.partial_buffer(C, device=device),
    )


def _launch_dx(
    src: torch.Tensor,
    x: torch.Tensor,
    w_table: torch.Tensor,
    plan: _Plan,
    residual: bool,
    wgrad: Optional[Tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    B, C, H, W = x.shape
    dx = torch.empty_like(x)
    pdw, pdb = wgrad if wgrad is not None else (w_table, w_table)
    with device_guard(x):
        for launch in plan.launches:
            args = (src, x, dx, w_table, launch.blocks, pdw, pdb, B, C, H, W, launch.b_per_prog)
            flags = dict(RESIDUAL=residual, WGRAD=wgrad is not None, KK_POW2=plan.kk_pow2)
            if plan.thread_plane[2]:
                for dx_pass in (True, False) if wgrad is not None else (True,):  # dx, then the weight gradient
                    _thread_plane_dx_kernel[launch.grid](
                        *args[:9],
                        launch.b_per_prog,
                        *src.stride(),
                        *x.stride(),
                        *dx.stride(),
                        RESIDUAL=residual,
                        WGRAD=not dx_pass,
                        DX=dx_pass,
                        **plan.thread_plane_constexprs(launch),
                        **NO_REGISTER_BUDGET,
                    )
            elif plan.strip:  # rows are contiguous: no column strides
                _strip_dx_kernel[launch.grid](
                    *args,
                    *src.stride()[:3],
                    *x.stride()[:3],
                    *dx.stride()[:3],
                    **flags,
                    **plan.strip_constexprs(launch),
                    **NO_REGISTER_BUDGET,
                )
            else:
                _dx_kernel[launch.grid](
                    *args,
                    *src.stride(),
                    *x.stride(),
                    *dx.stride(),
                    plan.zero_plane(src),
                    **flags,
                    **plan.constexprs(launch),
                    # the whole-plane weight-gradient sweep spilled 16-32 B (fp16/bf16, sm_86, Triton 3.6) without it
                    **(NO_REGISTER_BUDGET if wgrad is not None and plan.plane[1] else {}),
                )
    return dx


_PACK_SLOTS = 4  # _pack_kernel's groups per launch


def _launch_pack(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    table: torch.Tensor,
    bias: torch.Tensor,
    ksizes: Sequence[int],
    to_table: bool,
) -> None:
    """`_pack_kernel` over the groups, four per launch (one launch for TransXNet's four): weights [c_i, 1, K_i, K_i]
    and biases [c_i] (contiguous) into or out of table [C, kmax^2] and bias [C]."""
    firsts = [0]
    for w in weights[:-1]:
        firsts.append(firsts[-1] + w.shape[0])
    with device_guard(table):
        for start in range(0, len(weights), _PACK_SLOTS):
            slots = range(start, min(start + _PACK_SLOTS, len(weights)))
            unused = _PACK_SLOTS - len(slots)
            counts = [weights[i].shape[0] for i in slots]
            block_r = min(64, next_power_of_2(max(counts)))
            _pack_kernel[(cdiv(max(counts), block_r), len(slots))](
                *[weights[i] for i in slots],
                *[None] * unused,
                *[biases[i] for i in slots],
                *[None] * unused,
                table,
                bias,
                *[firsts[i] for i in slots],
                *[0] * unused,
                *counts,
                *[0] * unused,
                *[ksizes[i] for i in slots],
                *[1] * unused,
                GROUPS=len(slots),
                KK_STRIDE=table.shape[1],
                TO_TABLE=to_table,
                BLOCK_R=block_r,
                BLOCK_T=next_power_of_2(table.shape[1]),
                num_warps=4,
            )


def _pack(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[int]]:
    """(w_table, bias, widths, ksizes): the group weights packed into one zero-padded table [C, kmax^2] and the
    biases into one [C], in `dtype` (x's: under autocast the groups come uncast and are rounded here, as a cast
    would), in one launch (on a GPU the torch form, a pad per group and two cats, was six launches and its backward
    four copies). Not differentiable: the ops take the groups' tensors, pack inside and return the groups'
    gradients (`_group_gradients`)."""
    ksizes = [int(w.shape[-1]) for w in weights]
    widths = [int(w.shape[0]) for w in weights]
    table = weights[0].new_empty((sum(widths), max(ksizes) ** 2), dtype=dtype)
    bias = biases[0].new_empty((sum(widths),), dtype=dtype)
    with torch.no_grad():
        _launch_pack([w.contiguous() for w in weights], [b.contiguous() for b in biases], table, bias, ksizes, True)
    return table, bias, widths, ksizes


def _group_gradients(
    pdw: torch.Tensor, pdb: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Each group's weight and bias gradient, in its dtype, from the per-program partials ([P, C, kmax^2], [P, C]):
    summed over the programs (a fixed order: deterministic), then unpacked in one launch. Under autocast (fp32
    groups, half x) they are stored from the fp32 sums, where a cast's gradient would round them to half first."""
    dws = [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]
    dbs = [torch.empty(b.shape, dtype=b.dtype, device=b.device) for b in biases]
    _launch_pack(dws, dbs, pdw.sum(0), pdb.sum(0), [int(w.shape[-1]) for w in weights], False)
    return dws, dbs


# Packed tables of ms_ffn_middle_eval (forward-only, so its weights are constants): key -> (the _pack result, its
# sources). The key holds each weight's and bias's storage address, version counter (in-place updates bump it),
# shape, strides, dtype and device; the entry pins the sources, so no new tensor can take an address it keys on
# while it lives. The oldest entry goes first beyond _INFERENCE_PACKS_KEPT (a model has one weight set per MS-FFN).
_INFERENCE_PACKS: Dict[tuple, tuple] = {}
_INFERENCE_PACKS_KEPT = 256


def _pack_for_inference(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], dtype: torch.dtype):
    """_pack(weights, biases, dtype), kept until a source changes: on a GPU the packing is a launch and its Python
    (Triton's argument binding) at every inference call. Packed afresh while a CUDA graph is being captured (its
    replays must read the weights then current, and the table would live in the graph's memory pool) or where the
    tensors carry no version counter (inference-mode tensors)."""
    sources = (*weights, *biases)
    if sources[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return _pack(weights, biases, dtype)
    try:
        key = (dtype, *((t.data_ptr(), t._version, t.shape, t.stride(), t.dtype, t.device) for t in sources))
    except RuntimeError:  # an inference-mode tensor has no version counter
        return _pack(weights, biases, dtype)
    entry = _INFERENCE_PACKS.get(key)
    if entry is None:
        entry = (_pack(weights, biases, dtype), tuple(t.detach() for t in sources))
        keep_bounded(_INFERENCE_PACKS, key, entry, _INFERENCE_PACKS_KEPT)
    return entry[0]


# ------------------------------------------------------------------------------ multiscale_dwconv


@custom_op("transxnet_triton::multiscale_dwconv", mutates_args=())
def multiscale_dwconv_op(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor]) -> torch.Tensor:
    """multiscale_dwconv on the packed weight table (`_pack`, packed here so that autograd reaches the groups)."""
    out = torch.empty_like(x)
    if x.numel() > 0:
        w_table, bias, widths, ksizes = _pack(weights, biases, x.dtype)
        plan = _plan(x, widths, ksizes, out, thread_planes=True)
        _launch_forward(_CONV, x, w_table, bias, plan, out=out)
    return out


@multiscale_dwconv_op.register_fake
def _(x, weights, biases):
    return torch.empty_like(x)


@custom_op("transxnet_triton::multiscale_dwconv_backward", mutates_args=())
def multiscale_dwconv_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor]
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """(dx, each group's dW, each group's dbias)."""
    if x.numel() == 0:
        return torch.zeros_like(x), [torch.zeros_like(w) for w in weights], [torch.zeros_like(b) for b in biases]
    w_table, _, widths, ksizes = _pack(weights, biases, x.dtype)
    plan = _plan(x, widths, ksizes, grad_out, wgrad_dx=True, thread_planes=True)
    pdw, pdb = _wgrad_partials(plan, x.shape[1], x.device)
    dx = _launch_dx(grad_out, x, w_table, plan, residual=False, wgrad=(pdw, pdb))
    return (dx, *_group_gradients(pdw, pdb, weights, biases))


@multiscale_dwconv_backward.register_fake
def _(grad_out, x, weights, biases):
    return torch.empty_like(x), [torch.empty_like(w) for w in weights], [torch.empty_like(b) for b in biases]


def _multiscale_setup_context(ctx, inputs, output):
    x, weights, biases = inputs
    ctx.save_for_backward(x, *weights, *biases)
    ctx.groups = len(weights)


def _multiscale_autograd_rule(ctx, grad_out):
    x, *params = ctx.saved_tensors
    return multiscale_dwconv_backward(grad_out, x, params[: ctx.groups], params[ctx.groups :])


multiscale_dwconv_op.register_autograd(_multiscale_autograd_rule, setup_context=_multiscale_setup_context)


@ops.multiscale_dwconv.register("triton", supports=supports)
def multiscale_dwconv(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor]) -> torch.Tensor:
    return multiscale_dwconv_op(x, list(weights), list(biases))


# ---------------------------------------------------------------------------------- ms_ffn_middle


@custom_op("transxnet_triton::ms_ffn_middle", mutates_args=())
def ms_ffn_middle_op(
    x: torch.Tensor,
    weights: List[torch.Tensor],
    biases: List[torch.Tensor],
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    training: bool,
    save_z: bool,
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, var, z): mean and var are the per-channel statistics BN normalised with (batch mean and
    biased batch variance in training, copies of the running statistics in eval), in the accumulation dtype;
    z = conv(x) + x in x's dtype in training or with save_z (eval with gradients), for the backward; else empty.

    Then the stencil runs once: the first pass stores z, the normalising pass and the backward read it. That
    moves one pass more than recomputing the conv in each (write z, read z), but the stencil, not DRAM, bounds
    these kernels (static GPU audit): each recompute costs more than a pass."""
    C = x.shape[1]
    out = torch.empty_like(x)
    keep_z = training or save_z
    z = torch.empty_like(x) if keep_z else x.new_empty(0)
    w_table, bias, widths, ksizes = _pack(weights, biases, x.dtype)
    plan = _plan(x, widths, ksizes, out, thread_planes=True)
    if training:
        stats = tuple(plan.partial_buffer(C, device=x.device) for _ in range(3))
        _launch_forward(_STATS, x, w_table, bias, plan, out=z, stats=stats)
        mean, var = (torch.empty(C, dtype=plan.acc, device=x.device) for _ in range(2))
        scale, shift = _batch_norm_affine(plan, mean, var, norm_weight, norm_bias, eps, stats)
    else:
        mean = running_mean.to(plan.acc, copy=True)
        var = running_var.to(plan.acc, copy=True)
        if keep_z and x.numel() > 0:
            _launch_forward(_PREACT, x, w_table, bias, plan, out=z)
        scale, shift = _batch_norm_affine(plan, mean, var, norm_weight, norm_bias, eps)
    if keep_z and x.numel() > 0:  # no stencil: not a strip pass
        flat_z, flat_out = _flat_planes(z, out)
        elementwise = _plan(flat_z, widths, ksizes, flat_out, pointwise=True)
        _launch_forward(_APPLY_SAVED, flat_z, w_table, bias, elementwise, out=flat_out, scale=scale, shift=shift)
    elif x.numel() > 0:
        _launch_forward(_APPLY, x, w_table, bias, plan, out=out, scale=scale, shift=shift)
    return out, mean, var, z


@ms_ffn_middle_op.register_fake
def _(x, weights, biases, norm_weight, norm_bias, running_mean, running_var, training, save_z, eps):
    acc = accumulation_dtype(x.dtype)
    C = x.shape[1]
    z = torch.empty_like(x) if training or save_z else x.new_empty(0)
    return torch.empty_like(x), x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc), z


# The whole-plane plan's constexprs that _plane_dz_dx_kernel takes (its planes are dense slots and int32 offsets).
_PLANE_DZ_DX_CONSTEXPRS = (
    "KMAX",
    "KK_STRIDE",
    "ACC",
    "BLOCK_C",
    "PLANE_H",
    "PLANE_W",
    "PLANE_WP",
    "PLANE_DENSE",
    "num_warps",
)

# The widest map element whose dz pass runs on thread planes (_thread_plane_dz_kernel): every specialisation sits at
# 255 registers, and the fp32 one spilled 4 B a thread at K = 5 on sm_90 (Triton 3.8); fp32 and fp64 keep the
# whole-plane one pass (_plane_dz_dx_kernel).
_THREAD_PLANE_DZ_MAX_ELEMENT_SIZE = 2


@custom_op("transxnet_triton::ms_ffn_middle_backward", mutates_args=())
def ms_ffn_middle_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    z: Optional[torch.Tensor],
    weights: List[torch.Tensor],
    biases: List[torch.Tensor],
    norm_weight: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    training: bool,
    eps: float,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(dx, each group's dW, each group's dbias, dgamma, dbeta). z: the forward's saved z, or None to recompute
    it."""
    B, C, H, W = x.shape
    n = B * H * W
    if n == 0:  # eval on an empty batch
        return (
            torch.zeros_like(x),
            [torch.zeros_like(w) for w in weights],
            [torch.zeros_like(b) for b in biases],
            torch.zeros_like(norm_weight),
            torch.zeros_like(norm_weight),
        )
    w_table, bias, widths, ksizes = _pack(weights, biases, x.dtype)
    plan = _plan(x, widths, ksizes, grad_out)  # dz has x's shape and strides
    thread_plan = _plan(x, widths, ksizes, grad_out, thread_planes=True)
    # The strip and thread-plane kernels run the dz pass from the saved z; a dz pass that recomputes z runs on the
    # plan without strips; the statistics pass of training on the pointwise plan from the saved z (no stencil: each
    # plane one run, `_flat_planes`), else (z recomputed) on whole planes where the plan has them. From the saved z
    # on strips of whole rows, dz and dx are one pass (_strip_dz_dx_kernel).
    one_pass_plan = _plan(x, widths, ksizes, grad_out, wgrad_dx=True, whole_rows=True) if plan.strip else plan
    # (on contiguous maps: one set of strides for x, z, go and dx, whose offsets held the registers it spilled)
    one_pass = z is not None and one_pass_plan.strip > 0 and x.is_contiguous() and grad_out.is_contiguous()
    if one_pass:
        dz_plan = one_pass_plan
    elif z is None:
        dz_plan = _plan(x, widths, ksizes, grad_out, strips=False) if plan.strip else plan
    elif thread_plan.thread_plane[2] and x.element_size() <= _THREAD_PLANE_DZ_MAX_ELEMENT_SIZE:
        dz_plan = thread_plan
    else:
        dz_plan = plan
    # From the saved z on whole planes, dz and dx are one pass too (_plane_dz_dx_kernel).
    plane_one_pass = z is not None and dz_plan is plan and bool(plan.plane[1])
    # BatchNorm's gradient sums: in the dz pass in eval, a pass of their own in training (dz needs them) and on
    # thread planes (see _thread_plane_dz_kernel)
    separate_stats = training or bool(dz_plan.thread_plane[2])
    # The whole-plane weight gradient reads dz back after the pass stored it: in the accumulation dtype, so
    # that dW sums unrounded dz (rounded to fp16, its BatchNorm-cancelling sums lost the fp16 tolerance). The one
    # pass writes dx there instead, and keeps dz in its slots.
    dz = torch.empty_like(x, dtype=plan.acc if dz_plan.plane[1] and not plane_one_pass else x.dtype)
    if one_pass:
        one_pass_rows = {launch.kmax: _one_pass_strip_rows(dz_plan, launch.kmax, x) for launch in dz_plan.launches}
        slot_rows = max(rows + k - 1 for k, rows in one_pass_rows.items())
        slots = _strip_slots(dz_plan, dz_plan.block_c * slot_rows * dz_plan.block_hw, dz_plan.acc, x)
    elif plane_one_pass:
        slots = _strip_slots(dz_plan, dz_plan.block_c * dz_plan.plane[0] * dz_plan.plane[1], dz_plan.acc, x)
        slot_zeros = _zero_plane(dz_plan.plane, True, slots)
    if z is not None and z.stride() != dz.stride():  # the kernel reads z with dz's strides
        z = torch.empty_like(x).copy_(z)
    maps = (x, z if z is not None else dz, grad_out, dz)  # what the passes read and write, as `launch` takes them
    stats_plan, stats_maps = dz_plan, maps
    if separate_stats and z is not None:  # from the saved z, no stencil: each plane one run where it can be
        stats_maps = _flat_planes(*maps)
        stats_plan = _plan(stats_maps[0], widths, ksizes, stats_maps[2], pointwise=True)
    elif separate_stats:  # z recomputed: a stencil, on whole planes where the plan has them
        stats_plan = plan if plan.plane[1] else _plan(x, widths, ksizes, grad_out, pointwise=True)
    coef = torch.empty(4, C, dtype=plan.acc, device=x.device)  # rstd, cgo, cxhat, cconst (_batch_norm_grad_kernel)
    rstd, cgo, cxhat, cconst = coef.unbind(0)
    sgo, sgx = (stats_plan.partial_buffer(C, device=x.device) for _ in range(2))
    dgamma, dbeta = torch.empty_like(norm_weight), torch.empty_like(norm_weight)
    sums = (sgo, sgx, dgamma, dbeta)
    pdw, pdb = _wgrad_partials(dz_plan, C, x.device)

    def launch(pass_plan: _Plan, stats: bool, dz_pass: bool, pass_maps: Tuple[torch.Tensor, ...]) -> None:
        # pass_maps: x, z (dz where z is not saved), go and dz, as views of the plan's shape (`_flat_planes`)
        pass_x, pass_z, pass_go, pass_dz = pass_maps
        pass_h, pass_w = pass_x.shape[2:]
        with device_guard(x):
            for launch in pass_plan.launches:
                # per-channel inputs and partial buffers, then the sizes: the same for both kernels
                shared = (mean, rstd, cgo, cxhat, cconst, sgo, sgx, pdw, pdb, B, C, pass_h, pass_w, launch.b_per_prog)
                if pass_plan.thread_plane[2]:
                    assert dz_pass and not stats and z is not None, "the thread-plane kernel: dz from the saved z"
                    _thread_plane_dz_kernel[launch.grid](
                        x,
                        z,
                        grad_out,
                        dz,
                        launch.blocks,
                        *shared[:5],  # no BatchNorm gradient sums
                        *shared[7:11],
                        launch.b_per_prog,
                        *x.stride(),
                        *grad_out.stride(),
                        *dz.stride(),
                        **pass_plan.thread_plane_constexprs(launch),
                        **NO_REGISTER_BUDGET,
                    )
                elif pass_plan.strip and one_pass:
                    assert dz_pass, "the one-pass strip kernel: dz, dx and dW from the saved z"
                    _strip_dz_dx_kernel[launch.grid](
                        x,
                        z,
                        grad_out,
                        dz,  # dx
                        slots,
                        w_table,
                        launch.blocks,
                        *shared,
                        *x.stride()[:3],  # all four maps' (one_pass requires it)
                        STATS=stats,
                        KK_POW2=pass_plan.kk_pow2,
                        **dict(pass_plan.strip_constexprs(launch), STRIP=one_pass_rows[launch.kmax]),
                        **NO_REGISTER_BUDGET,
                    )
                elif plane_one_pass and dz_pass:
                    constexprs = pass_plan.constexprs(launch)
                    _plane_dz_dx_kernel[launch.grid](
                        x,
                        z,
                        grad_out,
                        dz,  # dx
                        slots,
                        w_table,
                        launch.blocks,
                        *shared,
                        *x.stride(),
                        *grad_out.stride(),
                        *dz.stride(),
                        slot_zeros,
                        STATS=stats,
                        **{key: constexprs[key] for key in _PLANE_DZ_DX_CONSTEXPRS},
                        **NO_REGISTER_BUDGET,
                    )
                elif pass_plan.strip:
                    assert dz_pass and z is not None, "the strip kernel is the dz pass from the saved z"
                    _strip_dz_kernel[launch.grid](
                        x,
                        z,
                        grad_out,
                        dz,
                        launch.blocks,
                        *shared,
                        *x.stride()[:3],
                        *grad_out.stride()[:3],
                        *dz.stride()[:3],
                        STATS=stats,
                        KK_POW2=pass_plan.kk_pow2,
                        **pass_plan.strip_constexprs(launch),
                        **NO_REGISTER_BUDGET,
                    )
                else:
                    _middle_grad_kernel[launch.grid](
                        pass_x,
                        pass_z,
                        pass_go,
                        pass_dz,
                        w_table,
                        bias,
                        launch.blocks,
                        *shared,
                        *pass_x.stride(),
                        *pass_go.stride(),
                        *pass_dz.stride(),
                        pass_plan.zero_plane(pass_x),
                        STATS=stats,
                        DZ=dz_pass,
                        Z_SAVED=z is not None,
                        **(NO_REGISTER_BUDGET if z is not None else {}),
                        KK_POW2=pass_plan.kk_pow2,
                        **pass_plan.constexprs(launch),
                    )

    _batch_norm_grad(plan, coef, var, norm_weight, eps, n)  # rstd, cgo; cxhat = cconst = 0
    if separate_stats:
        launch(stats_plan, True, False, stats_maps)
        # training: BN's gradient needs the batch sums of go and go*xhat before dz exists
        _batch_norm_grad(plan, coef, var, norm_weight, eps, n, sums, coefficients=training, centred=training)
    launch(dz_plan, not separate_stats, True, maps)
    if not separate_stats:
        _batch_norm_grad(plan, coef, var, norm_weight, eps, n, sums, coefficients=False)
    # dx = conv_transpose(dz) + dz, a thread per plane where planes are small (the one pass wrote it)
    dx = dz if one_pass or plane_one_pass else _launch_dx(dz, x, w_table, thread_plan, residual=True, wgrad=None)
    return dx, *_group_gradients(pdw, pdb, weights, biases), dgamma, dbeta


def _one_pass_strip_rows(plan: _Plan, k: int, x: torch.Tensor) -> int:
    """Rows of a strip of the one-pass backward (`_strip_dz_dx_kernel`) at kernel size k: the plan's, at most
    Settings.one_pass_k7_strip_rows from k = 7 on for fp32 and fp64 maps (16-bit maps' rows take half the registers:
    at 4 rows, 255 and no spill on sm_80/86/90). Its programs cover whole rows and walk down their images, so a
    launch's strip sets only its slot rows and loop, not its grid or partials."""
    if k >= 7 and x.element_size() >= 4:
        return min(plan.strip, launch_settings(Settings, x.device).one_pass_k7_strip_rows)
    return plan.strip


@ms_ffn_middle_backward.register_fake
def _(grad_out, x, z, weights, biases, norm_weight, mean, var, training, eps):
    return (
        torch.empty_like(x),
        [torch.empty_like(w) for w in weights],
        [torch.empty_like(b) for b in biases],
        torch.empty_like(norm_weight),
        torch.empty_like(norm_weight),
    )


def _middle_setup_context(ctx, inputs, output):
    x, weights, biases, norm_weight, norm_bias, _, _, training, save_z, eps = inputs
    _, mean, var, z = output
    ctx.save_for_backward(x, z if training or save_z else None, norm_weight, mean, var, *weights, *biases)
    ctx.groups = len(weights)
    ctx.args = (training, eps)
    ctx.norm_bias_dtype = norm_bias.dtype
    # The gradients of mean, var and z (outputs for the running statistics and the backward only) would otherwise
    # be materialised as zeros: for z, a fill as large as the map each backward (154 MB at T's stage 1, bf16).
    ctx.set_materialize_grads(False)


def _middle_autograd_rule(ctx, grad_out, _grad_mean, _grad_var, _grad_z):
    if grad_out is None:  # an undefined output gradient (autograd may pass one; gradcheck checks it)
        return None, [None] * ctx.groups, [None] * ctx.groups, *(None,) * 7
    x, z, norm_weight, mean, var, *params = ctx.saved_tensors
    weights, biases = params[: ctx.groups], params[ctx.groups :]
    dx, dws, dbs, dgamma, dbeta = ms_ffn_middle_backward(
        grad_out, x, z, weights, biases, norm_weight, mean, var, *ctx.args
    )
    return dx, dws, dbs, dgamma, dbeta.to(ctx.norm_bias_dtype), None, None, None, None, None


ms_ffn_middle_op.register_autograd(_middle_autograd_rule, setup_context=_middle_setup_context)


@custom_op("transxnet_triton::batch_norm_update_running", mutates_args=("running_mean", "running_var"))
def batch_norm_update_running(
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float,
) -> None:
    """F.batch_norm's update of the running statistics from a batch's mean and biased variance over `count` values
    per channel, in one launch (nine small torch launches on a GPU)."""
    momentum_hi = struct.unpack("f", struct.pack("f", momentum))[0]  # the nearest fp32, then the remainder
    block_c = _per_channel_block(mean.shape[0], mean.device)
    with device_guard(mean):
        _running_statistics_kernel[(cdiv(mean.shape[0], block_c),)](
            mean,
            var,
            running_mean,
            running_var,
            momentum_hi,
            momentum - momentum_hi,
            count,
            mean.shape[0],
            BLOCK_C=block_c,
            ACC=tl_accumulation_dtype(mean.dtype),
            num_warps=4,
        )


@batch_norm_update_running.register_fake
def _(running_mean, running_var, mean, var, count, momentum):
    return None


@ops.ms_ffn_middle.register("triton", supports=supports)
def ms_ffn_middle(x, weights, biases, norm_weight, norm_bias, running_mean, running_var, training, momentum, eps):
    """ms_ffn_middle on the packed kernels; the running statistics are updated here, as F.batch_norm does."""
    B, C, H, W = x.shape
    n = B * H * W
    if training and n <= 1:  # the message F.batch_norm gives
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    weights, biases = list(weights), list(biases)
    if norm_weight is None:
        norm_weight = torch.ones(C, dtype=x.dtype, device=x.device)
    if norm_bias is None:
        norm_bias = torch.zeros(C, dtype=x.dtype, device=x.device)
    # Eval with gradients (frozen BatchNorm while fine-tuning) keeps z too: the backward then skips the conv.
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, *weights, *biases, norm_weight, norm_bias)
    )
    out, mean, var, _ = ms_ffn_middle_op(
        x,
        weights,
        biases,
        norm_weight,
        norm_bias,
        running_mean,
        running_var,
        training,
        not training and needs_grad,
        float(eps),
    )
    if training and (running_mean is not None or running_var is not None):
        batch_norm_update_running(running_mean, running_var, mean.detach(), var.detach(), n, float(momentum))
    return out


# ----------------------------------------------------------------------------- ms_ffn_middle_eval


def _supports_inference(info) -> Optional[str]:
    if info.needs_grad:
        return (
            "the Triton ms_ffn_middle_eval is forward-only (inference); with gradients the model runs fc1's "
            "GELU and BatchNorm, then ms_ffn_middle"
        )
    return supports(info)


def _one_pass_strips(x: torch.Tensor) -> bool:
    """Whether ms_ffn_middle_eval may run its whole-row strips (`_strip_eval_kernel`) on x. fp16/bf16 maps on
    compute capability 7.x-8.0 keep the two launches: there a scheduler has 16 FP32 lanes, a warp's FFMA takes 2
    clocks, and the FP32 pipe, not DRAM, binds both forms; the one-pass kernel issues more on it (its slot's 16-bit
    round trips) than the two 16-bit passes it saves take DRAM time (static audit, Triton 3.8, T stage 1 bf16 on
    A100, µs, two launches -> one pass: by issue 435.5 -> 424.6, under the FP32-pipe bound 645.4 -> 682.1). fp32
    maps save twice the bytes (A100: 739.5 -> 670.3 under that bound)."""
    return x.element_size() >= 4 or not 70 <= launch_target(x.device).capability <= 80


@ops.ms_ffn_middle_eval.register("triton", supports=_supports_inference)
@ops.ms_ffn_middle_eval.library_op("transxnet_triton", fake=lambda x, *_: torch.empty_like(x))
def ms_ffn_middle_eval(x, input_scale, input_shift, weights, biases, output_scale, output_shift):
    """One pass over the map where a program can map y = GELU(x) * input_scale + input_shift for its own stencil: on
    planes of thread_plane_pixels or fewer (stage 4 at 224^2) one launch, `_EVAL`, a thread per plane mapping each
    element it loads once; on dense whole planes (stage 3, NCHW) `_plane_eval_kernel`, each thread mapping its own
    column once into its program's slot for the stencil to read back; on NCHW rows of at most 4 * whole_row_chunks
    pixels (stages 1-2) `_strip_eval_kernel`, a program walking down its images' strips of whole rows through a slot the
    same way (a launch per kernel size for both; not for 16-bit maps on compute capability 7.x-8.0, `_one_pass_strips`).
    Elsewhere (channels_last at stages 1-3, wider rows) two launches over the map: y (`_APPLY_SAVED`, no stencil),
    stored in x's dtype, then `_APPLY`'s stencil on y with the output affine: 4 passes against 2.

    The slots keep each program's GELUs to its own rows: a prologue in the column-block strips (each thread loading
    its chunk and both neighbours for every input row) would evaluate the GELU ~5x per input element at K = 7, and the
    tiled stencils once per tap. Static audit, Triton 3.8, T, batch 128, NCHW, H100 (A100), µs, two launches -> one
    pass / DRAM roofline: fp32 stage 1 (192x56x56) 383.8 -> 234.2 / 184.0 (635.5 -> 400.5 / 308.3), stage 3
    (896x14x14) 113.8 -> 68.0 / 53.7 (186.2 -> 106.7 / 89.9); bf16 stage 1 268.3 -> 243.3 / 92.0, stage 3 90.1 ->
    70.2 / 26.8 (133.8 -> 106.2 / 45.0). The 16-bit passes stay issue-bound (two GELUs per element and the
    stencil)."""
    w_table, bias, widths, ksizes = _pack_for_inference(weights, biases, x.dtype)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    acc = accumulation_dtype(x.dtype)

    def per_channel(t):
        return t.to(acc).contiguous()

    w_table, bias = w_table.contiguous(), bias.contiguous()
    plan = _plan(x, widths, ksizes, out, thread_planes=True)
    if plan.thread_plane[2]:
        _launch_forward(
            _EVAL,
            x,
            w_table,
            bias,
            plan,
            out=out,
            scale=per_channel(output_scale),
            shift=per_channel(output_shift),
            in_scale=per_channel(input_scale),
            in_shift=per_channel(input_shift),
        )
        return out
    stencil = _plan(x, widths, ksizes, out)
    if stencil.plane[1] and stencil.plane_dense:
        _launch_plane_eval(
            x,
            w_table,
            bias,
            stencil,
            out,
            *(per_channel(t) for t in (input_scale, input_shift, output_scale, output_shift)),
        )
        return out
    strips = _plan(x, widths, ksizes, out, whole_rows=True)
    if strips.strip and _one_pass_strips(x):
        _launch_strip_eval(
            x,
            w_table,
            bias,
            strips,
            out,
            *(per_channel(t) for t in (input_scale, input_shift, output_scale, output_shift)),
        )
        return out
    y = torch.empty_like(x)
    flat_x, flat_y = _flat_planes(x, y)
    elementwise = _plan(flat_x, widths, ksizes, flat_y, pointwise=True)
    _launch_forward(
        _APPLY_SAVED,
        flat_x,
        w_table,
        bias,
        elementwise,
        out=flat_y,
        scale=per_channel(input_scale),
        shift=per_channel(input_shift),
    )
    _launch_forward(
        _APPLY, y, w_table, bias, stencil, out=out, scale=per_channel(output_scale), shift=per_channel(output_shift)
    )
    return out
