"""Triton multiscale_dwconv and fused ms_ffn_middle against the PyTorch reference.

On CPU the kernels run in Triton's interpreter (fp32/fp64); on a GPU the same tests add fp16/bf16.
"""
import pytest
import torch
import torch.nn as nn

import transxnet_kernels as tk
from transxnet_kernels import msdwconv_triton as msdw
from transxnet_kernels import reference

from helpers import DEVICE, TOLERANCE, TRITON_DTYPES, assert_rel_close, requires_triton

pytestmark = requires_triton

# (group widths, kernel sizes, B, H, W): width 1 groups, odd and unequal widths, kernels 1..9,
# batch 1, maps smaller than the largest kernel, the MS-FFN split of Ch = 7.
LAYOUTS = [
    ([3, 2, 1, 2], [1, 3, 5, 7], 2, 5, 6),
    ([1, 4, 3], [9, 3, 1], 1, 3, 10),
    ([4, 1, 1, 1], [1, 3, 5, 7], 2, 2, 3),
    ([2, 3], [5, 9], 1, 7, 1),
    ([1], [3], 3, 4, 4),
]
FORMATS = [torch.contiguous_format, torch.channels_last]


def _tensors(widths, ksizes, B, H, W, dtype, fmt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    C = sum(widths)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)

    x = rand(B, C, H, W).contiguous(memory_format=fmt).requires_grad_()
    weights = [rand(c, 1, k, k, scale=0.3).requires_grad_() for c, k in zip(widths, ksizes)]
    biases = [rand(c, scale=0.3).requires_grad_() for c in widths]
    return x, weights, biases


def _output_grad(like, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=gen, dtype=torch.float64).to(DEVICE)


def _detached_double(ts):
    return [t.detach().double().requires_grad_() for t in ts]


def _tol(dtype):
    return TOLERANCE[dtype]


# ------------------------------------------------------------------------------ multiscale_dwconv

def _check_multiscale(widths, ksizes, B, H, W, dtype, fmt):
    x, weights, biases = _tensors(widths, ksizes, B, H, W, dtype, fmt)
    with tk.use_backend("triton"):
        out = tk.multiscale_dwconv(x, weights, biases)
    assert out.dtype == dtype
    xd, wd, bd = _detached_double([x]), _detached_double(weights), _detached_double(biases)
    ref = reference.multiscale_dwconv(xd[0], wd, bd)
    assert_rel_close(out, ref, _tol(dtype), "out")
    grad = _output_grad(ref)
    got = torch.autograd.grad(out, [x, *weights, *biases], grad.to(dtype))
    want = torch.autograd.grad(ref, xd + wd + bd, grad)
    for i, (g, r) in enumerate(zip(got, want)):
        assert g.dtype == dtype
        assert_rel_close(g, r, _tol(dtype), f"grad {i}")


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_multiscale_dwconv_matches_reference(layout, dtype, fmt):
    _check_multiscale(*layout, dtype, fmt)


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_multiscale_dwconv_many_tiles_and_batch_splits(monkeypatch, fmt):
    # The GPU launch shape: several spatial tiles, several channel blocks per group, batch split over
    # programs, and int64 in-image offsets.
    monkeypatch.setattr(msdw, "_CPU_TILE_ELEMS", 16)
    monkeypatch.setattr(msdw, "_CPU_TARGET_PROGRAMS", 10**6)
    monkeypatch.setattr(msdw, "_MAX_CHANNEL_BLOCK", 2)
    monkeypatch.setattr(msdw, "_INT32_SPAN", 0)
    _check_multiscale([3, 5, 1], [3, 1, 5], 3, 5, 7, torch.float64, fmt)


def test_multiscale_dwconv_strided_inputs():
    # A sliced (non-dense) input and an expanded (stride-0) output gradient.
    x_big, weights, biases = _tensors([2, 3], [3, 5], 2, 6, 9, torch.float64, torch.contiguous_format)
    x = x_big.detach()[:, :, 1:5, ::2].requires_grad_()
    with tk.use_backend("triton"):
        out = tk.multiscale_dwconv(x, weights, biases)
        got = torch.autograd.grad(out.sum(), [x, *weights])
    ref = reference.multiscale_dwconv(x, weights, biases)
    want = torch.autograd.grad(ref.sum(), [x, *weights])
    assert_rel_close(out, ref, 1e-10, "out")
    for i, (g, r) in enumerate(zip(got, want)):
        assert_rel_close(g, r, 1e-10, f"grad {i}")


# ---------------------------------------------------------------------------------- ms_ffn_middle

def _norm_params(C, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    weight = (1 + 0.2 * torch.randn(C, generator=gen, dtype=torch.float64)).to(DEVICE, dtype).requires_grad_()
    bias = (0.2 * torch.randn(C, generator=gen, dtype=torch.float64)).to(DEVICE, dtype).requires_grad_()
    running_mean = (0.1 * torch.randn(C, generator=gen, dtype=torch.float64)).to(DEVICE, torch.float32)
    running_var = (0.5 + torch.rand(C, generator=gen, dtype=torch.float64)).to(DEVICE, torch.float32)
    return weight, bias, running_mean, running_var


def _check_middle(widths, ksizes, B, H, W, dtype, fmt, training, track=True):
    x, weights, biases = _tensors(widths, ksizes, B, H, W, dtype, fmt)
    C = sum(widths)
    nw, nb, rm, rv = _norm_params(C, dtype)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rm, rv = rm.to(stat_dtype), rv.to(stat_dtype)
    rm_ref, rv_ref = rm.double(), rv.double()
    if not track:
        rm = rv = rm_ref = rv_ref = None
    with tk.use_backend("triton"):
        out = tk.ms_ffn_middle(x, weights, biases, nw, nb, rm, rv, training, 0.1, 1e-5)
    assert out.dtype == dtype
    xd, wd, bd, (nwd, nbd) = (_detached_double([x]), _detached_double(weights), _detached_double(biases),
                              _detached_double([nw, nb]))
    ref = reference.ms_ffn_middle(xd[0], wd, bd, nwd, nbd, rm_ref, rv_ref, training, 0.1, 1e-5)
    assert_rel_close(out, ref, _tol(dtype), "out")
    if track:
        assert_rel_close(rm, rm_ref, _tol(stat_dtype), "running_mean")
        assert_rel_close(rv, rv_ref, _tol(stat_dtype), "running_var")
    grad = _output_grad(ref)
    got = torch.autograd.grad(out, [x, *weights, *biases, nw, nb], grad.to(dtype))
    want = torch.autograd.grad(ref, xd + wd + bd + [nwd, nbd], grad)
    for i, (g, r) in enumerate(zip(got, want)):
        assert g.dtype == dtype
        assert_rel_close(g, r, _tol(dtype), f"grad {i}")


# Every layout in fp64; the other dtypes on two layouts (the interpreter is slow).
MIDDLE_CASES = [(layout, dtype) for dtype in TRITON_DTYPES
                for layout in (LAYOUTS[:3] + LAYOUTS[4:] if dtype == torch.float64 else LAYOUTS[:1] + LAYOUTS[2:3])]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("layout,dtype", MIDDLE_CASES, ids=str)
def test_ms_ffn_middle_matches_reference(layout, dtype, fmt, training):
    _check_middle(*layout, dtype, fmt, training)


def test_ms_ffn_middle_training_without_running_stats():
    _check_middle([2, 1, 1], [1, 3, 5], 2, 3, 4, torch.float64, torch.contiguous_format, True, track=False)


@pytest.mark.parametrize("fmt,training", [(torch.contiguous_format, False), (torch.channels_last, True)],
                         ids=["nchw-eval", "nhwc-train"])
def test_ms_ffn_middle_many_tiles_and_batch_splits(monkeypatch, fmt, training):
    monkeypatch.setattr(msdw, "_CPU_TILE_ELEMS", 16)
    monkeypatch.setattr(msdw, "_CPU_TARGET_PROGRAMS", 10**6)
    monkeypatch.setattr(msdw, "_MAX_CHANNEL_BLOCK", 2)
    monkeypatch.setattr(msdw, "_INT32_SPAN", 0)
    _check_middle([3, 5, 1], [3, 1, 5], 3, 5, 7, torch.float64, fmt, training)


def test_empty_batch():
    x, weights, biases = _tensors([2, 1], [3, 5], 0, 4, 4, torch.float32, torch.contiguous_format)
    nw, nb, rm, rv = _norm_params(3, torch.float32)
    with tk.use_backend("triton"):
        out = tk.multiscale_dwconv(x, weights, biases)
        out_mid = tk.ms_ffn_middle(x, weights, biases, nw, nb, rm, rv, False)
        grads = torch.autograd.grad(out.sum() + out_mid.sum(), [x, *weights, nw])
    assert out.shape == out_mid.shape == x.shape
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_ms_ffn_middle_single_value_per_channel_raises():
    x, weights, biases = _tensors([1], [3], 1, 1, 1, torch.float32, torch.contiguous_format)
    nw, nb, rm, rv = _norm_params(1, torch.float32)
    with tk.use_backend("triton"), pytest.raises(ValueError, match="more than 1 value per channel"):
        tk.ms_ffn_middle(x, weights, biases, nw, nb, rm, rv, True)


class _EagerMiddle(nn.Module):
    """The released MS-FFN middle as separate modules: split, dw convs, cat, residual, GELU, BN."""

    def __init__(self, widths, ksizes):
        super().__init__()
        self.widths = widths
        self.proj = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in zip(widths, ksizes))
        self.act = nn.GELU()
        self.norm = nn.BatchNorm2d(sum(widths))

    def forward(self, x):
        parts = torch.split(x, self.widths, dim=1)
        y = torch.cat([conv(p) for conv, p in zip(self.proj, parts)], dim=1)
        return self.norm(self.act(y + x))

    def fused(self, x):
        bn = self.norm
        if bn.training:
            bn.num_batches_tracked.add_(1)
        return tk.ms_ffn_middle(x, [c.weight for c in self.proj], [c.bias for c in self.proj], bn.weight, bn.bias,
                                bn.running_mean, bn.running_var, bn.training, bn.momentum, bn.eps)


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_ms_ffn_middle_matches_eager_module_train_step_then_eval(fmt):
    torch.manual_seed(0)
    Ch = 9
    widths, ksizes = [Ch - 3 * (Ch // 4), Ch // 4, Ch // 4, Ch // 4], [1, 3, 5, 7]
    eager = _EagerMiddle(widths, ksizes).double().to(DEVICE)
    with torch.no_grad():
        eager.norm.weight.uniform_(0.5, 1.5)
        eager.norm.bias.uniform_(-0.3, 0.3)
    fused = _EagerMiddle(widths, ksizes).double().to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, Ch, 6, 5, dtype=torch.float64, device=DEVICE).contiguous(memory_format=fmt)
    grad = torch.randn_like(x)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1)
    for _ in range(2):  # two training steps: the second sees updated weights and running stats
        xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_e = eager(xe)
        with tk.use_backend("triton"):
            out_f = fused.fused(xf)
        assert_rel_close(out_f, out_e, 1e-10, "train out")
        out_e.backward(grad)
        out_f.backward(grad)
        assert_rel_close(xf.grad, xe.grad, 1e-10, "grad x")
        for (name, pe), pf in zip(eager.named_parameters(), fused.parameters()):
            assert_rel_close(pf.grad, pe.grad, 1e-10, f"grad {name}")
        for (name, be), bf in zip(eager.named_buffers(), fused.buffers()):
            assert_rel_close(bf, be, 1e-10, name)
        opt_e.step()
        opt_f.step()
        opt_e.zero_grad()
        opt_f.zero_grad()
    eager.eval()
    fused.eval()
    with torch.no_grad(), tk.use_backend("triton"):
        assert_rel_close(fused.fused(x), eager(x), 1e-10, "eval out")


# ------------------------------------------------------------------- gradcheck, opcheck, poisoning

@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_multiscale_dwconv_gradcheck(fmt):
    x, weights, biases = _tensors([1, 2, 1], [1, 3, 5], 2, 3, 4, torch.float64, fmt)

    def fn(x, *params):
        with tk.use_backend("triton"):
            return tk.multiscale_dwconv(x, params[:3], params[3:])

    assert torch.autograd.gradcheck(fn, (x, *weights, *biases), fast_mode=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ms_ffn_middle_gradcheck(training):
    x, weights, biases = _tensors([1, 2, 1], [1, 3, 5], 2, 2, 3, torch.float64, torch.channels_last)
    nw, nb, rm, rv = _norm_params(4, torch.float64)

    def fn(x, *params):
        with tk.use_backend("triton"):
            # running stats are cloned so every gradcheck evaluation sees the same state
            return tk.ms_ffn_middle(x, params[:3], params[3:6], params[6], params[7], rm.clone(), rv.clone(), training)

    assert torch.autograd.gradcheck(fn, (x, *weights, *biases, nw, nb), fast_mode=True)


def _packed(widths, ksizes, B, H, W, fmt=torch.contiguous_format):
    x, weights, biases = _tensors(widths, ksizes, B, H, W, torch.float32, fmt)
    w_table, bias, widths, ksizes = msdw._pack(weights, biases)
    return x.detach().requires_grad_(), w_table.detach().requires_grad_(), bias.detach().requires_grad_(), widths, ksizes


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_opcheck_multiscale_dwconv(fmt):
    x, w_table, bias, widths, ksizes = _packed([2, 1], [3, 1], 2, 3, 4, fmt)
    torch.library.opcheck(msdw._msdw_op, (x, w_table, bias, widths, ksizes))
    grad = torch.randn_like(x)
    torch.library.opcheck(msdw._msdw_backward_op, (grad, x.detach(), w_table.detach(), bias.detach(), widths, ksizes))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_ms_ffn_middle(training):
    x, w_table, bias, widths, ksizes = _packed([2, 1], [3, 1], 2, 3, 4)
    nw, nb, rm, rv = _norm_params(3, torch.float32)
    torch.library.opcheck(msdw._middle_op, (x, w_table, bias, nw, nb, rm, rv, widths, ksizes, training, 1e-5))
    with torch.no_grad():
        _, mean, var = msdw._middle_op(x, w_table, bias, nw, nb, rm, rv, widths, ksizes, training, 1e-5)
    torch.library.opcheck(msdw._middle_backward_op, (torch.randn_like(x), x.detach(), w_table.detach(), bias.detach(),
                                                     nw.detach(), mean, var, widths, ksizes, training, 1e-5))


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_outputs_fully_written_nan_poisoned(nan_poisoned_empty, fmt):
    # The NaN fill also reaches the per-program partial buffers (statistics, dW, dbias).
    _check_multiscale([3, 1, 2], [1, 5, 3], 2, 4, 5, torch.float32, fmt)
    for training in (True, False):
        _check_middle([3, 1, 2], [1, 5, 3], 2, 4, 5, torch.float32, fmt, training)


# ---------------------------------------------------------------------------------- torch.compile

def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    x, weights, biases = _tensors([2, 1, 1], [1, 3, 5], 2, 4, 4, torch.float32, torch.contiguous_format)
    nw, nb, rm, rv = _norm_params(4, torch.float32)
    rm_ref, rv_ref = rm.clone(), rv.clone()

    def middle(x, weights, biases, nw, nb, rm, rv):
        return tk.ms_ffn_middle(x, weights, biases, nw, nb, rm, rv, True)

    def conv(x, weights, biases):
        return tk.multiscale_dwconv(x, weights, biases)

    with tk.use_backend("triton"):
        out = torch.compile(middle, fullgraph=True, backend="aot_eager")(x, weights, biases, nw, nb, rm, rv)
        out_conv = torch.compile(conv, fullgraph=True, backend="aot_eager")(x, weights, biases)
        out.sum().backward()
    ref = reference.ms_ffn_middle(x, weights, biases, nw, nb, rm_ref, rv_ref, True)
    assert_rel_close(out, ref, 1e-5, "compiled out")
    assert_rel_close(rm, rm_ref, 1e-5, "compiled running_mean")
    assert_rel_close(rv, rv_ref, 1e-5, "compiled running_var")
    assert_rel_close(out_conv, reference.multiscale_dwconv(x, weights, biases), 1e-5, "compiled conv")
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------ > 2^31 elements

@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU with > 20 GB of memory (tensors over 2^31 elements)")
def test_more_than_2_31_elements():
    torch.manual_seed(0)
    weights = [torch.randn(1, 1, k, k, device=DEVICE, dtype=torch.float16) for k in (3, 5)]
    biases = [torch.randn(1, device=DEVICE, dtype=torch.float16) for _ in range(2)]
    # Many images (batch offsets past 2^31), then one image spanning past 2^31 (int64 in-image offsets).
    for shape in ((1025, 2, 1024, 1024), (1, 2, 32768, 32769)):
        x = torch.randn(shape, device=DEVICE, dtype=torch.float16)
        assert x.numel() > 2**31
        with tk.use_backend("triton"):
            out = tk.multiscale_dwconv(x, weights, biases)
        for sl in (slice(0, 1), slice(-1, None)):
            xs = x[sl, :, -600:, -600:].float()
            ref = reference.multiscale_dwconv(xs, [w.float() for w in weights], [b.float() for b in biases])
            # compare away from the slice's cut edges, where the reference lacks neighbours
            assert_rel_close(out[sl, :, -597:-3, -597:-3], ref[..., 3:-3, 3:-3], TOLERANCE[torch.float16], f"{shape}")
        del x, out
        torch.cuda.empty_cache()
