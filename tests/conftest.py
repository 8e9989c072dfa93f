"""Test configuration.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors:
TRITON_INTERPRET must be set before Triton is first imported, so it is set here,
before anything imports torch or transxnet_kernels.
"""

import os

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

import transxnet_kernels


def missing_required_backends(required: str, status: dict) -> dict:
    """The backends named in `required` (comma-separated, TRANSXNET_REQUIRE_BACKENDS' format) that `status`
    (available_backends()'s answer) does not report fully available, each mapped to why."""
    names = [b.strip().lower() for b in required.split(",") if b.strip()]
    return {b: status.get(b, "unknown backend") for b in names if not status.get(b, "").startswith("available")}


def pytest_configure(config):
    # CI sets TRANSXNET_REQUIRE_BACKENDS=triton,cpp so that a backend (or any one op of it) that failed to
    # load turns into a failure instead of a column of skipped tests.
    missing = missing_required_backends(
        os.environ.get("TRANSXNET_REQUIRE_BACKENDS", ""), transxnet_kernels.available_backends()
    )
    if missing:
        raise pytest.UsageError(f"required backends are unavailable: {missing}")


def pytest_report_header(config):
    return [
        f"transxnet_kernels backends: {transxnet_kernels.available_backends()}",
        f"torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}",
    ]


@pytest.fixture
def nan_poisoned_empty(monkeypatch):
    """Make torch.empty-style allocations NaN-filled, so outputs a kernel leaves unwritten show up."""

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    real_empty, real_empty_like, real_strided, real_new_empty = (
        torch.empty,
        torch.empty_like,
        torch.empty_strided,
        torch.Tensor.new_empty,
    )
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch, "empty_strided", lambda *a, **k: poison(real_strided(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real_new_empty(self, *a, **k)))
    yield
