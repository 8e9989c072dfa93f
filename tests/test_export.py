"""Export: torch.onnx.export(..., dynamo=True) run in ONNX Runtime, and torch.export.export, against eager.

While an exporter traces, every op runs its reference formula (transxnet_kernels.backend.exporting), so the
exported graphs hold standard ops only, on every backend and in every grad mode; the accelerated eval model
exports as its folded, BatchNorm-free graph. onnx, onnxscript and onnxruntime are test dependencies
(scripts/setup_env.sh installs them): missing, these tests fail, they do not skip.
"""

import contextlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import transxnet
import transxnet_kernels as tk

TOL = 1e-4  # max |ONNX Runtime - eager| / max |eager|
SMALL = dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2))
GRAD_MODES = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def make_model(arch, accelerated: bool, image_size: int) -> transxnet.TransXNet:
    torch.manual_seed(0)
    model = transxnet.TransXNet(arch, image_size=image_size).eval()
    # non-trivial BatchNorm statistics and layer scales, so that folding them is really tested
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    for name, p in model.named_parameters():
        if "layer_scale" in name:
            p.data.uniform_(0.5, 1.0)
    return transxnet.accelerated(model) if accelerated else model


def rel_diff(actual: np.ndarray, expected: torch.Tensor) -> float:
    expected = expected.detach().numpy()
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def onnx_export(model, x, path, dynamic: bool, grad_mode: str):
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    with GRAD_MODES[grad_mode]():
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
    return onnx.load(str(path))


def check_in_onnx_runtime(model, path, batches, size):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in batches:
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            expected = model(x)
        actual = session.run(None, {name: x.numpy()})[0]
        assert actual.shape == tuple(expected.shape)
        err = rel_diff(actual, expected)
        assert err <= TOL, f"batch {batch}: ONNX Runtime vs eager relative difference {err:.2e} > {TOL:.0e}"


def op_types(graph: onnx.ModelProto) -> set:
    return {node.op_type for node in graph.graph.node} | {node.op_type for fn in graph.functions for node in fn.node}


# Every grad mode with a static batch size; a dynamic one (a slower export) in inference mode only.
EXPORT_CASES = [(False, mode) for mode in sorted(GRAD_MODES)] + [(True, "inference_mode")]


@pytest.mark.parametrize(
    "dynamic, grad_mode",
    EXPORT_CASES,
    ids=[f"{'dynamic' if dynamic else 'static'}-{mode}" for dynamic, mode in EXPORT_CASES],
)
@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "accelerated"])
def test_onnx_export_runs_in_onnx_runtime(tmp_path, accelerated, dynamic, grad_mode):
    model = make_model(SMALL, accelerated, 64)
    graph = onnx_export(model, torch.randn(2, 3, 64, 64), tmp_path / "m.onnx", dynamic, grad_mode)
    assert all(node.domain in ("", "ai.onnx", "pkg.onnxscript.torch_lib.common") for node in graph.graph.node)
    if accelerated:
        assert "BatchNormalization" not in op_types(graph), "the accelerated eval graph should be BatchNorm-free"
    check_in_onnx_runtime(model, tmp_path / "m.onnx", (2, 1, 3) if dynamic else (2,), 64)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_onnx_export_on_each_forced_backend(tmp_path, backend):
    """A forced backend does not reach the exported graph: its kernels have no ONNX translation."""
    model = make_model(SMALL, True, 64)
    with tk.use_backend(backend):
        onnx_export(model, torch.randn(2, 3, 64, 64), tmp_path / "m.onnx", False, "inference_mode")
    check_in_onnx_runtime(model, tmp_path / "m.onnx", (2,), 64)


def test_torchscript_onnx_exporter_gets_standard_ops(tmp_path):
    """The TorchScript exporter (dynamo=False) traces with torch.jit: the ops take their references there too,
    and the accelerated model traces its folding, not its cached inference constants or oneDNN calls."""
    # 224²: its stage maps (56 ... 7) are multiples of IDConv's 7x7 pooling, which this exporter requires
    model = make_model(SMALL, True, 224)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)  # the inference constants exist before the trace: it must not pick them up
        torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False)
    graph = onnx.load(str(tmp_path / "m.onnx"))
    assert all(node.domain in ("", "ai.onnx") for node in graph.graph.node), op_types(graph)
    check_in_onnx_runtime(model, tmp_path / "m.onnx", (1,), 224)


@pytest.mark.parametrize("grad_mode", sorted(GRAD_MODES))
@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "accelerated"])
def test_torch_export(accelerated, grad_mode):
    model = make_model(SMALL, accelerated, 64)
    x = torch.randn(2, 3, 64, 64)
    with GRAD_MODES[grad_mode]():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("transxnet" in t or "mkldnn" in t for t in targets), sorted(targets)
    if accelerated:
        assert not any("batch_norm" in t for t in targets), sorted(targets)
    for batch in (2, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            err = rel_diff(program.module()(x).numpy(), model(x))
        assert err <= TOL, f"batch {batch}: exported program vs eager relative difference {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "accelerated"])
def test_transxnet_t_onnx_export_under_no_grad(tmp_path, accelerated):
    """The issue's case: the eval T model under torch.no_grad(), where the cpp backend runs in eager."""
    model = make_model("t", accelerated, 224)
    graph = onnx_export(model, torch.randn(1, 3, 224, 224), tmp_path / "t.onnx", False, "no_grad")
    if accelerated:
        assert "BatchNormalization" not in op_types(graph)
    check_in_onnx_runtime(model, tmp_path / "t.onnx", (1,), 224)
