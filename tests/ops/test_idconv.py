"""idconv on every fused backend against the fp64 reference: output and every gradient, awkward shapes, layouts,
dtypes, NaN-poisoned allocations; then each backend's own paths (Triton: chunking, int64 offsets, gradcheck,
opcheck, torch.compile, determinism; cpp: kernel ISAs, the NHWC kernel limit, forward-only refusals)."""

import dataclasses
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
    not_interpreted,
    randn,
    requires_cpp,
    requires_triton,
    requiring_grad,
    to_layout,
    triton_only,
)
from transxnet_kernels import reference

OP = "idconv"


def idconv_args(B, C, H, W, G, K, bias=True, dtype=torch.float32, layout="contiguous", device=None, seed=0, grad=True):
    """(x, kernel_logits, weight, bias_logits, bias), every tensor requiring grad when `grad`."""
    gen = torch.Generator().manual_seed(seed)
    device = DEVICE if device is None else device

    def rand(*shape, scale=1.0):
        return randn(*shape, dtype=dtype, gen=gen, scale=scale, device=device)

    args = [to_layout(rand(B, C, H, W), layout), rand(B, G, C, K, K, scale=2.0), rand(G, C, K, K)]
    args += [rand(B, G, C, scale=2.0), rand(G, C)] if bias else [None, None]
    return requiring_grad(args, [0, 1, 2, 3, 4] if bias else [0, 1, 2]) if grad else tuple(args)


# (B, C, H, W, G, K, bias): odd channels, every G and K, H or W below K, batch 1, non-power-of-two planes,
# planes over several position tiles, wide rows (several register blocks), a kernel size without a
# specialised cpp instantiation.
SHAPES = [
    (2, 3, 9, 7, 2, 7, True),
    (1, 5, 4, 6, 3, 7, True),
    (2, 7, 3, 11, 4, 5, True),
    (3, 1, 1, 1, 1, 3, True),
    (1, 6, 12, 13, 2, 7, True),
    (2, 9, 5, 2, 4, 3, True),
    (1, 12, 7, 7, 1, 5, True),
    (2, 5, 8, 3, 1, 7, True),
    (1, 4, 2, 2, 3, 3, True),
    (2, 3, 6, 6, 4, 7, True),
    (1, 2, 3, 9, 2, 9, True),
    (2, 5, 9, 13, 2, 7, True),  # odd C, W not a multiple of the vector width
    (1, 3, 4, 3, 2, 7, True),  # H, W smaller than the kernel
    (3, 7, 17, 33, 4, 3, False),  # no bias, four kernel groups
    (2, 4, 6, 5, 1, 5, True),  # a single group (softmax of one logit)
    (1, 2, 5, 40, 3, 1, True),  # 1x1 kernel, wide rows
    (2, 3, 8, 8, 2, 11, False),  # kernel size without a specialised instantiation
]


def shape_id(s):
    return "B{}C{}H{}W{}G{}K{}".format(*s[:6]) + ("" if s[6] else "-nobias")


# cpp: the shapes that differ for its register blocking and vector remainders, in each kernel ISA.
CPP_SHAPES = SHAPES[11:] + [SHAPES[i] for i in (3, 4, 10)]
# The interpreter: all but the two largest planes (tens of seconds each there).
INTERPRETED_SHAPES = [s for i, s in enumerate(SHAPES) if i not in (11, 13)]


def _sweep():
    """Every shape in fp32 and fp64; cpp in each of its layouts, the interpreter in the contiguous one (its
    layouts are swept below on fewer shapes)."""
    params = []
    for backend in fused_backends(OP):
        layouts = ["contiguous"] if backend.interpreted else CPP_LAYOUTS if backend.name == "cpp" else LAYOUTS
        for dtype in (torch.float32, torch.float64):
            for shape in CPP_SHAPES if backend.name == "cpp" else INTERPRETED_SHAPES if backend.interpreted else SHAPES:
                for layout in layouts:
                    params.append(
                        backend_param(
                            backend, dtype, shape, layout, extra_id=f"-{dtype_id(dtype)}-{shape_id(shape)}-{layout}"
                        )
                    )
    return params


@pytest.mark.parametrize("backend,dtype,shape,layout", _sweep())
def test_matches_reference(backend, dtype, shape, layout, nan_poisoned_empty):
    args = idconv_args(*shape, dtype=dtype, layout=layout, device=backend.device)
    out, _, _ = check_op(backend, OP, args)
    assert_output_layout(out, args[0])


@pytest.mark.parametrize(
    "layout,bias",
    [pytest.param(layout, True, id=layout) for layout in LAYOUTS] + [pytest.param("channel_slice", False, id="nobias")],
)
@pytest.mark.parametrize("backend", backend_params(OP, only=triton_only))
def test_layouts_with_grad_out_in_another_layout(backend, layout, bias, nan_poisoned_empty):
    args = idconv_args(2, 5, 6, 9, 3, 5, bias=bias, layout=layout, seed=1)
    fmt = torch.contiguous_format if layout == "channels_last" else torch.channels_last
    grad_out = torch.randn(2, 5, 6, 9, dtype=torch.float64, device=DEVICE).to(torch.float32, memory_format=fmt)
    with backend.active():
        out, grads = evaluate(tk.idconv, args, grad_out)
    ref_args = [None if t is None else t.detach().double().requires_grad_() for t in args]
    ref_out, ref_grads = evaluate(reference.idconv, ref_args, grad_out.double())
    assert_output_layout(out, args[0])
    assert_rel_close(out, ref_out, TOLERANCE[torch.float32], "output")
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(g, rg, TOLERANCE[torch.float32], f"grad {i}")


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(OP, dtypes=[torch.float16, torch.bfloat16]))
def test_half_precision(backend, dtype, nan_poisoned_empty):
    """The dtypes beyond the sweep's (Triton: fp16 everywhere, bf16 on GPUs that have it)."""
    check_op(
        backend, OP, idconv_args(2, 6, 10, 9, 2, 7, dtype=dtype, layout="channels_last", seed=2, device=backend.device)
    )


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(OP, only=not_interpreted))
def test_model_shape(backend, dtype):
    """One TransXNet-T stage-1 sample: c = 24, 56x56, K = 7 (too slow for the interpreter)."""
    check_op(
        backend,
        OP,
        idconv_args(1, 24, 56, 56, 2, 7, dtype=dtype, device=backend.device, seed=3, grad=backend.has_backward),
    )


@pytest.mark.parametrize("choice", ALL_CHOICES)
def test_mixed_dtypes_and_devices_raise_value_error_naming_the_argument(choice):
    x, kernel_logits, weight, bias_logits, bias = idconv_args(1, 3, 4, 4, 2, 3, device=torch.device("cpu"), grad=False)
    with tk.use_backend(choice):
        with pytest.raises(ValueError, match=r"idconv: weight has dtype torch\.float64 but x has torch\.float32"):
            tk.idconv(x, kernel_logits, weight.double(), bias_logits, bias)
        with pytest.raises(ValueError, match="idconv: bias has dtype"):
            tk.idconv(x, kernel_logits, weight, bias_logits, bias.double())
        with pytest.raises(ValueError, match="idconv: kernel_logits is on meta but x is on cpu"):
            tk.idconv(x, kernel_logits.to("meta"), weight, bias_logits, bias)
        with pytest.raises(ValueError, match="idconv: x must be floating point"):
            tk.idconv(x.to(torch.int32), kernel_logits, weight, bias_logits, bias)


# ------------------------------------------------------------------------------------- triton


@requires_triton
@pytest.mark.parametrize("target_programs", [1, 4])
def test_triton_position_chunking(target_programs, nan_poisoned_empty):
    """Several tiles per program (target 1) and several chunks with a ragged last one (target 4): 20x21 = 420
    positions in 128-position tiles are 4 tiles; target 4 with B * channel blocks = 2 gives 2 chunks of 2."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import idconv as triton_idconv

    with common.launch_overrides(triton_idconv.Settings(target_programs=target_programs)):
        check_op(TRITON, OP, idconv_args(2, 1, 20, 21, 2, 7, seed=3))


# (H, most rows per strip) -> rows per strip: as few strips as the most rows allow, evenly filled.
_STRIP_ROWS = {(8, 8): 8, (5, 8): 5, (4, 8): 4, (9, 8): 5, (8, 2): 2, (5, 2): 2, (4, 2): 2, (9, 2): 2}
_STRIP_ROWS.update({(h, 0): 0 for h in (4, 5, 8, 9)})


@requires_triton
@pytest.mark.parametrize(
    ("H", "most", "rows"), [(28, 8, 7), (56, 8, 8), (100, 8, 8), (50, 4, 4), (25, 8, 7), (3, 8, 3)]
)
def test_triton_strip_rows_are_balanced(H, most, rows):
    """T/S/B at 224^2: stage 1 (H = 56) keeps 8-row strips, stage 2 (H = 28) takes 7, not 8 (32 rows computed)."""
    from transxnet_kernels.triton import idconv as triton_idconv

    assert triton_idconv._balanced_strip_rows(H, most) == rows
    assert triton_idconv._balanced_strip_rows(H, 0) == 0


# Launch settings of the stencils of NCHW rows of a multiple of 4 pixels (the whole-plane stencil off: these planes
# would take it): the chunked conv stencil in one tile or in 16-position tiles (several tiles and position chunks),
# or strips of 8 rows, or of 2 rows with 2 chunks of a row per program (several strips and column blocks).
ROW_STENCILS = {
    "chunks-one-tile": dict(conv_tile_elements=512, target_programs=8, strip_rows=0),
    "chunks-tiled": dict(conv_tile_elements=16, target_programs=8, strip_rows=0),
    "strips": dict(),
    "strips-small": dict(strip_rows=2, strip_row_chunks=2, strip_chunks=4),
}


@requires_triton
@pytest.mark.parametrize("stencil", list(ROW_STENCILS))
@pytest.mark.parametrize(
    "shape", [(2, 3, 8, 8, 2, 3), (1, 2, 5, 12, 3, 7), (2, 2, 4, 16, 2, 9), (1, 2, 9, 8, 2, 5)], ids=str
)
def test_triton_chunked_stencils(shape, stencil, nan_poisoned_empty):
    """NCHW rows of a multiple of 4 pixels: the forward, gx and dk passes on the chunked or the strip stencils (the
    plans must say so; H = 9 in strips of at most 8 rows: two of 5, the second with a row past the map), against the
    fp64 reference."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import idconv as triton_idconv

    args = idconv_args(*shape, dtype=torch.float64, seed=5)
    settings = triton_idconv.Settings(plane_max=0, **ROW_STENCILS[stencil])
    with common.launch_overrides(settings):
        x, K = args[0].detach(), shape[-1]
        conv = triton_idconv._Plan(x, K, conv=True, others=(x,))
        dk = triton_idconv._Plan(x, K, conv=False, others=(x,))
        assert conv.chunked and dk.chunked
        assert conv.strip == dk.strip == _STRIP_ROWS[shape[2], settings.strip_rows]
        if stencil == "strips-small":
            strips = triton_idconv.triton.cdiv(shape[2], 2) * triton_idconv.triton.cdiv(shape[3], 8)
            assert conv.n_chunks == dk.n_chunks == strips
        check_op(TRITON, OP, args)


# Forced on a wide dtype, every window, tap and mask is checked to its precision: fp64 in the interpreter, fp32 (IEEE
# dots) on GPUs, where Triton's tl.dot may not compile fp64.
_EXACT_DTYPE = torch.float64 if DEVICE.type == "cpu" else torch.float32


@requires_triton
@pytest.mark.parametrize(
    "shape,vector",
    [
        ((2, 3, 9, 16, 2, 7), 8),  # H odd, two column tiles
        ((1, 2, 18, 12, 3, 7), 4),  # W a multiple of 4 only: 4-element loads; two row tiles of 16
        ((2, 2, 5, 24, 2, 5), 8),  # K = 5, a column tile half past W
        ((1, 3, 6, 8, 2, 9), 8),  # K = 9: 16 kernel rows padded, a 32-column window
        ((2, 2, 7, 4, 1, 3), 4),  # W below a column tile
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [_EXACT_DTYPE, torch.float16], ids=dtype_id)
def test_triton_tensor_core_conv_passes(shape, vector, dtype, nan_poisoned_empty):
    """16-bit maps on the strips' planes run the forward and gx passes as matmuls with the kernel as a banded matrix
    (`_toeplitz_conv_kernel`) and the dk pass as the transposed product, whose diagonals are the taps' gradients
    (`_toeplitz_kernel_grad_kernel`). In fp16 as on GPUs, and in a wide dtype (forced); every gradient goes through
    dk and dβ."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import idconv as triton_idconv

    args = idconv_args(*shape, dtype=dtype, seed=7)
    settings = triton_idconv.Settings(plane_max=0, toeplitz_dtypes=(dtype,), toeplitz_rows=16, toeplitz_min_pixels=0)
    with common.launch_overrides(settings):
        x, K = args[0].detach(), shape[-1]
        conv = triton_idconv._Plan(x, K, conv=True, others=(x,))
        dk = triton_idconv._Plan(x, K, conv=False, others=(x,))
        assert conv.toeplitz and dk.toeplitz and conv.toeplitz_vector == dk.toeplitz_vector == vector
        assert dk.n_chunks == 1  # a program per plane: dk and dβ need no chunk sums
        check_op(TRITON, OP, args)


@requires_triton
@pytest.mark.parametrize("dtype", [_EXACT_DTYPE, torch.float16], ids=dtype_id)
def test_triton_tensor_core_conv_keeps_non_finite_values_local(dtype):
    """The banded matrix's zeros multiply a whole window, so an inf there would make every output of the tile NaN: a
    plane with a non-finite output is convolved again tap by tap (`_toeplitz_redo_kernel`), and infinities and NaNs
    (at the borders and inside) give the reference's non-finite outputs, position for position, forward and gx."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import idconv as triton_idconv

    args = idconv_args(2, 3, 9, 16, 2, 7, dtype=dtype, seed=4)
    x = args[0].detach().clone()
    x[0, 0, 3, 0] = math.inf
    x[0, 1, 4, 9] = -math.inf
    x[1, 2, 8, 15] = math.nan
    x.requires_grad_()
    grad_out = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(x.device)
    grad_out[1, 0, 5, 7] = math.inf
    settings = triton_idconv.Settings(plane_max=0, toeplitz_dtypes=(dtype,), toeplitz_rows=16, toeplitz_min_pixels=0)
    with common.launch_overrides(settings), TRITON.active():
        assert triton_idconv._Plan(x.detach(), 7, conv=True, others=(x.detach(),)).toeplitz
        out = tk.idconv(x, *args[1:])
        (grad_x,) = torch.autograd.grad(out, x, grad_out, retain_graph=True)
    ref_args = [a.detach().double().requires_grad_() for a in (x, *args[1:])]
    ref = reference.idconv(*ref_args)
    (ref_grad_x,) = torch.autograd.grad(ref, ref_args[0], grad_out.double())
    for actual, expected in ((out, ref), (grad_x, ref_grad_x)):
        assert torch.equal(torch.isnan(actual), torch.isnan(expected))
        assert torch.equal(torch.isinf(actual), torch.isinf(expected)) and torch.isinf(expected).any()
        finite = torch.isfinite(expected)
        assert_rel_close(actual[finite], expected[finite], TOLERANCE[dtype], "finite values")


@requires_triton
def test_triton_tensor_core_conv_passes_only_for_their_dtypes():
    """By default fp16 and bf16 planes of at least 2048 pixels (stage 1 at 224², the detection sizes' larger ones)
    only: fp32 keeps its exact FFMA stencil (the tensor cores' fp32 is TF32 or three passes of it), as do the
    channels_last maps, the whole planes and the planes too small to repay building the banded kernel (28², stage 2)."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import idconv as triton_idconv

    def toeplitz(x):
        return triton_idconv._Plan(x, 7, conv=True, others=(x,)).toeplitz

    for dtype in (torch.float16, torch.bfloat16):
        x = torch.empty(2, 3, 56, 56, device="meta", dtype=dtype)
        assert toeplitz(x)
        assert not toeplitz(x.to(memory_format=torch.channels_last))
        assert not toeplitz(torch.empty(2, 3, 14, 14, device="meta", dtype=dtype))
        assert not toeplitz(torch.empty(2, 3, 28, 28, device="meta", dtype=dtype))
        assert toeplitz(torch.empty(1, 2, 200, 304, device="meta", dtype=dtype))
    assert not toeplitz(torch.empty(2, 3, 56, 56, device="meta"))
    # GPUs whose tensor cores are not much faster than their FP32 pipes keep the strips (RTX 30 series: 8.6).
    x = torch.empty(2, 3, 56, 56, device="meta", dtype=torch.bfloat16)
    for capability, runs in ((80, True), (86, False), (90, True)):
        with common.launch_overrides(common.LaunchTarget(sm_count=100, interpreted=False, capability=capability)):
            assert toeplitz(x) == runs


@requires_triton
def test_triton_chunked_stencils_only_where_they_apply():
    """Planned on meta tensors, with the whole-plane stencil off (it takes every plane of these sizes)."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import idconv as triton_idconv

    def chunked(x, K=7):
        return triton_idconv._Plan(x, K, conv=True, others=(x,)).chunked

    x = torch.empty(2, 3, 8, 8, device="meta")
    with common.launch_overrides(triton_idconv.Settings(plane_max=0)):
        assert chunked(x)
        assert not chunked(x, K=11)
        assert not chunked(torch.empty(2, 3, 8, 6, device="meta"))
        assert not chunked(x.to(memory_format=torch.channels_last))
        with common.launch_overrides(dataclasses.replace(common.launch_target(DEVICE), int32_span_limit=0)):
            assert not chunked(x)
    assert not chunked(x)  # the whole-plane stencil


@requires_triton
def test_triton_whole_plane_stencils_where_they_apply():
    """Planes of at most plane_max rows and columns with int32 offsets, in either layout, run the whole-plane
    stencils in both the conv and the dk pass: a program per (sample, channel block), one chunk, the plane padded
    to powers of 2, plane_columns (channel, column) pairs per program. Planned on meta tensors."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import idconv as triton_idconv

    gpu = common.LaunchTarget(sm_count=132, interpreted=False, capability=90)
    with common.launch_overrides(gpu, triton_idconv.Settings.for_target(gpu)):
        for conv in (True, False):
            x = torch.empty(128, 112, 14, 14, device="meta")
            for layout in (x, x.to(memory_format=torch.channels_last)):
                p = triton_idconv._Plan(layout, 7, conv=conv, others=(layout,))
                assert p.plane == (14, 14, 16) and not p.chunked, p.plane
                assert (p.block_c, p.block_p, p.num_warps, p.n_chunks) == (4, 256, 2, 1)
                assert p.grid == (128 * 28,)
            p = triton_idconv._Plan(torch.empty(128, 224, 7, 7, device="meta"), 7, conv=conv)
            assert p.plane == (7, 7, 8) and (p.block_c, p.block_p, p.grid) == (8, 64, (128 * 28,))
            for H, W in ((17, 4), (4, 17), (28, 28)):
                assert triton_idconv._Plan(torch.empty(2, 3, H, W, device="meta"), 7, conv=conv).plane == (0, 0, 0)
        with common.launch_overrides(dataclasses.replace(gpu, int32_span_limit=0)):
            assert triton_idconv._Plan(torch.empty(2, 3, 14, 14, device="meta"), 7, conv=True).plane == (0, 0, 0)
        # Unmasked loads at compile-time strides (ms_ffn._dwconv_plane_k's DENSE) where every map's rows are contiguous.
        x = torch.empty(128, 112, 14, 14, device="meta")
        assert triton_idconv._Plan(x, 7, conv=True, others=(torch.empty_like(x),)).plane_dense
        assert not triton_idconv._Plan(x.to(memory_format=torch.channels_last), 7, conv=True).plane_dense
        assert not triton_idconv._Plan(x, 7, conv=True, others=(x.to(memory_format=torch.channels_last),)).plane_dense
        assert not triton_idconv._Plan(torch.empty(2, 3, 28, 28, device="meta"), 7, conv=True).plane_dense


@requires_triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_non_finite_values_at_the_borders(layout):
    """Zero padding is exact whatever the map holds: infinities and NaNs at the image borders give the
    reference's non-finite outputs, position for position (the dense whole-plane stencil reads zeros outside the
    image, never a neighbouring row times a zero tap)."""
    args = idconv_args(2, 5, 7, 7, 2, 7, dtype=torch.float64, layout=layout, seed=4, grad=False)
    x = args[0].clone()
    x[0, 0, 3, 0] = math.inf
    x[0, 2, 0, 6] = -math.inf
    x[1, 4, 6, 6] = math.nan
    with TRITON.active():
        out = tk.idconv(x, *args[1:])
    ref = reference.idconv(x, *args[1:])
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and torch.isinf(ref).any()
    assert torch.equal(out[torch.isinf(ref)], ref[torch.isinf(ref)])
    finite = torch.isfinite(ref)
    assert_rel_close(out[finite], ref[finite], 1e-10, "finite outputs")


# Small planes on both stencil families: the whole-plane one with several channel blocks (2 columns of 8 per
# program) and odd channel counts, and the tiled ones (per tap, chunks of 4) that larger planes take.
STENCIL_SHAPES = [(2, 5, 14, 14, 2, 7), (1, 3, 7, 7, 3, 7), (2, 3, 6, 8, 2, 5), (3, 2, 16, 3, 1, 9), (1, 4, 1, 5, 2, 3)]


@requires_triton
@pytest.mark.parametrize("stencil", ["plane", "tiled"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", STENCIL_SHAPES, ids=str)
def test_triton_plane_and_tiled_stencils_on_small_planes(shape, layout, stencil, nan_poisoned_empty):
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import idconv as triton_idconv

    args = idconv_args(*shape, dtype=torch.float64, layout=layout, seed=11)
    plane_max = 16 if stencil == "plane" else 0
    with common.launch_overrides(triton_idconv.Settings(plane_max=plane_max, plane_columns=16)):
        x = args[0].detach()
        assert bool(triton_idconv._Plan(x, shape[-1], conv=False, others=(x,)).plane[1]) == (stencil == "plane")
        check_op(TRITON, OP, args)


@requires_triton
def test_triton_int64_offsets_path(nan_poisoned_empty):
    """The int64 in-sample offsets used when a sample spans 2^31 elements, forced on a small input."""
    from transxnet_kernels.triton import common

    target = dataclasses.replace(common.launch_target(DEVICE), int32_span_limit=0)
    with common.launch_overrides(target):
        check_op(TRITON, OP, idconv_args(2, 3, 7, 8, 2, 5, layout="channels_last", seed=4))


@requires_triton
def test_triton_int64_decision():
    from transxnet_kernels.triton import common

    big = torch.empty_strided((2, 3, 4, 5), (2**33, 2**31, 5, 1), device="meta")
    small = torch.empty_strided((2**16, 3, 4, 5), (60, 20, 5, 1), device="meta")
    assert common.needs_int64(big)
    assert not common.needs_int64(small)  # the batch stride is always applied in int64


@requires_triton
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU with ~20 GB free (B*C*H*W > 2^31 elements)")
def test_triton_beyond_int32_elements():
    """B*C*H*W > 2^31 with small samples: the last sample is checked against the reference."""
    B, C, H, W, G, K = 1370, 24, 256, 256, 2, 7
    assert B * C * H * W > 2**31
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    x = torch.randn(B, C, H, W, device=DEVICE, dtype=torch.float16, generator=gen)
    small = [
        torch.randn(shape, device=DEVICE, dtype=torch.float16, generator=gen)
        for shape in ((B, G, C, K, K), (G, C, K, K), (B, G, C), (G, C))
    ]
    leaves = [t.requires_grad_() for t in [x] + small]
    with TRITON.active():
        out = tk.idconv(*leaves)
    grad_out = torch.randn_like(out)
    grad_x, grad_logits = torch.autograd.grad(out, leaves[:2], grad_out)
    last = [t[-1:].double() if t.shape[0] == B else t.double() for t in leaves]
    last = [t.detach().requires_grad_() for t in last]
    ref_out, ref_grads = evaluate(reference.idconv, last, grad_out[-1:].double())
    tol = TOLERANCE[torch.float16]
    assert_rel_close(out[-1:], ref_out, tol, "last sample output")
    assert_rel_close(grad_x[-1:], ref_grads[0], tol, "last sample grad x")
    assert_rel_close(grad_logits[-1:], ref_grads[1], tol, "last sample grad kernel_logits")


@requires_triton
@pytest.mark.parametrize("chain_programs", [2, 3, 100], ids=lambda n: f"programs{n}")
def test_triton_softmax_chain_sample_groups(chain_programs, nan_poisoned_empty):
    """The softmax chain sums the bank-gradient terms over each program's group of samples: B = 5 in the fewest
    groups that give chain_programs programs on one SM (interpreted), of 3 or 2 samples (the last one short) or 1
    per program; every gradient against the fp64 reference."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import idconv as triton_idconv

    args = idconv_args(5, 3, 6, 7, 3, 5, dtype=torch.float64, seed=9)
    with common.launch_overrides(triton_idconv.Settings(chain_programs=chain_programs, plane_max=0)):
        check_op(TRITON, OP, args)


@requires_triton
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_triton_gradcheck(bias):
    args = idconv_args(2, 3, 5, 4, 2, 3, bias=bias, dtype=torch.float64, layout="channels_last", seed=5)
    with TRITON.active():
        # fast_mode checks random projections of the Jacobian: a handful of interpreter runs, not hundreds.
        assert torch.autograd.gradcheck(tk.idconv, args, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


@requires_triton
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "nograd"])
def test_triton_eager_path_matches_the_dispatcher(grad):
    """Plain eager calls skip torch.library's dispatcher (one autograd node of our own): bit-identical results."""
    check_dispatcher_paths_agree(TRITON, OP, idconv_args(2, 3, 6, 5, 2, 3, seed=1, grad=grad))
    check_dispatcher_paths_agree(TRITON, OP, idconv_args(1, 2, 4, 5, 2, 5, bias=False, seed=2, grad=grad))


@requires_triton
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_triton_opcheck(bias):
    args = idconv_args(2, 3, 4, 5, 2, 3, bias=bias, seed=6)
    for keep_kernels in (True, False):
        torch.library.opcheck(torch.ops.transxnet_triton.idconv.default, (*args, keep_kernels))
    grad_out = torch.randn(2, 3, 4, 5, device=DEVICE)
    detached = [None if t is None else t.detach() for t in args]
    _, kernels = torch.ops.transxnet_triton.idconv.default(*detached, True)
    for kept in (kernels, None):
        torch.library.opcheck(torch.ops.transxnet_triton.idconv_backward.default, (grad_out, *detached, kept))


@requires_triton
@pytest.mark.parametrize("stencil", ["plane", "tiled"])
def test_triton_backward_reuses_the_forwards_kernels(stencil, monkeypatch):
    """With gradients recorded the forward keeps its per-sample kernels for the backward, which then mixes
    nothing; the gradients equal those of mixing the kernels again; without gradients nothing is kept. The kept
    kernels are the reference's mix. Whole planes mix in the conv's own launch (`_mixing_plane_forward_kernel`),
    other stencils in two `_mix_kernel` launches (kernels and biases) before it."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import idconv as triton_idconv

    args = idconv_args(2, 3, 6, 5, 2, 3, bias=True, dtype=torch.float64, seed=9)
    grad_out = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=DEVICE)
    detached = [t.detach() for t in args]
    plane_max = 16 if stencil == "plane" else 0
    with common.launch_overrides(triton_idconv.Settings(plane_max=plane_max, plane_columns=16)):
        assert bool(triton_idconv._Plan(detached[0], 3, conv=True).plane[1]) == (stencil == "plane")
        kernels = torch.ops.transxnet_triton.idconv.default(*detached, True)[1]
        assert kernels.shape == (2, 3, 3, 3)
        assert_rel_close(kernels, reference.idconv_mix(detached[1], detached[2]), 1e-12, "kept kernels")
        assert torch.ops.transxnet_triton.idconv.default(*detached, False)[1].numel() == 0
        kept = triton_idconv.idconv_backward(grad_out, *detached, kernels)
        again = triton_idconv.idconv_backward(grad_out, *detached, None)
        for name, a, b in zip(("x", "kernel_logits", "weight", "bias_logits", "bias"), kept, again):
            assert torch.equal(a, b), name

        launches = []
        kernel_class = type(triton_idconv._mix_kernel)  # JITFunction, or the interpreter's InterpretedFunction
        real_run = kernel_class.run

        def recording_run(fn, *a, **k):
            launches.append(fn)
            return real_run(fn, *a, **k)

        monkeypatch.setattr(kernel_class, "run", recording_run)
        with TRITON.active():
            tk.idconv(*args).backward(grad_out)
    fused = launches.count(triton_idconv._mixing_plane_forward_kernel)
    # The forward's mixing; the backward mixes none.
    assert (launches.count(triton_idconv._mix_kernel), fused) == ((0, 1) if stencil == "plane" else (2, 0))


@requires_triton
def test_triton_backward_is_deterministic():
    args = idconv_args(2, 5, 12, 13, 2, 7, seed=8)
    grad_out = torch.randn(2, 5, 12, 13, device=DEVICE)
    with TRITON.active():
        _, first = evaluate(tk.idconv, args, grad_out)
        _, second = evaluate(tk.idconv, args, grad_out)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"grad {i} differs between runs"


@pytest.mark.parametrize("backend", backend_params(OP, per_isa=False))
def test_compile_fullgraph(backend):
    """One opaque custom op in a fullgraph trace; Triton's backward too (cpp is forward-only)."""
    args = idconv_args(2, 3, 6, 5, 2, 3, seed=7, device=backend.device, grad=backend.has_backward)
    torch._dynamo.reset()
    compiled = torch.compile(tk.idconv, fullgraph=True, backend="aot_eager")
    with backend.active():
        out, grads = evaluate(
            compiled, args, torch.ones(2, 3, 6, 5, device=backend.device) if backend.has_backward else None
        )
    ref_args = [t.detach().double().requires_grad_() for t in args]
    ref_out, ref_grads = evaluate(
        reference.idconv, ref_args, torch.ones(2, 3, 6, 5, dtype=torch.float64, device=backend.device)
    )
    assert_rel_close(out, ref_out, TOLERANCE[torch.float32], "compiled output")
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(a, b, TOLERANCE[torch.float32], f"compiled grad {i}")


# ---------------------------------------------------------------------------------------- cpp


@requires_cpp
@pytest.mark.parametrize("backend", backend_params(OP, only=cpp_only))
def test_cpp_kernel_past_the_nhwc_limit(backend):
    """Kernels wider than the NHWC kernels take (63) run the NCHW kernels, still returning channels_last."""
    args = idconv_args(1, 3, 4, 5, 2, 65, dtype=torch.float64, layout="channel_slice", device="cpu", grad=False)
    out, _, _ = check_op(backend, OP, args)
    assert_output_layout(out, args[0])


@requires_cpp
def test_cpp_is_forward_only_auto_differentiates_the_reference():
    """auto runs the reference for calls that need gradients (cpp declines them); the cpp custom op has no
    autograd formula, so differentiating through a direct call raises instead of returning a wrong gradient."""
    args = idconv_args(2, 3, 6, 7, 2, 3, dtype=torch.float64, device="cpu")
    grad_out = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    with tk.use_backend("auto"):
        out, grads = evaluate(tk.idconv, args, grad_out)
    ref_out, ref_grads = evaluate(reference.idconv, args, grad_out)
    assert_rel_close(out, ref_out, TOLERANCE[torch.float64], "forward")
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(a, b, TOLERANCE[torch.float64], f"grad {i}")
    with tk.use_backend("cpp"), pytest.raises(tk.BackendUnavailableError, match="gradients"):
        tk.idconv(*args)
    direct = torch.ops.transxnet_cpp.idconv(*args)
    with pytest.raises(RuntimeError):
        direct.sum().backward()


@requires_cpp
def test_cpp_refuses_half_precision():
    args = idconv_args(1, 3, 4, 4, 2, 3, dtype=torch.float16, device="cpu", grad=False)
    with tk.use_backend("cpp"), pytest.raises(tk.BackendUnavailableError, match="dtype"):
        tk.idconv(*args)


@requires_cpp
def test_cpp_opcheck():
    ops = torch.ops.transxnet_cpp
    cases = [
        idconv_args(2, 3, 6, 7, 2, 3, device="cpu", grad=False),
        idconv_args(1, 3, 6, 7, 2, 5, bias=False, device="cpu", grad=False),
        idconv_args(2, 3, 6, 7, 2, 3, layout="channel_slice", device="cpu", grad=False),
        idconv_args(2, 4, 5, 6, 2, 7, layout="channels_last", device="cpu", grad=False),
    ]
    for args in cases:
        torch.library.opcheck(ops.idconv.default, args)
