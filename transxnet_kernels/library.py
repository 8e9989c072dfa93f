"""torch.library custom ops that plain eager calls run without the dispatcher.

Every fused op is a ``torch.library`` custom op, so ``torch.compile(fullgraph=True)``, ``torch.export``,
FakeTensor and ``opcheck`` see one op with its fake implementation and autograd formula. In plain eager mode the
dispatcher's layers cost more host time than most kernels take: per call, pytree flattening of the list
arguments, a dynamo-disabled wrapper, the redispatch below autograd, and an autograd node built from pytree specs.
On this project's 2-core CPU host (`benchmarks.host_overhead` with and without --through-dispatcher, launches
stubbed), TransXNet-T's op calls took 1.21-1.51x the host time through the dispatcher: the MS-FFN middle's
training call (three custom ops: forward, backward, running statistics) ~940 µs against ~680 at stage 4, the
forward-only calls 1.20-1.32x. A GPU host that spends that on every call leaves the GPU idle wherever its kernels
are shorter (stages 3-4, small batches).

``LibraryOp`` wraps a custom op and the Python function it was made from. A call goes through the dispatcher
(the custom op itself) whenever anything may be watching it: torch.compile or jit tracing, a tensor subclass
(FakeTensor, FunctionalTensor, DTensor, a Parameter), a TorchDispatchMode (make_fx, export, FakeTensorMode), a
functorch transform, or an input that needs a gradient for an op without an autograd formula (the custom op's
own behaviour then applies). Otherwise it calls the function directly, and where an input needs a gradient it
records one ``torch.autograd.Function`` node running the same setup_context and backward formula that
``register_autograd`` gave the custom op. Both routes run the same Python and the same kernels: results are
bit-identical (each op's tests check outputs, every gradient and in-place updates both ways,
`tests/helpers.check_dispatcher_paths_agree`; tests/test_library.py checks the routing).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

# A positional argument's shape in the flat argument list of the autograd node: a single value, or a list of n.
_SINGLE = -1


def dispatcher_needed(first: Any) -> bool:
    """Whether a call whose first argument is `first` must go through the dispatcher (see the module docstring).
    Only the first tensor's type is checked: the ops take their feature map first, and a traced or faked call
    has every tensor so."""
    return (
        torch.compiler.is_compiling()
        or type(first) is not torch.Tensor
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._are_functorch_transforms_active()
        or torch.jit.is_tracing()
    )


def _tensors(args: Sequence[Any]):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _flatten(args: Sequence[Any]) -> Tuple[Tuple[int, ...], List[Any]]:
    """(each argument's length or _SINGLE, the arguments with lists spliced in)."""
    lengths, flat = [], []
    for a in args:
        if isinstance(a, (list, tuple)):
            lengths.append(len(a))
            flat.extend(a)
        else:
            lengths.append(_SINGLE)
            flat.append(a)
    return tuple(lengths), flat


def _nest(flat: Sequence[Any], lengths: Sequence[int]) -> List[Any]:
    args, i = [], 0
    for n in lengths:
        if n == _SINGLE:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i : i + n]))
            i += n
    return args


class _EagerAutograd(torch.autograd.Function):
    """One autograd node for a LibraryOp call: forward runs the op's function and its setup_context, backward its
    backward formula; list arguments travel spliced into the flat argument list (autograd sees each tensor)."""

    @staticmethod
    def forward(ctx, op: LibraryOp, lengths: Tuple[int, ...], *flat):
        args = _nest(flat, lengths)
        output = op.function(*args)
        # needs_input_grad indexed as the custom op's setup_context sees it: one entry per argument with lists
        # spliced in, without this node's own two leading arguments.
        ctx.needs_input_grad = ctx.needs_input_grad[2:]
        op.setup_context(ctx, args, output)
        ctx.library_op_lengths = lengths
        ctx.library_op_backward = op.backward
        return output

    @staticmethod
    def backward(ctx, *grad_outputs):
        grads = ctx.library_op_backward(ctx, *grad_outputs)
        if not isinstance(grads, tuple):
            grads = (grads,)
        flat: List[Optional[torch.Tensor]] = [None, None]
        for n, g in zip(ctx.library_op_lengths, grads):
            if n == _SINGLE:
                flat.append(g)
            else:
                flat.extend([None] * n if g is None else g)
        return tuple(flat)


class LibraryOp:
    """A torch.library custom op (``.library_op``) and the function it runs (``.function``); calling it takes the
    dispatcher only where something may watch the call (module docstring). register_fake and register_autograd
    register on the custom op, as torch.library's do."""

    def __init__(self, library_op: Any, function: Callable):
        self.library_op = library_op
        self.function = function
        self.setup_context: Optional[Callable] = None
        self.backward: Optional[Callable] = None
        self.__name__ = function.__name__
        self.__doc__ = function.__doc__

    def __repr__(self) -> str:
        return f"<LibraryOp {self.library_op!r}>"

    def register_fake(self, fake: Callable) -> Callable:
        return self.library_op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.library_op.register_autograd(backward, setup_context=setup_context)
        self.backward, self.setup_context = backward, setup_context

    def __call__(self, *args):
        if dispatcher_needed(args[0]):
            return self.library_op(*args)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(args))):
            return self.function(*args)
        if self.backward is None:
            return self.library_op(*args)
        lengths, flat = _flatten(args)
        return _EagerAutograd.apply(self, lengths, *flat)


def custom_op(name: str, *, mutates_args: Sequence[str] = (), schema: Optional[str] = None):
    """Decorator: ``torch.library.custom_op(name, fn, ...)`` wrapped in a LibraryOp (called positionally)."""

    def deco(fn: Callable) -> LibraryOp:
        return LibraryOp(torch.library.custom_op(name, fn, mutates_args=mutates_args, schema=schema), fn)

    return deco
