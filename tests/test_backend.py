"""Backend selection and the reference ops themselves."""

import ast
import copy
import pathlib
import threading

import conftest
import pytest
import torch
import torch.nn.functional as F

import transxnet
import transxnet_kernels as tk
from transxnet_kernels import backend as bk

CPP_READY = tk.available_backends()["cpp"].startswith("available")


def idconv_args(B=2, C=3, G=2, K=3, H=5, W=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, C, H, W, generator=g, dtype=dtype),
        torch.randn(B, G, C, K, K, generator=g, dtype=dtype),
        torch.randn(G, C, K, K, generator=g, dtype=dtype),
        torch.randn(B, G, C, generator=g, dtype=dtype),
        torch.randn(G, C, generator=g, dtype=dtype),
    )


def test_reference_idconv_against_explicit_loops():
    x, kl, w, bl, b = idconv_args()
    out = tk.reference.idconv(x, kl, w, bl, b)
    H, W = x.shape[-2:]
    K = w.shape[-1]
    expected = torch.zeros_like(out)
    kern = (kl.softmax(1) * w).sum(1)
    bias = (bl.softmax(1) * b).sum(1)
    xp = F.pad(x, (K // 2,) * 4)
    for i in range(H):
        for j in range(W):
            expected[:, :, i, j] = (xp[:, :, i : i + K, j : j + K] * kern).sum((-2, -1)) + bias
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_reference_osra_against_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :, :4], v[:, :, :4]
    bias = torch.randn(1, 3, 7, 4, generator=g, dtype=torch.float64)
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) / 5**0.5 + bias
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
    with pytest.raises(ValueError, match="not one of"), tk.use_backend("fast"):
        pass


def test_forced_backend_that_cannot_run_raises_with_reason(monkeypatch):
    x = idconv_args(dtype=torch.float32)
    # CUDA-only dispatch: a meta tensor is supported by no accelerated backend
    meta = [t.to("meta") for t in x]
    for name in ("triton", "cpp"):
        message = f"backend '{name}' cannot run idconv on meta"
        with tk.use_backend(name), pytest.raises(tk.BackendUnavailableError, match=message):
            tk.idconv(*meta)


def test_auto_on_cpu_never_picks_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRANSXNET_BACKEND", raising=False)
    expected = "cpp" if CPP_READY else "reference"
    for op in ("idconv", "multiscale_dwconv", "ms_ffn_middle", "ms_ffn_middle_eval", "osra_attention"):
        assert bk.select(op, torch.device("cpu"), torch.float32, False, False, 0) == expected, op


def test_auto_picks_cpp_for_inference_and_reference_for_gradients(monkeypatch):
    """cpp is forward-only and eval-BatchNorm only: auto sends calls that need gradients, and training-mode
    ms_ffn_middle, to the reference."""
    monkeypatch.delenv("TRANSXNET_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert bk.select("multiscale_dwconv", cpu, torch.float32, True, False, 0) == "reference"
    assert bk.select("ms_ffn_middle", cpu, torch.float32, False, True, 0) == "reference"
    assert bk.select("multiscale_dwconv", cpu, torch.float16, False, False, 0) == "reference"  # cpp: fp32/fp64
    x = torch.randn(1, 3, 4, 4)
    weights, biases = [torch.randn(2, 1, 1, 1), torch.randn(1, 1, 3, 3)], [torch.randn(2), torch.randn(1)]

    def ran_cpp():
        # Count calls of the C++ entry point (torch 2.14's profiler omits custom ops with list arguments).
        if not CPP_READY:
            tk.multiscale_dwconv(x, weights, biases)
            return False
        from transxnet_kernels.cpp import ops as cpp_ops

        calls = []
        real = cpp_ops._C.multiscale_dwconv_forward

        class CountingExtension:
            def __getattr__(self, name):
                return getattr(real_extension, name)

            def multiscale_dwconv_forward(self, *args):
                calls.append(1)
                return real(*args)

        real_extension = cpp_ops._C
        monkeypatch.setattr(cpp_ops, "_C", CountingExtension())
        try:
            tk.multiscale_dwconv(x, weights, biases)
        finally:
            monkeypatch.setattr(cpp_ops, "_C", real_extension)
        return bool(calls)

    assert ran_cpp() == CPP_READY
    weights[0].requires_grad_(True)
    assert not ran_cpp()
    with torch.no_grad():
        assert ran_cpp() == CPP_READY


def test_unchecked_kernel_follows_the_backend_choice(monkeypatch):
    """Op.unchecked_kernel: the raw kernel a call without gradients ends in under the current choice (the C++
    extension's function, the reference), computing the op; None where a forced backend cannot run the call."""
    monkeypatch.delenv("TRANSXNET_BACKEND", raising=False)
    cpu = torch.device("cpu")
    args = idconv_args(dtype=torch.float32)
    with torch.no_grad():
        expected = tk.reference.idconv(*args)
    with tk.use_backend("reference"):
        assert tk.idconv.unchecked_kernel(cpu, torch.float32) is tk.reference.idconv
    kernel = tk.idconv.unchecked_kernel(cpu, torch.float32)
    if not CPP_READY:
        assert kernel is tk.reference.idconv
        return
    from transxnet_kernels.cpp import ops as cpp_ops

    calls = []
    real_extension = cpp_ops._C

    class CountingExtension:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real_extension, name)

    monkeypatch.setattr(cpp_ops, "_C", CountingExtension())
    with torch.no_grad():
        torch.testing.assert_close(kernel(*args), expected, rtol=1e-5, atol=1e-6)
    assert calls == ["idconv_forward"]
    with tk.use_backend("cpp"):
        assert tk.osra_attention.unchecked_kernel(cpu, torch.float16) is None  # cpp: fp32/fp64 only
        assert tk.ms_ffn_middle_eval.unchecked_kernel(cpu, torch.float64) is not None


def test_implementation_and_status_per_op():
    assert tk.idconv.implementation("reference") is tk.reference.idconv
    assert tk.idconv.status("reference") == "available"
    info = bk.CallInfo(torch.device("cpu"), torch.float32, needs_grad=False)
    assert tk.idconv.reason_unsupported("reference", info) is None

    def negate(x: torch.Tensor) -> torch.Tensor:
        return -x

    def probe_op(x: torch.Tensor):
        return (x,), bk.call_info([x])

    op = tk.ops.define(negate)(probe_op)  # an op no fused backend implements
    try:
        assert op.status("triton") == "not implemented"
        with pytest.raises(KeyError):
            op.implementation("triton")
        assert "has no implementation of probe_op" in op.reason_unsupported("triton", info)
        with tk.use_backend("cpp"), pytest.raises(tk.BackendUnavailableError, match="no implementation of probe_op"):
            op(torch.ones(2))
        assert torch.equal(op(torch.ones(2)), -torch.ones(2))  # auto: the reference
    finally:
        del bk.OPS["probe_op"]
    with pytest.raises(ValueError, match="unknown backend"):
        tk.idconv.register("cuda")
    status = tk.backend_status()
    assert set(status) == set(bk.BACKENDS)
    for per_op in status.values():
        assert set(per_op) == {"idconv", "multiscale_dwconv", "ms_ffn_middle", "ms_ffn_middle_eval", "osra_attention"}


def test_available_backends_reports_every_backend():
    status = tk.available_backends()
    assert set(status) == {"triton", "cpp", "reference"}
    assert status["reference"].startswith("available")
    for name in ("triton", "cpp"):
        assert status[name]  # either "available (...)" or the reason it is not


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: tk.idconv(torch.randn(2, 3, 4), torch.randn(2, 2, 3, 3, 3), torch.randn(2, 3, 3, 3)), "x must be"),
        (
            lambda: tk.idconv(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 3, 3, 3), torch.randn(2, 4, 3, 3)),
            "weight must be",
        ),
        (lambda: tk.idconv(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 3, 2, 2), torch.randn(2, 3, 2, 2)), "odd"),
        (
            lambda: tk.idconv(
                torch.randn(1, 3, 4, 4), torch.randn(1, 2, 3, 3, 3), torch.randn(2, 3, 3, 3), torch.randn(1, 2, 3)
            ),
            "both",
        ),
        (lambda: tk.multiscale_dwconv(torch.randn(1, 4, 4, 4), [torch.randn(3, 1, 3, 3)], [torch.randn(3)]), "cover 3"),
        (lambda: tk.multiscale_dwconv(torch.randn(1, 4, 4, 4), [torch.randn(4, 1, 2, 2)], [torch.randn(4)]), "odd"),
        (
            lambda: tk.osra_attention(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5)),
            "k and v",
        ),
        (
            lambda: tk.osra_attention(
                torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
            ),
            "bias must be",
        ),
    ],
)
def test_op_argument_checks(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_reference_ms_ffn_middle_eval_matches_eval_module_sequence():
    import transxnet.fused as fused
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
        in_scale, in_shift = fused.batchnorm_scale_shift(mlp.fc1[2])
        out_scale, out_shift = fused.batchnorm_scale_shift(mlp.norm)
        out = tk.reference.ms_ffn_middle_eval(
            h,
            in_scale,
            in_shift,
            [p.weight for p in mlp.dwconv.proj],
            [p.bias for p in mlp.dwconv.proj],
            out_scale,
            out_shift,
        )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_has_fused_is_a_constant_under_compile_fullgraph():
    """The accelerated model branches on has_fused in eval: under torch.compile(fullgraph=True) the answer is a
    trace-time constant (the use_backend context variable is not traceable), taken under the block's choice."""

    def f(x):
        return x * 2 if tk.has_fused("ms_ffn_middle_eval", x) else x + 1

    x = torch.full((2,), 3.0)
    for choice, expected in (("reference", 4.0), ("cpp", 6.0 if CPP_READY else 4.0)):
        torch._dynamo.reset()
        with tk.use_backend(choice):
            out = torch.compile(f, fullgraph=True, backend="eager")(x)
        assert torch.equal(out, torch.full((2,), expected)), choice


@pytest.mark.skipif(not CPP_READY, reason="cpp backend not built")
def test_cpp_kernel_isa_selection():
    """The cpp kernels run the best ISA build the CPU has; set_kernel_isa switches (the op tests run each build)
    and refuses one the CPU cannot run."""
    from transxnet_kernels.cpp import ops as cpp_ops

    best = cpp_ops.kernel_isa()
    assert best in ("baseline", "avx2", "avx512")
    assert cpp_ops.set_kernel_isa("baseline") == best
    try:
        assert cpp_ops.kernel_isa() == "baseline"
    finally:
        assert cpp_ops.set_kernel_isa(best) == "baseline"
    with pytest.raises(RuntimeError, match="unknown or not supported"):
        cpp_ops.set_kernel_isa("sse9")
    assert cpp_ops.kernel_isa() == best


# ------------------------------------------------------------------------------- availability


@pytest.fixture
def triton_idconv_failed_to_import(monkeypatch):
    """The registry as if transxnet_kernels/triton/idconv.py had failed to import: a copy of ops.idconv without
    its triton implementation and with the load error recorded, swapped into the registry (restored after)."""
    broken = copy.copy(tk.idconv)
    broken._impls = {k: v for k, v in tk.idconv._impls.items() if k != "triton"}
    broken._load_errors = dict(tk.idconv._load_errors)
    broken.record_load_error("triton", ImportError("triton 2.0 is too old"))
    monkeypatch.setitem(bk.OPS, "idconv", broken)
    return broken


def test_a_failed_op_module_is_reported_per_op(triton_idconv_failed_to_import):
    status = tk.backend_status()
    assert status["triton"]["idconv"] == "failed to import: ImportError: triton 2.0 is too old"
    assert status["triton"]["osra_attention"] == tk.osra_attention.status("triton")  # the others unaffected
    summary = tk.available_backends()
    assert not summary["triton"].startswith("available")
    assert "idconv: failed to import: ImportError: triton 2.0 is too old" in summary["triton"]
    assert summary["reference"].startswith("available")
    # forcing the backend for that op says why; auto runs something else
    x = torch.randn(1, 2, 4, 4)
    args = (x, torch.randn(1, 2, 2, 3, 3), torch.randn(2, 2, 3, 3))
    with tk.use_backend("triton"), pytest.raises(tk.BackendUnavailableError, match="failed to import"):
        tk.idconv(*args)
    with tk.use_backend("auto"):
        torch.testing.assert_close(tk.idconv(*args), tk.reference.idconv(*args))


def test_required_backend_check_fails_on_a_failed_op_module(triton_idconv_failed_to_import):
    """conftest's TRANSXNET_REQUIRE_BACKENDS check: one op of a backend that failed to load fails the run."""
    missing = conftest.missing_required_backends("triton,cpp", tk.available_backends())
    assert "triton" in missing and "failed to import" in missing["triton"]


def test_required_backend_check():
    status = {"triton": "available (idconv)", "cpp": "the C++ extension is not built", "reference": "available (x)"}
    assert conftest.missing_required_backends("", status) == {}
    assert conftest.missing_required_backends("triton, reference", status) == {}
    assert conftest.missing_required_backends("triton,cpp", status) == {"cpp": "the C++ extension is not built"}
    assert conftest.missing_required_backends("Cuda", status) == {"cuda": "unknown backend"}
    # this machine's status passes for every backend it reports available
    live = tk.available_backends()
    ready = ",".join(b for b, s in live.items() if s.startswith("available"))
    assert conftest.missing_required_backends(ready, live) == {}


# ------------------------------------------------------------------------------ thread-locality


def test_use_backend_is_thread_local(monkeypatch):
    """A use_backend block in one thread does not change the choice in another (each sees its own innermost
    block), while three threads are inside different blocks at the same time."""
    monkeypatch.delenv("TRANSXNET_BACKEND", raising=False)
    barrier = threading.Barrier(3, timeout=30)
    seen = {}
    errors = []

    def worker(name, choice):
        try:
            barrier.wait()  # 1: the main thread is inside its block
            seen[(name, "before")] = tk.requested_backend()
            with tk.use_backend(choice):
                barrier.wait()  # 2: every thread inside its block
                seen[(name, "inside")] = tk.requested_backend()
                barrier.wait()  # 3: every thread has read before any leaves
            barrier.wait()  # 4: both workers left their blocks
            seen[(name, "after")] = tk.requested_backend()
        except Exception as exc:  # reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [
        threading.Thread(target=worker, args=("a", "reference")),
        threading.Thread(target=worker, args=("b", "triton")),
    ]
    for t in threads:
        t.start()
    try:
        with tk.use_backend("cpp"):
            for _ in range(4):
                barrier.wait()
                seen[("main", _)] = tk.requested_backend()
    finally:
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert tk.requested_backend() == "auto"
    assert seen == {
        ("a", "before"): "auto",
        ("a", "inside"): "reference",
        ("a", "after"): "auto",
        ("b", "before"): "auto",
        ("b", "inside"): "triton",
        ("b", "after"): "auto",
        ("main", 0): "cpp",
        ("main", 1): "cpp",
        ("main", 2): "cpp",
        ("main", 3): "cpp",
    }


def test_use_backend_in_one_thread_does_not_change_the_kernel_another_runs(monkeypatch):
    """The op calls themselves: a thread that forces the reference while another computes with auto."""
    monkeypatch.delenv("TRANSXNET_BACKEND", raising=False)
    entered, done = threading.Event(), threading.Event()
    selected = []

    def forcing():
        with tk.use_backend("reference"):
            entered.set()
            done.wait(30)

    t = threading.Thread(target=forcing)
    t.start()
    try:
        assert entered.wait(30)
        selected.append(bk.select("idconv", torch.device("cpu"), torch.float32, False, False, 0))
    finally:
        done.set()
        t.join(30)
    assert selected == ["cpp" if CPP_READY else "reference"]


# ------------------------------------------------------------------------------- device guard

TRITON_DIR = pathlib.Path(tk.__file__).parent / "triton"


def _kernel_launches(tree: ast.AST):
    """(launch Call node, kernel name, enclosing With nodes) for every `<jit kernel>[grid](...)` in the module."""
    jit = {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list)
    }
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Subscript)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in jit
        ):
            withs, up = [], parents.get(node)
            while up is not None:
                if isinstance(up, (ast.With, ast.AsyncWith)):
                    withs.append(up)
                up = parents.get(up)
            yield node, node.func.value.id, withs


def _is_device_guard(with_node) -> bool:
    return any(
        isinstance(item.context_expr, ast.Call)
        and isinstance(item.context_expr.func, ast.Name)
        and item.context_expr.func.id == "device_guard"
        for item in with_node.items
    )


@pytest.mark.parametrize("module", sorted(p.name for p in TRITON_DIR.glob("*.py")))
def test_every_triton_launch_is_inside_a_device_guard(module):
    """Static audit: each `_x_kernel[grid](...)` launch is lexically inside `with device_guard(...)`, so it runs
    on its tensors' device whichever device is current (the runtime test needs two GPUs)."""
    tree = ast.parse((TRITON_DIR / module).read_text())
    launched, unguarded = set(), []
    for call, kernel, withs in _kernel_launches(tree):
        launched.add(kernel)
        if not any(_is_device_guard(w) for w in withs):
            unguarded.append(f"{kernel} at line {call.lineno}")
    assert not unguarded, f"{module}: launches outside device_guard: {unguarded}"
    kernels = {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and node.name.endswith("_kernel")
        and any("jit" in ast.unparse(d) for d in node.decorator_list)
    }
    assert kernels <= launched, f"{module}: kernels the audit found no launch of: {kernels - launched}"
    if module not in ("__init__.py", "common.py"):
        assert launched, f"{module}: no kernel launch found (the audit would pass vacuously)"


def test_device_guard_audit_catches_an_unguarded_launch():
    source = """
import triton
@triton.jit
def _a_kernel(x):
    pass
def good(x):
    with device_guard(x):
        _a_kernel[(1,)](x)
def bad(x):
    with torch.no_grad():
        _a_kernel[(1,)](x)
"""
    found = [
        (kernel, any(_is_device_guard(w) for w in withs)) for _, kernel, withs in _kernel_launches(ast.parse(source))
    ]
    assert sorted(found) == [("_a_kernel", False), ("_a_kernel", True)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (the launch device guard)")
def test_every_op_runs_on_the_second_gpu_while_the_first_is_current():
    """Tensors on cuda:1 while cuda:0 is current: every Triton kernel (forward and backward) must launch on
    cuda:1 and match the reference."""
    from helpers import TRITON, assert_rel_close

    dev = torch.device("cuda:1")
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dev).requires_grad_()

    weights, biases = [r(2, 1, 1, 1), r(1, 1, 3, 3)], [r(2), r(1)]
    nw, nb = r(3), r(3)
    cases = {
        "idconv": (r(2, 3, 5, 6), r(2, 2, 3, 3, 3), r(2, 3, 3, 3), r(2, 2, 3), r(2, 3)),
        "multiscale_dwconv": (r(2, 3, 5, 6), weights, biases),
        "ms_ffn_middle": (
            r(2, 3, 5, 6),
            weights,
            biases,
            nw,
            nb,
            torch.zeros(3, dtype=torch.float64, device=dev),
            torch.ones(3, dtype=torch.float64, device=dev),
            True,
        ),
        "osra_attention": (r(2, 2, 7, 4), r(2, 2, 5, 4), r(2, 2, 5, 4), r(1, 2, 7, 5)),
    }
    with torch.cuda.device(0):
        for op, args in cases.items():
            with TRITON.active():
                out = getattr(tk, op)(*args)
            leaves = [
                t for a in args for t in (a if isinstance(a, list) else [a]) if torch.is_tensor(t) and t.requires_grad
            ]
            grads = torch.autograd.grad(out.square().sum(), leaves)
            ref_args = [
                [t.detach().clone().requires_grad_() for t in a]
                if isinstance(a, list)
                else a.detach().clone().requires_grad_(a.requires_grad)
                if torch.is_tensor(a)
                else a
                for a in args
            ]
            ref = getattr(tk.reference, op)(*ref_args)
            ref_leaves = [
                t
                for a in ref_args
                for t in (a if isinstance(a, list) else [a])
                if torch.is_tensor(t) and t.requires_grad
            ]
            ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
            assert out.device == dev and torch.cuda.current_device() == 0
            assert_rel_close(out, ref, 1e-10, f"{op} on cuda:1")
            for i, (a, b) in enumerate(zip(grads, ref_grads)):
                assert a.device == dev
                assert_rel_close(a, b, 1e-10, f"{op} grad {i} on cuda:1")


def test_released_model_compiles_fullgraph_where_autocast_availability_breaks_the_graph(monkeypatch):
    """Before torch 2.13 dynamo cannot trace torch.amp.is_autocast_available: an op calling it while compiling
    splits the graph (on torch 2.11 the resumed frame then failed on a symbolic head dim, breaking
    torch.compile of the released model on GPU). Simulated on any torch by making that call a graph break; the
    autocast cast itself must stay in the graph (bf16 autocast)."""
    monkeypatch.setattr(torch.amp, "is_autocast_available", torch._dynamo.disable(torch.amp.is_autocast_available))
    torch.manual_seed(0)
    model = transxnet.TransXNet("t").eval()
    x = torch.randn(1, 3, 64, 64)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), tk.use_backend("reference"):
        expected = model(x)
        out = compiled(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_auto_never_picks_triton(monkeypatch):
    """Triton runs only when forced until its kernels measure faster than the reference (backend.AUTO_ORDER,
    from the first GPU measurement): under auto a CUDA call of every op goes to the reference."""
    monkeypatch.delenv("TRANSXNET_BACKEND", raising=False)
    cuda = torch.device("cuda")
    for op in ("idconv", "multiscale_dwconv", "ms_ffn_middle", "ms_ffn_middle_eval", "osra_attention"):
        for needs_grad, training in ((False, False), (True, False), (True, True)):
            assert bk.select(op, cuda, torch.bfloat16, needs_grad, training, 32) == "reference", op
            assert not bk.runs_fused(op, cuda, torch.bfloat16), op


@pytest.mark.parametrize("capability", [(7, 0), (7, 5), (8, 0), (9, 0)])
def test_triton_declines_gpus_below_compute_capability_8(monkeypatch, capability):
    """Triton 3.3+ targets sm_80+ (on 7.x tl.dot falls back to FMA and bf16 is absent) and the kernels are audited
    for sm_80/86/90 only: a forced triton backend on a V100 or T4 raises and says why; from 8.0 on it runs."""
    if not tk.available_backends()["triton"].startswith("available"):
        pytest.skip("the triton backend is not available here")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda", 0)
    implemented = [op for op, status in tk.backend_status()["triton"].items() if status == "available"]
    assert "idconv" in implemented and "osra_attention" in implemented
    with tk.use_backend("triton"):
        for op in implemented:
            if capability < (8, 0):
                message = rf"compute capability {capability[0]}\.{capability[1]} is below 8\.0"
                with pytest.raises(tk.BackendUnavailableError, match=message):
                    bk.select(op, cuda, torch.float32, False, False, 32)
            else:
                assert bk.select(op, cuda, torch.float32, False, False, 32) == "triton", op


@pytest.mark.parametrize(
    "triton_version, numpy_version, defective",
    [
        ("3.6.0", "2.4.6", True),
        ("3.5.1", "2.4.0rc1", True),
        ("3.6.0", "2.3.4", False),
        ("3.7.0", "2.4.6", False),
        ("3.8.0+git1234", "2.5.5", False),
        ("4.0.0", "2.4.0", False),
    ],
)
def test_interpreter_defect_by_version(triton_version, numpy_version, defective):
    from transxnet_kernels.triton import common

    reason = common.interpreter_defect(triton_version, numpy_version)
    if defective:
        assert f"Triton {triton_version}" in reason and f"NumPy {numpy_version}" in reason and "#9171" in reason
    else:
        assert reason is None


def test_interpreter_defect_matches_what_this_interpreter_does():
    """The version rule against the interpreter itself: a kernel loop with a runtime bound fails in it exactly when
    INTERPRETER_DEFECT says so (checked under either outcome, so a wrong rule fails here)."""
    if not tk.available_backends()["triton"].startswith("available"):
        pytest.skip("the triton backend is not available here")
    if torch.cuda.is_available():
        pytest.skip("compiled for the GPU: the interpreter is not in use")
    import triton
    import triton.language as tl

    from transxnet_kernels.triton import common

    @triton.jit
    def count_kernel(out_ptr, n):
        total = 0
        for i in range(tl.program_id(0), n):
            total += i
        tl.store(out_ptr + tl.program_id(0), total)

    out = torch.zeros(2, dtype=torch.int32)
    try:
        count_kernel[(2,)](out, 5)
    except Exception as error:  # InterpreterError wrapping NumPy's TypeError
        assert common.INTERPRETER_DEFECT is not None, error
        assert "0-dimensional" in str(error)
    else:
        assert common.INTERPRETER_DEFECT is None
        assert out.tolist() == [10, 10]


def test_triton_declines_cpu_calls_under_a_defective_interpreter(monkeypatch):
    """Where the interpreter cannot run the kernels (INTERPRETER_DEFECT), a forced triton backend raises with the
    reason on CPU tensors and auto keeps to the other backends."""
    if not tk.available_backends()["triton"].startswith("available"):
        pytest.skip("the triton backend is not available here")
    from transxnet_kernels.triton import common

    monkeypatch.setattr(common, "interpreter_active", lambda: True)
    monkeypatch.setattr(common, "INTERPRETER_DEFECT", "the interpreter is broken here")
    monkeypatch.delenv("TRANSXNET_BACKEND", raising=False)
    cpu = torch.device("cpu")
    with tk.use_backend("triton"), pytest.raises(tk.BackendUnavailableError, match="the interpreter is broken here"):
        bk.select("idconv", cpu, torch.float32, False, False, 0)
    assert bk.select("idconv", cpu, torch.float32, False, False, 0) == ("cpp" if CPP_READY else "reference")
