"""The ``cpp`` backend: C++ CPU kernels from ``csrc/`` (extension ``transxnet_kernels._C``; this is its Python side).

Forward only (inference), fp32 and fp64, CPU tensors. Each op is a
``torch.library`` custom op ``transxnet_cpp::<op>`` with a fake impl, so
``torch.compile(fullgraph=True)`` traces it as one opaque node. Calls that need
gradients are declined by ``cpp_supports`` (``auto`` then runs the reference,
whose autograd is exact), and the custom ops register no autograd formula, so a
direct call under autograd raises instead of returning a wrong gradient.

Kernels (csrc/kernels.h; built for AVX-512, AVX2+FMA and the baseline ISA, the
best the CPU runs picked at run time, ``kernel_isa()`` says which), with the minimal traffic each must move.

Layouts: the depthwise ops run natively on inputs whose channels are
unit-stride (channels_last, or a channel slice of a channels_last tensor such as
the model's ``x.chunk(2, dim=1)[0]``, read with its pixel stride, no copy) and
then return a channels_last tensor; other inputs run the NCHW kernels (after
``.contiguous()``) and return a contiguous tensor (``layout.channels_last_input`` is
the rule, shared with the C++ side and the fake impls). NHWC kernels: input rows
are staged into a ring of zero-bordered row buffers (for ms_ffn_middle_eval the
staging computes y = GELU(x) * s + t, once per element), the weights tap-major
[K*K][C], each channel vector of 4 output pixels accumulated in registers.
osra_attention returns its output in q's dimension order (``empty_like(q)``),
so the model's ``out.transpose(-1, -2).reshape(B, C, H, W)`` is a view.

* idconv: per (b, c) plane mix the K*K kernel (softmax over G), zero-pad the
  plane in a scratch buffer, depthwise conv with bias.
  Bytes: x + out + kernel_logits (+ weight), i.e. ~2*B*C*H*W elements.
* multiscale_dwconv: the same plane kernel, the kernel size per channel group,
  written straight into the concatenated output. Bytes: x + out.
* ms_ffn_middle (eval): the plane kernel with the epilogue
  gelu(conv + bias + x) * scale + shift, BatchNorm folded into per-channel
  scale/shift (computed in fp64). Bytes: x + out, versus ~10 passes eagerly
  (split, conv per group, cat, add, GELU, BatchNorm). Training-mode BatchNorm
  (batch statistics) is not fused: it runs on the reference.
* ms_ffn_middle_eval: y = gelu(x) * input_scale + input_shift computed while
  staging the conv input (the conv zero-pads y), then the epilogue
  gelu(conv + bias + y) * output_scale + output_shift. Bytes: x + out
  (``ms_ffn_middle_eval_overwriting``: out may be x's storage).
* osra_attention: per (b, head, block of 128 query rows) pack k^T and v, then
  per row scores in registers, scale + bias, softmax, p @ v; the [N, M] score
  matrix never reaches memory. Bytes: q + k + v + bias + out; FLOPs 4*B*h*N*M*d.
  q, k, v and bias may have any strides (the model passes transposed views).
"""

from __future__ import annotations

import importlib.util
from typing import Callable, List, Optional

import torch

from .. import ops
from ..backend import CallInfo
from ..layout import empty_like_layout
from ..library import custom_op

if importlib.util.find_spec("transxnet_kernels._C") is None:  # no compiler, failed build, TRANSXNET_NO_CPP=1
    raise ImportError(
        "the C++ extension transxnet_kernels._C is not built; build it with "
        "`python setup.py build_ext --inplace` or reinstall with a C++ compiler"
    )
from .. import _C

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _kernel(name: str) -> Callable:
    """The extension's function `name` as an op's unchecked kernel (looked up per call, so tests can wrap `_C`)."""
    return lambda *args: getattr(_C, name)(*args)


def kernel_isa() -> str:
    """Instruction set of the kernels in use: 'avx512', 'avx2' or 'baseline' (the best the CPU has)."""
    return _C.kernel_isa()


def set_kernel_isa(name: str) -> str:
    """Use the kernels built for `name` (one the CPU supports; for tests); returns the previous choice."""
    return _C.set_kernel_isa(name)


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """x = GELU(x) in place, returning x: the exact (erf) form, fp32 through the kernels' fitted rational erf
    (|erf error| <= 3.7e-7, as in ms_ffn_middle_eval). A dense float32/float64 CPU tensor of any dimension order,
    outside autograd. Not an op: the accelerated model's CPU inference applies it to fresh conv and matmul
    outputs, where torch's fp32 GELU runs oneDNN's eltwise primitive (~10 us a call on 300 elements, 30-190 us
    inside a batch-1 forward, its OpenMP region included); this runs on the calling thread below 16384 elements."""
    return _C.gelu_(x)


def strided_dwconv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride: int,
    padding: int,
    gelu: bool = False,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding, groups=C) for a depthwise weight [C, 1, K, K], then GELU if
    `gelu`, then * scale + shift (C elements each, any shape) if given; a channels_last result, any input layout
    (channels_last read in place). Not an op: OSRA's strided spatial reduction in the accelerated model's CPU
    inference, which oneDNN runs at 50-130 us a call at batch 1 for 0.1-0.2M multiply-adds. Forward only,
    float32/float64 CPU tensors, outside autograd. Bytes: x + out (+ the small weight)."""
    return _C.strided_dwconv_forward(x, weight, bias, stride, padding, gelu, scale, shift)


def ms_ffn_middle_eval_overwriting(
    x: torch.Tensor,
    input_scale: torch.Tensor,
    input_shift: torch.Tensor,
    weights: List[torch.Tensor],
    biases: List[torch.Tensor],
    output_scale: torch.Tensor,
    output_shift: torch.Tensor,
) -> torch.Tensor:
    """ms_ffn_middle_eval whose result may take x's storage, overwriting x: for x a fresh tensor no one else reads
    (the accelerated model's fc1 output). It does where that is safe: x dense channels_last, kernels of at most
    63x63 (the NHWC kernels), and at least as many samples as threads (each sample one task, which reads input
    rows only past the output rows it has written). A fresh result is a first touch of new memory there, a page
    fault per 4 KB (TransXNet-S at batch 16, stage 1: 77 MB, ~19 ms of a ~75 ms call). Not an op: forward only,
    float32/float64 CPU tensors, outside autograd."""
    return _C.ms_ffn_middle_eval_overwriting(x, input_scale, input_shift, weights, biases, output_scale, output_shift)


def idconv_eval(
    x: torch.Tensor,
    reduce_weight: torch.Tensor,
    reduce_bias: torch.Tensor,
    expand_weight: torch.Tensor,
    expand_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """IDConv's eval forward from its input x [B, C, H, W]: the logits from `proj` as two linear layers
    (reduce_weight [R, C] and reduce_bias [R]: its 1x1 conv with the BatchNorm folded; GELU; expand_weight
    [G*C, R] and expand_bias [G*C]: its second 1x1 conv) applied to the input pooled to K x K (adaptive average
    pooling, PyTorch's bins) and to its mean, then `idconv` with weight [G, C, K, K] and bias [G, C]. The pooling
    and the mean are one pass of box sums over x, the kernel and bias logits come out of one matmul in the layout
    the mixing reads, so the ~13 torch calls of the same math (0.1-0.2 ms per call at batch 1 in TransXNet-T)
    are one. idconv's layout rule. Not an op: forward only, float32/float64 CPU tensors, outside autograd.
    Bytes: x + out (+ the weights and K*K + 1 rows of logits)."""
    return _C.idconv_eval(x, reduce_weight, reduce_bias, expand_weight, expand_bias, weight, bias)


def supports(info: CallInfo) -> Optional[str]:
    """The cpp backend's predicate: None when the kernels can run the call, else why not."""
    if info.device.type != "cpu":
        return f"the cpp kernels run on CPU tensors, got device {info.device}"
    if info.dtype not in SUPPORTED_DTYPES:
        return f"dtype {info.dtype} is not supported (float32 and float64 only)"
    if info.needs_grad:
        return "the cpp kernels are forward-only; calls that need gradients run on the reference"
    return None


def supports_eval_batchnorm(info: CallInfo) -> Optional[str]:
    if info.training:
        # Batch statistics need a reduction over the whole batch before the epilogue.
        return "the cpp kernel fuses eval-mode BatchNorm only (training uses batch statistics)"
    return supports(info)


@ops.idconv.register("cpp", supports=supports, unchecked=_kernel("idconv_forward"))
@ops.idconv.library_op("transxnet_cpp", fake=lambda x, *_: empty_like_layout(x))
def idconv(x, kernel_logits, weight, bias_logits, bias):
    return _C.idconv_forward(x, kernel_logits, weight, bias_logits, bias)


@ops.multiscale_dwconv.register("cpp", supports=supports, unchecked=_kernel("multiscale_dwconv_forward"))
@ops.multiscale_dwconv.library_op("transxnet_cpp", fake=lambda x, *_: empty_like_layout(x))
def multiscale_dwconv(x, weights, biases):
    return _C.multiscale_dwconv_forward(x, weights, biases)


@custom_op("transxnet_cpp::ms_ffn_middle", mutates_args=())
def ms_ffn_middle_inference(
    x: torch.Tensor,
    weights: List[torch.Tensor],
    biases: List[torch.Tensor],
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """ms_ffn_middle with eval-mode BatchNorm (the only mode this backend runs)."""
    return _C.ms_ffn_middle_forward(x, weights, biases, norm_weight, norm_bias, running_mean, running_var, eps)


@ms_ffn_middle_inference.register_fake
def _(x, weights, biases, norm_weight, norm_bias, running_mean, running_var, eps):
    return empty_like_layout(x)


@ops.ms_ffn_middle.register("cpp", supports=supports_eval_batchnorm)
def ms_ffn_middle(x, weights, biases, norm_weight, norm_bias, running_mean, running_var, training, momentum, eps):
    return ms_ffn_middle_inference(x, weights, biases, norm_weight, norm_bias, running_mean, running_var, float(eps))


@ops.ms_ffn_middle_eval.register("cpp", supports=supports, unchecked=_kernel("ms_ffn_middle_eval_forward"))
@ops.ms_ffn_middle_eval.library_op("transxnet_cpp", fake=lambda x, *_: empty_like_layout(x))
def ms_ffn_middle_eval(x, input_scale, input_shift, weights, biases, output_scale, output_shift):
    return _C.ms_ffn_middle_eval_forward(x, input_scale, input_shift, weights, biases, output_scale, output_shift)


# The output has q's dimension order, dense (empty_like, as the kernel allocates it): for the model's transposed
# channels_last q, its transpose + reshape back to [B, C, H, W] is a view.
@ops.osra_attention.register("cpp", supports=supports, unchecked=_kernel("osra_attention_forward"))
@ops.osra_attention.library_op("transxnet_cpp", fake=lambda q, *_: torch.empty_like(q))
def osra_attention(q, k, v, bias, scale):
    return _C.osra_attention_forward(q, k, v, bias, scale)
