"""Pure-PyTorch reference implementations of the TransXNet ops.

These are the test oracle and the fallback of every fused backend. They import
nothing but torch, compute exactly what the authors' released model computes,
and get their gradients from PyTorch autograd.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def idconv_mix(logits: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """IDConv's per-sample kernels (or biases): sum_g softmax_g(logits)[b, g] * bank[g], logits [B, G, ...]
    and bank [G, ...] -> [B, ...]."""
    return (torch.softmax(logits, dim=1) * bank.unsqueeze(0)).sum(dim=1)


def idconv(
    x: torch.Tensor,
    kernel_logits: torch.Tensor,
    weight: torch.Tensor,
    bias_logits: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Input-dependent depthwise conv.

    w_b = sum_g softmax_g(kernel_logits)[b, g] * weight[g]        -> [B, C, K, K]
    b_b = sum_g softmax_g(bias_logits)[b, g] * bias[g]            -> [B, C]
    out[b, c] = cross_correlate(x[b, c], w_b[b, c], padding K//2) + b_b[b, c]
    """
    B, C, H, W = x.shape
    K = weight.shape[-1]
    kernel = idconv_mix(kernel_logits, weight)
    conv_bias = None
    if bias is not None:
        conv_bias = idconv_mix(bias_logits, bias).reshape(-1)
    if torch.compiler.is_exporting() and not isinstance(B, int):  # issue 14 (export)
        return _per_sample_dwconv_by_patches(x, kernel, conv_bias)
    out = F.conv2d(
        x.reshape(1, B * C, H, W),
        kernel.reshape(B * C, 1, K, K),
        bias=conv_bias,
        padding=K // 2,
        groups=B * C,
    )
    return out.reshape(B, C, H, W)


# --- issue 14 (export): begin
def _per_sample_dwconv_by_patches(x: torch.Tensor, kernel: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """idconv's per-sample depthwise conv (kernel [B, C, K, K], bias [B*C] or None) with a batch-independent
    conv: a depthwise conv with one-hot kernels gathers each pixel's K*K neighbours, which are then weighted
    per (sample, channel) and summed. For exporting with a symbolic batch size: the grouped conv above
    needs groups = B*C, which ONNX's Conv takes as a constant."""
    B, C, H, W = x.shape
    K = kernel.shape[-1]
    one_hot = torch.eye(K * K, dtype=x.dtype, device=x.device).reshape(K * K, 1, K, K).repeat(C, 1, 1, 1)
    patches = F.conv2d(x, one_hot, padding=K // 2, groups=C).reshape(B, C, K * K, H, W)
    out = (patches * kernel.reshape(B, C, K * K, 1, 1)).sum(dim=2)
    return out if bias is None else out + bias.reshape(B, C, 1, 1)


# --- issue 14 (export): end


def multiscale_dwconv(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenation of per-group depthwise convs (group i: c_i channels, kernel k_i, padding k_i//2). Weights and
    biases of another dtype than x's (under autocast, where the ops pass them uncast) are rounded to x's first."""
    widths = [w.shape[0] for w in weights]
    parts = torch.split(x, widths, dim=1)
    return torch.cat(
        [
            F.conv2d(part, w.to(x.dtype), b.to(x.dtype), padding=w.shape[-1] // 2, groups=w.shape[0])
            for part, w, b in zip(parts, weights, biases)
        ],
        dim=1,
    )


def ms_ffn_middle(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The MS-FFN middle: BatchNorm(GELU(multiscale_dwconv(x) + x)).

    BatchNorm follows F.batch_norm: batch statistics and in-place running-stat
    updates when `training`, running statistics otherwise.
    """
    y = F.gelu(multiscale_dwconv(x, weights, biases) + x)
    return F.batch_norm(y, running_mean, running_var, norm_weight, norm_bias, training, momentum, eps)


def ms_ffn_middle_eval(
    x: torch.Tensor,
    input_scale: torch.Tensor,
    input_shift: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    output_scale: torch.Tensor,
    output_shift: torch.Tensor,
) -> torch.Tensor:
    """Inference MS-FFN from fc1's conv output to fc2's input, eval BatchNorms folded:

    y = GELU(x) * input_scale + input_shift          (fc1's GELU and BatchNorm)
    out = GELU(multiscale_dwconv(y) + y) * output_scale + output_shift   (the middle and its BatchNorm)
    """

    def per_channel(t):
        return t.view(1, -1, 1, 1)

    y = F.gelu(x) * per_channel(input_scale) + per_channel(input_shift)
    return F.gelu(multiscale_dwconv(y, weights, biases) + y) * per_channel(output_scale) + per_channel(output_shift)


def osra_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """softmax(q @ k^T * scale + bias) @ v, with q [B,h,N,d], k and v [B,h,M,d]."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    attn = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        attn = attn + bias
    return torch.softmax(attn, dim=-1) @ v
