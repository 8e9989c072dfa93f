"""The Triton IDConv against the reference: forward, every gradient, gradcheck, opcheck, compile."""
import pytest
import torch

import transxnet_kernels
from transxnet_kernels import reference
from helpers import DEVICE, TOLERANCE, TRITON_DTYPES, assert_rel_close, requires_triton

idconv_triton = pytest.importorskip("transxnet_kernels.idconv_triton")

pytestmark = requires_triton

NAMES = ("x", "kernel_logits", "weight", "bias_logits", "bias")


def make_inputs(B, C, H, W, G, K, bias=True, dtype=torch.float32, layout="contiguous", seed=0):
    """IDConv inputs; layout 'channels_last', or 'slice' (x is the first C channels of a 2C tensor)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)

    if layout == "slice":
        x = randn(B, 2 * C, H, W)[:, :C]
    else:
        x = randn(B, C, H, W)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    inputs = [x, randn(B, G, C, K, K, scale=2.0), randn(G, C, K, K)]
    inputs += [randn(B, G, C, scale=2.0), randn(G, C)] if bias else [None, None]
    return inputs


def run(fn, inputs, grad_out):
    """fn's output and the gradients of every input that is not None."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, grad_out.to(out.dtype))
    return out.detach(), grads


def check_against_reference(inputs, grad_out, dtype):
    with transxnet_kernels.use_backend("triton"):
        out, grads = run(transxnet_kernels.idconv, inputs, grad_out)
    ref_inputs = [None if t is None else t.double() for t in inputs]
    ref_out, ref_grads = run(reference.idconv, ref_inputs, grad_out.double())
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype
    assert_rel_close(out, ref_out, tol, "output")
    names = [n for n, t in zip(NAMES, inputs) if t is not None]
    for name, grad, ref_grad, t in zip(names, grads, ref_grads, [t for t in inputs if t is not None]):
        assert grad.dtype == t.dtype, name
        assert_rel_close(grad, ref_grad, tol, f"grad {name}")


# (B, C, H, W, G, K): odd channels, every G and K, H or W below K, batch 1, non-power-of-two planes,
# a plane large enough for several position tiles (12x13 with K=7 > one 128-position tile).
SHAPES = [
    (2, 3, 9, 7, 2, 7),
    (1, 5, 4, 6, 3, 7),
    (2, 7, 3, 11, 4, 5),
    (3, 1, 1, 1, 1, 3),
    (1, 6, 12, 13, 2, 7),
    (2, 9, 5, 2, 4, 3),
    (1, 12, 7, 7, 1, 5),
    (2, 5, 8, 3, 1, 7),
    (1, 4, 2, 2, 3, 3),
    (2, 3, 6, 6, 4, 7),
    (1, 2, 3, 9, 2, 9),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}H{}W{}G{}K{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_reference(shape, dtype, nan_poisoned_empty):
    inputs = make_inputs(*shape, dtype=dtype)
    grad_out = torch.randn(inputs[0].shape, dtype=torch.float64).to(DEVICE, dtype)
    check_against_reference(inputs, grad_out, dtype)


@pytest.mark.parametrize("layout", ["channels_last", "slice"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layouts_and_no_bias(layout, bias, nan_poisoned_empty):
    inputs = make_inputs(2, 5, 6, 9, 3, 5, bias=bias, layout=layout, seed=1)
    # A grad_out in yet another layout: channels_last against a contiguous x and vice versa.
    grad_out = torch.randn(2, 5, 6, 9, dtype=torch.float64, device=DEVICE)
    if layout != "channels_last":
        grad_out = grad_out.to(memory_format=torch.channels_last)
    check_against_reference(inputs, grad_out.float(), torch.float32)


def test_output_keeps_channels_last():
    inputs = make_inputs(1, 4, 5, 5, 2, 3, layout="channels_last")
    with transxnet_kernels.use_backend("triton"):
        out = transxnet_kernels.idconv(*inputs)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_dtypes(dtype, nan_poisoned_empty):
    """Every dtype the backend runs here (half precision on GPUs), against an fp64 reference."""
    inputs = make_inputs(2, 6, 10, 9, 2, 7, dtype=dtype, seed=2)
    grad_out = torch.randn(2, 6, 10, 9, dtype=torch.float64).to(DEVICE, dtype)
    check_against_reference(inputs, grad_out, dtype)


@pytest.mark.parametrize("target_programs", [1, 4])
def test_position_chunking(monkeypatch, target_programs, nan_poisoned_empty):
    """Several tiles per program (target 1) and several chunks with a ragged last one (target 4)."""
    monkeypatch.setattr(idconv_triton, "_TARGET_PROGRAMS", target_programs)
    # 20x21 = 420 positions, 128-position tiles: 4 tiles; target 4 with B*cblocks=2 -> 2 chunks of 2 tiles.
    inputs = make_inputs(2, 1, 20, 21, 2, 7, seed=3)
    grad_out = torch.randn(2, 1, 20, 21, dtype=torch.float64).to(DEVICE, torch.float32)
    check_against_reference(inputs, grad_out, torch.float32)


def test_int64_offsets_path(monkeypatch, nan_poisoned_empty):
    """The int64 in-sample offsets used when a sample spans 2^31 elements, forced on a small input."""
    monkeypatch.setattr(idconv_triton, "_needs_int64", lambda t: True)
    inputs = make_inputs(2, 3, 7, 8, 2, 5, layout="channels_last", seed=4)
    grad_out = torch.randn(2, 3, 7, 8, dtype=torch.float64).to(DEVICE, torch.float32)
    check_against_reference(inputs, grad_out, torch.float32)


def test_int64_decision():
    big = torch.empty_strided((2, 3, 4, 5), (2**33, 2**31, 5, 1), device="meta")
    small = torch.empty_strided((2**16, 3, 4, 5), (60, 20, 5, 1), device="meta")
    assert idconv_triton._needs_int64(big)
    assert not idconv_triton._needs_int64(small)  # the batch stride is always applied in int64


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU with ~20 GB free (B*C*H*W > 2^31 elements)")
def test_beyond_int32_elements():
    """B*C*H*W > 2^31 with small samples: the last sample is checked against the reference."""
    B, C, H, W, G, K = 1370, 24, 256, 256, 2, 7
    assert B * C * H * W > 2**31
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    x = torch.randn(B, C, H, W, device=DEVICE, dtype=torch.float16, generator=gen)
    small = [torch.randn(shape, device=DEVICE, generator=gen) for shape in
             ((B, G, C, K, K), (G, C, K, K), (B, G, C), (G, C))]
    leaves = [t.requires_grad_() for t in [x] + small]
    with transxnet_kernels.use_backend("triton"):
        out = transxnet_kernels.idconv(*leaves)
    grad_out = torch.randn_like(out)
    grad_x, grad_logits = torch.autograd.grad(out, leaves[:2], grad_out)
    last = [x[-1:].double()] + [t[-1:].double() if t.shape[0] == B else t.double() for t in small]
    ref_out, ref_grads = run(reference.idconv, last, grad_out[-1:].double())
    tol = TOLERANCE[torch.float16]
    assert_rel_close(out[-1:], ref_out, tol, "last sample output")
    assert_rel_close(grad_x[-1:], ref_grads[0], tol, "last sample grad x")
    assert_rel_close(grad_logits[-1:], ref_grads[1], tol, "last sample grad kernel_logits")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck(bias):
    inputs = make_inputs(2, 3, 5, 4, 2, 3, bias=bias, dtype=torch.float64, seed=5)
    inputs[0] = inputs[0].to(memory_format=torch.channels_last)
    leaves = tuple(None if t is None else t.detach().requires_grad_() for t in inputs)
    with transxnet_kernels.use_backend("triton"):
        # fast_mode checks random projections of the Jacobian: a handful of interpreter runs, not hundreds.
        assert torch.autograd.gradcheck(transxnet_kernels.idconv, leaves, eps=1e-6, atol=1e-8, rtol=1e-6,
                                        fast_mode=True)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(bias):
    inputs = make_inputs(2, 3, 4, 5, 2, 3, bias=bias, seed=6)
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    torch.library.opcheck(torch.ops.transxnet.idconv.default, tuple(leaves))
    grad_out = torch.randn(2, 3, 4, 5, device=DEVICE)
    torch.library.opcheck(torch.ops.transxnet.idconv_backward.default, (grad_out, *inputs))


def test_compile_fullgraph():
    inputs = make_inputs(2, 3, 6, 5, 2, 3, seed=7)
    leaves = [t.detach().requires_grad_() for t in inputs]
    compiled = torch.compile(transxnet_kernels.idconv, fullgraph=True, backend="aot_eager")
    with transxnet_kernels.use_backend("triton"):
        out = compiled(*leaves)
        out.sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference.idconv(*ref_leaves)
    ref.sum().backward()
    assert_rel_close(out.detach(), ref.detach(), TOLERANCE[torch.float32], "compiled output")
    for name, a, b in zip(NAMES, leaves, ref_leaves):
        assert_rel_close(a.grad, b.grad, TOLERANCE[torch.float32], f"compiled grad {name}")


def test_backward_is_deterministic():
    inputs = make_inputs(2, 5, 12, 13, 2, 7, seed=8)
    grad_out = torch.randn(2, 5, 12, 13, device=DEVICE)
    with transxnet_kernels.use_backend("triton"):
        _, first = run(transxnet_kernels.idconv, inputs, grad_out)
        _, second = run(transxnet_kernels.idconv, inputs, grad_out)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"grad {name} differs between runs"


def test_forced_backend_rejects_unsupported_dtype():
    inputs = make_inputs(1, 2, 3, 3, 2, 3)
    inputs = [t.to(torch.int32) for t in inputs]
    with transxnet_kernels.use_backend("triton"):
        with pytest.raises(transxnet_kernels.BackendUnavailableError, match="dtype"):
            transxnet_kernels.idconv(*inputs)
