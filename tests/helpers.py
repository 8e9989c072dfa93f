"""Shared test helpers: devices, per-dtype tolerances, relative-error asserts."""
import os

import pytest
import torch

import transxnet_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Relative error ‖actual − expected‖ / ‖expected‖ allowed against an fp32/fp64 reference.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

# Dtypes the Triton kernels are tested in on this machine: the interpreter runs fp32/fp64;
# real GPUs add half precision (bf16 only where the device has it).
if DEVICE.type == "cuda":
    TRITON_DTYPES = [torch.float32, torch.float64, torch.float16] + (
        [torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
else:
    TRITON_DTYPES = [torch.float32, torch.float64]


def backend_ready(name: str) -> bool:
    return transxnet_kernels.available_backends()[name].startswith("available")


requires_triton = pytest.mark.skipif(
    not backend_ready("triton") or (DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason=f"triton backend: {transxnet_kernels.available_backends()['triton']}")
requires_cpp = pytest.mark.skipif(
    not backend_ready("cpp"), reason=f"cpp backend: {transxnet_kernels.available_backends()['cpp']}")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
