"""Fit the rational erf of the fp32 GELU in the C++ kernels (csrc/kernels.h, `gelu_erf`) and in the MS-FFN Triton
kernels (transxnet_kernels/triton/ms_ffn.py, `_erf_scaled`; a test pins the two copies equal); check it in fp32.

    erf(x / sqrt(2)) ~= x * P(x^2) / Q(x^2)   fitted for |x| <= FIT_END * sqrt(2),   Q(0) = 1

(beyond, erf rounds to +-1 in fp32). The kernel evaluates it on x clamped to +-X_CLAMP, where it exceeds 1
by a margin far above fp32 rounding, and clamps the result to [-1, 1]: so erf is exactly +-1 for |x| >=
X_CLAMP (GELU exactly x or 0 in the tails) and never overflows. P has degree 6 and Q degree 4: 11 FMAs
and one reciprocal per GELU, no exp, against ~35 operations and a division for Abramowitz-Stegun 7.1.26
(what ATen's fp32 erf uses).
The fit minimises the absolute erf error: Sanathanan-Koerner iterations (a weighted linear least-squares
problem per step), then Lawson reweighting towards the minimax solution. Prints the fp32 coefficients in
C++ form and the fp32 error of a Horner evaluation against math.erf. Needs numpy only:

    python scripts/fit_gelu_erf.py
"""

import math

import numpy as np

FIT_END = 3.92  # erf(3.92) = 1 - 3.0e-8: rounds to 1 in fp32
X_CLAMP = 5.8
P_DEGREE, Q_DEGREE = 6, 4

erf = np.vectorize(math.erf)


def fit():
    """float64 coefficients of P and Q (lowest order first) in z^2, z = x / sqrt(2)."""
    z = np.concatenate([np.linspace(1e-4, FIT_END, 20000), FIT_END * np.sin(np.linspace(0, np.pi / 2, 4000))[1:]])
    u, f = z * z, erf(z) / z
    sk_weight, lawson = np.ones_like(u), np.ones_like(u)
    for step in range(60):
        # f Q - P = 0 linearised: columns P's coefficients, then Q's past the constant 1
        a = np.hstack([u[:, None] ** np.arange(P_DEGREE + 1), -f[:, None] * u[:, None] ** np.arange(1, Q_DEGREE + 1)])
        w = (sk_weight * lawson * z)[:, None]  # * z: the error of erf, not of erf / z
        sol = np.linalg.lstsq(a * w, f * w[:, 0], rcond=None)[0]
        p, q = sol[: P_DEGREE + 1], np.concatenate([[1.0], sol[P_DEGREE + 1 :]])
        q_u = np.polyval(q[::-1], u)
        err = np.abs(z * np.polyval(p[::-1], u) / q_u - erf(z))
        sk_weight = 1 / np.abs(q_u)
        if step >= 20:
            lawson = lawson * (err / err.max() + 1e-3) ** 0.5
    return p, q


def main():
    p, q = fit()
    # In x^2 (z^2 = x^2 / 2) with the 1 / sqrt(2) of z folded into P: erf(x / sqrt(2)) = x P'(x^2) / Q'(x^2).
    p_x = np.array([c / 2.0**k for k, c in enumerate(p)]) / math.sqrt(2)
    q_x = np.array([c / 2.0**k for k, c in enumerate(q)])
    p32, q32 = p_x.astype(np.float32), q_x.astype(np.float32)
    x = np.linspace(-X_CLAMP - 1, X_CLAMP + 1, 1_000_001).astype(np.float32)
    xc = np.clip(x, -X_CLAMP, X_CLAMP)
    v = xc * xc

    def horner(c, t):
        r = np.full_like(t, c[-1])
        for ci in c[-2::-1]:
            r = (r * t + ci).astype(np.float32)
        return r

    approx = np.clip(xc * horner(p32, v) / horner(q32, v), -1, 1)
    worst = np.abs(approx.astype(np.float64) - erf(x.astype(np.float64) / math.sqrt(2))).max()
    margin = X_CLAMP * np.polyval(p_x[::-1], X_CLAMP**2) / np.polyval(q_x[::-1], X_CLAMP**2) - 1
    print(f"fit for |x| <= {FIT_END * math.sqrt(2):.7g}; at the clamp x = {X_CLAMP} the form is 1 + {margin:.2e}")
    print(f"max |erf error| of the fp32 evaluation (clamped as the kernel does): {worst:.2e}")
    print("P:", ", ".join(f"{c:.9e}f" for c in p32))
    print("Q:", ", ".join(f"{c:.9e}f" for c in q32))


if __name__ == "__main__":
    main()
