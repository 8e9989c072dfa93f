"""transxnet_kernels/library.py: plain eager calls of a LibraryOp run its function directly (one autograd node of
the library's own, with the custom op's setup_context and backward), and every call something may watch goes
through torch.library's dispatcher. Each fused op's tests check that both routes give bit-identical results
(`helpers.check_dispatcher_paths_agree`); these check the routing itself on a small op of their own."""

from typing import List

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.library import opcheck

from transxnet_kernels import library
from transxnet_kernels.library import custom_op

SEEN = []  # (route, needs_input_grad as the setup_context saw it)


@custom_op("transxnet_test::weighted_sum", mutates_args=())
def weighted_sum(x: torch.Tensor, weights: List[torch.Tensor], scale: float, shift: torch.Tensor) -> torch.Tensor:
    """x * scale * prod(weights) + shift (the weights broadcast over x)."""
    out = x * scale + shift
    for w in weights:
        out = out * w
    return out


@weighted_sum.register_fake
def _(x, weights, scale, shift):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, weights, scale, shift = inputs
    SEEN.append(ctx.needs_input_grad)
    ctx.save_for_backward(x, shift, *weights)
    ctx.scale = scale


def _backward(ctx, grad):
    x, shift, *weights = ctx.saved_tensors
    inner = x * ctx.scale + shift
    total = grad
    for w in weights:
        total = total * w
    weight_grads = []
    for i in range(len(weights)):
        others = inner
        for j, w in enumerate(weights):
            if j != i:
                others = others * w
        weight_grads.append((grad * others).sum_to_size(weights[i].shape))
    return total * ctx.scale, weight_grads, None, total.sum_to_size(shift.shape)


weighted_sum.register_autograd(_backward, setup_context=_setup_context)


@custom_op("transxnet_test::doubled", mutates_args=())
def doubled(x: torch.Tensor) -> torch.Tensor:
    """2x, without an autograd formula."""
    return x * 2


@doubled.register_fake
def _(x):
    return torch.empty_like(x)


def _inputs(requires=(True, True, True)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(requires[0])
    weights = [torch.randn(4, generator=g, dtype=torch.float64).requires_grad_(requires[1]) for _ in range(2)]
    shift = torch.randn(1, 4, generator=g, dtype=torch.float64).requires_grad_(requires[2])
    return x, weights, 0.7, shift


def _run(args, dispatcher: bool):
    x, weights, scale, shift = args
    leaves = [x, *weights, shift]
    SEEN.clear()
    if dispatcher:
        out = weighted_sum.library_op(x, weights, scale, shift)
    else:
        out = weighted_sum(x, weights, scale, shift)
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, wrt, torch.ones_like(out))
    return out, grads, type(out.grad_fn).__name__, list(SEEN)


@pytest.mark.parametrize(
    "requires", [(True, True, True), (True, False, True), (False, True, False)], ids=["all", "no-weights", "weights"]
)
def test_eager_call_records_one_node_with_the_custom_ops_formula(requires):
    args = _inputs(requires)
    eager = _run(args, dispatcher=False)
    dispatched = _run(args, dispatcher=True)
    assert eager[2] == "_EagerAutogradBackward"
    assert dispatched[2].startswith("GeneratedBackwardFor_transxnet_test_weighted_sum")
    assert torch.equal(eager[0], dispatched[0])
    assert len(eager[1]) == len(dispatched[1]) == sum(t.requires_grad for t in (args[0], *args[1], args[3]))
    for a, b in zip(eager[1], dispatched[1]):
        assert torch.equal(a, b)
    # setup_context sees needs_input_grad indexed as through the dispatcher: an entry per argument, lists spliced in
    # (the dispatcher's node has entries of its own after them)
    flags = (requires[0], requires[1], requires[1], False, requires[2])
    assert eager[3] == [flags] and dispatched[3][0][: len(flags)] == flags


def test_gradients_match_finite_differences():
    x, weights, scale, shift = _inputs()
    assert torch.autograd.gradcheck(lambda x, w0, w1, s: weighted_sum(x, [w0, w1], scale, s), (x, *weights, shift))


def test_calls_without_gradients_run_the_function_directly():
    x, weights, scale, shift = _inputs((False, False, False))
    assert weighted_sum(x, weights, scale, shift).grad_fn is None
    with torch.no_grad():
        out = weighted_sum(*_inputs())
    assert out.grad_fn is None and not out.requires_grad


def test_an_op_without_a_formula_keeps_the_dispatchers_behaviour():
    """A call needing a gradient from an op without an autograd formula goes to the custom op, which refuses to
    backpropagate (run directly, the function's torch ops would have recorded a graph of their own)."""
    x = torch.randn(3, requires_grad=True)
    out = doubled(x)
    with pytest.raises(RuntimeError, match="autograd"):
        out.sum().backward()
    assert doubled(x.detach()).grad_fn is None


def test_watched_calls_need_the_dispatcher():
    x = torch.randn(2, 3)
    assert not library.dispatcher_needed(x)
    assert library.dispatcher_needed(torch.nn.Parameter(x))  # a subclass
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert library.dispatcher_needed(fake)
        assert weighted_sum(fake, [fake[0]], 2.0, fake).shape == x.shape  # the fake implementation ran

    def under_grad(t):
        assert library.dispatcher_needed(t)
        return (t * 2).sum()

    torch.func.grad(under_grad)(torch.randn(3))


def test_traced_calls_record_the_custom_op():
    """make_fx (as torch.export and AOTAutograd trace) sees one custom op call, not the function's torch ops."""
    x, weights, scale, shift = _inputs((False, False, False))
    graph = make_fx(lambda x, w, s: weighted_sum(x, [w], scale, s), tracing_mode="fake")(x, weights[0], shift)
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert targets == ["transxnet_test.weighted_sum.default"], targets


def test_compiled_calls_record_the_custom_op():
    x, weights, scale, shift = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w0, s: weighted_sum(x, [w0], scale, s), fullgraph=True, backend="aot_eager")
    out = compiled(x, weights[0], shift)
    assert torch.equal(out, weighted_sum(x, [weights[0]], scale, shift))


def test_opcheck():
    opcheck(weighted_sum.library_op, _inputs())
