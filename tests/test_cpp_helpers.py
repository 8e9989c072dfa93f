"""The cpp backend's non-op kernels of the accelerated model's CPU inference (`transxnet_kernels.cpp.ops`): the
in-place GELU, the strided depthwise conv with its GELU + affine epilogue, the MS-FFN eval middle that may
overwrite its input and IDConv's eval forward from its input, in every kernel ISA this CPU runs, against torch or
the op's reference in fp64 (fp32 inputs, fp64 reference) and their refusals."""

import pytest
import torch
import torch.nn.functional as F

import transxnet_kernels as tk
from helpers import (
    TOLERANCE,
    assert_rel_close,
    backend_params,
    cpp_only,
    num_threads,
    randn,
    requires_cpp,
    to_layout,
)

pytestmark = requires_cpp


@pytest.fixture(params=backend_params("multiscale_dwconv", only=cpp_only))
def cpp(request):
    """transxnet_kernels.cpp.ops with its kernels built for one ISA (skipped where this CPU cannot run it)."""
    from transxnet_kernels.cpp import ops as cpp_ops

    with request.param.active():
        yield cpp_ops


def _dense_layouts(x: torch.Tensor):
    """x in three dense dimension orders: contiguous, channels_last, and a permuted view of a contiguous tensor."""
    return {
        "contiguous": x.contiguous(),
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "permuted": x.permute(3, 1, 0, 2).contiguous().permute(2, 1, 3, 0),
    }


# Element counts: empty, one, a vector remainder in every ISA, and one past the grain (a parallel region).
@pytest.mark.parametrize("numel", [0, 1, 37, 16385 * 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_gelu_in_place_matches_torch(cpp, numel, dtype):
    gen = torch.Generator().manual_seed(numel)
    values = randn(numel, dtype=torch.float64, gen=gen, scale=3.0, device="cpu")
    values[: numel // 10] *= 4  # tails: erf saturates (GELU exactly x or 0) past |x| ~ 5.8
    x = values.to(dtype)
    expected = F.gelu(values)
    data_ptr = x.data_ptr()
    out = cpp.gelu_(x)
    assert out is x and x.data_ptr() == data_ptr, "not in place"
    assert_rel_close(x, expected, TOLERANCE[dtype], str(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_gelu_in_place_in_every_dense_layout(cpp, dtype):
    gen = torch.Generator().manual_seed(1)
    base = randn(2, 5, 7, 3, dtype=dtype, gen=gen, scale=2.0, device="cpu")
    for name, x in _dense_layouts(base).items():
        expected = F.gelu(x.double())
        cpp.gelu_(x)
        assert_rel_close(x, expected, TOLERANCE[dtype], name)
        assert torch.equal(x.isnan(), expected.isnan())


def test_gelu_refuses_what_it_cannot_run(cpp):
    full = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="dense"):
        cpp.gelu_(full[:, :4])  # a channel slice: its elements are not one run
    with pytest.raises(RuntimeError, match="float32 and float64"):
        cpp.gelu_(torch.randn(4, dtype=torch.float16))


# (B, C, H, W, K, stride, padding): OSRA's reductions of TransXNet at 224^2 (stages 1-3: K = sr + 3, stride sr,
# padding K // 2), odd channel counts (vector remainders), H or W smaller than the kernel, no padding, stride 1.
STRIDED_SHAPES = [
    (1, 24, 56, 56, 11, 8, 5),
    (2, 48, 28, 28, 7, 4, 3),
    (1, 112, 14, 14, 5, 2, 2),
    (3, 5, 9, 7, 5, 2, 2),
    (1, 3, 3, 4, 5, 2, 2),
    (2, 17, 13, 13, 3, 3, 0),
    (1, 33, 6, 5, 3, 1, 1),
]


def strided_id(shape):
    return "B{}C{}H{}W{}K{}s{}p{}".format(*shape)


@pytest.mark.parametrize("epilogue", ["none", "gelu", "gelu-affine", "affine"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
@pytest.mark.parametrize("shape", STRIDED_SHAPES, ids=strided_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_strided_dwconv_matches_conv2d(cpp, shape, dtype, layout, epilogue):
    B, C, H, W, K, stride, padding = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = randn(B, C, H, W, dtype=dtype, gen=gen, device="cpu")
    weight = randn(C, 1, K, K, dtype=dtype, gen=gen, scale=0.3, device="cpu")
    bias = randn(C, dtype=dtype, gen=gen, device="cpu")
    scale = randn(1, C, 1, 1, dtype=dtype, gen=gen, device="cpu")
    shift = randn(1, C, 1, 1, dtype=dtype, gen=gen, device="cpu")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":  # the first half of a channels_last map whose other half is NaN
        full = torch.cat([x, torch.full_like(x, float("nan"))], dim=1).contiguous(memory_format=torch.channels_last)
        x = full[:, :C]
    gelu, affine = "gelu" in epilogue, "affine" in epilogue
    out = cpp.strided_dwconv(x, weight, bias, stride, padding, gelu, *((scale, shift) if affine else (None, None)))
    expected = F.conv2d(x.double(), weight.double(), bias.double(), stride, padding, 1, C)
    expected = F.gelu(expected) if gelu else expected
    expected = expected * scale.double() + shift.double() if affine else expected
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(out, expected, TOLERANCE[dtype], f"{strided_id(shape)} {layout} {epilogue}")


def test_strided_dwconv_refuses_what_it_cannot_run(cpp):
    x = torch.randn(1, 4, 5, 5)
    weight, bias = torch.randn(4, 1, 3, 3), torch.randn(4)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        cpp.strided_dwconv(x[:, :, :2, :2], weight, bias, 1, 0)
    with pytest.raises(RuntimeError, match=r"\[C, 1, K, K\]"):
        cpp.strided_dwconv(x, torch.randn(4, 2, 3, 3), bias, 2, 1)
    with pytest.raises(RuntimeError, match="both scale and shift"):
        cpp.strided_dwconv(x, weight, bias, 2, 1, True, torch.ones(4), None)
    with pytest.raises(RuntimeError, match="stride"):
        cpp.strided_dwconv(x, weight, bias, 0, 1)
    with pytest.raises(RuntimeError, match="dtype"):
        cpp.strided_dwconv(x, weight.double(), bias, 2, 1)


# (channel widths, kernel sizes, H, W): the MS-FFN layout with odd, unequal groups; H and W smaller than the
# largest kernel; groups spanning several vectors with a runtime kernel size.
MIDDLE_SHAPES = [([3, 2, 2, 2], [1, 3, 5, 7], 11, 9), ([6, 5, 5, 5], [1, 3, 5, 7], 3, 2), ([20, 17], [11, 3], 12, 23)]


def middle_eval_args(widths, ksizes, B, H, W, dtype, layout):
    gen = torch.Generator().manual_seed(B * 1000 + H * 10 + W)
    C = sum(widths)
    x = to_layout(randn(B, C, H, W, dtype=dtype, gen=gen, device="cpu"), layout)
    weights = [randn(c, 1, k, k, dtype=dtype, gen=gen, scale=0.3, device="cpu") for c, k in zip(widths, ksizes)]
    biases = [randn(c, dtype=dtype, gen=gen, scale=0.3, device="cpu") for c in widths]
    scales = [randn(C, dtype=dtype, gen=gen, device="cpu") for _ in range(4)]
    return x, scales[0], scales[1], weights, biases, scales[2], scales[3]


def middle_eval_reference(args):
    """The op's reference in fp64."""
    as64 = [[t.double() for t in a] if isinstance(a, list) else a.double() for a in args]
    with tk.use_backend("reference"):
        return tk.ms_ffn_middle_eval(*as64)


@pytest.mark.parametrize("shape", MIDDLE_SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1])) + f"-{s[2]}x{s[3]}")
@pytest.mark.parametrize(
    "threads,B,in_place",
    [(2, 2, True), (2, 3, True), (1, 1, True), (2, 1, False), (4, 2, False)],
    ids=["2thr-b2", "2thr-b3", "1thr-b1", "2thr-b1-bands", "4thr-b2-bands"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_middle_eval_overwriting_takes_the_input_only_where_safe(cpp, shape, threads, B, in_place, dtype):
    """With at least as many samples as threads (each sample one task) on a dense channels_last input the
    result takes the input's storage; with fewer (a sample's rows split into bands, which read each other's
    input rows) the input is left as it was. Either way the result is the op's."""
    widths, ksizes, H, W = shape
    args = middle_eval_args(widths, ksizes, B, H, W, dtype, "channels_last")
    x = args[0]
    x_before = x.clone()
    expected = middle_eval_reference(args)
    with num_threads(threads):
        out = cpp.ms_ffn_middle_eval_overwriting(*args)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
    assert_rel_close(out, expected, TOLERANCE[dtype], f"{shape} B={B} threads={threads}")
    assert (out.data_ptr() == x.data_ptr()) == in_place
    if not in_place:
        assert torch.equal(x, x_before), "the input changed"


@pytest.mark.parametrize("layout", ["contiguous", "channel_slice", "nchw_slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_middle_eval_overwriting_keeps_other_layouts(cpp, layout, dtype):
    """An NCHW or non-dense input is read, not overwritten (a channel slice's other half is NaN: reading it
    would show), and the result has the op's layout."""
    args = middle_eval_args([3, 2, 2, 2], [1, 3, 5, 7], 2, 11, 9, dtype, layout)
    x = args[0]
    x_before = x.clone()
    with num_threads(2):
        out = cpp.ms_ffn_middle_eval_overwriting(*args)
    assert_rel_close(out, middle_eval_reference(args), TOLERANCE[dtype], layout)
    assert torch.equal(x.isnan(), x_before.isnan()) and torch.equal(x.nan_to_num(), x_before.nan_to_num())
    assert out.data_ptr() != x.data_ptr()
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channel_slice")


# (B, C, H, W, G, K): TransXNet-T's stage-1 IDConv (bins tiling the map); odd channels with overlapping bins;
# H and W smaller than K (bins repeat pixels); a batch of tiled maps with 3 groups; a kernel of 3 on an odd map.
IDCONV_SHAPES = [
    (1, 24, 56, 56, 2, 7),
    (2, 5, 9, 11, 2, 7),
    (1, 3, 4, 5, 2, 7),
    (3, 17, 21, 14, 3, 7),
    (1, 40, 5, 7, 4, 3),
]


def idconv_id(shape):
    return "B{}C{}H{}W{}G{}K{}".format(*shape)


def idconv_eval_args(shape, dtype, layout):
    B, C, H, W, G, K = shape
    R = max(1, C // 4)
    gen = torch.Generator().manual_seed(sum(shape))
    x = to_layout(randn(B, C, H, W, dtype=dtype, gen=gen, device="cpu"), layout)
    params = [(R, C), (R,), (G * C, R), (G * C,), (G, C, K, K), (G, C)]
    return (x, *(randn(*p, dtype=dtype, gen=gen, scale=0.5, device="cpu") for p in params))


def idconv_eval_reference(x, reduce_weight, reduce_bias, expand_weight, expand_bias, weight, bias):
    """IDConv's eval math in fp64 as the released module runs it: proj on the pooled map and on the mean, then the
    op's reference."""
    x, reduce_weight, reduce_bias, expand_weight, expand_bias, weight, bias = (
        t.double() for t in (x, reduce_weight, reduce_bias, expand_weight, expand_bias, weight, bias)
    )
    B, C = x.shape[:2]
    G, K = weight.shape[0], weight.shape[-1]

    def proj(pixels):  # [B, C, h, w] -> [B, G*C, h, w]
        hidden = F.gelu(F.conv2d(pixels, reduce_weight[:, :, None, None], reduce_bias))
        return F.conv2d(hidden, expand_weight[:, :, None, None], expand_bias)

    kernel_logits = proj(F.adaptive_avg_pool2d(x, K)).reshape(B, G, C, K, K)
    bias_logits = proj(x.mean(dim=(2, 3), keepdim=True)).reshape(B, G, C)
    with tk.use_backend("reference"):
        return tk.idconv(x, kernel_logits, weight, bias_logits, bias)


@pytest.mark.parametrize("threads", [1, 2], ids=["1thr", "2thr"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
@pytest.mark.parametrize("shape", IDCONV_SHAPES, ids=idconv_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_idconv_eval_matches_the_released_math(cpp, shape, dtype, layout, threads):
    args = idconv_eval_args(shape, dtype, layout)
    x_before = args[0].clone()
    with num_threads(threads):
        out = cpp.idconv_eval(*args)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout != "contiguous")
    assert_rel_close(out, idconv_eval_reference(*args), TOLERANCE[dtype], f"{idconv_id(shape)} {layout}")
    x = args[0]
    assert torch.equal(x.isnan(), x_before.isnan()) and torch.equal(x.nan_to_num(), x_before.nan_to_num())


def test_idconv_eval_refuses_what_it_cannot_run(cpp):
    x, reduce_weight, reduce_bias, expand_weight, expand_bias, weight, bias = idconv_eval_args(
        (1, 8, 9, 9, 2, 7), torch.float32, "channels_last"
    )
    with pytest.raises(RuntimeError, match="positive"):
        cpp.idconv_eval(x[:, :, :0], reduce_weight, reduce_bias, expand_weight, expand_bias, weight, bias)
    with pytest.raises(RuntimeError, match=r"\[G, C, K, K\]"):
        cpp.idconv_eval(x, reduce_weight, reduce_bias, expand_weight, expand_bias, weight[:, :4], bias)
    with pytest.raises(RuntimeError, match="odd"):
        cpp.idconv_eval(x, reduce_weight, reduce_bias, expand_weight, expand_bias, weight[..., :6, :6], bias)
    with pytest.raises(RuntimeError, match=r"reduce_weight must be \[R, C\]"):
        cpp.idconv_eval(x, reduce_weight[:, :4], reduce_bias, expand_weight, expand_bias, weight, bias)
    with pytest.raises(RuntimeError, match=r"expand_weight must be \[G\*C, R\]"):
        cpp.idconv_eval(x, reduce_weight, reduce_bias, expand_weight[:8], expand_bias, weight, bias)
    with pytest.raises(RuntimeError, match=r"bias must be \[G, C\]"):
        cpp.idconv_eval(x, reduce_weight, reduce_bias, expand_weight, expand_bias, weight, bias[:1])
    with pytest.raises(RuntimeError, match="dtype"):
        cpp.idconv_eval(x, reduce_weight.double(), reduce_bias, expand_weight, expand_bias, weight, bias)
