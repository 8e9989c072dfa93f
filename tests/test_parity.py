"""Parity with the authors' implementation (golden outputs in ../shared/parity/golden)."""
import zlib

import torch

import transxnet
from helpers import rel_err
from parity import fill_deterministic, golden, golden_input

FP32_ULP = 2.0 ** -23


def test_eval_logits_match_golden_fp32():
    g = golden("t_eval_224")
    model = fill_deterministic(transxnet.transxnet_t()).eval()
    with torch.no_grad():
        out = model(golden_input(2, 224, 224))
    assert rel_err(out, g["output"]) <= 1e-5


def test_train_logits_and_all_gradients_match_golden_fp64():
    """fp64 train step. The golden tensors are stored in float32, so ours are compared
    after rounding to float32 (1e-8 relative for logits and input gradient, at most one
    float32 ulp per gradient projection). Gradients that are zero analytically (biases
    feeding straight into a training-mode BatchNorm) are pure rounding noise in the
    golden file; for those ours must be negligible too."""
    g = golden("t_train_160x224")
    model = fill_deterministic(transxnet.transxnet_t()).double().train()
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
        r = torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(("proj:" + name).encode())),
                        dtype=torch.float64)
        ours = torch.stack([(p.grad * r).sum(), p.grad.norm()])
        gold = projections[name].double()
        if gold[1] < 1e-9 * scale:
            assert ours[1] < 1e-9 * scale, f"{name}: gradient should vanish, norm {ours[1]:.3e}"
            zero += 1
            continue
        diff = (ours.float().double() - gold).abs()
        assert torch.all(diff <= FP32_ULP * gold.abs() + 1e-12 * scale), f"{name}: {ours.tolist()} vs {gold.tolist()}"
        checked += 1
    assert checked > 900 and zero < 100, (checked, zero)
