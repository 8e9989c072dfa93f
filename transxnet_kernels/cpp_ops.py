"""The ``cpp`` backend: C++ CPU kernels from ``csrc/`` (extension ``transxnet_kernels._C``).

Forward only (inference), fp32 and fp64, CPU tensors. Each op is a
``torch.library`` custom op ``transxnet::<op>_cpp`` with a fake impl, so
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
``.contiguous()``) and return a contiguous tensor (``_channels_last_input`` is
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
  gelu(conv + bias + y) * output_scale + output_shift. Bytes: x + out.
* osra_attention: per (b, head, block of 128 query rows) pack k^T and v, then
  per row scores in registers, scale + bias, softmax, p @ v; the [N, M] score
  matrix never reaches memory. Bytes: q + k + v + bias + out; FLOPs 4*B*h*N*M*d.
  q, k, v and bias may have any strides (the model passes transposed views).
"""
from __future__ import annotations

import importlib.util
from typing import List, Optional, Sequence

import torch

from . import backend

if importlib.util.find_spec("transxnet_kernels._C") is None:  # no compiler, failed build, TRANSXNET_NO_CPP=1
    raise ImportError("the C++ extension transxnet_kernels._C is not built; build it with "
                      "`python setup.py build_ext --inplace` or reinstall with a C++ compiler")
from . import _C  # noqa: E402  (an ImportError here, e.g. an ABI mismatch, says why)

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def kernel_isa() -> str:
    """Instruction set of the kernels in use: 'avx512', 'avx2' or 'baseline' (the best the CPU has)."""
    return _C.kernel_isa()


def set_kernel_isa(name: str) -> str:
    """Use the kernels built for `name` (one the CPU supports; for tests); returns the previous choice."""
    return _C.set_kernel_isa(name)


def cpp_supports(info: backend.CallInfo) -> Optional[str]:
    if info.device.type != "cpu":
        return f"the cpp kernels run on CPU tensors, got device {info.device}"
    if info.dtype not in SUPPORTED_DTYPES:
        return f"dtype {info.dtype} is not supported (float32 and float64 only)"
    if info.needs_grad:
        return "the cpp kernels are forward-only; calls that need gradients run on the reference"
    return None


def _channels_last_input(x: torch.Tensor) -> bool:
    # The layout rule of csrc/ops.cpp (channels_last_input): unit-stride channels
    # (channels_last, or a channel slice of a channels_last tensor) run the NHWC
    # kernels with no layout copy.
    return x.shape[1] > 1 and x.stride(1) == 1


def _empty_conv_output(x: torch.Tensor) -> torch.Tensor:
    # The conv ops return channels_last for an NHWC input, contiguous otherwise.
    memory_format = torch.channels_last if _channels_last_input(x) else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format)


@torch.library.custom_op("transxnet::idconv_cpp", mutates_args=())
def idconv_cpp(x: torch.Tensor, kernel_logits: torch.Tensor, weight: torch.Tensor,
               bias_logits: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _C.idconv_forward(x, kernel_logits, weight, bias_logits, bias)


@idconv_cpp.register_fake
def _(x, kernel_logits, weight, bias_logits, bias):
    return _empty_conv_output(x)


@torch.library.custom_op("transxnet::multiscale_dwconv_cpp", mutates_args=())
def multiscale_dwconv_cpp(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor]) -> torch.Tensor:
    return _C.multiscale_dwconv_forward(x, weights, biases)


@multiscale_dwconv_cpp.register_fake
def _(x, weights, biases):
    return _empty_conv_output(x)


@torch.library.custom_op("transxnet::ms_ffn_middle_cpp", mutates_args=())
def ms_ffn_middle_cpp(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                      norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                      running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    return _C.ms_ffn_middle_forward(x, weights, biases, norm_weight, norm_bias, running_mean, running_var, eps)


@ms_ffn_middle_cpp.register_fake
def _(x, weights, biases, norm_weight, norm_bias, running_mean, running_var, eps):
    return _empty_conv_output(x)


@torch.library.custom_op("transxnet::ms_ffn_middle_eval_cpp", mutates_args=())
def ms_ffn_middle_eval_cpp(x: torch.Tensor, input_scale: torch.Tensor, input_shift: torch.Tensor,
                           weights: List[torch.Tensor], biases: List[torch.Tensor], output_scale: torch.Tensor,
                           output_shift: torch.Tensor) -> torch.Tensor:
    return _C.ms_ffn_middle_eval_forward(x, input_scale, input_shift, weights, biases, output_scale, output_shift)


@ms_ffn_middle_eval_cpp.register_fake
def _(x, input_scale, input_shift, weights, biases, output_scale, output_shift):
    return _empty_conv_output(x)


@torch.library.custom_op("transxnet::osra_attention_cpp", mutates_args=())
def osra_attention_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                       scale: float) -> torch.Tensor:
    return _C.osra_attention_forward(q, k, v, bias, scale)


@osra_attention_cpp.register_fake
def _(q, k, v, bias, scale):
    # q's dimension order, dense (empty_like, as the kernel allocates it): for the model's
    # transposed channels_last q, its transpose + reshape back to [B, C, H, W] is a view.
    return torch.empty_like(q)


@backend.register("idconv", "cpp", supports=cpp_supports)
def idconv(x, kernel_logits, weight, bias_logits=None, bias=None):
    return idconv_cpp(x, kernel_logits, weight, bias_logits, bias)


@backend.register("multiscale_dwconv", "cpp", supports=cpp_supports)
def multiscale_dwconv(x, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]):
    return multiscale_dwconv_cpp(x, list(weights), list(biases))


def ms_ffn_middle_supports(info: backend.CallInfo) -> Optional[str]:
    if info.training:
        # Batch statistics need a reduction over the whole batch before the epilogue.
        return "the cpp kernel fuses eval-mode BatchNorm only (training uses batch statistics)"
    return cpp_supports(info)


@backend.register("ms_ffn_middle", "cpp", supports=ms_ffn_middle_supports)
def ms_ffn_middle(x, weights, biases, norm_weight, norm_bias, running_mean, running_var, training,
                  momentum=0.1, eps=1e-5):
    return ms_ffn_middle_cpp(x, list(weights), list(biases), norm_weight, norm_bias, running_mean, running_var,
                             float(eps))


@backend.register("ms_ffn_middle_eval", "cpp", supports=cpp_supports)
def ms_ffn_middle_eval(x, input_scale, input_shift, weights, biases, output_scale, output_shift):
    return ms_ffn_middle_eval_cpp(x, input_scale, input_shift, list(weights), list(biases), output_scale,
                                  output_shift)


@backend.register("osra_attention", "cpp", supports=cpp_supports)
def osra_attention(q, k, v, bias=None, scale=None):
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return osra_attention_cpp(q, k, v, bias, float(scale))
