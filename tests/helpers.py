"""Shared test machinery: devices, per-dtype tolerances, relative-error asserts, the fused backends this
machine runs (parametrization), input builders for every layout, and the run-forced-backend-vs-fp64-reference
check every op test uses."""

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence
from unittest import mock

import pytest
import torch

import transxnet_kernels as tk
from transxnet_kernels import ops, reference
from transxnet_kernels.backend import CallInfo

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: Triton's interpreter (conftest)

# Relative error ‖actual − expected‖ / ‖expected‖ allowed against an fp64 reference on the same inputs.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

# Dtypes each backend is tested in on this machine. Triton: the interpreter runs fp32, fp64 and fp16 (its
# bf16 tl.dot is wrong, so bf16 is GPU-only, where the device has it). cpp: fp32 and fp64 (all it runs).
if DEVICE.type == "cuda":
    TRITON_DTYPES = [torch.float32, torch.float64, torch.float16] + (
        [torch.bfloat16] if torch.cuda.is_bf16_supported() else []
    )
else:
    TRITON_DTYPES = [torch.float32, torch.float64, torch.float16]
CPP_DTYPES = [torch.float32, torch.float64]
CPP_ISAS = ["baseline", "avx2", "avx512"]

# What use_backend accepts: the argument checks of the public ops run whatever is chosen.
ALL_CHOICES = ["triton", "cpp", "reference", "auto"]


def backend_ready(name: str) -> bool:
    return tk.available_backends()[name].startswith("available")


def _triton_skip_reason() -> Optional[str]:
    """None when the triton backend runs on DEVICE here, else why not (its own predicate: the interpreter on
    CPU, a supported compute capability on GPUs)."""
    if not backend_ready("triton"):
        return f"triton backend: {tk.available_backends()['triton']}"
    return ops.idconv.reason_unsupported("triton", CallInfo(DEVICE, torch.float32, needs_grad=False))


requires_triton = pytest.mark.skipif(_triton_skip_reason() is not None, reason=str(_triton_skip_reason()))
requires_cpp = pytest.mark.skipif(not backend_ready("cpp"), reason=f"cpp backend: {tk.available_backends()['cpp']}")


def _cpu_runs_isa(isa: str) -> Optional[str]:
    """None when this CPU runs the cpp kernels built for `isa`, else why not."""
    from transxnet_kernels.cpp import ops as cpp_ops

    try:
        previous = cpp_ops.set_kernel_isa(isa)
    except RuntimeError as exc:
        return f"this CPU cannot run the {isa} kernels: {exc}"
    cpp_ops.set_kernel_isa(previous)
    return None


# ------------------------------------------------------------------------------------ backends


@dataclass(frozen=True)
class Backend:
    """A fused backend as the tests run it: triton (device DEVICE) or cpp with one kernel ISA (CPU)."""

    name: str
    isa: Optional[str] = None

    @property
    def id(self) -> str:
        return self.name if self.isa is None else f"{self.name}-{self.isa}"

    def __str__(self) -> str:
        return self.id

    @property
    def device(self) -> torch.device:
        return DEVICE if self.name == "triton" else torch.device("cpu")

    @property
    def dtypes(self) -> List[torch.dtype]:
        return TRITON_DTYPES if self.name == "triton" else CPP_DTYPES

    @property
    def has_backward(self) -> bool:
        """Whether its ops (but FORWARD_ONLY_OPS) have a backward."""
        return self.name == "triton"

    @property
    def interpreted(self) -> bool:
        return self.name == "triton" and self.device.type == "cpu"

    @contextlib.contextmanager
    def active(self):
        """Force this backend (and, for cpp, its kernel ISA) inside the block."""
        with tk.use_backend(self.name):
            if self.isa is None:
                yield
                return
            from transxnet_kernels.cpp import ops as cpp_ops

            previous = cpp_ops.set_kernel_isa(self.isa)
            try:
                yield
            finally:
                cpp_ops.set_kernel_isa(previous)


# Inference ops that every backend runs forward only: a forced call that needs gradients must raise.
FORWARD_ONLY_OPS = ("ms_ffn_middle_eval",)

TRITON = Backend("triton")
CPP = Backend("cpp")  # the kernel ISA the library picked (the best this CPU runs)


def _skip_reason(backend: Backend) -> Optional[str]:
    if backend.name == "triton":
        return _triton_skip_reason()
    if not backend_ready("cpp"):
        return f"cpp backend: {tk.available_backends()['cpp']}"
    return None if backend.isa is None else _cpu_runs_isa(backend.isa)


def fused_backends(op: str, per_isa: bool = True) -> List[Backend]:
    """Every fused backend that implements `op` (cpp once per kernel ISA, or once with its default ISA),
    whether or not it loaded here: one that did not load, or an ISA the CPU cannot run, becomes a skipped
    parameter (conftest's TRANSXNET_REQUIRE_BACKENDS turns a missing backend into a failure)."""
    op_obj = getattr(ops, op)
    result = []
    for backend in [TRITON] + ([Backend("cpp", isa) for isa in CPP_ISAS] if per_isa else [CPP]):
        if op_obj.status(backend.name) == "not implemented":
            continue
        result.append(backend)
    return result


def backend_param(backend: Backend, *values, extra_id: str = "", marks=()):
    """pytest.param(backend, *values) with the backend's id; skipped where the backend cannot run here."""
    reason = _skip_reason(backend)
    marks = list(marks) + ([pytest.mark.skip(reason=reason)] if reason else [])
    return pytest.param(backend, *values, id=backend.id + extra_id, marks=marks)


def backend_params(op: str, only: Optional[Callable[[Backend], bool]] = None, per_isa: bool = True):
    """pytest params: the fused backends of `op` (filtered by `only`), unavailable ones skipped."""
    return [backend_param(b) for b in fused_backends(op, per_isa) if only is None or only(b)]


def backend_dtype_params(
    op: str,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    only: Optional[Callable[[Backend], bool]] = None,
    per_isa: bool = True,
):
    """pytest params (backend, dtype): every dtype each fused backend of `op` runs (or those of `dtypes` it runs)."""
    return [
        backend_param(b, dtype, extra_id="-" + dtype_id(dtype))
        for b in fused_backends(op, per_isa)
        if only is None or only(b)
        for dtype in b.dtypes
        if dtypes is None or dtype in dtypes
    ]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def triton_only(backend: Backend) -> bool:
    return backend.name == "triton"


def cpp_only(backend: Backend) -> bool:
    return backend.name == "cpp"


def not_interpreted(backend: Backend) -> bool:
    """Large shapes: every backend but Triton's interpreter (minutes per call there)."""
    return not backend.interpreted


# ------------------------------------------------------------------------------- comparisons


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


def assert_output_layout(out: torch.Tensor, x: torch.Tensor) -> None:
    """The conv ops return channels_last for inputs with unit-stride channels (layout.channels_last_input),
    else contiguous."""
    if x.shape[1] > 1 and x.stride(1) == 1:
        assert out.is_contiguous(memory_format=torch.channels_last), f"expected channels_last, strides {out.stride()}"
    else:
        assert out.is_contiguous(), f"expected contiguous, strides {out.stride()}"


# ----------------------------------------------------------------------------------- inputs

# channel_slice: unit-stride channels, not dense (the model's x.chunk(2, dim=1)[0] of a channels_last map);
# nchw_slice: the same of a contiguous map.
LAYOUTS = ["contiguous", "channels_last", "channel_slice", "nchw_slice"]
# cpp: nchw_slice is .contiguous() and the NCHW kernels, as contiguous; the other three are distinct kernel paths.
CPP_LAYOUTS = LAYOUTS[:3]


def randn(*shape, dtype=torch.float32, gen: torch.Generator, scale: float = 1.0, device=DEVICE) -> torch.Tensor:
    """Seeded normal values drawn in fp64 on the CPU (the same values on every device and dtype)."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in `layout`: contiguous, channels_last, or channel_slice / nchw_slice (the first half of the
    channels of a channels_last / contiguous tensor whose other half is NaN, as the model's x.chunk(2, dim=1)[0]:
    a kernel that reads outside the slice turns the result into NaN)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    assert layout in ("channel_slice", "nchw_slice"), layout
    fmt = torch.channels_last if layout == "channel_slice" else torch.contiguous_format
    full = torch.cat([x, torch.full_like(x, float("nan"))], dim=1).contiguous(memory_format=fmt)
    return full.chunk(2, dim=1)[0]


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to n inside the block, restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], args):
    """args with fn applied to every tensor, inside lists and tuples too."""
    if isinstance(args, torch.Tensor):
        return fn(args)
    if isinstance(args, (list, tuple)):
        return type(args)(map_tensors(fn, a) for a in args)
    return args


def flat_tensors(args) -> List[torch.Tensor]:
    found = []
    map_tensors(found.append, args)
    return found


def requiring_grad(args, indices: Sequence[int]):
    """args with the tensors at positions `indices` (a list: every tensor in it) set to require grad."""
    args = list(args)
    for i in indices:
        args[i] = map_tensors(lambda t: t.detach().requires_grad_(), args[i])
    return tuple(args)


def reference_args(args):
    """fp64 copies of every tensor (always copies: the reference may update running statistics in place)."""
    return map_tensors(lambda t: t.detach().to(torch.float64, copy=True).requires_grad_(t.requires_grad), args)


def evaluate(fn: Callable, args, grad_out: Optional[torch.Tensor] = None):
    """(output, gradients of the tensors of args that require grad, in order) of fn(*args). Leaves are fresh
    detached views (same storage and strides), so layouts such as channel slices reach fn unchanged."""
    leaves = map_tensors(lambda t: t.detach().requires_grad_() if t.requires_grad else t, args)
    out = fn(*leaves)
    wrt = [t for t in flat_tensors(leaves) if t.requires_grad]
    grads = ()
    if wrt and grad_out is not None:
        grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype))
    return out.detach(), grads


def needs_grad(args) -> bool:
    return any(t.requires_grad for t in flat_tensors(args))


def check_op(backend: Backend, op: str, args, grad_seed: int = 0, tol: Optional[float] = None, what: str = ""):
    """Run `op` forced onto `backend` and the fp64 reference on the same values; compare the output and, for a
    backend with a backward, the gradient of every tensor that requires grad (output gradient: seeded noise in
    the input's dtype). A forward-only backend runs the forward without gradients, and a forced call that needs
    them must raise BackendUnavailableError. Each side runs once (running statistics are updated once).
    Returns (fused output, fp64 reference output, fp64 reference args)."""
    first = flat_tensors(args)[0]
    dtype = first.dtype
    tol = TOLERANCE[dtype] if tol is None else tol
    grad_out = None
    has_backward = backend.has_backward and op not in FORWARD_ONLY_OPS
    if needs_grad(args) and has_backward:
        grad_out = randn(*first.shape, dtype=dtype, gen=torch.Generator().manual_seed(grad_seed), device=first.device)
    ref_args = reference_args(args)
    with contextlib.nullcontext() if grad_out is not None else torch.no_grad():
        ref_out, ref_grads = evaluate(getattr(reference, op), ref_args, None if grad_out is None else grad_out.double())
    with backend.active():
        if needs_grad(args) and not has_backward:
            with pytest.raises(tk.BackendUnavailableError, match="gradients"):
                getattr(tk, op)(*args)
        with contextlib.nullcontext() if grad_out is not None else torch.no_grad():
            out, grads = evaluate(getattr(tk, op), args, grad_out)
    assert out.dtype == dtype, f"{what} output dtype {out.dtype} != {dtype}"
    tols = [tol] * (1 + len(ref_grads))
    if dtype == torch.float32 and grad_out is not None:
        own_errors = same_dtype_reference_errors(op, args, grad_out, (ref_out, *ref_grads))
        tols = [max(tol, CONDITIONING_FACTOR * e) for e in own_errors]
    assert_rel_close(out, ref_out, tols[0], f"{backend} {op} {what} output")
    if grad_out is not None:
        inputs = [t for t in flat_tensors(args) if t.requires_grad]
        assert len(grads) == len(ref_grads) == len(inputs)
        for i, (g, rg, t) in enumerate(zip(grads, ref_grads, inputs)):
            assert g.dtype == t.dtype, f"{what} grad {i}: dtype {g.dtype} != {t.dtype}"
            assert_rel_close(g, rg, tols[1 + i], f"{backend} {op} {what} grad of tensor {i}")
    return out, ref_out, ref_args


# A gradient can be a sum that nearly cancels (the conv bias of a one-channel group under training-mode
# BatchNorm on a 3 x 10 plane): its fp32 value is then off by more than TOLERANCE[fp32] however it is summed,
# PyTorch's own fp32 computation included. Such a value is held to this many times PyTorch's own fp32 error
# instead (a wrong kernel is off by O(1), far beyond either bound).
CONDITIONING_FACTOR = 4.0


def same_dtype_reference_errors(op: str, args, grad_out: torch.Tensor, fp64_results) -> List[float]:
    """Relative error against the fp64 results of the reference op run in the inputs' own dtype (on copies,
    so running statistics are untouched; TF32 off), for the output and each gradient: how well conditioned
    each checked value is at that precision."""
    copies = map_tensors(lambda t: t.detach().clone().requires_grad_(t.requires_grad), args)
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        out, grads = evaluate(getattr(reference, op), copies, grad_out)
    return [rel_err(a, b) for a, b in zip((out, *grads), fp64_results)]


def record_launches(monkeypatch, module, name: str, record: Callable) -> list:
    """Spy on the Triton kernel `module.name` for the test: each launch appends record(args, kwargs) of its
    arguments to the list returned, then runs the kernel."""
    kernel, launched = getattr(module, name), []

    class RecordingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(record(args, kwargs))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, RecordingKernel())
    return launched


def groups_id(groups) -> str:
    """Test id of a multi-scale group layout (widths, kernel sizes, B, H, W)."""
    widths, ksizes, B, H, W = groups
    return "w{}k{}-B{}H{}W{}".format("_".join(map(str, widths)), "_".join(map(str, ksizes)), B, H, W)


def ms_ffn_small_tiles(
    index64: bool = True,
    plane: bool = False,
    strips: bool = False,
    thread_planes: bool = False,
    target_programs: int = 10**6,
    least_padding: bool = False,
):
    """launch_overrides for the Triton MS-FFN kernels giving GPU-like launch shapes on small inputs: several spatial
    tiles, channel blocks per group, the batch split over programs (as far as target_programs asks: a small one leaves
    several images to a program), and (index64) int64 in-image offsets. plane: the whole-plane stencil where it applies
    (a few channels per tile); strips: strips of 2 rows x 2 chunks, 2 channels per program, where they apply
    (ms_ffn_middle_eval's whole-row strips: rows of at most 2 chunks); thread_planes: the forward passes on planes of at
    most 64 pixels with a thread per plane, 2 channels and one image per program; else the tiled stencils (per tap,
    chunks of 4); least_padding: the passes without a stencil on NCHW tiles whose run of pixels (at least 4) pads the
    plane least, channels filling the tile, as on GPUs (`ms_ffn._nchw_tile`). The BatchNorm affine map takes 2
    channels a program and its partials 2 rows a tile."""
    import dataclasses

    from transxnet_kernels.triton import common, ms_ffn

    target = common.launch_target(DEVICE)
    return common.launch_overrides(
        ms_ffn.Settings(
            tile_elements=16,
            target_programs=target_programs,
            max_channel_block=2,
            plane_max=16 if plane else 0,
            plane_columns=8,
            strip_rows=2 if strips else 0,
            strip_chunks=4,
            strip_row_chunks=2,
            whole_row_chunks=2,
            thread_plane_pixels=64 if thread_planes else 0,
            thread_plane_channels=2,
            thread_plane_warps=10**6,
            affine_channels=2,
            affine_rows=2,
            min_nchw_run=4 if least_padding else 0,
        ),
        dataclasses.replace(target, int32_span_limit=0) if index64 else target,
    )


def ms_ffn_tiled_stencils(strips: bool = True):
    """launch_overrides for the Triton MS-FFN kernels: the default launch settings without the whole-plane
    stencil and thread planes, so small planes run the stencils larger ones take (strips of rows where rows are
    a multiple of 4 pixels, else per tap); strips=False: chunks of 4 pixels there instead."""
    import dataclasses

    from transxnet_kernels.triton import common, ms_ffn

    settings = ms_ffn.Settings.for_target(common.launch_target(DEVICE))
    return common.launch_overrides(
        dataclasses.replace(settings, plane_max=0, strip_rows=settings.strip_rows * strips, thread_plane_pixels=0)
    )


def check_dispatcher_paths_agree(backend: Backend, op: str, args, grad_seed: int = 0) -> None:
    """`op` forced onto `backend` in plain eager (its LibraryOps call their functions directly, one autograd node
    per call: transxnet_kernels/library.py) and through torch.library's dispatcher (the custom ops themselves) give
    bit-identical outputs, gradients of every tensor that requires grad, and in-place updates (running
    statistics). Each side runs on its own copies of args."""
    from transxnet_kernels import library

    first = flat_tensors(args)[0]
    grad_out = randn(*first.shape, dtype=first.dtype, gen=torch.Generator().manual_seed(grad_seed), device=first.device)
    results = {}
    for path in ("eager", "dispatcher"):
        copies = map_tensors(lambda t: t.detach().clone().requires_grad_(t.requires_grad), args)
        forced = mock.patch.object(library, "dispatcher_needed", lambda first: True)
        with forced if path == "dispatcher" else contextlib.nullcontext(), backend.active():
            out = getattr(tk, op)(*copies)
            wrt = [t for t in flat_tensors(copies) if t.requires_grad]
            grads = torch.autograd.grad(out, wrt, grad_out) if wrt else ()
        results[path] = (type(out.grad_fn).__name__ if wrt else None, out, grads, flat_tensors(copies))
    eager, dispatched = results["eager"], results["dispatcher"]
    if needs_grad(args):  # the node each path records: this module's, the custom op's
        assert eager[0] == "_EagerAutogradBackward", eager[0]
        assert dispatched[0].startswith("GeneratedBackwardFor_"), dispatched[0]
    assert torch.equal(eager[1], dispatched[1]), f"{op} output"
    assert len(eager[2]) == len(dispatched[2])
    for i, (a, b) in enumerate(zip(eager[2], dispatched[2])):
        assert torch.equal(a, b), f"{op} gradient of input tensor {i}"
    for i, (a, b) in enumerate(zip(eager[3], dispatched[3])):
        assert torch.equal(a, b), f"{op} input tensor {i} after the call"
