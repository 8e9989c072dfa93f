"""osra_attention, softmax(q @ k^T * scale + bias) @ v, on every fused backend against the fp64 reference:
output and every gradient (bias included), the kernels' block paths, the model's strided views, dtypes,
NaN-poisoned allocations, zero sizes; then each backend's own paths (Triton: output layout, determinism,
gradcheck, opcheck, torch.compile, the fp64 path without tl.dot; cpp: output layout, strided k/v, opcheck)."""

import dataclasses

import pytest
import torch

import transxnet_kernels as tk
from helpers import (
    ALL_CHOICES,
    DEVICE,
    TOLERANCE,
    TRITON,
    TRITON_DTYPES,
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
    record_launches,
    requires_cpp,
    requires_triton,
    requiring_grad,
    to_layout,
)
from transxnet_kernels import reference

OP = "osra_attention"


def osra_args(
    B, h, N, M, d, bias_shape, dtype=torch.float32, transposed=True, device=None, seed=0, grad=True, scale=None
):
    """(q, k, v, bias, scale). transposed: q, k and the bias are the model's views of [B, h, d, L] (and
    [.., M, N]) memory, stride 1 along the sequence; else contiguous. bias_shape: its two leading dims, or None."""
    gen = torch.Generator().manual_seed(seed)
    device = DEVICE if device is None else device

    def rand(*shape):
        return randn(*shape, dtype=dtype, gen=gen, device=device)

    def seq(B_, h_, L, d_):
        return rand(B_, h_, d_, L).transpose(-1, -2) if transposed else rand(B_, h_, L, d_)

    q, k, v = seq(B, h, N, d), seq(B, h, M, d), rand(B, h, M, d)
    bias = None
    if bias_shape is not None:
        bias = rand(*bias_shape, M, N).transpose(-1, -2) if transposed else rand(*bias_shape, N, M)
    args = (q, k, v, bias, scale)
    return requiring_grad(args, [0, 1, 2] + ([3] if bias is not None else [])) if grad else args


# (B, h, N, M, d, bias dims). The Triton rows each exercise a kernel path: M <= 64 keys take the one-pass short
# path (query blocks of 64 or 128 rows; interpreted, batch groups fill 4 programs), longer M the flash kernels
# (BLOCK_M = 64 keys, BLOCK_N = 16 to 64 queries; interpreted, the backward splits/groups work to fill 4
# programs); the cpp rows its register blocking.
CASES = [
    (2, 3, 37, 49, 19, (1, 3)),  # short: batch-1 bias, one batch per group, groups summed
    (5, 2, 37, 49, 21, (1, 2)),  # short: groups of 3 batches share the bias tile and sum its gradient in registers
    (3, 2, 37, 130, 24, (1, 2)),  # flash: M over two key blocks, bias gradient read-modify-written per group
    (3, 2, 70, 130, 28, (3, 2)),  # flash: per-batch bias, no reduction; two query blocks
    (1, 1, 150, 20, 32, (1, 1)),  # short: batch 1, three query blocks' dk/dv partials summed
    (2, 2, 68, 20, 32, (1, 1)),  # short: bias broadcast over heads; N a multiple of 4 (queries move in vectors)
    (2, 2, 33, 17, 24, None),  # short: no bias
    (1, 1, 9, 1050, 21, (1, 1)),  # flash: detection-size M, 17 key blocks
    (2, 2, 50, 49, 24, (2, 2)),  # short: per-sample bias, loaded and its gradient stored per batch
    (2, 3, 37, 11, 13, (1, 3)),  # bias shared over the batch, odd sizes
    (1, 1, 1, 1, 5, None),  # single query and key
    (3, 4, 20, 13, 28, (1, 1)),  # bias broadcast over heads too
    (2, 1, 9, 70, 9, (2, 1)),  # M spanning several register blocks
    (1, 2, 16, 7, 40, None),  # d spanning several register blocks
]
INTERPRETED_CASES = CASES[:9]
_BF16 = [torch.bfloat16] if torch.bfloat16 in TRITON_DTYPES else []  # bf16 is GPU-only (see helpers)


def case_id(c):
    B, h, N, M, d, bias = c
    return f"B{B}h{h}N{N}M{M}d{d}-" + ("nobias" if bias is None else "bias{}{}".format(*bias))


def _sweep():
    """Every case in every dtype the backend runs, in the model's transposed layout; cpp's own cases in contiguous
    tensors too (the interpreter's contiguous inputs are checked below)."""
    params = []
    for backend in fused_backends(OP):
        cases = INTERPRETED_CASES if backend.interpreted else CASES
        for dtype in backend.dtypes:
            for case in cases:
                for transposed in [True, False] if backend.name == "cpp" and case in CASES[9:] else [True]:
                    params.append(
                        backend_param(
                            backend,
                            dtype,
                            case,
                            transposed,
                            extra_id=f"-{dtype_id(dtype)}-{case_id(case)}-{'model' if transposed else 'contiguous'}",
                        )
                    )
    return params


@pytest.mark.parametrize("backend,dtype,case,transposed", _sweep())
def test_matches_reference(backend, dtype, case, transposed, nan_poisoned_empty):
    check_op(backend, OP, osra_args(*case, dtype=dtype, transposed=transposed, device=backend.device))


@pytest.mark.parametrize("scale", [0.3, 0.0, -0.3])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "model"])
@pytest.mark.parametrize("backend", backend_params(OP, per_isa=False))
def test_custom_scale(backend, transposed, scale):
    """Any scale, zero and negative included (softmax(bias) and reversed scores; Triton's short path needs a
    positive one and hands these to the flash kernels)."""
    check_op(
        backend,
        OP,
        osra_args(
            2,
            2,
            45,
            30,
            19,
            (2, 2),
            dtype=torch.float64,
            transposed=transposed,
            seed=1,
            scale=scale,
            device=backend.device,
        ),
    )


@pytest.mark.parametrize("backend", backend_params(OP, per_isa=False))
def test_strided_kv_and_bias(backend):
    """k and v as the usual fused-kv projection views, a bias with a non-unit stride along M."""
    gen = torch.Generator().manual_seed(3)
    B, h, N, M, d = 2, 2, 19, 10, 6
    q = randn(B, h, N, d, dtype=torch.float64, gen=gen, device=backend.device)
    kv = randn(B, M, 2, h, d, dtype=torch.float64, gen=gen, device=backend.device).permute(2, 0, 3, 1, 4)
    bias = randn(B, h, M, N, dtype=torch.float64, gen=gen, device=backend.device).transpose(-1, -2)
    check_op(backend, OP, requiring_grad((q, kv[0], kv[1], bias, 0.37), [0, 1, 2, 3]))


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(OP, only=not_interpreted))
def test_model_shape(backend, dtype):
    """A TransXNet-T stage-1 OSRA: N = 3136, M = 49, d = 24, the model's q layout (too slow interpreted)."""
    check_op(
        backend,
        OP,
        osra_args(1, 1, 3136, 49, 24, (1, 1), dtype=dtype, device=backend.device, seed=4, grad=backend.has_backward),
    )


@pytest.mark.parametrize("choice", ALL_CHOICES)
def test_mixed_dtypes_and_devices_raise_value_error_naming_the_argument(choice):
    q, k, v, bias, _ = osra_args(1, 2, 5, 3, 4, (1, 2), device=torch.device("cpu"), grad=False)
    with tk.use_backend(choice):
        with pytest.raises(ValueError, match=r"osra_attention: k has dtype torch\.float64 but q has torch\.float32"):
            tk.osra_attention(q, k.double(), v, bias)
        with pytest.raises(ValueError, match=r"osra_attention: v has dtype torch\.float16"):
            tk.osra_attention(q, k, v.half(), bias)
        with pytest.raises(ValueError, match=r"osra_attention: v is on meta but q is on cpu"):
            tk.osra_attention(q, k, v.to("meta"), bias)
        with pytest.raises(ValueError, match=r"osra_attention: bias is on meta but q is on cpu"):
            tk.osra_attention(q, k, v, bias.to("meta"))


# ------------------------------------------------------------------------------------- triton


@requires_triton
def test_triton_output_layout_makes_the_model_reshape_a_view():
    q, k, v, bias, _ = osra_args(2, 2, 40, 49, 24, (1, 2), grad=False)
    with TRITON.active():
        out = tk.osra_attention(q, k, v, bias)
    assert out.shape == (2, 2, 40, 24)
    assert out.transpose(-1, -2).is_contiguous()  # so .reshape(B, h*d, H, W) needs no copy
    assert_rel_close(
        out,
        reference.osra_attention(q.double(), k.double(), v.double(), bias.double()),
        TOLERANCE[torch.float32],
        "out",
    )


@requires_triton
def test_triton_contiguous_inputs(nan_poisoned_empty):
    check_op(TRITON, OP, osra_args(3, 2, 70, 130, 28, (1, 2), transposed=False, seed=5))


@requires_triton
def test_triton_only_some_inputs_requiring_grad():
    """A bias without a gradient, k without one: only the gradients asked for."""
    q, k, v, bias, _ = osra_args(3, 2, 37, 49, 24, (1, 2), dtype=torch.float64, grad=False)
    check_op(TRITON, OP, requiring_grad((q, k, v, bias), [0, 2]))


@requires_triton
@pytest.mark.parametrize("dim", ["B", "N", "M"])
def test_triton_zero_sizes(dim, nan_poisoned_empty):
    """B = 0, N = 0 or M = 0: the forward matches the reference (M = 0: zeros, the empty sum) and the backward
    gives zero or empty gradients without launching anything."""
    sizes = dict(B=2, h=2, N=5, M=3, d=4)
    sizes[dim] = 0
    args = osra_args(sizes["B"], sizes["h"], sizes["N"], sizes["M"], sizes["d"], (1, 2), dtype=torch.float64)
    grad_out = torch.randn(sizes["B"], sizes["h"], sizes["N"], sizes["d"], dtype=torch.float64, device=DEVICE)
    with TRITON.active():
        out, grads = evaluate(tk.osra_attention, args, grad_out)
    ref_out, ref_grads = evaluate(reference.osra_attention, args, grad_out)
    assert out.shape == ref_out.shape and torch.equal(out, ref_out)
    if dim == "M":
        assert out.numel() > 0 and torch.count_nonzero(out) == 0
    assert len(grads) == 4
    for name, g, rg, t in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, args):
        assert g.shape == t.shape == rg.shape, name
        assert torch.count_nonzero(g) == 0 and torch.equal(g, rg), name


@requires_triton
@pytest.mark.parametrize("M", [49, 70], ids=["short", "flash"])
def test_triton_int64_offsets_path(M, nan_poisoned_empty):
    """The int64 offsets used when a tensor spans 2^31 elements, forced on a small input (forward and backward
    kernels of the flash path; the short path's forward, whose backward then runs on the flash kernels; with a
    batch-1 bias gradient)."""
    from transxnet_kernels.triton import common

    target = dataclasses.replace(common.launch_target(DEVICE), int32_span_limit=0)
    with common.launch_overrides(target):
        check_op(TRITON, OP, osra_args(3, 2, 37, M, 19, (1, 2), seed=11))


@requires_triton
def test_triton_flash_int64_offsets_follow_the_bias():
    """The flash kernels form a head's bias offsets (row times stride) in int32 unless INDEX64: a bias (or its
    gradient buffer) whose sample spans the limit makes them int64 even where q, k and v are small."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import osra_attention as triton_osra

    q, k = torch.empty(2, 2, 37, 19), torch.empty(2, 2, 70, 19)
    bias = torch.empty(1, 2, 37, 70)  # sample span 2·37·70 - 1 = 5179; q's 1405, k's 2659

    def index64(limit, bias):
        target = common.LaunchTarget(132, interpreted=False, int32_span_limit=limit, capability=90)
        with common.launch_overrides(target):
            return triton_osra._flash_index64(bias, q, k, k, q)

    assert not index64(2660, None) and not index64(5180, bias)
    assert index64(2660, bias) and index64(2659, None)


@requires_triton
@pytest.mark.parametrize("M", [49, 130], ids=["short", "flash"])
def test_triton_bias_gradient_is_deterministic(M):
    args = osra_args(5, 2, 37, M, 19, (1, 2), seed=6)
    grad_out = torch.randn(5, 2, 37, 19, device=DEVICE)
    with TRITON.active():
        first = evaluate(tk.osra_attention, args, grad_out)[1]
        second = evaluate(tk.osra_attention, args, grad_out)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_triton
@pytest.mark.parametrize("bias_shape", [(1, 1), None], ids=["bias11", "nobias"])
def test_triton_gradcheck(bias_shape):
    # A [1, 1] bias on B = h = 2 needs the batch and head reductions of its gradient.
    q, k, v, bias, _ = osra_args(2, 2, 4, 5, 3, bias_shape, dtype=torch.float64, seed=7)
    leaves = (q, k, v) + ((bias,) if bias is not None else ())

    def fn(*ts):
        with TRITON.active():
            return tk.osra_attention(*ts[:3], ts[3] if len(ts) > 3 else None)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


@requires_triton
def test_triton_eager_path_matches_the_dispatcher():
    """Plain eager calls skip torch.library's dispatcher (one autograd node of our own): bit-identical results,
    with and without the bias needing a gradient (the backward reads needs_input_grad per op argument)."""
    q, k, v, bias, scale = osra_args(2, 2, 9, 11, 5, (1, 2), seed=8)
    check_dispatcher_paths_agree(TRITON, OP, (q, k, v, bias, scale))
    check_dispatcher_paths_agree(TRITON, OP, (q, k, v, bias.detach(), scale))
    check_dispatcher_paths_agree(TRITON, OP, (q.detach(), k.detach(), v.detach(), bias, scale))
    check_dispatcher_paths_agree(TRITON, OP, osra_args(2, 2, 9, 11, 5, (1, 2), seed=8, grad=False))


@requires_triton
def test_triton_opcheck():
    ops = torch.ops.transxnet_triton
    for bias_shape in [(1, 2), None]:
        q, k, v, bias, _ = osra_args(2, 2, 9, 11, 5, bias_shape, seed=8)
        torch.library.opcheck(ops.osra_attention.default, (q, k, v, bias, 0.4))
        with torch.no_grad():
            out, lse = ops.osra_attention(q, k, v, bias, 0.4)
        torch.library.opcheck(
            ops.osra_attention_backward.default,
            (
                torch.randn_like(out),
                q.detach(),
                k.detach(),
                v.detach(),
                None if bias is None else bias.detach(),
                out,
                lse,
                0.4,
                bias is not None,
            ),
        )


@requires_triton
def test_triton_compile_fullgraph():
    q, k, v, bias, _ = osra_args(2, 2, 20, 13, 8, (1, 2), seed=9, grad=False)
    bias.requires_grad_(True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(q, k, v, bias):
        return tk.osra_attention(q, k, v, bias)

    torch._dynamo.reset()
    with TRITON.active():
        out = fn(q, k, v, bias)
    (dbias,) = torch.autograd.grad(out.square().sum(), bias)
    bias_ref = bias.detach().double().requires_grad_(True)
    ref = reference.osra_attention(q.double(), k.double(), v.double(), bias_ref)
    (rdbias,) = torch.autograd.grad(ref.square().sum(), bias_ref)
    assert_rel_close(out, ref, TOLERANCE[torch.float32], "out")
    assert_rel_close(dbias, rdbias, TOLERANCE[torch.float32], "dbias")


@requires_triton
def test_triton_declines_head_dims_over_its_limit():
    """Head dims above MAX_HEAD_DIM: forced Triton says why; auto runs another backend."""
    from transxnet_kernels.triton import osra_attention as triton_osra

    d = triton_osra.MAX_HEAD_DIM + 2
    q, k, v, _, _ = osra_args(1, 1, 4, 4, d, None, grad=False)
    with TRITON.active(), pytest.raises(tk.BackendUnavailableError, match=f"head dim {d} is above"):
        tk.osra_attention(q, k, v)
    q, k, v, _, _ = osra_args(1, 1, 4, 4, triton_osra.MAX_HEAD_DIM, None, grad=False)
    check_op(TRITON, OP, (q, k, v))  # the limit itself runs
    with tk.use_backend("auto"):
        assert_rel_close(
            tk.osra_attention(q, k, v),
            reference.osra_attention(q.double(), k.double(), v.double()),
            TOLERANCE[torch.float32],
            "auto",
        )


@requires_triton
@pytest.mark.parametrize("bias_shape", [(1, 2), (3, 1)], ids=["bias1h", "biasB1"])
def test_triton_fp64_gpu_path_without_tl_dot(monkeypatch, bias_shape):
    """fp64 on GPUs avoids tl.dot (16x16 blocks, broadcast-multiply-sum): run that path here too. (`_uses_dot`
    picks a code path, not a launch setting, so it has no launch_overrides knob.)"""
    from transxnet_kernels.triton import osra_attention as triton_osra

    monkeypatch.setattr(triton_osra, "_uses_dot", lambda q: False)
    check_op(TRITON, OP, osra_args(3, 2, 37, 49, 19, bias_shape, dtype=torch.float64, seed=10))


@pytest.fixture
def tf32_allowed():
    """TF32 allowed for fp32 matmuls, as `torch.set_float32_matmul_precision("high")` allows it, for one test."""
    from benchmarks.common import tf32_matmuls

    with tf32_matmuls(True):
        yield


@pytest.fixture
def tf32_tensor_cores(monkeypatch):
    """The interpreter's tl.dot at input precision "tf32" taking fp32 operands as a tensor core does, their 13 low
    mantissa bits ignored (the interpreter's own dots multiply them whole): the products of TF32 values are exact in
    fp32 and summed in fp32, as on the hardware."""
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def truncated(operand):
        if operand.data.dtype != np.float32:
            return operand
        bits = operand.data.view(np.uint32) & np.uint32(0xFFFFE000)
        return interpreter.TensorHandle(bits.view(np.float32), operand.dtype)

    def tensor_core_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32:
            a, b = truncated(a), truncated(b)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", tensor_core_dot)


@requires_triton
def test_tf32_split_is_exact_and_rounds_to_nearest():
    """`_tf32_split`: x = big + small exactly, big on TF32's 10-bit mantissa and nearest to x (ties away from zero),
    and each product of `_dot`'s three TF32 terms (the small parts truncated to TF32 as a tensor core takes them)
    within 1.25·2^-20 of |a|·|b|, the bound its docstring states."""
    import triton
    import triton.language as tl

    import transxnet_kernels.triton.osra_attention  # noqa: F401 (the kernel reaches it through the global tk)

    @triton.jit
    def split_kernel(x_ptr, big_ptr, small_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        big, small = tk.triton.osra_attention._tf32_split(tl.load(x_ptr + offs))
        tl.store(big_ptr + offs, big)
        tl.store(small_ptr + offs, small)

    gen = torch.Generator().manual_seed(0)
    n = 4096
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 30, (n,), generator=gen).float())
    tie = torch.tensor([1.0 + 2.0**-11, -(1.0 + 3 * 2.0**-11), 3.0 * 2.0**-11, 1.0 + 2.0**-12])  # two ties, two not
    x = torch.cat([tie, x[tie.numel() :]]).to(DEVICE)
    big, small = torch.empty_like(x), torch.empty_like(x)
    split_kernel[(1,)](x, big, small, N=n)
    x, big, small = x.cpu(), big.cpu(), small.cpu()
    assert torch.equal(big + small, x)
    assert not (big.view(torch.int32) & 0x1FFF).any()
    half_ulp = torch.ldexp(torch.ones(n), torch.frexp(x).exponent - 12)  # half of TF32's ulp at x
    assert (small.abs() <= half_ulp).all()
    ties = small.abs() == half_ulp
    assert ties[:2].all() and not ties[2:4].any() and (big[ties].abs() > x[ties].abs()).all()
    assert torch.equal(big[:4], torch.tensor([1.0 + 2.0**-10, -(1.0 + 2 * 2.0**-10), 3.0 * 2.0**-11, 1.0]))

    def tensor_core(v):  # fp32 -> TF32 by dropping the 13 low bits
        return (v.view(torch.int32) & ~0x1FFF).view(torch.float32).double()

    a, b = x[: n // 2], x[n // 2 :]
    a_big, a_small, b_big, b_small = big[: n // 2], small[: n // 2], big[n // 2 :], small[n // 2 :]
    three = tensor_core(a_small) * b_big.double() + a_big.double() * tensor_core(b_small) + a_big.double() * b_big
    error = (three - a.double() * b.double()).abs() / (a.double() * b.double()).abs()
    assert error.max() <= 1.25 * 2.0**-20
    assert error.max() > 2.0**-22  # the bound is near what the split reaches, not loose by orders


@requires_triton
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("case", [CASES[0], CASES[4], (2, 1, 128, 49, 16, (1, 1)), CASES[2]], ids=case_id)
def test_triton_fp32_on_tf32_tensor_cores_within_fp32_tolerance(
    case, capability, tf32_tensor_cores, nan_poisoned_empty
):
    """fp32 without TF32 allowed, the dots' TF32 inputs truncated as a tensor core takes them: the short path's 3xTF32
    (`_dot`; its backward on sm_90, the forward on both) and the flash kernels' IEEE dots meet fp32's tolerance, output
    and every gradient."""
    from transxnet_kernels.triton import common

    with common.launch_overrides(dataclasses.replace(common.launch_target(DEVICE), capability=capability)):
        check_op(TRITON, OP, osra_args(*case))


@requires_triton
def test_triton_tf32_tensor_core_emulation_misses_fp32_tolerance(tf32_allowed, tf32_tensor_cores):
    """The control of the test above: plain TF32 dots through the same emulation miss fp32's tolerance (and meet
    fp16's), so the emulation does drop the bits a tensor core ignores."""
    args = osra_args(*CASES[0])
    with pytest.raises(AssertionError, match="output"):
        check_op(TRITON, OP, args)
    check_op(TRITON, OP, osra_args(*CASES[0]), tol=TOLERANCE[torch.float16])


@requires_triton
def test_triton_fp32_dot_precision_follows_the_users_tf32_setting(request):
    """fp32 dots: TF32 only once the user allowed it for matmuls, else 3xTF32 on the short path and IEEE in the
    flash kernels; fp64 IEEE; fp16/bf16 their own tensor-core inputs."""
    from transxnet_kernels.triton import osra_attention as triton_osra

    def precisions(dtype=torch.float32):
        q = torch.empty(1, 1, 4, 8, dtype=dtype)
        return (triton_osra._short_precision(q),) + tuple(triton_osra._config(q, k).precision for k in ("fwd", "dq"))

    assert precisions() == ("tf32x3", "ieee", "ieee")
    assert precisions(torch.float64) == ("ieee",) * 3
    assert precisions(torch.bfloat16) == ("tf32",) * 3
    request.getfixturevalue("tf32_allowed")
    assert precisions() == ("tf32",) * 3
    assert precisions(torch.float64) == ("ieee",) * 3


@requires_triton
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize(
    "case,rows",
    [
        (CASES[0], {80: 32, 90: 16}),  # batch groups; N = 37: q in scalars, the smaller backward tiles
        (CASES[4], {80: 32, 90: 16}),  # several query blocks' dk/dv partials
        ((2, 1, 128, 49, 16, (1, 1)), {80: 64, 90: 32}),  # N and q's strides multiples of 16: the larger ones
        (CASES[2], {80: 16, 90: 16}),  # flash kernels (M = 130)
    ],
    ids=lambda c: case_id(c) if isinstance(c, tuple) else None,
)
def test_triton_fp32_with_tf32_allowed(case, rows, capability, tf32_allowed, nan_poisoned_empty):
    """fp32 with TF32 allowed for matmuls, planned as for sm_80 and sm_90: the short path's TF32 tiles (its backward
    on sm_8x too, where it leaves the flash kernels) and the flash kernels' TF32 dots. Within fp16's tolerance: TF32
    keeps fp16's 10-bit mantissa (the interpreter's dots are exact)."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import osra_attention as triton_osra

    args = osra_args(*case)
    q, k, _, bias, _ = args
    with common.launch_overrides(dataclasses.replace(common.launch_target(DEVICE), capability=capability)):
        short = triton_osra._short_path(q, k, bias, q.shape[-1] ** -0.5, "bwd")
        assert short == (k.shape[2] <= triton_osra.SHORT_PATH_MAX_KEYS)
        cfg = triton_osra._short_config(q, k, bias, "bwd") if short else triton_osra._config(q, "dq")
        assert (cfg.precision, cfg.block_n) == ("tf32", rows[capability])
        check_op(TRITON, OP, args, tol=TOLERANCE[torch.float16])


@requires_triton
def test_triton_short_path_choice(request):
    """Short path for M <= 64 keys and a positive scale, except the fp32 backward on sm_8x (flash kernels) unless
    TF32 is allowed."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import osra_attention as triton_osra

    def short(kernel, capability, M=49, scale=0.2, dtype=torch.float32, int32_span_limit=common.INT32_SPAN_LIMIT):
        q, k = torch.empty(1, 1, 4, 8, dtype=dtype), torch.empty(1, 1, M, 8, dtype=dtype)
        target = common.LaunchTarget(132, interpreted=False, int32_span_limit=int32_span_limit, capability=capability)
        with common.launch_overrides(target):
            return triton_osra._short_path(q, k, None, scale, kernel)

    assert [short("fwd", 80), short("fwd", 90), short("bwd", 86), short("bwd", 90)] == [True, True, False, True]
    assert short("bwd", 80, dtype=torch.bfloat16) and short("bwd", 80, dtype=torch.float16)
    request.getfixturevalue("tf32_allowed")  # TF32 allowed: the sm_8x fp32 backward's one-pass dots fit
    assert short("bwd", 80) and short("bwd", 86)
    assert not short("fwd", 90, M=65) and not short("fwd", 90, scale=0.0) and not short("fwd", 90, scale=-1.0)
    # The one-pass backward addresses in int32 only; its largest offset here is k's and the dk/dv partials', 391.
    assert short("bwd", 90, int32_span_limit=392) and not short("bwd", 90, int32_span_limit=391)
    assert short("fwd", 90, int32_span_limit=0)  # the forward has an int64 variant


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=case_id)
@pytest.mark.parametrize("capability", [80, 86])
def test_triton_short_backward_sums_the_bias_gradient_in_its_buffer(case, dtype, capability, nan_poisoned_empty):
    """The one-pass backward as planned for sm_8x, where it sums a batch-shared bias's gradient over each batch
    group by read-modify-writes of the group's buffer slice instead of in registers (sm_80: rows padded to the key
    block, sm_86: M keys): groups of one and of three batches, three query blocks."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import osra_attention as triton_osra

    args = osra_args(*case, dtype=dtype)
    with common.launch_overrides(dataclasses.replace(common.launch_target(DEVICE), capability=capability)):
        q, k, _, bias, _ = args
        cfg = triton_osra._short_config(q, k, bias, "bwd")
        assert triton_osra._short_path(q, k, bias, 0.2, "bwd")
        assert not triton_osra._short_dbias_in_registers(q, cfg.block_n)
        assert triton_osra._short_dbias_rows_padded(q, cfg, False, torch.float32) == (capability == 80)
        check_op(TRITON, OP, args)


_HALF = [torch.float16] + _BF16
_D24_GROUPS = (5, 2, 37, 49, 24, (1, 2))  # CASES[1] with d = 24: 3 of the 32-wide tile's 4 quarters
_ROWS_ALIGNED_GROUPS = (5, 2, 144, 49, 21, (1, 2))  # N = 144: sm_80's 128-row plan (two query blocks), one group


@requires_triton
@pytest.mark.parametrize(
    "dtype,case,capability,tf32,row",
    [(d, CASES[0], 90, False, 64) for d in _HALF]  # one batch per group: 16-bit slices, rows of the key block
    + [(d, CASES[1], 90, False, 64) for d in _HALF]  # groups of 3 batches, d = 21: fp32 slices, bound by issue
    + [(d, _D24_GROUPS, 90, False, 49) for d in _HALF]  # d = 24: fp32 slices keep rows of M keys
    + [(torch.float32, CASES[1], 90, False, 64), (torch.float32, _D24_GROUPS, 90, False, 64)]  # 3xTF32: any d
    + [(torch.float32, CASES[1], 90, True, 49)]  # TF32 allowed: rows of M keys
    + [(d, CASES[0], 86, False, 49) for d in _HALF]  # sm_86: summed in the buffer, rows of M keys
    + [(d, _ROWS_ALIGNED_GROUPS, 80, False, 64) for d in _HALF]  # sm_80's 128-row kernel at d = 21: fp32 slices padded
    + [(d, _ROWS_ALIGNED_GROUPS[:4] + (24, (1, 2)), 80, False, 49) for d in _HALF],  # at d = 24, rows of M keys
    ids=lambda p: dtype_id(p) if isinstance(p, torch.dtype) else case_id(p) if isinstance(p, tuple) else str(p),
)
def test_triton_short_backward_pads_slice_rows(case, capability, tf32, row, dtype, monkeypatch, nan_poisoned_empty):
    """The register sum's bias-gradient slices (sm_90, sm_80's 128-row kernel) are stored in rows padded to the 64-key
    block (whole rows in vectors: `_short_dbias_rows_padded`) where they are 16-bit (sm_90), and where fp32 slices
    cost less padded: under 3xTF32, and in 16 bits where d fills at most two thirds of the d tile; the padded keys'
    dS is 0 and dropped before the sum. The gradient matches the fp64 reference whatever the rows."""
    from benchmarks.common import tf32_matmuls
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import osra_attention as triton_osra

    buffers = _recording_dbias_buffers(monkeypatch)
    args = osra_args(*case, dtype=dtype)
    with (
        tf32_matmuls(tf32),
        common.launch_overrides(dataclasses.replace(common.launch_target(DEVICE), capability=capability)),
    ):
        q, k, _, bias, _ = args
        block_n = triton_osra._short_config(q, k, bias, "bwd").block_n
        if capability == 80:
            assert block_n == 128  # the 128-row kernel, which sums in registers
        assert triton_osra._short_dbias_in_registers(q, block_n) == (capability in (80, 90))
        check_op(TRITON, OP, args)
    assert buffers and {b.shape[-1] for b in buffers} == {row}


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + _BF16, ids=dtype_id)
@pytest.mark.parametrize(
    "kv_layout,programs,direct",
    [("shared", 10**6, True), ("shared", 1, "16-bit"), ("own", 10**6, False)],
    ids=["model-layout", "register-group-sum", "own-layouts"],
)
def test_triton_short_backward_stores_one_query_blocks_dk_dv_in_place(
    kv_layout, programs, direct, dtype, monkeypatch, nan_poisoned_empty
):
    """With one query block the one-pass backward stores dk and dv in place (DKV_DIRECT: no partials, no arrival
    sum) where they share a layout, as the model's k and v do; beside a bias-gradient sum held in registers over
    several batches (one batch group here) only where the bias tile is held in its 16-bit dtype (as on sm_90); not
    where their layouts differ; the gradients match fp64 each way."""
    from transxnet_kernels.triton import osra_attention as triton_osra

    launched = record_launches(
        monkeypatch, triton_osra, "_osra_bwd_short_kernel", lambda args, kwargs: kwargs["DKV_DIRECT"]
    )
    B, h, N, M, d = 5, 2, 13, 49, 21  # N within one query block (fp32's 16 rows too); 5 batches
    q, k, v, bias, scale = osra_args(B, h, N, M, d, (1, h), dtype=dtype)
    if kv_layout == "shared":  # v, like k, a transposed view of [B, h, d, M] memory
        v = randn(B, h, d, M, dtype=dtype, gen=torch.Generator().manual_seed(3), device=DEVICE).transpose(-1, -2)
        v.requires_grad_()
    assert (k.stride() == v.stride()) == (kv_layout == "shared")
    assert triton_osra._short_config(q, k, bias, "bwd").block_n >= N
    with _short_path_programs(programs):
        check_op(TRITON, OP, (q, k, v, bias, scale))
    if direct == "16-bit":
        direct = dtype != torch.float32
    assert launched == [direct]


@requires_triton
@pytest.mark.parametrize("dtype", [d for d in (torch.float16, torch.bfloat16) if d in TRITON_DTYPES], ids=dtype_id)
def test_triton_short_backward_holds_a_16bit_bias_tile(dtype, nan_poisoned_empty):
    """The 128-row one-pass backward as planned for sm_80: the batch-shared 16-bit bias held in its own dtype across
    the batch loop and turned into the scores' fp32 start per batch (BIAS_TILE_RAW), the bias gradient summed in
    registers; N = 144 (a multiple of 16, as the plan needs: two query blocks, the second 16 rows), the five batches
    in groups that share the tile. bf16 where Triton runs it (not interpreted)."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import osra_attention as triton_osra

    args = osra_args(5, 2, 144, 49, 12, (1, 2), dtype=dtype)
    with common.launch_overrides(dataclasses.replace(common.launch_target(DEVICE), capability=80)):
        q, k, _, bias, _ = args
        cfg = triton_osra._short_config(q, k, bias, "bwd")
        block_n = cfg.block_n
        _, per_group = triton_osra._short_path_groups(bias, 5, 2, 2, q.device, True, cfg.precision)
        assert block_n == 128 and triton_osra._short_dbias_in_registers(q, block_n) and per_group > 1
        check_op(TRITON, OP, args)


def _short_path_programs(programs: int):
    """The launch settings of this device with `programs` as the short path's floor on programs per launch (which
    sets its batch groups: 1, one group; 10**6, one batch per group), as a context."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import osra_attention as triton_osra

    settings = triton_osra.Settings.for_target(common.launch_target(DEVICE))
    return common.launch_overrides(dataclasses.replace(settings, short_path_programs=programs))


def _recording_dbias_buffers(monkeypatch) -> list:
    """The bias-gradient buffers the Triton backward allocates from now on in the test (a spy on `_dbias_buffer`)."""
    from transxnet_kernels.triton import osra_attention as triton_osra

    buffers, make_buffer = [], triton_osra._dbias_buffer

    def recording_buffer(*args, **kwargs):
        made = make_buffer(*args, **kwargs)
        buffers.append(made[0])
        return made

    monkeypatch.setattr(triton_osra, "_dbias_buffer", recording_buffer)
    return buffers


def _recording_tensor_sums(monkeypatch) -> list:
    """The shapes of the tensors `Tensor.sum` reduces from now on in the test (a spy: how the backward sums its
    bias-gradient slices, in the kernel or in torch)."""
    shapes, real_sum = [], torch.Tensor.sum

    def recording_sum(tensor, *args, **kwargs):
        shapes.append(tuple(tensor.shape))
        return real_sum(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sum", recording_sum)
    return shapes


@requires_triton
@pytest.mark.parametrize(
    "dtype,bias_dtype,case,capability,partial_dtype",
    [
        (torch.float16, None, CASES[0], None, torch.float16),  # a batch per group: each slice one batch's dS
        (torch.float16, None, CASES[5], None, torch.float16),  # a head-broadcast bias: one (batch, head)'s dS each
        (torch.float16, None, CASES[0], 86, torch.float16),  # the sm_86 kernel, its slice summed in the buffer
        (torch.float16, None, CASES[1], None, torch.float32),  # groups of 3 batches summed in registers
        (torch.float16, None, CASES[2], None, torch.float32),  # flash: a group of 3 summed in the buffer
        (torch.float16, torch.float32, CASES[0], None, torch.float32),  # eager forms this bias's dS in fp32
        (torch.float32, None, CASES[5], None, torch.float32),
    ]
    + [(d, None, CASES[0], None, d) for d in _BF16]
    + [(d, None, CASES[1], None, torch.float32) for d in _BF16],
    ids=lambda p: dtype_id(p) if isinstance(p, torch.dtype) else case_id(p) if isinstance(p, tuple) else str(p),
)
def test_triton_bias_gradient_partials_dtype(dtype, bias_dtype, case, capability, partial_dtype, monkeypatch):
    """The bias-gradient slices the backward writes and torch sums afterwards are in the bias's 16-bit dtype where q
    shares it and a slice holds one batch's dS (`_dbias_partial_dtype`: eager's rounding of each batch's dS, half the
    bytes), in fp32 where a slice sums several batches or eager computes in fp32; the gradient matches the fp64
    reference either way."""
    from transxnet_kernels.triton import common

    buffers = _recording_dbias_buffers(monkeypatch)
    q, k, v, bias, scale = osra_args(*case, dtype=dtype)
    if bias_dtype is not None:
        bias = bias.detach().to(bias_dtype).requires_grad_()
    target = common.launch_target(DEVICE)
    if capability is not None:
        target = dataclasses.replace(target, capability=capability)
    with common.launch_overrides(target):
        check_op(TRITON, OP, (q, k, v, bias, scale))
    assert buffers and {b.dtype for b in buffers} == {partial_dtype}


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("programs", [1, 10**6], ids=["one-group", "group-per-batch"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[8]], ids=case_id)
def test_triton_short_backward_sums_its_dkdv_partials(case, programs, dtype, monkeypatch, nan_poisoned_empty):
    """The one-pass backward's last query-block program of each (head, batch group) sums the group's dk/dv
    partials itself, no separate sum launch: one batch group or one per batch, one query block (fp16, N = 37) or
    several (fp32's 16 rows; fp16's 64 for N = 150), a batch-shared or a per-batch bias."""
    from transxnet_kernels.triton import osra_attention as triton_osra

    class NotLaunched:
        def __getitem__(self, grid):
            raise AssertionError("the short backward launched _osra_dkdv_sum_kernel")

    monkeypatch.setattr(triton_osra, "_osra_dkdv_sum_kernel", NotLaunched())
    args = osra_args(*case, dtype=dtype)
    with _short_path_programs(programs):
        q, k, _, bias, _ = args
        assert triton_osra._short_path(q, k, bias, 0.2, "bwd")
        check_op(TRITON, OP, args)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize(
    "N,bias_shape,programs,summed",
    [
        (37, (1, 2), 10**6, (True, False, False)),  # a group per batch, summed per head; 37·49 keys: scalar loads
        (68, (1, 2), 10**6, (True, False, True)),  # 68·49 a multiple of 4: vectors
        (37, (1, 1), 10**6, (True, True, False)),  # a head-broadcast bias: the groups and heads summed
        (37, (1, 2), 1, (False, False, False)),  # one group: its slice is the gradient
        (37, (3, 2), 10**6, (False, False, False)),  # a per-batch bias: nothing to sum
    ],
    ids=["groups", "groups-aligned", "groups-and-heads", "one-group", "per-batch"],
)
def test_triton_short_backward_sums_the_bias_gradient_in_kernel(
    N, bias_shape, programs, summed, dtype, monkeypatch, nan_poisoned_empty
):
    """The one-pass backward's last program writing each query block's rows of a batch-shared bias's gradient slices
    sums them (over the groups, and the heads for a head-broadcast bias) into the gradient itself, in the bias's
    dtype (DBIAS_SUMMED); every output and gradient against fp64, and no torch sum after the launch."""
    from transxnet_kernels.triton import osra_attention as triton_osra

    flags = ("DBIAS_SUMMED", "DBIAS_HEADS_SUMMED", "DBIAS_SUM_ALIGNED")
    launched = record_launches(
        monkeypatch, triton_osra, "_osra_bwd_short_kernel", lambda a, kw: tuple(kw[f] for f in flags)
    )
    sums = _recording_tensor_sums(monkeypatch)
    with _short_path_programs(programs):
        check_op(TRITON, OP, osra_args(3, 2, N, 49, 12, bias_shape, dtype=dtype))
    assert launched == [summed]
    if summed[0]:
        assert not [shape for shape in sums if len(shape) == 4 and shape[-1] >= 49], "a torch sum of bias slices"


@requires_triton
@pytest.mark.parametrize(
    "dtype,B,h,N,bias_shape,programs,set_slices,sets,capability",
    [
        (torch.float32, 5, 1, 37, (1, 1), 10**6, 2, 3, None),  # a batch per group, sets of 2 groups, the last of 1
        (torch.float32, 5, 2, 37, (1, 1), 10**6, 2, 5, None),  # groups and heads summed: a set per group, its 2 heads
        (torch.float16, 5, 1, 150, (1, 1), 6, 1, 2, None),  # fp16 in groups of 3 and 2 batches (fp32 slices)
        (torch.float16, 5, 1, 150, (1, 1), 10**6, 2, 3, 90),  # sm_90: one batch's fp16 slices, rows padded to 64 keys
    ],
    ids=["groups", "groups-and-heads", "fp16-batch-groups", "fp16-padded-rows-sm90"],
)
def test_triton_short_backward_sums_the_bias_gradient_in_sets(
    dtype, B, h, N, bias_shape, programs, set_slices, sets, capability, monkeypatch, nan_poisoned_empty
):
    """Where its query blocks (x heads) are too few last arrivers to share the bias gradient's sum
    (`Settings.dbias_sum_min_programs`), the one-pass backward sums the group slices in sets of at most
    `Settings.dbias_set_slices` slices, a set's last arriver storing its fp32 sum; torch sums the sets: every output
    and gradient against fp64, the kernel launched with DBIAS_IN_SETS and torch's sum over [sets, heads, N, M]."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import osra_attention as triton_osra

    flags = ("DBIAS_SUMMED", "DBIAS_IN_SETS", "DBIAS_ROWS_PADDED")
    launched = record_launches(
        monkeypatch, triton_osra, "_osra_bwd_short_kernel", lambda a, kw: tuple(kw[f] for f in flags)
    )
    sums = _recording_tensor_sums(monkeypatch)
    target = common.launch_target(DEVICE)
    if capability is not None:
        target = dataclasses.replace(target, capability=capability)
    settings = triton_osra.Settings.for_target(target)
    settings = dataclasses.replace(
        settings, short_path_programs=programs, dbias_sum_min_programs=4, dbias_set_slices=set_slices
    )
    with common.launch_overrides(target, settings):
        check_op(TRITON, OP, osra_args(B, h, N, 49, 12, bias_shape, dtype=dtype))
    assert launched == [(True, True, capability == 90)]
    assert (sets, 1, N, 49) in sums


def test_batch_groups_balance_the_busiest_sm():
    """Short-path batch groups: the longest groups above the floor on programs end on a ragged last wave, so the
    group length is the one whose busiest SM does least (programs on it x (batches + prologue)). T stage 1 on an
    H100 (25 query blocks, batch 128): the forward's 4 per SM takes 26 groups of 5 (650 programs, 5 on the
    busiest SM) over 22 of 6 (550: also 5, each a batch longer); the backward's 8 per SM keeps 43 of 3 (9 a SM);
    one SM (interpreted) takes the fewest groups; a serial tail per batch of a group shortens the groups."""
    from transxnet_kernels.triton.common import balanced_batch_groups, fewest_batch_groups

    assert balanced_batch_groups(128, 25, 4 * 132, 132, 1.0) == (26, 5)
    assert balanced_batch_groups(128, 25, 8 * 132, 132, 1.0) == (43, 3)
    assert balanced_batch_groups(10, 2, 4, 1, 1.0) == fewest_batch_groups(10, 2, 4) == (2, 5)
    # A serial tail per batch of a group (the backward's last-arriver dk/dv sum over Q query blocks, 2Q·0.02 batches'
    # worth each): T stage 1 fp32 (196 query blocks of 16 rows) goes from 8 groups of 16 to 32 of 4; bf16 (25 blocks of
    # 128) keeps 43 of 3.
    assert balanced_batch_groups(128, 196, 8 * 132, 132, 1.0) == (8, 16)
    assert balanced_batch_groups(128, 196, 8 * 132, 132, 1.0, 2 * 196 * 0.02) == (32, 4)
    assert balanced_batch_groups(128, 25, 8 * 132, 132, 1.0, 2 * 25 * 0.02) == (43, 3)
    # The backward weighs its sum only where it is long (Settings.partial_sum_min_batches): fp32's 196 blocks at T
    # stage 1 on an H100, not bf16's 25 (whose shorter groups on an A100 cost more bias-gradient bytes than they saved).
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import osra_attention as triton_osra

    bias = torch.empty(1, 1, 3136, 49)
    for sm_count, query_blocks, groups in [(132, 196, (32, 4)), (132, 25, (43, 3)), (108, 25, (32, 4))]:
        with common.launch_overrides(common.LaunchTarget(sm_count=sm_count, interpreted=False, capability=90)):
            assert triton_osra._short_path_groups(bias, 128, query_blocks, 1, bias.device, True, "tf32") == groups
    # The fp32 backward under 3xTF32 pays a shorter prologue against its longer batch trip
    # (Settings.tf32x3_backward_prologue_batches): B stage 3 on an H100 (13 query blocks of 16 rows, 8 heads) takes
    # 16 groups of 8 where 11 of 12 had a smaller busiest SM at a prologue of a whole batch; the forward keeps 1.0
    with common.launch_overrides(common.LaunchTarget(sm_count=132, interpreted=False, capability=90)):
        assert triton_osra._short_path_groups(bias, 128, 13, 8, bias.device, True, "tf32x3") == (16, 8)
        assert triton_osra._short_path_groups(bias, 128, 13, 8, bias.device, True, "tf32") == (11, 12)
        # (13 query blocks x 4 heads: 15 groups of 9 at 0.4)
        assert triton_osra._short_path_groups(bias, 128, 13, 4, bias.device, False, "tf32x3") == (12, 11)
    for B, per_batch, floor, sms in [(128, 25, 528, 132), (128, 4, 864, 108), (37, 3, 264, 132), (1, 7, 528, 132)]:
        groups, per_group = balanced_batch_groups(B, per_batch, floor, sms, 1.0)
        # Never longer groups than the fewest that reach the floor (fewer programs).
        assert groups == -(-B // per_group) and per_group <= fewest_batch_groups(B, per_batch, floor)[1]


def test_query_vector_divides_n_and_the_query_strides():
    """The queries' vector (`_query_alignment`): the most elements up to 16 bytes dividing N and the strides of q's
    dims longer than 1, in the model's layout (queries contiguous); 1 otherwise. TransXNet at 224^2: N = 196
    (stage 3) takes 4 in bf16 and fp32, 784 takes 16 bytes, 49 none. Q_VECTOR, the short-path kernels' promise that
    N and q's strides are its multiples (they restate them so): the alignment, or 1 where N and all four strides
    are multiples of 16, which Triton's specialisation already says."""
    from transxnet_kernels.triton.osra_attention import _query_alignment, _query_vector

    def model_q(B, h, N, d, dtype):
        return torch.empty(B, h, d, N, dtype=dtype).transpose(-1, -2)

    assert _query_alignment(model_q(2, 8, 196, 21, torch.bfloat16)) == 4
    assert _query_alignment(model_q(2, 8, 196, 21, torch.float32)) == 4
    assert _query_alignment(model_q(2, 4, 784, 19, torch.bfloat16)) == 8
    assert _query_alignment(model_q(2, 2, 3136, 24, torch.float64)) == 2
    assert _query_alignment(model_q(2, 16, 49, 21, torch.float16)) == 1
    assert _query_alignment(torch.empty(2, 8, 196, 20)) == 1  # d contiguous: no vector along the queries
    # A size-1 dim's stride never moves the index (always 0), so it constrains nothing; the others still do.
    assert _query_alignment(model_q(1, 1, 12, 5, torch.float32)) == 4
    assert _query_alignment(torch.empty(300).as_strided((2, 1, 12, 5), (150, 150, 1, 12))) == 2  # batch stride 150
    odd_batch = torch.empty(2 * 8 * 21 * 196 + 2 * 3, dtype=torch.bfloat16)
    q = odd_batch.as_strided((2, 8, 196, 21), (8 * 21 * 196 + 3, 21 * 196, 1, 196))
    assert _query_alignment(q) == 1
    assert _query_vector(model_q(2, 8, 196, 21, torch.bfloat16)) == 4
    assert _query_vector(model_q(2, 4, 784, 24, torch.bfloat16)) == 1  # 784, 24 * 784, ...: all multiples of 16
    padded_batch = torch.empty(1000, dtype=torch.bfloat16).as_strided((2, 3, 32, 5), (488, 160, 1, 32))
    assert _query_vector(padded_batch) == 8  # the batch stride, 488, is a multiple of 8, not of 16


def test_triton_short_path_rows_per_program(request):
    """Query rows (and warps) per program: the half-precision backward takes 128 on sm_90+ (and interpreted) when
    its queries move in vectors of 4 or more (`_query_vector`: the model's layout at N = 3136, 784, 196), else 64
    (N = 49, or d contiguous); on sm_80 128 only with a batch-shared 16-bit bias where Triton's specialisation
    already knows the vectors (N = 3136, 784), else 64 (and always on sm_86); the fp32 backward 16 rows on 4 warps
    (one per 16-row mma tile); a forward never takes more rows than N (rounded up to a power of two),
    then 16 rows per warp; the fp32 forward on sm_8x 16 rows on 4 warps. fp32 with TF32
    allowed: the backward 32 rows on 4 warps on sm_90, 64 on sm_8x, where Triton's specialisation knows the query
    vectors (N = 3136), else 16 and 32; the forward as fp32's, 128 rows on sm_8x too (the configurations the static
    GPU audit finds spill-free)."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import osra_attention as triton_osra

    def rows_and_warps(kernel, capability, N, dtype=torch.bfloat16, model_layout=True, bias_dtype=None):
        q = torch.empty(1, 1, 24, N, dtype=dtype).transpose(-1, -2) if model_layout else torch.empty(1, 1, N, 24)
        k = torch.empty(1, 1, 49, 24, dtype=dtype)
        bias = None if bias_dtype is None else torch.empty(1, 1, 49, N, dtype=bias_dtype).transpose(-1, -2)
        target = common.LaunchTarget(sm_count=132, interpreted=capability == 0, capability=capability)
        with common.launch_overrides(target):
            cfg = triton_osra._short_config(q.to(dtype), k, bias, kernel)
        return cfg.block_n, cfg.num_warps

    bwd = [rows_and_warps("bwd", c, N) for c, N in ((90, 3136), (0, 784), (90, 196), (90, 49), (80, 3136))]
    assert bwd + [rows_and_warps("bwd", 90, 3136, model_layout=False)] == [(128, 8)] * 3 + [(64, 8)] * 3
    # sm_8x: 128 rows only with a batch-shared 16-bit bias and N a multiple of 16 (stages 1-2).
    sm8x = [rows_and_warps("bwd", 80, N, bias_dtype=torch.bfloat16) for N in (3136, 784, 196, 49)]
    assert sm8x == [(128, 8), (128, 8), (64, 8), (64, 8)]
    assert rows_and_warps("bwd", 80, 3136, torch.float16, bias_dtype=torch.float16) == (128, 8)
    assert rows_and_warps("bwd", 86, 3136, bias_dtype=torch.bfloat16) == (64, 8)  # sm_86 spilled at 128
    assert rows_and_warps("bwd", 80, 3136, bias_dtype=torch.float32) == (64, 8)
    fp32_bwd = [rows_and_warps("bwd", 90, N, torch.float32) for N in (3136, 784, 196, 49)]
    assert fp32_bwd == [(16, 4)] * 4
    half_fwd = [rows_and_warps("fwd", c, N) for c, N in ((90, 3136), (90, 49), (80, 49), (90, 20))]
    assert half_fwd == [(128, 8), (64, 4), (64, 4), (32, 2)]
    fp32_fwd = [rows_and_warps("fwd", c, N, torch.float32) for c, N in ((90, 3136), (90, 49), (90, 20), (80, 3136))]
    assert fp32_fwd == [(128, 8), (64, 4), (32, 2), (16, 4)]
    request.getfixturevalue("tf32_allowed")  # fp32 with TF32 allowed
    tf32_bwd = [rows_and_warps("bwd", c, N, torch.float32) for c, N in ((90, 3136), (90, 49), (80, 3136), (86, 49))]
    assert tf32_bwd == [(32, 4), (16, 4), (64, 4), (32, 4)]
    tf32_fwd = [rows_and_warps("fwd", c, N, torch.float32) for c, N in ((90, 3136), (80, 3136), (86, 49))]
    assert tf32_fwd == [(128, 8), (128, 8), (64, 4)]


def test_triton_short_forward_register_budget():
    """The half-precision forward at 128 query rows launches under a 128-register budget on sm_90+ (two 8-warp
    blocks per SM, `_SHORT_FWD_HALF_REGISTERS_SM90`); not on sm_8x, not in fp32, not at 64 rows (N = 49)."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import osra_attention as triton_osra

    def budgeted(capability, N, dtype=torch.bfloat16):
        q = torch.empty(1, 1, 24, N, dtype=dtype).transpose(-1, -2)
        k = torch.empty(1, 1, 49, 24, dtype=dtype)
        with common.launch_overrides(common.LaunchTarget(sm_count=132, interpreted=False, capability=capability)):
            return triton_osra._short_fwd_register_budget(q, triton_osra._short_config(q, k, None, "fwd"))

    assert budgeted(90, 3136) and budgeted(90, 196, torch.float16)
    assert not any([budgeted(80, 3136), budgeted(86, 3136), budgeted(90, 3136, torch.float32), budgeted(90, 49)])


def test_triton_short_forward_sum_columns_and_key_row_stride():
    """The one-pass forward's compile-time choices: fp16/bf16 with room in the head-dim block put the softmax row sum
    in V's last 8, 4 or 2 padded columns (none at d = 31 or 32, none in fp32); keys contiguous (the model's k and v,
    [B, h, d, M] memory) give their head-dim stride, M, else 0."""
    from transxnet_kernels.triton import osra_attention as triton_osra

    def sum_columns_from(d, dtype=torch.float16):
        q, k = torch.empty(1, 1, 196, d, dtype=dtype), torch.empty(1, 1, 49, d, dtype=dtype)
        return triton_osra._sum_columns_from(q, triton_osra._short_config(q, k, None, "fwd"))

    assert [sum_columns_from(d) for d in (8, 12, 19, 21, 24, 28, 30, 31, 32)] == [8, 12, 24, 24, 24, 28, 30, 0, 0]
    assert sum_columns_from(19, torch.bfloat16) == 24 and sum_columns_from(19, torch.float32) == 0
    model_k = torch.empty(2, 3, 21, 49).transpose(-1, -2)
    assert triton_osra._key_row_stride(model_k) == 49
    assert triton_osra._key_row_stride(torch.empty(2, 3, 49, 21)) == 0


@requires_triton
@pytest.mark.parametrize("d", [19, 28, 30, 31], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("transposed", [True, False], ids=["model", "contiguous"])
def test_triton_short_forward_row_sums_from_v_padding(d, transposed, monkeypatch, nan_poisoned_empty):
    """fp16 forward (and the backward, from its lse) against the fp64 reference where P @ V carries the row sums in
    8 (d = 19), 4 (d = 28) or 2 (d = 30) padded columns of V, or none (d = 31); k and v in the model's layout
    (KEY_ROW_STRIDE = M) or contiguous. The lse is checked too: the backward recomputes P from it."""
    from transxnet_kernels.triton import osra_attention as triton_osra

    launched = record_launches(
        monkeypatch,
        triton_osra,
        "_osra_fwd_short_kernel",
        lambda args, kwargs: (kwargs["SUM_COLUMNS_FROM"], kwargs["KEY_ROW_STRIDE"]),
    )
    q, k, v, bias, scale = osra_args(3, 2, 37, 49, d, (1, 2), dtype=torch.float16, transposed=transposed)
    if transposed:  # v, like k, a transposed view of [B, h, d, M] memory (the model's)
        v = v.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
        assert v.stride() == k.stride()
    check_op(TRITON, OP, (q, k, v, bias, scale))
    with torch.no_grad(), TRITON.active():
        _, lse = torch.ops.transxnet_triton.osra_attention(q, k, v, bias, d**-0.5)
    scores = q.double() @ k.double().transpose(-1, -2) * d**-0.5 + bias.double()
    assert_rel_close(lse, torch.logsumexp(scores, -1), TOLERANCE[torch.float16], "lse")
    expected = {19: 24, 28: 28, 30: 30, 31: 0}[d]
    assert set(launched) == {(expected, 49 if transposed else 0)}


def test_padded_bias_copy():
    """The short-path kernels' copy of a batch-shared bias: [h, N, BLOCK_M], the bias's values and -inf past M keys;
    strides (batch 0, head, row, 1), the head's 0 for a head-broadcast bias."""
    from transxnet_kernels.triton import osra_attention as triton_osra

    gen = torch.Generator().manual_seed(4)
    bias = randn(1, 3, 49, 37, gen=gen).transpose(-1, -2)  # [1, h, N = 37, M = 49], the model's transposed view
    cfg = triton_osra._Config(64, 64, 32, "ieee", True, 4, 1)
    padded, strides = triton_osra._padded_bias(bias, cfg)
    assert padded.shape == (3, 37, 64) and strides == (0, 37 * 64, 64, 1)
    assert torch.equal(padded[..., :49], bias[0]) and bool((padded[..., 49:] == float("-inf")).all())
    broadcast, strides = triton_osra._padded_bias(bias[:, :1], cfg)
    assert broadcast.shape == (1, 37, 64) and strides == (0, 0, 64, 1)


def test_dkdv_partials_slices_start_aligned():
    """The short backward's dk and dv partials: [query blocks, B, h, M, d] views of one buffer whose (block, b, head)
    slices are M·d contiguous elements starting at multiples of 4, which the last program sums in aligned vectors
    (M·d = 49·21 = 1029 pads to 1032; 49·24 = 1176 needs none)."""
    from transxnet_kernels.triton import osra_attention as triton_osra

    dk_parts, dv_parts = triton_osra._dkdv_partials(5, torch.empty(2, 3, 49, 21), torch.float32)
    for parts in (dk_parts, dv_parts):
        assert parts.shape == (5, 2, 3, 49, 21) and parts.stride() == (6 * 1032, 3 * 1032, 1032, 21, 1)
    assert dv_parts.storage_offset() - dk_parts.storage_offset() == 5 * 6 * 1032  # one buffer, no overlap
    dk_parts, _ = triton_osra._dkdv_partials(2, torch.empty(1, 1, 49, 24, dtype=torch.float16), torch.float16)
    assert dk_parts.dtype == torch.float16 and dk_parts.stride() == (1176, 1176, 1176, 24, 1)


def test_key_padded_bias_is_recognised_whole():
    """`layout.key_padded_bias`: the bias's values in a view of a copy whose rows hold 64 keys, -inf past M, which
    `key_padded_rows` recognises, as it does views of whole rows of it (a head, a head broadcast); not a view that
    drops keys, a transposed one, an ordinary tensor, or a copy that was freed."""
    import gc

    from transxnet_kernels import layout

    gen = torch.Generator().manual_seed(4)
    bias = randn(1, 3, 37, 49, gen=gen)
    view = layout.key_padded_bias(bias)
    assert torch.equal(view, bias) and view.stride() == (3 * 37 * 64, 37 * 64, 64, 1)
    assert bool((view._base[..., 49:] == float("-inf")).all())
    assert layout.key_padded_rows(view) == 64
    assert layout.key_padded_rows(view[:, 1:2]) == layout.key_padded_rows(view[:, :1].expand(1, 3, 37, 49)) == 64
    for other in (view[..., :48], view[..., 1:], view.transpose(-1, -2), bias):
        assert layout.key_padded_rows(other) == 0
    with pytest.raises(ValueError, match="65 keys"):
        layout.key_padded_bias(randn(1, 1, 2, 65, gen=gen))
    storage = view.untyped_storage().data_ptr()
    del view
    gc.collect()
    assert storage not in layout._KEY_PADDED


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + _BF16, ids=dtype_id)
def test_triton_short_path_reads_a_key_padded_bias_in_place(dtype, monkeypatch, nan_poisoned_empty):
    """A batch-shared bias viewing `key_padded_bias`'s copy is read in place by both one-pass kernels (their padded
    tile, BIAS_PADDED): no F.pad in the forward or the backward, where an ordinary bias takes one in each; every
    output and gradient checked against fp64 either way."""
    import torch.nn.functional as F

    from transxnet_kernels.layout import key_padded_bias
    from transxnet_kernels.triton import osra_attention as triton_osra

    pads = []
    real_pad = F.pad

    def counted_pad(t, *args, **kwargs):
        pads.append(tuple(t.shape))
        return real_pad(t, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "pad", counted_pad)
    forward = record_launches(monkeypatch, triton_osra, "_osra_fwd_short_kernel", lambda a, kw: kw["BIAS_PADDED"])
    backward = record_launches(monkeypatch, triton_osra, "_osra_bwd_short_kernel", lambda a, kw: kw["BIAS_PADDED"])
    q, k, v, bias, scale = osra_args(3, 2, 37, 49, 12, (1, 2), dtype=dtype)
    with _short_path_programs(10**6):
        check_op(TRITON, OP, (q, k, v, bias, scale))
        assert pads == [(2, 37, 49)] * 2 and forward == [True] and backward == [True]
        padded_bias = key_padded_bias(bias.detach()).requires_grad_()
        pads.clear()
        check_op(TRITON, OP, (q, k, v, padded_bias, scale))
    assert pads == [] and forward == [True] * 2 and backward == [True] * 2


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + _BF16, ids=dtype_id)
@pytest.mark.parametrize(
    "bias_shape,programs,forward_padded,backward_padded",
    [
        ((1, 2), 10**6, True, True),
        ((1, 2), 1, True, "16-bit"),
        ((1, 1), 10**6, True, True),
        ((3, 2), 10**6, False, False),
    ],
    ids=["shared-one-batch-groups", "shared-register-group-sum", "head-broadcast", "per-batch"],
)
def test_triton_short_path_reads_the_padded_bias_copy(
    bias_shape, programs, forward_padded, backward_padded, dtype, monkeypatch, nan_poisoned_empty
):
    """Both one-pass kernels read a batch-shared bias from its padded copy (BIAS_PADDED); beside a bias-gradient sum
    held in registers over several batches (groups of two batches where the programs' floor allows, else of one) the
    backward does so for a 16-bit bias only, held in that dtype (BIAS_TILE_RAW); a per-batch bias is read in place.
    Output and every gradient, the bias's included, against fp64, N = 37 (a partial query block: the row mask)."""
    from transxnet_kernels.triton import osra_attention as triton_osra

    forward = record_launches(monkeypatch, triton_osra, "_osra_fwd_short_kernel", lambda a, kw: kw["BIAS_PADDED"])
    backward = record_launches(
        monkeypatch, triton_osra, "_osra_bwd_short_kernel", lambda a, kw: (kw["BIAS_PADDED"], kw["BIAS_TILE_RAW"])
    )
    args = osra_args(3, 2, 37, 49, 12, bias_shape, dtype=dtype)
    with _short_path_programs(programs):
        check_op(TRITON, OP, args)
    if backward_padded == "16-bit":  # the register group sum: the copy's tile held raw, for a 16-bit bias only
        expected_backward = (True, True) if dtype != torch.float32 else (False, False)
    else:
        expected_backward = (backward_padded, False)
    assert forward == [forward_padded] and backward == [expected_backward]


@requires_triton
def test_triton_scale_tensor_made_once_per_scale_dtype_and_device(monkeypatch):
    """The scale the kernels read by pointer is one tensor per (scale, accumulation dtype, device), kept (up to a
    bound, oldest dropped first) instead of filled at every call."""
    from transxnet_kernels.triton import common
    from transxnet_kernels.triton import osra_attention as triton_osra

    monkeypatch.setattr(common, "_SCALARS", {})
    monkeypatch.setattr(common, "_SCALARS_KEPT", 2)
    q = torch.zeros(1, 1, 2, 4, device=DEVICE)
    kept = triton_osra._scale_tensor(0.125, q)
    assert triton_osra._scale_tensor(0.125, q.half()) is kept  # fp16 computes in fp32 too
    assert (kept.dtype, kept.tolist()) == (torch.float32, [0.125])
    as_fp64 = triton_osra._scale_tensor(0.125, q.double())
    assert as_fp64 is not kept and (as_fp64.dtype, as_fp64.tolist()) == (torch.float64, [0.125])
    assert triton_osra._scale_tensor(0.25, q).tolist() == [0.25]  # a third entry: the first is dropped
    assert triton_osra._scale_tensor(0.125, q) is not kept


# ---------------------------------------------------------------------------------------- cpp


@requires_cpp
@pytest.mark.parametrize("backend", backend_params(OP, only=cpp_only))
def test_cpp_output_takes_q_layout(backend):
    for transposed in (True, False):
        q, k, v, bias, _ = osra_args(2, 3, 37, 11, 13, (1, 3), transposed=transposed, device="cpu", grad=False)
        out, _, _ = check_op(backend, OP, (q, k, v, bias))
        assert out.stride() == q.stride(), "the output takes q's (dense) layout"


@requires_cpp
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpp_output_reshapes_back_as_a_view(layout):
    """The model: q = conv_out.reshape(B, h, d, N).transpose(-1, -2); out.transpose(-1, -2).reshape(B, C, H, W)
    must be a view of out (no copy), channels_last when conv_out is."""
    gen = torch.Generator().manual_seed(5)
    B, h, d, H, W, M = 2, 3, 8, 5, 7, 6
    C, N = h * d, H * W
    conv_out = to_layout(randn(B, C, H, W, gen=gen, device="cpu"), layout)
    q = conv_out.reshape(B, h, d, N).transpose(-1, -2)
    kv = to_layout(randn(B, 2 * C, 2, 3, gen=gen, device="cpu"), layout)
    k, v = (t.reshape(B, h, d, M).transpose(-1, -2) for t in kv.chunk(2, dim=1))  # strided k/v views
    bias = randn(1, h, N, M, gen=gen, device="cpu")
    with tk.use_backend("cpp"):
        out = tk.osra_attention(q, k, v, bias)
    assert_rel_close(
        out,
        reference.osra_attention(q.double(), k.double(), v.double(), bias.double()),
        TOLERANCE[torch.float32],
        "osra",
    )
    image = out.transpose(-1, -2).reshape(B, C, H, W)
    assert image.data_ptr() == out.data_ptr() and image._base is out, "reshape copied"
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert image.is_contiguous(memory_format=memory_format)


@requires_cpp
def test_cpp_refuses_half_precision():
    q, k, v, bias, _ = osra_args(1, 2, 5, 3, 4, (1, 2), dtype=torch.float16, device="cpu", grad=False)
    with tk.use_backend("cpp"), pytest.raises(tk.BackendUnavailableError, match="dtype"):
        tk.osra_attention(q, k, v, bias)


@requires_cpp
def test_cpp_opcheck():
    op = torch.ops.transxnet_cpp.osra_attention.default
    q, k, v, bias, _ = osra_args(2, 2, 20, 13, 6, (1, 2), device="cpu", grad=False)
    torch.library.opcheck(op, (q, k, v, bias, 0.4))
    torch.library.opcheck(op, (q, k, v, None, 0.4))
    q, k, v, bias, _ = osra_args(2, 2, 20, 13, 6, (2, 1), transposed=False, device="cpu", grad=False)
    torch.library.opcheck(op, (q, k, v, bias, 0.4))


@requires_cpp
def test_cpp_compile_fullgraph():
    q, k, v, bias, _ = osra_args(2, 2, 20, 13, 6, (1, 2), device="cpu", grad=False)
    torch._dynamo.reset()
    compiled = torch.compile(tk.osra_attention, fullgraph=True, backend="aot_eager")
    with tk.use_backend("cpp"), torch.no_grad():
        out = compiled(q, k, v, bias)
    assert_rel_close(
        out,
        reference.osra_attention(q.double(), k.double(), v.double(), bias.double()),
        TOLERANCE[torch.float32],
        "compiled",
    )
