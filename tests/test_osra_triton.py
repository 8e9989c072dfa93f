"""Triton OSRA attention against the reference: forward, every gradient (bias included), layouts,
gradcheck, opcheck, NaN-poisoned outputs, determinism and torch.compile."""
import pytest
import torch

import transxnet_kernels
from transxnet_kernels import reference
from helpers import DEVICE, TOLERANCE, TRITON_DTYPES, assert_rel_close, requires_triton

pytestmark = requires_triton

# (B, h, N, M, d, bias shape or None). Each row exercises a path of the kernels (BLOCK_N = BLOCK_M = 64;
# on CPU the backward splits/groups work to fill 4 programs).
CASES = [
    (2, 3, 37, 49, 19, (1, 3)),     # batch-1 bias, one batch per group, groups summed
    (5, 2, 37, 49, 21, (1, 2)),     # groups of 3 batches accumulated in registers (one key block)
    (3, 2, 37, 130, 24, (1, 2)),    # M over two key blocks: bias gradient read-modify-written per group
    (3, 2, 70, 130, 28, (3, 2)),    # per-batch bias: no reduction; two query blocks
    (1, 1, 150, 20, 32, (1, 1)),    # batch 1; dk/dv query range split over 3 programs
    (2, 2, 70, 20, 32, (1, 1)),     # bias broadcast over heads
    (2, 2, 33, 17, 24, None),       # no bias
    (1, 1, 9, 1050, 21, (1, 1)),    # detection-size M: 17 key blocks
]


def _model_layout(B, h, L, d, dtype, transposed):
    """[B, h, L, d]; transposed=True gives the model's view of [B, h, d, L] memory (stride 1 along L)."""
    if transposed:
        return torch.randn(B, h, d, L, dtype=dtype, device=DEVICE).transpose(-1, -2)
    return torch.randn(B, h, L, d, dtype=dtype, device=DEVICE)


def _inputs(B, h, N, M, d, bias_shape, dtype, transposed=True):
    q = _model_layout(B, h, N, d, dtype, transposed)
    k = _model_layout(B, h, M, d, dtype, transposed)
    v = torch.randn(B, h, M, d, dtype=dtype, device=DEVICE)
    bias = None
    if bias_shape is not None:
        # A transposed view too: the kernels read the bias through its strides.
        bias = torch.randn(*bias_shape, M, N, dtype=dtype, device=DEVICE).transpose(-1, -2)
    return q, k, v, bias


def _reference_and_grads(q, k, v, bias, grad_out):
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v) + ((bias,) if bias is not None else ())]
    out = reference.osra_attention(*leaves[:3], leaves[3] if bias is not None else None)
    return out, torch.autograd.grad(out, leaves, grad_out.double())


def _triton_and_grads(q, k, v, bias, grad_out):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v) + ((bias,) if bias is not None else ())]
    with transxnet_kernels.use_backend("triton"):
        out = transxnet_kernels.osra_attention(*leaves[:3], leaves[3] if bias is not None else None)
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("B,h,N,M,d,bias_shape", CASES)
def test_forward_and_gradients_match_reference(B, h, N, M, d, bias_shape, dtype):
    torch.manual_seed(0)
    q, k, v, bias = _inputs(B, h, N, M, d, bias_shape, dtype)
    grad_out = torch.randn(B, h, N, d, dtype=dtype, device=DEVICE)
    out, grads = _triton_and_grads(q, k, v, bias, grad_out)
    ref, ref_grads = _reference_and_grads(q, k, v, bias, grad_out)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype
    assert_rel_close(out, ref, tol, "out")
    for name, g, rg in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert g.dtype == dtype
        assert_rel_close(g, rg, tol, name)


def test_output_layout_makes_model_reshape_a_view():
    torch.manual_seed(0)
    B, h, N, M, d = 2, 2, 40, 49, 24
    q, k, v, bias = _inputs(B, h, N, M, d, (1, h), torch.float32)
    with transxnet_kernels.use_backend("triton"):
        out = transxnet_kernels.osra_attention(q, k, v, bias)
    assert out.shape == (B, h, N, d)
    assert out.transpose(-1, -2).is_contiguous()  # so .reshape(B, h*d, H, W) needs no copy
    assert_rel_close(out, reference.osra_attention(q.double(), k.double(), v.double(), bias.double()), 1e-5, "out")


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_contiguous_inputs_and_custom_scale(transposed):
    torch.manual_seed(1)
    q, k, v, bias = _inputs(2, 2, 45, 30, 19, (2, 2), torch.float64, transposed)
    with transxnet_kernels.use_backend("triton"):
        out = transxnet_kernels.osra_attention(q, k, v, bias, scale=0.3)
    assert_rel_close(out, reference.osra_attention(q, k, v, bias, scale=0.3), 1e-10, "out")


def test_bias_without_grad_and_only_some_inputs_requiring_grad():
    torch.manual_seed(2)
    q, k, v, bias = _inputs(3, 2, 37, 49, 24, (1, 2), torch.float64)
    q.requires_grad_(True)
    v.requires_grad_(True)
    with transxnet_kernels.use_backend("triton"):
        out = transxnet_kernels.osra_attention(q, k, v, bias)
    grad_out = torch.randn_like(out)
    dq, dv = torch.autograd.grad(out, (q, v), grad_out)
    qr, vr = q.detach().requires_grad_(True), v.detach().requires_grad_(True)
    ref = reference.osra_attention(qr, k, vr, bias)
    rdq, rdv = torch.autograd.grad(ref, (qr, vr), grad_out)
    assert_rel_close(dq, rdq, 1e-10, "dq")
    assert_rel_close(dv, rdv, 1e-10, "dv")


def test_nan_poisoned_outputs_are_fully_written(nan_poisoned_empty):
    torch.manual_seed(3)
    for shape in [(3, 2, 37, 130, 21, (1, 2)), (1, 1, 150, 20, 32, (1, 1)), (5, 2, 37, 49, 19, (1, 1))]:
        q, k, v, bias = _inputs(*shape, torch.float32)
        grad_out = torch.randn(q.shape, dtype=q.dtype, device=DEVICE)
        out, grads = _triton_and_grads(q, k, v, bias, grad_out)
        ref, ref_grads = _reference_and_grads(q, k, v, bias, grad_out)
        assert_rel_close(out, ref, 1e-5, f"out {shape}")
        for name, g, rg in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
            assert_rel_close(g, rg, 1e-5, f"{name} {shape}")


def test_bias_gradient_is_deterministic():
    torch.manual_seed(4)
    q, k, v, bias = _inputs(5, 2, 37, 130, 19, (1, 2), torch.float32)
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=DEVICE)
    first = _triton_and_grads(q, k, v, bias, grad_out)[1]
    second = _triton_and_grads(q, k, v, bias, grad_out)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bias_shape", [(1, 1), None], ids=["bias11", "nobias"])
def test_gradcheck_fp64(bias_shape):
    torch.manual_seed(5)
    # A [1, 1] bias on B = h = 2 needs the batch and head reductions of its gradient.
    q, k, v, bias = _inputs(2, 2, 4, 5, 3, bias_shape, torch.float64)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v) + ((bias,) if bias is not None else ())]

    def fn(*ts):
        with transxnet_kernels.use_backend("triton"):
            return transxnet_kernels.osra_attention(*ts[:3], ts[3] if len(ts) > 3 else None)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_opcheck_custom_ops():
    from transxnet_kernels import osra_triton

    torch.manual_seed(6)
    for bias_shape in [(1, 2), None]:
        q, k, v, bias = _inputs(2, 2, 9, 11, 5, bias_shape, torch.float32)
        for t in (q, k, v) + ((bias,) if bias is not None else ()):
            t.requires_grad_(True)
        torch.library.opcheck(osra_triton.osra_attention_fwd, (q, k, v, bias, 0.4))
        with torch.no_grad():
            out, lse = osra_triton.osra_attention_fwd(q, k, v, bias, 0.4)
        torch.library.opcheck(osra_triton.osra_attention_bwd,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                               None if bias is None else bias.detach(), out, lse, 0.4, bias is not None))


def test_torch_compile_fullgraph():
    torch.manual_seed(7)
    q, k, v, bias = _inputs(2, 2, 20, 13, 8, (1, 2), torch.float32)
    bias.requires_grad_(True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(q, k, v, bias):
        return transxnet_kernels.osra_attention(q, k, v, bias)

    with transxnet_kernels.use_backend("triton"):
        out = fn(q, k, v, bias)
    (dbias,) = torch.autograd.grad(out.square().sum(), bias)
    bias_ref = bias.detach().double().requires_grad_(True)
    ref = reference.osra_attention(q.double(), k.double(), v.double(), bias_ref)
    (rdbias,) = torch.autograd.grad(ref.square().sum(), bias_ref)
    assert_rel_close(out, ref, 1e-5, "out")
    assert_rel_close(dbias, rdbias, 1e-5, "dbias")


def test_head_dim_over_limit_is_rejected():
    q, k, v, _ = _inputs(1, 1, 4, 4, 130, None, torch.float32)
    with transxnet_kernels.use_backend("triton"), pytest.raises(ValueError, match="head dim"):
        transxnet_kernels.osra_attention(q, k, v)


@pytest.mark.parametrize("bias_shape", [(1, 2), (3, 1)], ids=["bias1h", "biasB1"])
def test_fp64_gpu_path_without_tl_dot(monkeypatch, bias_shape):
    """fp64 on GPUs avoids tl.dot (16x16 blocks, broadcast-multiply-sum); run that path here too."""
    from transxnet_kernels import osra_triton

    monkeypatch.setattr(osra_triton, "_uses_dot", lambda q: False)
    torch.manual_seed(8)
    q, k, v, bias = _inputs(3, 2, 37, 49, 19, bias_shape, torch.float64)
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=DEVICE)
    out, grads = _triton_and_grads(q, k, v, bias, grad_out)
    ref, ref_grads = _reference_and_grads(q, k, v, bias, grad_out)
    assert_rel_close(out, ref, 1e-10, "out")
    for name, g, rg in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert_rel_close(g, rg, 1e-10, name)
