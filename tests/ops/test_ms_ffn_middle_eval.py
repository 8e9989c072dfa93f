"""ms_ffn_middle_eval (inference MS-FFN, fc1's GELU + BatchNorm folded in front) on every fused backend that has
it against the fp64 reference: awkward group layouts, memory layouts, dtypes, NaN-poisoned allocations; the
Triton stencils and the cpp kernels' banded rows; opcheck and torch.compile. It is forward-only everywhere (the
model uses it in eval without gradients): a forced call that needs gradients is refused."""

import contextlib

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
    dtype_id,
    fused_backends,
    groups_id,
    ms_ffn_small_tiles,
    not_interpreted,
    num_threads,
    randn,
    record_launches,
    requires_cpp,
    requires_triton,
    requiring_grad,
    to_layout,
)

OP = "ms_ffn_middle_eval"


def eval_args(widths, ksizes, B, H, W, dtype=torch.float32, layout="contiguous", device=None, seed=0, grad=True):
    """(x, input_scale, input_shift, weights, biases, output_scale, output_shift); x and the conv parameters
    require grad when `grad` (so a forward-only backend's refusal is checked too)."""
    gen = torch.Generator().manual_seed(seed)
    device = torch.device("cpu") if device is None else device
    C = sum(widths)

    def rand(*shape, scale=1.0):
        return randn(*shape, dtype=dtype, gen=gen, scale=scale, device=device)

    x = to_layout(rand(B, C, H, W), layout)
    weights = [rand(c, 1, k, k, scale=0.3) for c, k in zip(widths, ksizes)]
    biases = [rand(c, scale=0.3) for c in widths]
    in_scale, in_shift, out_scale, out_shift = (rand(C) for _ in range(4))
    args = (x, in_scale, in_shift, weights, biases, out_scale, out_shift)
    return requiring_grad(args, [0, 3, 4]) if grad else args


GROUPS = [
    ([3, 2, 2, 2], [1, 3, 5, 7], 2, 11, 9),  # the MS-FFN layout, odd C, unequal groups
    ([1, 2, 3, 1, 2], [1, 3, 5, 7, 9], 1, 4, 6),  # kernels 1..9, H/W smaller than the largest, batch 1
    ([4, 1, 1, 1], [1, 3, 5, 7], 1, 3, 2),  # tiny image: most taps read the zero padding of y
    ([6, 5, 5, 5], [1, 3, 5, 7], 2, 14, 13),  # groups that are not whole vectors
    ([20, 17], [11, 3], 2, 12, 23),  # runtime kernel size, groups spanning several vectors
    ([1], [3], 3, 4, 4),  # one channel
]


def _sweep():
    return [
        backend_param(backend, dtype, g, layout, extra_id=f"-{dtype_id(dtype)}-{groups_id(g)}-{layout}")
        for backend in fused_backends(OP)
        for dtype in backend.dtypes
        if dtype in (torch.float32, torch.float64)
        for g in GROUPS
        for layout in (CPP_LAYOUTS if backend.name == "cpp" else LAYOUTS)
    ]


@pytest.mark.parametrize("backend,dtype,groups,layout", _sweep())
def test_matches_reference(backend, dtype, groups, layout, nan_poisoned_empty):
    """The conv zero-pads y = GELU(x) * s + t, not x: the tiny maps check that padding."""
    args = eval_args(*groups, dtype=dtype, layout=layout, device=backend.device)
    out, _, _ = check_op(backend, OP, args)
    assert_output_layout(out, args[0])


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(OP, only=not_interpreted))
def test_model_shape(backend, dtype):
    """A TransXNet-T stage-1 MS-FFN sample: 4C = 192 channels, 56x56."""
    check_op(
        backend,
        OP,
        eval_args(
            [48, 48, 48, 48],
            [1, 3, 5, 7],
            1,
            56,
            56,
            dtype=dtype,
            layout="channels_last",
            device=backend.device,
            seed=3,
            grad=False,
        ),
    )


@pytest.mark.parametrize("choice", ALL_CHOICES)
def test_mixed_dtypes_and_devices_raise_value_error_naming_the_argument(choice):
    x, s_in, t_in, weights, biases, s_out, t_out = eval_args([2, 1], [3, 5], 1, 4, 4, grad=False)
    with tk.use_backend(choice):
        with pytest.raises(ValueError, match=r"ms_ffn_middle_eval: weights\[0\] has dtype torch\.float64 but x has"):
            tk.ms_ffn_middle_eval(x, s_in, t_in, [weights[0].double(), weights[1]], biases, s_out, t_out)
        with pytest.raises(ValueError, match=r"ms_ffn_middle_eval: output_shift is on meta but x is on cpu"):
            tk.ms_ffn_middle_eval(x, s_in, t_in, weights, biases, s_out, t_out.to("meta"))
        with pytest.raises(ValueError, match=r"ms_ffn_middle_eval: input_scale must be \[3\]"):
            tk.ms_ffn_middle_eval(x, s_in[:2], t_in, weights, biases, s_out, t_out)


@pytest.mark.parametrize("H", [6, 9], ids=["48px", "72px"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(OP, dtypes=[torch.float16, torch.bfloat16]))
def test_half_precision(backend, dtype, H, nan_poisoned_empty):
    """Half-precision x and conv weights with fp32 scales and shifts (BatchNorm's fp32 parameters under autocast).
    Triton, on planes of at most 64 pixels, keeps y = GELU(x) * s + t in fp32 registers (thread planes); on larger
    ones it stores y in x's dtype (72 pixels: the one-pass whole-plane kernel's slot; two launches elsewhere)."""
    x, s_in, t_in, weights, biases, s_out, t_out = eval_args(
        [3, 2, 2, 2], [1, 3, 5, 7], 2, H, 8, dtype=dtype, device=backend.device, seed=2, grad=False
    )
    check_op(backend, OP, (x, s_in.float(), t_in.float(), weights, biases, s_out.float(), t_out.float()))


@pytest.mark.parametrize("backend", backend_params(OP, per_isa=False))
def test_forward_only(backend):
    """A forced call that needs gradients says so; auto runs the reference, which has a backward."""
    args = eval_args([2, 1], [3, 5], 1, 4, 4, device=backend.device)
    with backend.active(), pytest.raises(tk.BackendUnavailableError, match="forward-only"):
        tk.ms_ffn_middle_eval(*args)
    with tk.use_backend("auto"):
        out = tk.ms_ffn_middle_eval(*args)
    out.sum().backward()
    assert all(t.grad is not None for t in (args[0], *args[3], *args[4]))


@requires_triton
@pytest.mark.parametrize(
    "stencil",
    ["strips", "strips-wide-rows", "chunks", "plane", "plane-channels-last", "per-tap-int64", "thread-planes"],
)
def test_triton_stencils(stencil, nan_poisoned_empty, monkeypatch):
    """Each stencil the plan picks, with several tiles or strips, channel blocks and batch splits. One pass on
    strips whose programs cover whole rows (`_strip_eval_kernel`), on dense whole planes (`_plane_eval_kernel`),
    each a launch per kernel size, and on thread planes (_EVAL); two launches on strips of rows wider than
    whole_row_chunks, chunks of 4 pixels, whole planes with channels_last rows, and per-tap tiles with int64
    offsets."""
    from transxnet_kernels.triton import ms_ffn

    widths, ksizes = [2, 3, 1, 2], [1, 3, 5, 7]
    layout = "channels_last" if stencil == "plane-channels-last" else "contiguous"
    W = 16 if stencil == "strips-wide-rows" else 8
    args = eval_args(widths, ksizes, 3, 6, W, dtype=torch.float64, layout=layout, device=DEVICE, grad=False)
    settings = {
        "strips": dict(index64=False, strips=True),
        "strips-wide-rows": dict(index64=False, strips=True),
        "chunks": dict(index64=False),
        "plane": dict(index64=False, plane=True),
        "plane-channels-last": dict(index64=False, plane=True),
        "per-tap-int64": dict(index64=True),
        "thread-planes": dict(index64=False, thread_planes=True),
    }[stencil]
    modes, one_pass = [], []
    launch_forward = ms_ffn._launch_forward

    def recording_launch_forward(mode, *args, **kwargs):
        modes.append(mode)
        launch_forward(mode, *args, **kwargs)

    def recording(name):
        launch = getattr(ms_ffn, name)

        def recording_launch(*args):
            one_pass.append(name)
            launch(*args)

        return recording_launch

    monkeypatch.setattr(ms_ffn, "_launch_forward", recording_launch_forward)
    for name in ("_launch_plane_eval", "_launch_strip_eval"):
        monkeypatch.setattr(ms_ffn, name, recording(name))
    with ms_ffn_small_tiles(**settings):
        plan = ms_ffn._plan(args[0], widths, ksizes, thread_planes=True)
        picked = {
            "strips": plan.strip,
            "strips-wide-rows": plan.strip,
            "chunks": plan.vec,
            "plane": plan.plane[1] and plan.plane_dense,
            "plane-channels-last": plan.plane[1] and not plan.plane_dense,
            "per-tap-int64": plan.index64,
            "thread-planes": plan.thread_plane[2],
        }
        assert picked[stencil], plan
        check_op(TRITON, OP, args)
    one_pass_launcher = {"strips": "_launch_strip_eval", "plane": "_launch_plane_eval"}.get(stencil)
    assert one_pass == ([one_pass_launcher] if one_pass_launcher else [])
    two_launches = [ms_ffn._APPLY_SAVED, ms_ffn._APPLY]
    assert modes == {"thread-planes": [ms_ffn._EVAL], "plane": [], "strips": []}.get(stencil, two_launches)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize(
    "stencil,H,W",
    [("plane", 5, 7), ("plane", 3, 2), ("strips", 5, 8), ("strips", 3, 4), ("strips-default", 17, 20)],
    ids=lambda v: str(v),
)
def test_triton_one_pass_slots_reused_across_images(dtype, stencil, H, W, nan_poisoned_empty, monkeypatch):
    """The one-pass kernels (whole planes, whole-row strips) with several images per program (each program's slot
    rewritten per image), a group narrower than its channel block (padding channels), a map smaller than the
    largest kernel, the last strip past the image (odd H), whole-plane rows narrower than their power-of-two
    padding, and y rounded to bf16 in the slot as the two-launch form stores it. Strips: a program walks down its
    images' strips (2 rows; strips-default, the default settings: 4 rows, the last of 17 one row), the slot's top
    rows carried from the strip above, over whole rows (strips-default: 5 chunks padded to 8)."""
    from transxnet_kernels.triton import ms_ffn

    widths, ksizes = [3, 2, 3, 1], [1, 3, 5, 7]
    args = eval_args(widths, ksizes, 7, H, W, dtype=dtype, device=DEVICE, seed=3, grad=False)
    stencil, default_settings = stencil.removesuffix("-default"), stencil.endswith("-default")
    name = {"plane": "_plane_eval_kernel", "strips": "_strip_eval_kernel"}[stencil]

    def images_per_program_and_k(kernel_args, kwargs):
        return kernel_args[12 if stencil == "plane" else 13], kwargs["KMAX" if stencil == "plane" else "K"]

    launched = record_launches(monkeypatch, ms_ffn, name, images_per_program_and_k)
    small_tiles = ms_ffn_small_tiles(
        index64=False, plane=stencil == "plane", strips=stencil == "strips", target_programs=1
    )
    with contextlib.nullcontext() if default_settings else small_tiles:
        check_op(TRITON, OP, args)
    assert sorted(k for _, k in launched) == [1, 3, 5, 7]
    assert all(images > 1 for images, _ in launched), launched


@requires_triton
@pytest.mark.parametrize("capability,dtype", [(80, torch.bfloat16), (80, torch.float32), (90, torch.bfloat16)])
def test_triton_one_pass_strips_by_target(capability, dtype, monkeypatch):
    """Whole-row strips run one pass except for 16-bit maps on compute capability 8.0 (16 FP32 lanes per
    scheduler: the halo rows' GELUs cost more FP32-pipe time than the two passes save), which keep two launches;
    both match the reference."""
    import dataclasses

    from transxnet_kernels.triton import common, ms_ffn

    x, s_in, t_in, weights, biases, s_out, t_out = eval_args(
        [2, 3, 1, 2], [1, 3, 5, 7], 2, 6, 8, dtype=dtype, device=DEVICE, grad=False
    )
    launched = []
    launch_forward, launch_strip_eval = ms_ffn._launch_forward, ms_ffn._launch_strip_eval

    def recording_launch_forward(mode, *args, **kwargs):
        launched.append(mode)
        launch_forward(mode, *args, **kwargs)

    def recording_launch_strip_eval(*args):
        launched.append("one pass")
        launch_strip_eval(*args)

    monkeypatch.setattr(ms_ffn, "_launch_forward", recording_launch_forward)
    monkeypatch.setattr(ms_ffn, "_launch_strip_eval", recording_launch_strip_eval)
    target = dataclasses.replace(common.launch_target(DEVICE), capability=capability)
    with ms_ffn_small_tiles(index64=False, strips=True), common.launch_overrides(target):
        check_op(TRITON, OP, (x, s_in.float(), t_in.float(), weights, biases, s_out.float(), t_out.float()))
    two_launches = capability == 80 and dtype == torch.bfloat16
    assert launched == ([ms_ffn._APPLY_SAVED, ms_ffn._APPLY] if two_launches else ["one pass"])


@requires_triton
def test_triton_packed_weights_kept_until_a_source_changes():
    """The packed weight table is built once per weight set and rebuilt when a weight changes in place or is
    replaced: each output matches the reference on the weights of that call."""
    from transxnet_kernels.triton import ms_ffn

    widths, ksizes = [2, 3, 1, 2], [1, 3, 5, 7]
    x, in_scale, in_shift, weights, biases, out_scale, out_shift = eval_args(
        widths, ksizes, 2, 6, 5, dtype=torch.float64, device=DEVICE, grad=False
    )

    def run():
        with TRITON.active():
            out = tk.ms_ffn_middle_eval(x, in_scale, in_shift, weights, biases, out_scale, out_shift)
        with tk.use_backend("reference"):
            ref = tk.ms_ffn_middle_eval(x, in_scale, in_shift, weights, biases, out_scale, out_shift)
        assert_rel_close(out, ref, TOLERANCE[torch.float64], "output")
        return ms_ffn._pack_for_inference(weights, biases, x.dtype)[0]

    table = run()
    assert run() is table  # the same weights: the table is reused
    with torch.no_grad():
        weights[3].mul_(-2.0)  # in place: the version counter moves
    changed = run()
    assert changed is not table and run() is changed
    biases[1] = biases[1] + 1.0  # a new tensor
    assert run() is not changed


@requires_triton
def test_triton_packed_weights_not_kept_for_inference_mode_tensors():
    """Tensors created under torch.inference_mode carry no version counter: they are packed at every call."""
    from transxnet_kernels.triton import ms_ffn

    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        weights = [randn(2, 1, k, k, gen=gen) for k in (1, 3)]
        biases = [randn(2, gen=gen) for _ in range(2)]
        first = ms_ffn._pack_for_inference(weights, biases, torch.float32)[0]
        second = ms_ffn._pack_for_inference(weights, biases, torch.float32)[0]
    assert first is not second and torch.equal(first, second)


@requires_triton
def test_triton_packed_weights_cache_is_bounded(monkeypatch):
    """Beyond its bound the oldest packed table is dropped, and with it the pinned sources."""
    from transxnet_kernels.triton import ms_ffn

    monkeypatch.setattr(ms_ffn, "_INFERENCE_PACKS", {})
    monkeypatch.setattr(ms_ffn, "_INFERENCE_PACKS_KEPT", 2)
    gen = torch.Generator().manual_seed(0)
    sets = [([randn(2, 1, 3, 3, gen=gen)], [randn(2, gen=gen)]) for _ in range(3)]
    tables = [ms_ffn._pack_for_inference(*s, torch.float32)[0] for s in sets]
    assert len(ms_ffn._INFERENCE_PACKS) == 2
    assert ms_ffn._pack_for_inference(*sets[2], torch.float32)[0] is tables[2]
    assert ms_ffn._pack_for_inference(*sets[0], torch.float32)[0] is not tables[0]  # dropped, packed again


# ---------------------------------------------------------------------------------------- cpp


@requires_cpp
@pytest.mark.parametrize("backend", backend_params(OP, only=lambda b: b.name == "cpp"))
def test_cpp_banded_rows(backend):
    """Batch 1 with more threads than samples splits rows into bands that restage their halo rows."""
    args = eval_args([5, 4, 4, 4], [1, 3, 5, 7], 1, 23, 9, dtype=torch.float64, layout="channels_last", grad=False)
    with num_threads(4):
        check_op(backend, OP, args)


@requires_cpp
def test_cpp_refuses_half_precision():
    args = eval_args([2], [3], 1, 4, 4, dtype=torch.float16, grad=False)
    with tk.use_backend("cpp"), pytest.raises(tk.BackendUnavailableError, match="dtype"):
        tk.ms_ffn_middle_eval(*args)


@pytest.mark.parametrize("backend", backend_params(OP, per_isa=False))
def test_compile_fullgraph_channels_last(backend):
    x, *rest = eval_args(
        [3, 2, 2, 2], [1, 3, 5, 7], 2, 8, 12, layout="channels_last", device=backend.device, grad=False
    )

    def middle(x):
        return tk.ms_ffn_middle_eval(x, *rest) * 2

    torch._dynamo.reset()
    with backend.active():
        expected = middle(x)
        compiled = torch.compile(middle, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            actual = compiled(x)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(actual, expected, TOLERANCE[torch.float32], "compiled")


@pytest.mark.parametrize("backend", backend_params(OP, per_isa=False))
def test_eager_path_matches_the_dispatcher(backend):
    """Plain eager calls skip torch.library's dispatcher: bit-identical outputs."""
    args = eval_args([3, 2, 2], [1, 3, 5], 2, 7, 9, device=backend.device, grad=False)
    check_dispatcher_paths_agree(backend, OP, args)


@pytest.mark.parametrize("backend", backend_params(OP, per_isa=False))
def test_opcheck(backend):
    op = getattr(torch.ops, f"transxnet_{backend.name}").ms_ffn_middle_eval.default
    device = backend.device
    torch.library.opcheck(op, eval_args([3, 2, 2], [1, 3, 5], 2, 7, 9, device=device, grad=False))
    torch.library.opcheck(op, eval_args([4, 3], [3, 7], 1, 5, 8, layout="channels_last", device=device, grad=False))
    torch.library.opcheck(op, eval_args([4, 3], [3, 7], 2, 5, 6, layout="channel_slice", device=device, grad=False))
