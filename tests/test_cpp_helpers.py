"""The cpp backend's non-op kernels of the accelerated model's CPU inference (`transxnet_kernels.cpp.ops`): the
in-place GELU and the strided depthwise conv with its GELU + affine epilogue, in every kernel ISA this CPU runs,
against torch in fp64 (fp32 inputs, fp64 reference) and their refusals."""

import pytest
import torch
import torch.nn.functional as F

from helpers import TOLERANCE, assert_rel_close, backend_params, cpp_only, randn, requires_cpp

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
