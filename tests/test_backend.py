"""Backend selection and the reference ops themselves."""
import pytest
import torch
import torch.nn.functional as F

import transxnet_kernels as tk
from transxnet_kernels import backend as bk


def idconv_args(B=2, C=3, G=2, K=3, H=5, W=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, C, H, W, generator=g, dtype=dtype), torch.randn(B, G, C, K, K, generator=g, dtype=dtype),
            torch.randn(G, C, K, K, generator=g, dtype=dtype), torch.randn(B, G, C, generator=g, dtype=dtype),
            torch.randn(G, C, generator=g, dtype=dtype))


def test_reference_idconv_against_explicit_loops():
    x, kl, w, bl, b = idconv_args()
    out = tk.reference.idconv(x, kl, w, bl, b)
    B, C, H, W = x.shape
    K = w.shape[-1]
    expected = torch.zeros_like(out)
    kern = (kl.softmax(1) * w).sum(1)
    bias = (bl.softmax(1) * b).sum(1)
    xp = F.pad(x, (K // 2,) * 4)
    for i in range(H):
        for j in range(W):
            expected[:, :, i, j] = (xp[:, :, i:i + K, j:j + K] * kern).sum((-2, -1)) + bias
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_reference_osra_against_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :, :4], v[:, :, :4]
    bias = torch.randn(1, 3, 7, 4, generator=g, dtype=torch.float64)
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) / 5 ** 0.5 + bias
    expected = torch.einsum("bhnm,bhmd->bhnd", s.exp() / s.exp().sum(-1, keepdim=True), v)
    torch.testing.assert_close(tk.reference.osra_attention(q, k, v, bias), expected, rtol=1e-12, atol=1e-12)


def test_reference_multiscale_against_separate_convs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 6, 5, generator=g, dtype=torch.float64)
    ws = [torch.randn(c, 1, k, k, generator=g, dtype=torch.float64) for c, k in ((1, 1), (4, 3), (2, 9))]
    bs = [torch.randn(w.shape[0], generator=g, dtype=torch.float64) for w in ws]
    out = tk.reference.multiscale_dwconv(x, ws, bs)
    assert torch.equal(out[:, :1], F.conv2d(x[:, :1], ws[0], bs[0], groups=1))
    assert torch.equal(out[:, 1:5], F.conv2d(x[:, 1:5], ws[1], bs[1], padding=1, groups=4))
    assert torch.equal(out[:, 5:], F.conv2d(x[:, 5:], ws[2], bs[2], padding=4, groups=2))


def test_use_backend_and_env_override(monkeypatch):
    monkeypatch.delenv("TRANSXNET_BACKEND", raising=False)
    assert tk.requested_backend() == "auto"
    monkeypatch.setenv("TRANSXNET_BACKEND", "Reference")
    assert tk.requested_backend() == "reference"
    with tk.use_backend("auto"):
        assert tk.requested_backend() == "auto"
        with tk.use_backend("triton"):
            assert tk.requested_backend() == "triton"
        assert tk.requested_backend() == "auto"
    assert tk.requested_backend() == "reference"
    monkeypatch.setenv("TRANSXNET_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="TRANSXNET_BACKEND='cuda-magic'"):
        tk.requested_backend()
    with pytest.raises(ValueError, match="not one of"):
        with tk.use_backend("fast"):
            pass


def test_forced_backend_that_cannot_run_raises_with_reason(monkeypatch):
    x = idconv_args(dtype=torch.float32)
    # CUDA-only dispatch: a meta tensor is supported by no accelerated backend
    meta = [t.to("meta") for t in x]
    for name in ("triton", "cpp"):
        with tk.use_backend(name):
            with pytest.raises(tk.BackendUnavailableError, match=f"backend '{name}' cannot run idconv on meta"):
                tk.idconv(*meta)


def test_auto_on_cpu_never_picks_the_interpreter():
    args = idconv_args(dtype=torch.float32)
    fn = bk.select("idconv", *args)
    assert fn is not bk._IMPLS["idconv"].get("triton", bk._Impl(None, None)).fn
    expected = bk._IMPLS["idconv"]["cpp"].fn if "cpp" in bk._IMPLS["idconv"] else tk.reference.idconv
    assert fn is expected


def test_auto_needs_grad_skips_backends_without_backward():
    args = [t.requires_grad_() for t in idconv_args(dtype=torch.float32)]
    fn = bk.select("idconv", *args)
    impl = next(i for name, i in bk._IMPLS["idconv"].items() if i.fn is fn)
    assert impl.supports(bk.CallInfo(args[0].device, args[0].dtype, True)) is None


def test_available_backends_reports_every_backend():
    status = tk.available_backends()
    assert set(status) == {"triton", "cpp", "reference"}
    assert status["reference"].startswith("available")
    for name in ("triton", "cpp"):
        assert status[name]  # either "available (...)" or the reason it is not


@pytest.mark.parametrize("call,message", [
    (lambda: tk.idconv(torch.randn(2, 3, 4), torch.randn(2, 2, 3, 3, 3), torch.randn(2, 3, 3, 3)), "x must be"),
    (lambda: tk.idconv(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 3, 3, 3), torch.randn(2, 4, 3, 3)), "weight must be"),
    (lambda: tk.idconv(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 3, 2, 2), torch.randn(2, 3, 2, 2)), "odd"),
    (lambda: tk.idconv(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 3, 3, 3), torch.randn(2, 3, 3, 3),
                       torch.randn(1, 2, 3)), "both"),
    (lambda: tk.multiscale_dwconv(torch.randn(1, 4, 4, 4), [torch.randn(3, 1, 3, 3)], [torch.randn(3)]), "cover 3"),
    (lambda: tk.multiscale_dwconv(torch.randn(1, 4, 4, 4), [torch.randn(4, 1, 2, 2)], [torch.randn(4)]), "odd"),
    (lambda: tk.osra_attention(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5)), "k and v"),
    (lambda: tk.osra_attention(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4),
                               torch.randn(1, 2, 5, 4)), "bias must be"),
])
def test_op_argument_checks(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_reference_ms_ffn_middle_eval_matches_eval_module_sequence():
    import transxnet.model as model_module

    torch.manual_seed(0)
    mlp = model_module.Mlp(8, 20).eval()
    with torch.no_grad():
        for bn in (mlp.fc1[2], mlp.norm):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.normal_()
            bn.bias.normal_()
        h = torch.randn(2, 20, 5, 6, dtype=torch.float64)
        mlp.double()
        y = mlp.fc1[2](mlp.fc1[1](h))
        expected = mlp.norm(mlp.act(mlp.dwconv(y) + y))
        in_scale, in_shift = model_module.batchnorm_scale_shift(mlp.fc1[2])
        out_scale, out_shift = model_module.batchnorm_scale_shift(mlp.norm)
        out = tk.reference.ms_ffn_middle_eval(h, in_scale, in_shift, [p.weight for p in mlp.dwconv.proj],
                                              [p.bias for p in mlp.dwconv.proj], out_scale, out_shift)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
