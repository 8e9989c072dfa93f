"""multiscale_dwconv on every fused backend against the fp64 reference: output and every gradient, awkward group
layouts, memory layouts, dtypes, NaN-poisoned allocations; then each backend's own paths (Triton: tiling and
batch splits, the launch grid, gradcheck, opcheck, torch.compile, > 2^31 elements; cpp: the NHWC kernel limit)."""

import contextlib
import math

import pytest
import torch

import transxnet_kernels as tk
from helpers import (
    ALL_CHOICES,
    CPP_LAYOUTS,
    DEVICE,
    LAYOUTS,
    TOLERANCE,
    TRITON,
    assert_output_layout,
    assert_rel_close,
    backend_dtype_params,
    backend_param,
    backend_params,
    check_dispatcher_paths_agree,
    check_op,
    cpp_only,
    dtype_id,
    evaluate,
    fused_backends,
    groups_id,
    ms_ffn_small_tiles,
    ms_ffn_tiled_stencils,
    not_interpreted,
    randn,
    requires_cpp,
    requires_triton,
    requiring_grad,
    to_layout,
    triton_only,
)
from transxnet_kernels import reference

OP = "multiscale_dwconv"


def msdw_args(widths, ksizes, B, H, W, dtype=torch.float32, layout="contiguous", device=None, seed=0, grad=True):
    """(x, weights, biases), every tensor requiring grad when `grad`."""
    gen = torch.Generator().manual_seed(seed)
    device = DEVICE if device is None else device

    def rand(*shape, scale=1.0):
        return randn(*shape, dtype=dtype, gen=gen, scale=scale, device=device)

    x = to_layout(rand(B, sum(widths), H, W), layout)
    weights = [rand(c, 1, k, k, scale=0.3) for c, k in zip(widths, ksizes)]
    biases = [rand(c, scale=0.3) for c in widths]
    args = (x, weights, biases)
    return requiring_grad(args, [0, 1, 2]) if grad else args


# (group widths, kernel sizes, B, H, W): width-1 groups, odd and unequal widths, kernels 1..11, batch 1, maps
# smaller than the largest kernel, wide rows, groups that are not whole vectors or span several.
GROUPS = [
    ([3, 2, 1, 2], [1, 3, 5, 7], 2, 5, 6),
    ([1, 4, 3], [9, 3, 1], 1, 3, 10),
    ([4, 1, 1, 1], [1, 3, 5, 7], 2, 2, 3),
    ([2, 3], [5, 9], 1, 7, 1),
    ([1], [3], 3, 4, 4),
    ([3, 2, 2, 2], [1, 3, 5, 7], 2, 11, 9),  # the MS-FFN split with unequal widths
    ([1, 2, 3, 1, 2], [1, 3, 5, 7, 9], 1, 4, 6),  # kernels 1..9, H/W smaller than the largest
    ([5], [3], 3, 7, 19),  # one group
    ([2, 3], [11, 1], 2, 12, 35),  # runtime kernel size, wide rows
]
INTERPRETED_GROUPS = GROUPS[:5]  # the interpreter runs fewer (seconds per call)


def _sweep():
    params = []
    for backend in fused_backends(OP):
        groups = INTERPRETED_GROUPS if backend.interpreted else GROUPS
        layouts = (
            ["contiguous", "channels_last"]
            if backend.interpreted
            else CPP_LAYOUTS
            if backend.name == "cpp"
            else LAYOUTS
        )
        for dtype in (torch.float32, torch.float64):
            # Triton: planes of <= 16 x 16 take the whole-plane stencil; again with the tiled stencils larger
            # planes take (in the interpreter in fp64 only).
            tiled = backend.name == "triton" and (dtype == torch.float64 or not backend.interpreted)
            for g in groups:
                for layout in layouts:
                    for stencil in ("default", "tiled") if tiled else ("default",):
                        extra = f"-{dtype_id(dtype)}-{groups_id(g)}-{layout}" + ("-tiled" if stencil == "tiled" else "")
                        params.append(backend_param(backend, dtype, g, layout, stencil, extra_id=extra))
    return params


@pytest.mark.parametrize("backend,dtype,groups,layout,stencil", _sweep())
def test_matches_reference(backend, dtype, groups, layout, stencil, nan_poisoned_empty):
    args = msdw_args(*groups, dtype=dtype, layout=layout, device=backend.device)
    with ms_ffn_tiled_stencils() if stencil == "tiled" else contextlib.nullcontext():
        out, _, _ = check_op(backend, OP, args)
    assert_output_layout(out, args[0])


@pytest.mark.parametrize("layout", ["channel_slice", "nchw_slice"])
@pytest.mark.parametrize("backend", backend_params(OP, only=triton_only))
def test_channel_slices(backend, layout, nan_poisoned_empty):
    out, _, _ = check_op(backend, OP, msdw_args([3, 2, 2], [1, 3, 5], 2, 4, 5, layout=layout, seed=1))
    assert_output_layout(out, to_layout(torch.empty(2, 7, 4, 5), layout))


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(OP, dtypes=[torch.float16, torch.bfloat16]))
def test_half_precision(backend, dtype, nan_poisoned_empty):
    """The dtypes beyond the sweep's (Triton: fp16 everywhere, bf16 on GPUs that have it)."""
    check_op(
        backend,
        OP,
        msdw_args(
            [3, 2, 1, 2], [1, 3, 5, 7], 2, 5, 6, dtype=dtype, layout="channels_last", seed=2, device=backend.device
        ),
    )


@pytest.mark.parametrize("backend", backend_params(OP, per_isa=False))
def test_strided_inputs(backend):
    """A sliced (non-dense) input and, with gradients, an expanded (stride-0) output gradient."""
    x_big, weights, biases = msdw_args([2, 3], [3, 5], 2, 6, 9, dtype=torch.float64, device=backend.device)
    x = x_big.detach()[:, :, 1:5, ::2]
    check_op(backend, OP, requiring_grad((x, weights, biases), [0]))
    if backend.has_backward:
        x = x.requires_grad_()
        with backend.active():
            out = tk.multiscale_dwconv(x, weights, biases)
            got = torch.autograd.grad(out.sum(), [x, *weights])
        ref = reference.multiscale_dwconv(x, weights, biases)
        want = torch.autograd.grad(ref.sum(), [x, *weights])
        for i, (g, r) in enumerate(zip(got, want)):
            assert_rel_close(g, r, TOLERANCE[torch.float64], f"grad {i}")


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(OP, only=not_interpreted))
def test_model_shape(backend, dtype):
    """A TransXNet-T stage-1 MS-FFN sample: 4C = 192 channels in four groups, 56x56 (too slow interpreted)."""
    check_op(
        backend,
        OP,
        msdw_args(
            [48, 48, 48, 48],
            [1, 3, 5, 7],
            1,
            56,
            56,
            dtype=dtype,
            layout="channels_last",
            device=backend.device,
            seed=3,
            grad=backend.has_backward,
        ),
    )


@pytest.mark.parametrize("choice", ALL_CHOICES)
def test_mixed_dtypes_and_devices_raise_value_error_naming_the_argument(choice):
    x, weights, biases = msdw_args([2, 1], [3, 5], 1, 4, 4, device=torch.device("cpu"), grad=False)
    with tk.use_backend(choice):
        with pytest.raises(ValueError, match=r"multiscale_dwconv: weights\[0\] has dtype torch\.float64 but x has"):
            tk.multiscale_dwconv(x, [weights[0].double(), weights[1]], biases)
        with pytest.raises(ValueError, match=r"multiscale_dwconv: biases\[1\] has dtype torch\.float64"):
            tk.multiscale_dwconv(x, weights, [biases[0], biases[1].double()])
        with pytest.raises(ValueError, match=r"multiscale_dwconv: weights\[1\] is on meta but x is on cpu"):
            tk.multiscale_dwconv(x, [weights[0], weights[1].to("meta")], biases)
        with pytest.raises(ValueError, match=r"multiscale_dwconv: weights\[0\] is on cpu but x is on meta"):
            tk.multiscale_dwconv(x.to("meta"), weights, biases)


@pytest.mark.parametrize("backend", backend_params(OP, per_isa=False))
def test_empty_batch(backend):
    x, weights, biases = msdw_args([2, 1], [3, 5], 0, 4, 4, device=backend.device, grad=backend.has_backward)
    with backend.active():
        out = tk.multiscale_dwconv(x, weights, biases)
        assert out.shape == x.shape
        if backend.has_backward:
            grads = torch.autograd.grad(out.sum(), [x, *weights, *biases])
            assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("backend", backend_params(OP, per_isa=False))
def test_compile_fullgraph(backend):
    args = msdw_args([2, 1, 1], [1, 3, 5], 2, 4, 4, device=backend.device, seed=4, grad=backend.has_backward)
    torch._dynamo.reset()
    compiled = torch.compile(tk.multiscale_dwconv, fullgraph=True, backend="aot_eager")
    grad_out = torch.ones(2, 4, 4, 4, device=backend.device)
    with backend.active():
        out, grads = evaluate(compiled, args, grad_out if backend.has_backward else None)
    ref_args = requiring_grad(
        [t.detach().double() if torch.is_tensor(t) else [u.detach().double() for u in t] for t in args], [0, 1, 2]
    )
    ref_out, ref_grads = evaluate(reference.multiscale_dwconv, ref_args, grad_out.double())
    assert_rel_close(out, ref_out, TOLERANCE[torch.float32], "compiled output")
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(a, b, TOLERANCE[torch.float32], f"compiled grad {i}")


# ------------------------------------------------------------------------------------- triton


@requires_triton
@pytest.mark.parametrize("plane", [False, True], ids=["tiled", "plane"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_many_tiles_and_batch_splits(layout, plane, nan_poisoned_empty):
    with ms_ffn_small_tiles(index64=not plane, plane=plane):
        check_op(TRITON, OP, msdw_args([3, 5, 1], [3, 1, 5], 3, 5, 7, dtype=torch.float64, layout=layout))


@requires_triton
def test_triton_whole_plane_stencil_where_it_applies():
    """Planes of at most plane_max rows and columns with int32 offsets, in either memory layout, take the
    whole-plane stencil: one launch per kernel size, largest first, a program per channel block holding the
    plane padded to powers of 2. Planned on meta tensors, nothing runs."""
    from transxnet_kernels.triton import common, ms_ffn

    def plan(x, widths=(2, 3), ksizes=(3, 7)):
        return ms_ffn._plan(x, list(widths), list(ksizes))

    with common.launch_overrides(common.LaunchTarget(sm_count=132, interpreted=False)):
        p = plan(torch.empty(8, 5, 14, 14, device="meta"))
        assert p.plane == (14, 14, 16) and p.block_hw == 256 and not p.vec, p
        assert [launch.kmax for launch in p.launches] == [7, 3]
        assert p.block_c == 4 and p.num_warps == 2, p  # 64 (channel, column) pairs of 16 columns: 4
        assert [launch.grid[:2] for launch in p.launches] == [(1, 1), (1, 1)]
        assert plan(torch.empty(8, 5, 7, 9, device="meta").to(memory_format=torch.channels_last)).plane == (7, 9, 16)
        assert plan(torch.empty(8, 5, 16, 1, device="meta")).plane == (16, 1, 1)
        assert plan(torch.empty(8, 5, 17, 4, device="meta")).plane == (0, 0, 0)
        assert plan(torch.empty(8, 5, 4, 17, device="meta")).plane == (0, 0, 0)
        assert plan(torch.empty(8, 5, 17, 4, device="meta")).launches[0].kmax == 7
    with ms_ffn_small_tiles(index64=True, plane=True):
        assert plan(torch.empty(8, 5, 14, 14, device="meta")).plane == (0, 0, 0)


@requires_triton
def test_triton_dense_whole_planes_where_rows_are_contiguous():
    """Whole planes read with unmasked loads and compile-time strides (`plane_dense`) only where every map of the
    pass has contiguous rows: NCHW, not channels_last, not rows padded past W, not a plan with such another map."""
    from transxnet_kernels.triton import common, ms_ffn

    def dense(x, *others):
        return ms_ffn._plan(x, [2, 3], [3, 7], *others).plane_dense

    x = torch.empty(8, 5, 14, 14, device="meta")
    with common.launch_overrides(common.LaunchTarget(sm_count=132, interpreted=False)):
        assert dense(x) and dense(x, torch.empty_like(x))
        assert dense(torch.empty(8, 9, 14, 14, device="meta")[:, 2:7])  # a channel slice keeps its rows
        assert not dense(x.to(memory_format=torch.channels_last))
        assert not dense(x, x.to(memory_format=torch.channels_last))
        assert not dense(torch.empty(8, 5, 14, 16, device="meta")[..., :14])
        assert not dense(torch.empty(8, 5, 20, 20, device="meta"))  # no whole planes: the strips or tiles


@requires_triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_non_finite_values_at_the_borders(layout):
    """Zero padding is exact whatever the map holds: infinities and NaNs at the image borders give the
    reference's non-finite outputs, position for position (the dense whole-plane stencil reads zeros from a zero
    plane outside the image, never a neighbouring row times a zero tap)."""
    x, weights, biases = msdw_args([2, 2, 3], [3, 5, 7], 2, 9, 10, dtype=torch.float64, layout=layout, grad=False)
    x = x.clone()
    x[0, 0, 4, 0] = math.inf  # left border
    x[0, 3, 0, 9] = -math.inf  # right border, top row
    x[1, 5, 8, 9] = math.nan  # bottom-right corner
    x[1, 6, 3, 0] = math.inf
    with TRITON.active():
        out = tk.multiscale_dwconv(x, weights, biases)
    ref = reference.multiscale_dwconv(x, weights, biases)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and torch.isinf(ref).any()
    assert torch.equal(out[torch.isinf(ref)], ref[torch.isinf(ref)])
    finite = torch.isfinite(ref)
    assert_rel_close(out[finite], ref[finite], 1e-10, "finite outputs")


@requires_triton
def test_triton_whole_plane_launches_with_unequal_batch_splits(nan_poisoned_empty):
    """One launch per kernel size, each splitting the batch for its own channel blocks: the k = 3 launch (four
    one-channel blocks) splits a batch of 4 once, the k = 5 launch (one block) four times, so the weight
    gradient's partials have rows only one launch writes (zero for the other's channels)."""
    import dataclasses

    from transxnet_kernels.triton import common, ms_ffn

    args = msdw_args([4, 1], [3, 5], 4, 6, 5, dtype=torch.float64)
    settings = ms_ffn.Settings.for_target(common.launch_target(DEVICE))
    overrides = dataclasses.replace(settings, target_programs=4, plane_columns=8, thread_plane_pixels=0)
    with common.launch_overrides(overrides):
        plan = ms_ffn._plan(args[0].detach(), [4, 1], [3, 5], thread_planes=True)
        assert [(launch.kmax, launch.grid) for launch in plan.launches] == [(5, (1, 1, 4)), (3, (1, 4, 1))], plan
        check_op(TRITON, OP, args)


# Planes of at most 64 pixels: 7 x 7 (stage 4 at 224^2) with kernels up to 7, one row or column, a single pixel,
# 8 x 8 (64 pixels exactly), taps reaching past both edges (K = 7 on 2 x 5), kernel 9 beside 1.
THREAD_PLANES = [
    ([2, 3, 1, 2], [1, 3, 5, 7], 2, 7, 7),
    ([3, 2], [7, 3], 3, 2, 5),
    ([1, 2], [9, 1], 1, 1, 9),
    ([2], [5], 2, 1, 1),
    ([1, 1], [3, 7], 2, 8, 8),
]


@requires_triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", THREAD_PLANES, ids=groups_id)
def test_triton_thread_planes(groups, layout, nan_poisoned_empty):
    """The forward and the backward on a thread per plane (_thread_plane_forward_kernel, _thread_plane_dx_kernel:
    dx and the weight gradient as two launches) against the fp64 reference, with 2 channels and one image per program
    (several channel blocks per group, the batch split). Fails if either plan does not take thread planes."""
    from transxnet_kernels.triton import ms_ffn

    args = msdw_args(*groups, dtype=torch.float64, layout=layout)
    with ms_ffn_small_tiles(index64=False, thread_planes=True):
        for wgrad_dx in (False, True):
            plan = ms_ffn._plan(args[0].detach(), groups[0], groups[1], wgrad_dx=wgrad_dx, thread_planes=True)
            H, W = groups[3:]
            assert plan.thread_plane == (H, W, 1 << (H * W - 1).bit_length()) and plan.block_c <= 2, plan
            assert len(plan.launches) == len(set(groups[1])) and plan.launches[0].grid[2] == groups[2], plan
        check_op(TRITON, OP, args)


@requires_triton
def test_triton_thread_planes_where_they_apply():
    """Forward plans on planes of at most thread_plane_pixels pixels with int32 offsets take thread planes:
    blocks of channels dividing every group's width, a launch per kernel size, programs of four warps per SM in
    all; larger planes, int64 offsets and plans for the backward (thread_planes=False) do not. Planned on meta
    tensors."""
    from transxnet_kernels.triton import common, ms_ffn

    def plan(x, widths, ksizes=(1, 3, 5, 7), **kwargs):
        return ms_ffn._plan(x, list(widths), list(ksizes), **kwargs)

    with common.launch_overrides(common.LaunchTarget(sm_count=132, interpreted=False)):
        for widths, block_c in (([448] * 4, 64), ([512] * 4, 128), ([672] * 4, 32), ([3, 5, 1, 2], 8)):
            x = torch.empty(128, sum(widths), 7, 7, device="meta")
            p = plan(x, widths, thread_planes=True)
            assert p.thread_plane == (7, 7, 64) and p.plane == (0, 0, 0) and not p.vec, p
            assert p.block_c == block_c and p.num_warps == max(1, block_c // 32), p
            assert [launch.kmax for launch in p.launches] == [7, 5, 3, 1], p
            blocks = -(-widths[0] // block_c)
            floor = 4 * 132 // p.num_warps  # four warps per SM in all
            splits, per_split = common.balanced_batch_groups(128, blocks, floor, 132, 1.0)
            assert p.launches[0].grid == (1, blocks, splits) and p.launches[0].b_per_prog == per_split, p
            assert per_split <= common.fewest_batch_groups(128, blocks, floor)[1], p  # no fewer programs
            assert plan(x, widths).thread_plane == (0, 0, 0) and plan(x, widths).plane == (7, 7, 8)
        x = torch.empty(2, 8, 8, 8, device="meta").to(memory_format=torch.channels_last)
        assert plan(x, [2] * 4, thread_planes=True).thread_plane == (8, 8, 64)
        assert plan(torch.empty(2, 8, 9, 8, device="meta"), [2] * 4, thread_planes=True).thread_plane == (0, 0, 0)
    with ms_ffn_small_tiles(index64=True, thread_planes=True):
        assert plan(torch.empty(2, 8, 7, 7, device="meta"), [2] * 4, thread_planes=True).thread_plane == (0, 0, 0)


# Row-contiguous maps with W a multiple of 4 take the strip kernels (_strip_*_kernel: _dwconv_strip_vec_k,
# _wgrad_strip_vec_k), or with strip_rows = 0 the chunked stencils (_dwconv_tile_vec_k, _wgrad_tile_vec_k): chunks
# at both row ends and in the middle, H smaller than the kernel and than a strip, kernels 1 to 9, one and several
# tiles, strips and column blocks.
CHUNKED = [
    ([2, 3, 1, 2], [1, 3, 5, 7], 2, 6, 8),
    ([1, 2], [9, 3], 1, 3, 12),
    ([3], [7], 3, 5, 4),
    ([2, 1], [5, 1], 2, 9, 16),
]
# launch_overrides of each row stencil, and the plan field that names it
ROW_STENCILS = {
    "chunks-one-tile": (lambda: ms_ffn_tiled_stencils(strips=False), "vec"),
    "chunks-tiled": (lambda: ms_ffn_small_tiles(index64=False), "vec"),
    "strips": (ms_ffn_tiled_stencils, "strip"),
    "strips-small": (lambda: ms_ffn_small_tiles(index64=False, strips=True), "strip"),
}


@requires_triton
@pytest.mark.parametrize("stencil", list(ROW_STENCILS))
@pytest.mark.parametrize("groups", CHUNKED, ids=groups_id)
def test_triton_row_stencils(groups, stencil, nan_poisoned_empty):
    """The chunked and strip stencils against the fp64 reference, output and every gradient; small tiles and
    strips add several tiles or strips and column blocks per plane and batch splits. Fails if the plan does not
    take that path, so the test cannot pass on the per-tap stencil alone."""
    from transxnet_kernels.triton import ms_ffn

    overrides, field = ROW_STENCILS[stencil]
    args = msdw_args(*groups, dtype=torch.float64)
    with overrides():
        assert getattr(ms_ffn._plan(args[0].detach(), groups[0], groups[1]), field)
        check_op(TRITON, OP, args)


@requires_triton
def test_triton_block_table_runs_the_largest_kernels_first():
    from transxnet_kernels.triton import ms_ffn

    ((kmax, table),) = ms_ffn._block_tables([3, 2, 4, 1], [1, 3, 7, 5], 2, False, torch.device("cpu"))
    assert kmax == 7 and table.tolist() == [[5, 7, 7], [7, 9, 7], [9, 10, 5], [3, 5, 3], [0, 2, 1], [2, 3, 1]]
    tables = ms_ffn._block_tables([3, 2, 4, 1], [1, 3, 7, 5], 2, True, torch.device("cpu"))
    assert [(k, t.tolist()) for k, t in tables] == [
        (7, [[5, 7, 7], [7, 9, 7]]),
        (5, [[9, 10, 5]]),
        (3, [[3, 5, 3]]),
        (1, [[0, 2, 1], [2, 3, 1]]),
    ]


@requires_triton
@pytest.mark.parametrize("strips", [False, True], ids=["chunks", "strips"])
def test_triton_row_stencils_only_where_they_apply(strips):
    """W not a multiple of 4, channels_last, a column stride, a channel stride off by one element, a kernel
    of 11, int64 in-image offsets: the per-tap stencil (the plan says so; the reference sweeps above cover
    these results), never the chunked or strip ones."""
    from transxnet_kernels.triton import ms_ffn

    def row_stencil(x, ksizes=(3, 5)):
        p = ms_ffn._plan(x, [1, 1], list(ksizes))
        assert not (p.vec and p.strip), p
        return p.strip if strips else p.vec

    x = torch.empty(2, 2, 6, 8, device="meta")
    with ms_ffn_tiled_stencils(strips=strips):
        assert row_stencil(x)
        assert not row_stencil(x, (3, 11))
        assert not row_stencil(torch.empty(2, 2, 6, 6, device="meta"))
        assert not row_stencil(x.to(memory_format=torch.channels_last))
        assert not row_stencil(torch.empty(2, 2, 6, 16, device="meta")[..., ::2])
        strided = torch.empty(2, 3, 6, 8, device="meta")[:, :2].as_strided((2, 2, 6, 8), (97, 49, 8, 1))
        assert not row_stencil(strided)
    assert not row_stencil(x)  # the whole-plane stencil
    with ms_ffn_small_tiles(index64=True, strips=strips):
        assert not row_stencil(x)


@requires_triton
def test_triton_strip_plans_at_the_model_stages():
    """On a GPU, NCHW stages 1-2 (T: 192 x 56 x 56, 384 x 28 x 28; detection's 200 x 304) run strips of 4 rows x
    8 chunks (one compiled kernel for both widths), 8 channels of one kernel size per program (2 warps), one
    launch per kernel size, heaviest first; the statistics-only passes plan without strips. The dx pass with the
    weight gradient takes the same strips, and with longer strips (strip_rows 8) at most 6 rows on fp32 maps.
    Planned on meta tensors."""
    import dataclasses

    from transxnet_kernels.triton import common, ms_ffn

    gpu = common.LaunchTarget(sm_count=132, interpreted=False)
    settings = ms_ffn.Settings.for_target(gpu)
    with common.launch_overrides(gpu, settings):
        for C, H, W, column_blocks in ((192, 56, 56, 2), (384, 28, 28, 1), (192, 200, 304, 10)):
            tiles = math.ceil(H / 4) * column_blocks
            x = torch.empty(128, C, H, W, device="meta")
            widths = [C // 4] * 4
            p = ms_ffn._plan(x, widths, [1, 3, 5, 7])
            assert (p.strip, p.block_c, p.block_hw, p.num_warps, p.vec) == (4, 8, 32, 2, False), p
            assert [launch.kmax for launch in p.launches] == [7, 5, 3, 1]
            assert [launch.grid[:2] for launch in p.launches] == [(tiles, C // 4 // 8)] * 4
            constexprs = p.strip_constexprs(p.launches[0])
            assert (constexprs["K"], constexprs["CHUNKS"], constexprs["STRIP"]) == (7, 8, 4)
            unstripped = ms_ffn._plan(x, widths, [1, 3, 5, 7], strips=False)
            assert unstripped.vec and not unstripped.strip and len(unstripped.launches) == 1
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                wgrad_dx = ms_ffn._plan(x.to(dtype), widths, [1, 3, 5, 7], wgrad_dx=True)
                assert wgrad_dx.strip == 4 and wgrad_dx.strip_constexprs(wgrad_dx.launches[0])["STRIP"] == 4
                assert [launch.grid[0] for launch in wgrad_dx.launches] == [tiles] * 4
            with common.launch_overrides(dataclasses.replace(settings, strip_rows=8)):
                for dtype, rows in ((torch.float32, 6), (torch.bfloat16, 8), (torch.float16, 8)):
                    wgrad_dx = ms_ffn._plan(x.to(dtype), widths, [1, 3, 5, 7], wgrad_dx=True)
                    assert wgrad_dx.strip == rows and wgrad_dx.strip_constexprs(wgrad_dx.launches[0])["STRIP"] == rows
                    assert [launch.grid[0] for launch in wgrad_dx.launches] == [math.ceil(H / rows) * column_blocks] * 4


@requires_triton
@pytest.mark.parametrize("target", ["interpreter", "gpu"])
def test_triton_grid_puts_spatial_tiles_on_axis_0(target):
    """CUDA grids allow 65535 programs on axes 1 and 2: the spatial tiles, which can be many more (a
    channels_last map of 8192x8192), must be on axis 0. Planned on a meta tensor, nothing runs."""
    from transxnet_kernels.triton import common, ms_ffn

    side = 8192
    x = torch.empty(1, 32, side, side, device="meta").to(memory_format=torch.channels_last)
    launch = (
        common.LaunchTarget(sm_count=1, interpreted=True)
        if target == "interpreter"
        else common.LaunchTarget(sm_count=132, interpreted=False)
    )
    for widths, ksizes in (([32], [3]), ([8, 8, 8, 8], [1, 3, 5, 7])):
        with common.launch_overrides(launch):
            plan = ms_ffn._plan(x, widths, ksizes)
        ((_, grid, _, _),) = plan.launches
        assert grid[0] * plan.block_hw >= side * side and grid[0] > 65535, grid
        assert grid[1] <= 65535 and grid[2] <= 65535, grid


@requires_triton
def test_triton_nchw_tiles_are_one_channel_on_gpus_and_share_small_planes_in_the_interpreter():
    """On GPUs an NCHW tile is one channel's long run of pixels (coalesced). The interpreter's cost is per
    tile operation, so there small planes share a tile (the whole-model training test took 20 minutes with
    one channel per program) while large planes keep one channel per tile (the tiled stencils: by default small
    planes take the whole-plane one, NCHW rows of a multiple of 4 pixels the strips). Planned on meta tensors."""
    import dataclasses

    from transxnet_kernels.triton import common, ms_ffn

    widths, ksizes = [16, 16, 16, 16], [1, 3, 5, 7]
    small, large = (torch.empty(2, 64, side, side, device="meta") for side in (8, 64))
    no_plane = dataclasses.replace(ms_ffn.Settings.for_target(common.LaunchTarget(1, False)), plane_max=0, strip_rows=0)
    with common.launch_overrides(common.LaunchTarget(sm_count=132, interpreted=False), no_plane):
        assert ms_ffn._plan(small, widths, ksizes).block_c == 1
        assert ms_ffn._plan(large, widths, ksizes).block_c == 1
    no_plane = dataclasses.replace(ms_ffn.Settings.for_target(common.LaunchTarget(1, True)), plane_max=0, strip_rows=0)
    with common.launch_overrides(common.LaunchTarget(sm_count=1, interpreted=True), no_plane):
        plan = ms_ffn._plan(small, widths, ksizes)
        assert plan.block_c == 16 and plan.block_hw == 64 and plan.launches[0].grid[:2] == (1, 4), plan
        plan = ms_ffn._plan(large, widths, ksizes)
        assert plan.block_c == 1 and plan.block_hw == 4096, plan


@requires_triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_gradcheck(layout):
    args = msdw_args([1, 2, 1], [1, 3, 5], 2, 3, 4, dtype=torch.float64, layout=layout)
    x, weights, biases = args

    def fn(x, *params):
        with TRITON.active():
            return tk.multiscale_dwconv(x, params[:3], params[3:])

    assert torch.autograd.gradcheck(fn, (x, *weights, *biases), fast_mode=True)


@requires_triton
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "nograd"])
def test_triton_eager_path_matches_the_dispatcher(grad):
    """Plain eager calls skip torch.library's dispatcher (one autograd node of our own, the group lists spliced
    into its inputs): bit-identical results."""
    check_dispatcher_paths_agree(TRITON, OP, msdw_args([2, 1, 3], [1, 3, 5], 2, 5, 6, seed=3, grad=grad))


@requires_triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_opcheck(layout):
    x, weights, biases = msdw_args([2, 1], [3, 1], 2, 3, 4, layout=layout)
    torch.library.opcheck(torch.ops.transxnet_triton.multiscale_dwconv.default, (x, weights, biases))
    detached = [[t.detach() for t in group] for group in (weights, biases)]
    torch.library.opcheck(
        torch.ops.transxnet_triton.multiscale_dwconv_backward.default, (torch.randn_like(x), x.detach(), *detached)
    )


@requires_triton
@pytest.mark.parametrize(
    "widths, ksizes", [([2, 1], [3, 1]), ([3, 1, 2, 70, 1], [1, 3, 5, 7, 9])], ids=["2_groups", "5_groups"]
)
def test_triton_weight_packing_and_group_gradients(widths, ksizes, nan_poisoned_empty):
    """The one-launch packing (four groups per launch) equals the torch form: each group's taps padded to kmax^2,
    then concatenated, and the biases concatenated, strided weights included. The group gradients are the sums of
    the per-program partials over the programs, each group's taps (the padding dropped) and bias slice, in the
    group's dtype."""
    from transxnet_kernels.triton import ms_ffn

    gen = torch.Generator().manual_seed(9)
    weights = [torch.randn(c, 1, k, k, generator=gen, dtype=torch.float64).to(DEVICE) for c, k in zip(widths, ksizes)]
    weights[0] = weights[0].transpose(2, 3)  # a strided weight: packed from its values, not its storage
    biases = [torch.randn(c, generator=gen, dtype=torch.float64).to(DEVICE) for c in widths]
    kk = max(ksizes) ** 2
    pads = [torch.nn.functional.pad(w.reshape(w.shape[0], -1), (0, kk - w[0].numel())) for w in weights]
    table, bias, got_widths, got_ksizes = ms_ffn._pack(weights, biases, torch.float64)
    assert (got_widths, got_ksizes) == (widths, ksizes)
    assert torch.equal(table, torch.cat(pads)) and torch.equal(bias, torch.cat(biases))

    # rounded as it packs, as a cast would round (under autocast the groups come uncast)
    def to_bf16(t):  # a compiled kernel rounds to nearest even as torch does; Triton's interpreter truncates
        if not ms_ffn._INTERPRETED:
            return t.bfloat16()
        return (t.view(torch.int32) & -65536).view(torch.float32).bfloat16()

    singles = [w.float() for w in weights], [b.float() for b in biases]
    table, bias, *_ = ms_ffn._pack(*singles, torch.bfloat16)
    assert table.dtype == bias.dtype == torch.bfloat16
    assert torch.equal(table, to_bf16(torch.cat(pads).float()))
    assert torch.equal(bias, to_bf16(torch.cat(singles[1])))

    pdw = torch.randn(3, sum(widths), kk, generator=gen, dtype=torch.float64).to(DEVICE)
    pdb = torch.randn(3, sum(widths), generator=gen, dtype=torch.float64).to(DEVICE)
    dws, dbs = ms_ffn._group_gradients(pdw, pdb, *singles)
    first = 0
    for c, k, dw, db in zip(widths, ksizes, dws, dbs):
        assert dw.dtype == db.dtype == torch.float32 and dw.is_contiguous()
        assert torch.equal(dw, pdw.sum(0)[first : first + c, : k * k].reshape(c, 1, k, k).float())
        assert torch.equal(db, pdb.sum(0)[first : first + c].float())
        first += c


@requires_triton
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU with > 20 GB of memory (tensors over 2^31 elements)")
def test_triton_more_than_2_31_elements():
    torch.manual_seed(0)
    weights = [torch.randn(1, 1, k, k, device=DEVICE, dtype=torch.float16) for k in (3, 5)]
    biases = [torch.randn(1, device=DEVICE, dtype=torch.float16) for _ in range(2)]
    # Many images (batch offsets past 2^31), then one image spanning past 2^31 (int64 in-image offsets).
    for shape in ((1025, 2, 1024, 1024), (1, 2, 32768, 32769)):
        x = torch.randn(shape, device=DEVICE, dtype=torch.float16)
        assert x.numel() > 2**31
        with TRITON.active():
            out = tk.multiscale_dwconv(x, weights, biases)
        for sl in (slice(0, 1), slice(-1, None)):
            xs = x[sl, :, -600:, -600:].float()
            ref = reference.multiscale_dwconv(xs, [w.float() for w in weights], [b.float() for b in biases])
            # compare away from the slice's cut edges, where the reference lacks neighbours
            assert_rel_close(out[sl, :, -597:-3, -597:-3], ref[..., 3:-3, 3:-3], TOLERANCE[torch.float16], f"{shape}")
        del x, out
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- cpp


@requires_cpp
@pytest.mark.parametrize("backend", backend_params(OP, only=cpp_only))
def test_cpp_kernel_past_the_nhwc_limit(backend):
    """Kernels wider than the NHWC kernels take (63) run the NCHW kernels, still returning channels_last."""
    args = msdw_args([2, 2], [3, 65], 1, 4, 5, dtype=torch.float64, layout="channels_last", device="cpu", grad=False)
    out, _, _ = check_op(backend, OP, args)
    assert_output_layout(out, args[0])


@requires_cpp
def test_cpp_refuses_half_precision():
    args = msdw_args([2], [3], 1, 4, 4, dtype=torch.float16, device="cpu", grad=False)
    with tk.use_backend("cpp"), pytest.raises(tk.BackendUnavailableError, match="dtype"):
        tk.multiscale_dwconv(*args)


@requires_cpp
def test_cpp_opcheck():
    for layout in ("contiguous", "channels_last", "channel_slice"):
        args = msdw_args([3, 2, 2], [1, 3, 5], 2, 7, 9, layout=layout, device="cpu", grad=False)
        torch.library.opcheck(torch.ops.transxnet_cpp.multiscale_dwconv.default, args)
