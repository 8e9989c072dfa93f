"""The exact GELU and its derivative inside the MS-FFN Triton kernels (`ms_ffn._gelu`, `ms_ffn._gelu_grad`):
fp32 maps run a rational erf (the C++ kernels' fit), fp16 / bf16 maps a shorter one (computed in fp32, stored in 16
bits), fp64 maps libdevice's erf. Checked value by value through a probe kernel against torch in fp64, the 16-bit
form against fp16's rounding too, and the fp32 form's coefficients against the C++ kernels' copy."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from helpers import DEVICE, requires_triton  # noqa: E402
from transxnet_kernels.triton import ms_ffn  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@triton.jit
def _probe_kernel(x_ptr, y_ptr, n, GRAD: tl.constexpr, NARROW: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    if GRAD:
        y = ms_ffn._gelu_grad(x, NARROW)
    else:
        y = ms_ffn._gelu(x, NARROW)
    tl.store(y_ptr + offs, y, mask=offs < n)


def _probe(x: torch.Tensor, grad: bool, narrow: bool = False) -> torch.Tensor:
    """GELU (or GELU') of x as the kernels compute it; narrow: the fp16 / bf16 maps' form (x is their fp32 value)."""
    y = torch.full_like(x, float("nan"))
    block = 1024
    _probe_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), GRAD=grad, NARROW=narrow, BLOCK=block)
    return y


def _expected(x: torch.Tensor, grad: bool) -> torch.Tensor:
    xd = x.double().requires_grad_(grad)
    y = F.gelu(xd)
    return torch.autograd.grad(y.sum(), xd)[0] if grad else y.detach()


@requires_triton
@pytest.mark.parametrize("grad", [False, True], ids=["gelu", "gelu_grad"])
def test_fp32_rational_erf_value_by_value(grad):
    x = torch.linspace(-12, 12, 240_001, dtype=torch.float32, device=DEVICE)
    got, want = _probe(x, grad).double(), _expected(x, grad)
    # erf's error is <= 3.7e-7 (the fit), so GELU's is <= |x| / 2 * 3.7e-7 plus rounding, and GELU' <= 1.9e-7 plus
    # rounding; torch's own fp32 GELU sits at a similar distance in the cancelling left tail.
    assert (got - want).abs().max().item() <= (1.5e-6 if not grad else 5e-7)
    tail = x.abs() >= 5.8  # erf is exactly +-1: GELU is exactly x or 0, GELU' exactly 1 or 0 (its phi term aside)
    if not grad:
        assert torch.equal(got[tail], torch.where(x[tail] > 0, x[tail], 0.0).double())
    else:
        assert (got[tail] - want[tail]).abs().max().item() <= 1e-6
    special = torch.tensor([float("nan"), 0.0, -0.0], dtype=torch.float32, device=DEVICE)
    out = _probe(special, grad)
    assert out[0].isnan() and torch.equal(out[1:].double(), _expected(special[1:], grad))


@requires_triton
@pytest.mark.parametrize("grad", [False, True], ids=["gelu", "gelu_grad"])
def test_16bit_rational_erf_value_by_value(grad):
    """fp16 / bf16 maps: |erf error| <= 2.9e-6 (scripts/fit_gelu_erf.py), so |GELU error| <= 1.5e-6 |x| and
    |GELU' error| <= 1.5e-6, plus fp32 rounding; past the clamp (|x| >= 4.6787) GELU is x or 0 to 1.2e-7."""
    x = torch.linspace(-12, 12, 240_001, dtype=torch.float32, device=DEVICE)
    got, want = _probe(x, grad, narrow=True).double(), _expected(x, grad)
    err = (got - want).abs()
    if not grad:
        assert (err <= 1.5e-6 * x.abs().double() + 1e-7).all(), err.max().item()
    else:
        assert err.max().item() <= 1.7e-6
    special = torch.tensor([float("nan"), 0.0, -0.0], dtype=torch.float32, device=DEVICE)
    out = _probe(special, grad, narrow=True)
    assert out[0].isnan() and torch.equal(out[1:].double(), _expected(special[1:], grad))


@requires_triton
def test_16bit_gelu_rounds_as_the_exact_one():
    """Every fp16 x in [-1, 12] (where GELU(x) >= 0.16 |x|): GELU rounded to fp16 is the exact GELU rounded to fp16,
    or one ulp off where the exact value lies within the form's error of a rounding boundary (rare)."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = bits[bits.isfinite() & (bits >= -1) & (bits <= 12)].float().to(DEVICE)
    got = _probe(x, False, narrow=True).half().float()
    want = F.gelu(x.double()).half().float()
    ulp = torch.where(want == 0, 2.0**-24, 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(2.0**-14))) - 10))
    off_by = ((got - want).abs() / ulp).round()
    assert off_by.max().item() <= 1
    assert (off_by > 0).float().mean().item() < 0.01, (off_by > 0).sum().item()


@requires_triton
@pytest.mark.parametrize("grad", [False, True], ids=["gelu", "gelu_grad"])
def test_fp64_uses_full_precision_erf(grad):
    x = torch.linspace(-9, 9, 20_001, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(_probe(x, grad), _expected(x, grad), rtol=1e-13, atol=1e-15)


def _floats(text: str):
    """The e-notation constants, a leading minus included (Python's `c * v - 4.4e-08`, C++'s `Vec(-4.4e-08f)`)."""
    return [float(f.replace(" ", "")) for f in re.findall(r"(?:-\s*)?\d\.\d+e[-+]\d+", text)]


def test_rational_erf_coefficients_match_the_cpp_kernels():
    """One fit (scripts/fit_gelu_erf.py) serves both: P's then Q's coefficients, highest order first."""
    header = (ROOT / "csrc" / "kernels.h").read_text()
    cpp = header[header.index("inline Vectorized<float> gelu_erf(") :]
    cpp = cpp[: cpp.index("\n}\n")]
    source = (ROOT / "transxnet_kernels" / "triton" / "ms_ffn.py").read_text()
    triton_src = source[source.index("def _normal_cdf(") :]
    triton_src = triton_src[triton_src.index("zc = tl.clamp(z, -5.8") : triton_src.index("return 0.5 * tl.clamp(zc")]
    assert len(_floats(cpp)) == 11  # P: 7, Q: 4 past its constant 1
    assert _floats(triton_src) == _floats(cpp)
