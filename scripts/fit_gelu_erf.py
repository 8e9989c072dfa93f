"""Fit the rational erf forms of the exact GELU in the C++ kernels (csrc/kernels.h, `gelu_erf`) and the MS-FFN Triton
kernels (transxnet_kernels/triton/ms_ffn.py, `_normal_cdf`); check each in fp32 as the kernels evaluate it.

    erf(x / sqrt(2)) ~= x * P(x^2) / Q(x^2)   fitted for |x| <= fit_end * sqrt(2),   Q(0) = 1

fp32 (the C++ kernels and the Triton kernels on fp32 maps; a test pins the two copies equal): P of degree 6, Q of
degree 4, 11 FMAs and one reciprocal, fitted to where erf rounds to +-1 in fp32 (erf(3.92) = 1 - 3.0e-8). The kernel
evaluates it on x clamped to +-5.8, where the form exceeds 1 by a margin far above fp32 rounding, and clamps the
result to [-1, 1]: so erf is exactly +-1 for |x| >= 5.8 (GELU exactly x or 0 in the tails) and never overflows.
Against ~35 operations and a division for Abramowitz-Stegun 7.1.26 (what ATen's fp32 erf uses).

16-bit (the Triton kernels on fp16 / bf16 maps, which compute in fp32 and store 16 bits): P and Q of degree 3, 6
FMAs, with the GELU's 1/2 folded in, Phi(x) = 1/2 + x P'(x^2) / Q(x^2). Its x clamp is where the form reaches 1/2
(erf 1), so no result clamp is needed: 13 instructions per GELU on sm_90 against 19. Its error (printed) is ~100x
below an fp16 map's rounding of GELU(x) for x > 0; in the left tail, where GELU(x) = x Phi(x) is small against x, it
is an absolute error of ~1e-6 |x|.

The fit minimises the absolute erf error: Sanathanan-Koerner iterations (a weighted linear least-squares problem per
step), then Lawson reweighting towards the minimax solution. Prints each form's fp32 coefficients (C++ form) and the
fp32 error of a Horner evaluation against math.erf. Needs numpy only:

    python scripts/fit_gelu_erf.py
"""

import math
from typing import NamedTuple, Optional

import numpy as np

erf = np.vectorize(math.erf)


class Form(NamedTuple):
    p_degree: int
    q_degree: int
    fit_end: float  # in z = x / sqrt(2)
    x_clamp: Optional[float]  # None: where the form reaches erf = 1 (no result clamp)
    phi: bool  # the coefficients give Phi(x) - 1/2 = erf(x / sqrt(2)) / 2, not erf


FORMS = {"fp32": Form(6, 4, 3.92, 5.8, False), "16-bit": Form(3, 3, 3.3, None, True)}


def fit(form: Form):
    """float64 coefficients of P and Q (lowest order first) in z^2, z = x / sqrt(2)."""
    z = np.concatenate(
        [np.linspace(1e-4, form.fit_end, 20000), form.fit_end * np.sin(np.linspace(0, np.pi / 2, 4000))[1:]]
    )
    u, f = z * z, erf(z) / z
    sk_weight, lawson = np.ones_like(u), np.ones_like(u)
    for step in range(60):
        # f Q - P = 0 linearised: columns P's coefficients, then Q's past the constant 1
        a = np.hstack(
            [u[:, None] ** np.arange(form.p_degree + 1), -f[:, None] * u[:, None] ** np.arange(1, form.q_degree + 1)]
        )
        w = (sk_weight * lawson * z)[:, None]  # * z: the error of erf, not of erf / z
        sol = np.linalg.lstsq(a * w, f * w[:, 0], rcond=None)[0]
        p, q = sol[: form.p_degree + 1], np.concatenate([[1.0], sol[form.p_degree + 1 :]])
        q_u = np.polyval(q[::-1], u)
        err = np.abs(z * np.polyval(p[::-1], u) / q_u - erf(z))
        sk_weight = 1 / np.abs(q_u)
        if step >= 20:
            lawson = lawson * (err / err.max() + 1e-3) ** 0.5
    return p, q


def _horner(c, t):
    r = np.full_like(t, c[-1])
    for ci in c[-2::-1]:
        r = (r * t + ci).astype(np.float32)
    return r


def report(name: str, form: Form):
    p, q = fit(form)
    # In x^2 (z^2 = x^2 / 2) with the 1 / sqrt(2) of z (and Phi's 1/2) folded into P: erf(x / sqrt(2)) = x P'(x^2) /
    # Q'(x^2).
    p_x = np.array([c / 2.0**k for k, c in enumerate(p)]) / math.sqrt(2) / (2.0 if form.phi else 1.0)
    q_x = np.array([c / 2.0**k for k, c in enumerate(q)])
    p32, q32 = p_x.astype(np.float32), q_x.astype(np.float32)
    erf_scale = 2.0 if form.phi else 1.0
    x_clamp = form.x_clamp
    if x_clamp is None:  # the first fp32 x past the fit where the form reaches erf = 1
        xs = np.linspace(0.9 * form.fit_end * math.sqrt(2), 8.0, 200_001).astype(np.float32)
        reached = erf_scale * xs * _horner(p32, xs * xs) / _horner(q32, xs * xs) >= 1.0
        x_clamp = math.ceil(float(xs[np.argmax(reached)]) * 1e4) / 1e4
    x = np.linspace(-x_clamp - 3, x_clamp + 3, 1_000_001).astype(np.float32)
    xc = np.clip(x, -x_clamp, x_clamp)
    form_erf = erf_scale * xc * _horner(p32, xc * xc) / _horner(q32, xc * xc)
    approx = form_erf if form.phi else np.clip(form_erf, -1, 1)
    worst = np.abs(approx.astype(np.float64) - erf(x.astype(np.float64) / math.sqrt(2))).max()
    at_clamp = erf_scale * x_clamp * np.polyval(p_x[::-1], x_clamp**2) / np.polyval(q_x[::-1], x_clamp**2) - 1
    fit_end = form.fit_end * math.sqrt(2)
    print(f"{name}: P degree {form.p_degree}, Q degree {form.q_degree}, fit for |x| <= {fit_end:.7g}")
    print(f"  x clamp {x_clamp:.4f}: the form there is erf = 1 + {at_clamp:.2e}")
    print(f"  max |erf error| of the fp32 evaluation (clamped as the kernel does): {worst:.2e}")
    print("  P:", ", ".join(f"{c:.9e}f" for c in p32))
    print("  Q:", ", ".join(f"{c:.9e}f" for c in q32))


def main():
    for name, form in FORMS.items():
        report(name, form)


if __name__ == "__main__":
    main()
