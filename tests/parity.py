"""Access to the shared parity data (../shared/parity beside the checkout)."""

import importlib.util
import json
import os

import pytest
import torch

PARITY_DIR = os.environ.get(
    "TRANSXNET_PARITY_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "parity")
)

if not os.path.isdir(PARITY_DIR):
    message = f"parity data not found at {PARITY_DIR} (set TRANSXNET_PARITY_DIR)"
    if os.environ.get("CI"):
        raise RuntimeError(message)  # CI always has ../shared: its absence is a failure, not a skip
    # Elsewhere (e.g. a GPU machine that got only the repository) the modules that need it skip.
    pytest.skip(message, allow_module_level=True)


def _load_weights_module():
    spec = importlib.util.spec_from_file_location("parity_weights", os.path.join(PARITY_DIR, "weights.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_weights = _load_weights_module()
fill_deterministic = _weights.fill_deterministic
golden_input = _weights.golden_input


def manifest():
    with open(os.path.join(PARITY_DIR, "state_dict_keys.json")) as f:
        return json.load(f)


def golden(name: str):
    return torch.load(os.path.join(PARITY_DIR, "golden", f"{name}.pt"), map_location="cpu")


def golden_eval_error(model: torch.nn.Module) -> float:
    """Relative error of `model` (transxnet_t layout, any path) against the fp32 eval golden file."""
    from helpers import rel_err

    fill_deterministic(model).eval()
    with torch.no_grad():
        out = model(golden_input(2, 224, 224))
    return rel_err(out, golden("t_eval_224")["output"])


def check_train_golden(model: torch.nn.Module) -> None:
    """fp64 train step against the golden file. The golden tensors are stored in float32, so
    ours are compared after rounding to float32 (1e-8 relative for logits and input gradient,
    at most one float32 ulp per gradient projection). Gradients that are zero analytically
    (biases feeding straight into a training-mode BatchNorm) are pure rounding noise in the
    golden file; for those ours must be negligible too."""
    import zlib

    from helpers import rel_err

    fp32_ulp = 2.0**-23
    g = golden("t_train_160x224")
    model = fill_deterministic(model).double().train()
    x = golden_input(2, 160, 224).double().requires_grad_()
    logits = model(x)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (logits * w).sum().backward()

    assert rel_err(logits.float(), g["output"]) <= 1e-8
    assert rel_err(x.grad.float(), g["input_grad"]) <= 1e-8

    projections = g["param_grad_proj"]
    params = dict(model.named_parameters())
    assert set(params) == set(projections)
    scale = torch.stack([p[1] for p in projections.values()]).median().item()
    checked = zero = 0
    for name, p in params.items():
        r = torch.randn(
            p.shape, generator=torch.Generator().manual_seed(zlib.crc32(("proj:" + name).encode())), dtype=torch.float64
        )
        ours = torch.stack([(p.grad * r).sum(), p.grad.norm()])
        gold = projections[name].double()
        if gold[1] < 1e-9 * scale:
            assert ours[1] < 1e-9 * scale, f"{name}: gradient should vanish, norm {ours[1]:.3e}"
            zero += 1
            continue
        diff = (ours.float().double() - gold).abs()
        assert torch.all(diff <= fp32_ulp * gold.abs() + 1e-12 * scale), f"{name}: {ours.tolist()} vs {gold.tolist()}"
        checked += 1
    assert checked > 900 and zero < 100, (checked, zero)
