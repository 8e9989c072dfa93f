"""The cpp backend (C++ CPU kernels) against the reference, op by op.

Every output is compared with the reference evaluated in fp64 on the same
inputs (fp32 within 1e-5, fp64 within 1e-10 relative), on awkward shapes.
"""
import pytest
import torch

import transxnet_kernels as tk
from transxnet_kernels import BackendUnavailableError, reference
from helpers import TOLERANCE, assert_rel_close, requires_cpp

pytestmark = requires_cpp
DTYPES = [torch.float32, torch.float64]
ISAS = ["baseline", "avx2", "avx512"]


@pytest.fixture(params=ISAS)
def kernel_isa(request):
    """Run the test on each kernel build (baseline, AVX2, AVX-512) this CPU can execute."""
    from transxnet_kernels import cpp_ops
    try:
        previous = cpp_ops.set_kernel_isa(request.param)
    except RuntimeError as exc:
        pytest.skip(f"this CPU cannot run the {request.param} kernels: {exc}")
    yield request.param
    cpp_ops.set_kernel_isa(previous)


LAYOUTS = ["contiguous", "channels_last"]


def to_layout(x, layout):
    """x with the same values in `layout`: contiguous, channels_last, or channel_slice (the
    first half of the channels of a channels_last tensor, as the model's x.chunk(2, dim=1)[0])."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    assert layout == "channel_slice"
    full = torch.cat([x, torch.full_like(x, float("nan"))], dim=1).contiguous(memory_format=torch.channels_last)
    return full.chunk(2, dim=1)[0]


def assert_output_layout(out, x):
    """The conv ops return channels_last for unit-stride channels (no layout copy), else contiguous."""
    if x.shape[1] > 1 and x.stride(1) == 1:
        assert out.is_contiguous(memory_format=torch.channels_last), f"expected channels_last, strides {out.stride()}"
    else:
        assert out.is_contiguous(), f"expected contiguous, strides {out.stride()}"


def rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def run_cpp(op, *args):
    with tk.use_backend("cpp"):
        return getattr(tk, op)(*args)


def run_reference_fp64(op, *args):
    def up(a):
        if isinstance(a, torch.Tensor):
            return a.double()
        if isinstance(a, (list, tuple)):
            return [up(t) for t in a]
        return a
    return getattr(reference, op)(*[up(a) for a in args])


def idconv_args(B, C, H, W, G, K, with_bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    args = [rand(B, C, H, W, dtype=dtype, gen=g), rand(B, G, C, K, K, dtype=dtype, gen=g),
            rand(G, C, K, K, dtype=dtype, gen=g)]
    if with_bias:
        args += [rand(B, G, C, dtype=dtype, gen=g), rand(G, C, dtype=dtype, gen=g)]
    return args


def multiscale_args(B, widths, kernels, H, W, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = rand(B, sum(widths), H, W, dtype=dtype, gen=g)
    weights = [rand(c, 1, k, k, dtype=dtype, gen=g) for c, k in zip(widths, kernels)]
    biases = [rand(c, dtype=dtype, gen=g) for c in widths]
    return x, weights, biases


def batch_norm_args(C, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (rand(C, dtype=dtype, gen=g), rand(C, dtype=dtype, gen=g), rand(C, dtype=dtype, gen=g),
            torch.rand(C, generator=g, dtype=torch.float64).to(dtype) + 0.5)


def attention_args(B, h, N, M, d, bias_shape, dtype, transposed_q=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if transposed_q:  # the model's layout: q is a [B, h, d, N] tensor seen as [B, h, N, d]
        q = rand(B, h, d, N, dtype=dtype, gen=g).transpose(-1, -2)
    else:
        q = rand(B, h, N, d, dtype=dtype, gen=g)
    k, v = rand(B, h, M, d, dtype=dtype, gen=g), rand(B, h, M, d, dtype=dtype, gen=g)
    bias = None if bias_shape is None else rand(*bias_shape, dtype=dtype, gen=g)
    return q, k, v, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,G,K,with_bias", [
    (2, 5, 9, 13, 2, 7, True),    # odd C, W not a multiple of the vector width
    (1, 3, 4, 3, 2, 7, True),     # H, W smaller than the kernel, batch 1
    (3, 7, 17, 33, 4, 3, False),  # no bias, four kernel groups
    (2, 4, 6, 5, 1, 5, True),     # a single group (softmax of one logit)
    (1, 2, 5, 40, 3, 1, True),    # 1x1 kernel, wide rows (several register blocks)
    (2, 3, 8, 8, 2, 11, False),   # kernel size without a specialised instantiation
])
@pytest.mark.parametrize("layout", LAYOUTS + ["channel_slice"])
def test_idconv(B, C, H, W, G, K, with_bias, layout, dtype, nan_poisoned_empty, kernel_isa):
    args = idconv_args(B, C, H, W, G, K, with_bias, dtype)
    args[0] = to_layout(args[0], layout)
    out = run_cpp("idconv", *args)
    assert out.dtype == dtype
    assert_output_layout(out, args[0])
    assert_rel_close(out, run_reference_fp64("idconv", *args), TOLERANCE[dtype], "idconv")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,widths,kernels,H,W", [
    (2, [3, 2, 2, 2], [1, 3, 5, 7], 11, 9),    # the MS-FFN layout with unequal widths
    (1, [1, 2, 3, 1, 2], [1, 3, 5, 7, 9], 4, 6),  # kernels 1..9, H/W smaller than the largest
    (3, [5], [3], 7, 19),                      # one group
    (2, [2, 3], [11, 1], 12, 35),              # runtime kernel size, wide rows
])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_multiscale_dwconv(B, widths, kernels, H, W, layout, dtype, nan_poisoned_empty, kernel_isa):
    x, weights, biases = multiscale_args(B, widths, kernels, H, W, dtype)
    x = to_layout(x, layout)
    out = run_cpp("multiscale_dwconv", x, weights, biases)
    assert_output_layout(out, x)
    assert_rel_close(out, run_reference_fp64("multiscale_dwconv", x, weights, biases), TOLERANCE[dtype],
                     "multiscale_dwconv")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,widths,kernels,H,W", [
    (2, [3, 2, 2, 2], [1, 3, 5, 7], 11, 9),
    (1, [4, 1, 1, 1], [1, 3, 5, 7], 3, 2),
    (2, [6, 2, 2, 2], [1, 3, 5, 7], 14, 14),
])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ms_ffn_middle_eval_mode(B, widths, kernels, H, W, affine, layout, dtype, nan_poisoned_empty, kernel_isa):
    x, weights, biases = multiscale_args(B, widths, kernels, H, W, dtype)
    x = to_layout(x, layout)
    norm_weight, norm_bias, mean, var = batch_norm_args(x.shape[1], dtype)
    if not affine:
        norm_weight = norm_bias = None
    args = (x, weights, biases, norm_weight, norm_bias, mean, var, False, 0.1, 1e-5)
    mean_before, var_before = mean.clone(), var.clone()
    out = run_cpp("ms_ffn_middle", *args)
    assert_output_layout(out, x)
    assert_rel_close(out, run_reference_fp64("ms_ffn_middle", *args), TOLERANCE[dtype], "ms_ffn_middle")
    assert torch.equal(mean, mean_before) and torch.equal(var, var_before), "eval mode must not touch running stats"


def ms_ffn_eval_args(B, widths, kernels, H, W, dtype, seed=0):
    """(x, input_scale, input_shift, weights, biases, output_scale, output_shift) of ms_ffn_middle_eval."""
    x, weights, biases = multiscale_args(B, widths, kernels, H, W, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    C = x.shape[1]
    in_scale, in_shift, out_scale, out_shift = (rand(C, dtype=dtype, gen=g) for _ in range(4))
    return x, in_scale, in_shift, weights, biases, out_scale, out_shift


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,widths,kernels,H,W", [
    (2, [3, 2, 2, 2], [1, 3, 5, 7], 11, 9),       # the MS-FFN layout, odd C, unequal groups
    (1, [1, 2, 3, 1, 2], [1, 3, 5, 7, 9], 4, 6),  # kernels 1..9, H/W smaller than the largest, batch 1
    (1, [4, 1, 1, 1], [1, 3, 5, 7], 3, 2),        # tiny image: most taps read the zero padding of y
    (2, [6, 5, 5, 5], [1, 3, 5, 7], 14, 13),      # groups that are not whole vectors
    (2, [20, 17], [11, 3], 12, 23),               # runtime kernel size, groups spanning several vectors
])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ms_ffn_middle_eval_op(B, widths, kernels, H, W, layout, dtype, nan_poisoned_empty, kernel_isa):
    """fc1's GELU + BatchNorm folded in front: the conv zero-pads y = GELU(x) * s + t, not x."""
    args = list(ms_ffn_eval_args(B, widths, kernels, H, W, dtype))
    args[0] = to_layout(args[0], layout)
    out = run_cpp("ms_ffn_middle_eval", *args)
    assert out.dtype == dtype
    assert_output_layout(out, args[0])
    assert_rel_close(out, run_reference_fp64("ms_ffn_middle_eval", *args), TOLERANCE[dtype], "ms_ffn_middle_eval")


def test_ms_ffn_middle_eval_banded_rows():
    """Batch 1 with more threads than samples splits rows into bands that restage their halo rows."""
    dtype = torch.float64
    args = list(ms_ffn_eval_args(1, [5, 4, 4, 4], [1, 3, 5, 7], 23, 9, dtype))
    args[0] = to_layout(args[0], "channels_last")
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        out = run_cpp("ms_ffn_middle_eval", *args)
    finally:
        torch.set_num_threads(threads)
    assert_rel_close(out, run_reference_fp64("ms_ffn_middle_eval", *args), TOLERANCE[dtype], "banded")


def test_ms_ffn_middle_training_runs_reference_or_refuses():
    dtype = torch.float64
    x, weights, biases = multiscale_args(2, [3, 2, 2, 2], [1, 3, 5, 7], 6, 5, dtype)
    norm_weight, norm_bias, mean, var = batch_norm_args(x.shape[1], dtype)
    with pytest.raises(BackendUnavailableError, match="training"):
        run_cpp("ms_ffn_middle", x, weights, biases, norm_weight, norm_bias, mean, var, True)
    ref_mean, ref_var = mean.clone(), var.clone()
    expected = reference.ms_ffn_middle(x, weights, biases, norm_weight, norm_bias, ref_mean, ref_var, True)
    with tk.use_backend("auto"):
        out = tk.ms_ffn_middle(x, weights, biases, norm_weight, norm_bias, mean, var, True)
    assert_rel_close(out, expected, TOLERANCE[dtype], "training output")
    assert_rel_close(mean, ref_mean, TOLERANCE[dtype], "running_mean update")
    assert_rel_close(var, ref_var, TOLERANCE[dtype], "running_var update")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,h,N,M,d,bias_shape,transposed_q", [
    (2, 3, 37, 11, 13, (1, 3, 37, 11), False),   # bias shared over the batch, odd sizes
    (2, 2, 50, 49, 24, (2, 2, 50, 49), True),    # per-sample bias, the model's q layout, M = 49
    (1, 1, 1, 1, 5, None, False),                # single query and key
    (3, 4, 20, 13, 28, (1, 1, 20, 13), True),    # bias broadcast over heads too
    (2, 1, 9, 70, 9, (2, 1, 9, 70), False),      # M spanning several register blocks
    (1, 2, 16, 7, 40, None, True),               # d spanning several register blocks
])
def test_osra_attention(B, h, N, M, d, bias_shape, transposed_q, dtype, nan_poisoned_empty, kernel_isa):
    q, k, v, bias = attention_args(B, h, N, M, d, bias_shape, dtype, transposed_q)
    out = run_cpp("osra_attention", q, k, v, bias)
    assert out.stride() == q.stride(), "the output takes q's (dense) layout"
    assert_rel_close(out, run_reference_fp64("osra_attention", q, k, v, bias), TOLERANCE[dtype], "osra_attention")


@pytest.mark.parametrize("dtype", DTYPES)
def test_osra_attention_strided_kv_bias_and_scale(dtype, kernel_isa):
    g = torch.Generator().manual_seed(3)
    B, h, N, M, d = 2, 2, 19, 10, 6
    q = rand(B, h, N, d, dtype=dtype, gen=g)
    kv = rand(B, M, 2, h, d, dtype=dtype, gen=g).permute(2, 0, 3, 1, 4)  # the usual fused-kv projection views
    k, v = kv[0], kv[1]
    bias = rand(B, h, M, N, dtype=dtype, gen=g).transpose(-1, -2)  # stride along M is not 1
    out = run_cpp("osra_attention", q, k, v, bias, 0.37)
    assert_rel_close(out, run_reference_fp64("osra_attention", q, k, v, bias, 0.37), TOLERANCE[dtype],
                     "osra_attention")


@pytest.mark.parametrize("conv_layout", LAYOUTS)
def test_osra_attention_output_reshapes_back_as_a_view(conv_layout):
    """The model: q = conv_out.reshape(B, h, d, N).transpose(-1, -2); out.transpose(-1, -2).reshape(B, C, H, W)
    must be a view of out (no copy), channels_last when conv_out is."""
    dtype = torch.float32
    g = torch.Generator().manual_seed(5)
    B, h, d, H, W, M = 2, 3, 8, 5, 7, 6
    C, N = h * d, H * W
    conv_out = to_layout(rand(B, C, H, W, dtype=dtype, gen=g), conv_layout)
    q = conv_out.reshape(B, h, d, N).transpose(-1, -2)
    kv = to_layout(rand(B, 2 * C, 2, 3, dtype=dtype, gen=g), conv_layout)
    k, v = (t.reshape(B, h, d, M).transpose(-1, -2) for t in kv.chunk(2, dim=1))  # strided k/v views
    bias = rand(1, h, N, M, dtype=dtype, gen=g)
    out = run_cpp("osra_attention", q, k, v, bias)
    assert_rel_close(out, run_reference_fp64("osra_attention", q, k, v, bias), TOLERANCE[dtype], "osra")
    image = out.transpose(-1, -2).reshape(B, C, H, W)
    assert image.data_ptr() == out.data_ptr() and image._base is out, "reshape copied"
    memory_format = torch.channels_last if conv_layout == "channels_last" else torch.contiguous_format
    assert image.is_contiguous(memory_format=memory_format)


def test_channels_last_kernel_past_the_nhwc_limit():
    """Kernels wider than the NHWC kernels take (63) run the NCHW kernels, still returning channels_last."""
    dtype = torch.float64
    args = idconv_args(1, 3, 4, 5, 2, 65, True, dtype)
    args[0] = to_layout(args[0], "channel_slice")
    out = run_cpp("idconv", *args)
    assert_output_layout(out, args[0])
    assert_rel_close(out, run_reference_fp64("idconv", *args), TOLERANCE[dtype], "idconv")
    x, weights, biases = multiscale_args(1, [2, 2], [3, 65], 4, 5, dtype)
    x = to_layout(x, "channels_last")
    out = run_cpp("multiscale_dwconv", x, weights, biases)
    assert_output_layout(out, x)
    assert_rel_close(out, run_reference_fp64("multiscale_dwconv", x, weights, biases), TOLERANCE[dtype], "msdw")


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_shapes(dtype):
    """One TransXNet-T stage-1 sample: IDConv c=24, MS-FFN 4C=192, OSRA N=3136, M=49."""
    args = idconv_args(1, 24, 56, 56, 2, 7, True, dtype)
    assert_rel_close(run_cpp("idconv", *args), run_reference_fp64("idconv", *args), TOLERANCE[dtype], "idconv")
    x, weights, biases = multiscale_args(1, [48, 48, 48, 48], [1, 3, 5, 7], 56, 56, dtype)
    args = (x, weights, biases, *batch_norm_args(192, dtype), False)
    assert_rel_close(run_cpp("ms_ffn_middle", *args), run_reference_fp64("ms_ffn_middle", *args),
                     TOLERANCE[dtype], "ms_ffn_middle")
    q, k, v, bias = attention_args(1, 1, 3136, 49, 24, (1, 1, 3136, 49), dtype, transposed_q=True)
    assert_rel_close(run_cpp("osra_attention", q, k, v, bias), run_reference_fp64("osra_attention", q, k, v, bias),
                     TOLERANCE[dtype], "osra_attention")


def test_auto_picks_cpp_for_inference_and_reference_for_gradients(monkeypatch):
    monkeypatch.delenv("TRANSXNET_BACKEND", raising=False)
    from transxnet_kernels import backend, cpp_ops
    x, weights, biases = multiscale_args(1, [2, 1], [1, 3], 4, 4, torch.float32)
    assert backend.select("multiscale_dwconv", x, *weights, *biases) is cpp_ops.multiscale_dwconv
    weights[0].requires_grad_(True)
    assert backend.select("multiscale_dwconv", x, *weights, *biases) is reference.multiscale_dwconv
    with torch.no_grad():
        assert backend.select("multiscale_dwconv", x, *weights, *biases) is cpp_ops.multiscale_dwconv


def test_gradients_equal_reference_and_forced_cpp_refuses():
    dtype = torch.float64
    args = idconv_args(2, 3, 6, 7, 2, 3, True, dtype)
    leaves = [a.clone().requires_grad_(True) for a in args]
    ref_leaves = [a.clone().requires_grad_(True) for a in args]
    out = tk.idconv(*leaves)  # auto: cpp declines calls that need gradients
    grad_out = torch.randn_like(out)
    expected = reference.idconv(*ref_leaves)
    assert_rel_close(out, expected, TOLERANCE[dtype], "forward")
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(expected, ref_leaves, grad_out)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(a, b, TOLERANCE[dtype], f"grad {i}")
    with pytest.raises(BackendUnavailableError, match="gradients"):
        run_cpp("idconv", *leaves)
    # The custom op has no autograd formula: differentiating through it raises, never returns a wrong gradient.
    direct = torch.ops.transxnet.idconv_cpp(*leaves)
    with pytest.raises(RuntimeError):
        direct.sum().backward()


def test_unsupported_dtype_is_refused():
    x, weights, biases = multiscale_args(1, [2], [3], 4, 4, torch.float32)
    with pytest.raises(BackendUnavailableError, match="dtype"):
        run_cpp("multiscale_dwconv", x.half(), [w.half() for w in weights], [b.half() for b in biases])


def test_opcheck():
    dtype = torch.float32
    ops = torch.ops.transxnet
    x, weights, biases = multiscale_args(2, [3, 2, 2], [1, 3, 5], 7, 9, dtype)
    norm_weight, norm_bias, mean, var = batch_norm_args(x.shape[1], dtype)
    q, k, v, bias = attention_args(2, 2, 20, 13, 6, (1, 2, 20, 13), dtype, transposed_q=True)
    cases = [
        (ops.idconv_cpp.default, tuple(idconv_args(2, 3, 6, 7, 2, 3, True, dtype))),
        (ops.idconv_cpp.default, tuple(idconv_args(1, 3, 6, 7, 2, 5, False, dtype)) + (None, None)),
        (ops.multiscale_dwconv_cpp.default, (x, weights, biases)),
        (ops.ms_ffn_middle_cpp.default, (x, weights, biases, norm_weight, norm_bias, mean, var, 1e-5)),
        (ops.ms_ffn_middle_cpp.default, (x, weights, biases, None, None, mean, var, 1e-3)),
        (ops.ms_ffn_middle_cpp.default, (x.contiguous(memory_format=torch.channels_last), weights, biases,
                                         norm_weight, norm_bias, mean, var, 1e-5)),
        (ops.multiscale_dwconv_cpp.default, (x.contiguous(memory_format=torch.channels_last), weights, biases)),
        (ops.idconv_cpp.default, (to_layout(idconv_args(2, 3, 6, 7, 2, 3, True, dtype)[0], "channel_slice"),
                                  *idconv_args(2, 3, 6, 7, 2, 3, True, dtype)[1:])),
        (ops.ms_ffn_middle_eval_cpp.default, ms_ffn_eval_args(2, [3, 2, 2], [1, 3, 5], 7, 9, dtype)),
        (ops.ms_ffn_middle_eval_cpp.default, tuple(
            to_layout(a, "channels_last") if i == 0 else a
            for i, a in enumerate(ms_ffn_eval_args(1, [4, 3], [3, 7], 5, 6, dtype)))),
        (ops.osra_attention_cpp.default, (q, k, v, bias, 0.4)),
        (ops.osra_attention_cpp.default, (q, k, v, None, 0.4)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    dtype = torch.float32
    x, weights, biases = multiscale_args(2, [3, 2, 2, 2], [1, 3, 5, 7], 8, 9, dtype)
    bn = batch_norm_args(x.shape[1], dtype)
    q, k, v, bias = attention_args(2, 2, 20, 13, 6, (1, 2, 20, 13), dtype, transposed_q=True)
    id_args = idconv_args(2, 9, 8, 9, 2, 7, True, dtype)

    def block(x, q, k, v, bias):
        y = tk.ms_ffn_middle(x, weights, biases, *bn, False)
        y = tk.idconv(y, *id_args[1:])
        return tk.multiscale_dwconv(y, weights, biases), tk.osra_attention(q, k, v, bias)

    with tk.use_backend("cpp"):
        expected = block(x, q, k, v, bias)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            actual = compiled(x, q, k, v, bias)
    for a, e in zip(actual, expected):
        assert_rel_close(a, e, TOLERANCE[dtype], "compiled")


def test_torch_compile_ms_ffn_middle_eval_channels_last():
    dtype = torch.float32
    x, in_scale, in_shift, weights, biases, out_scale, out_shift = ms_ffn_eval_args(2, [3, 2, 2, 2], [1, 3, 5, 7],
                                                                                    8, 9, dtype)
    x = to_layout(x, "channels_last")

    def middle(x):
        return tk.ms_ffn_middle_eval(x, in_scale, in_shift, weights, biases, out_scale, out_shift) * 2

    with tk.use_backend("cpp"):
        expected = middle(x)
        compiled = torch.compile(middle, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            actual = compiled(x)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(actual, expected, TOLERANCE[dtype], "compiled")
