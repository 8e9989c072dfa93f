"""Public TransXNet ops: argument checks, then the backend `backend.select` picks."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .backend import runs_fused, select


def _check(cond: bool, message: Callable[[], str]) -> None:
    # The message is built only on failure: formatting a symbolic size would make
    # torch.compile specialise it (e.g. a dynamic batch size).
    if not cond:
        raise ValueError(message())


def idconv(
    x: torch.Tensor,
    kernel_logits: torch.Tensor,
    weight: torch.Tensor,
    bias_logits: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Input-dependent depthwise conv (IDConv).

    x [B, C, H, W]; kernel_logits [B, G, C, K, K] (pre-softmax over G);
    weight [G, C, K, K]; bias_logits [B, G, C] and bias [G, C], both or neither.
    Returns [B, C, H, W]: each sample's channels cross-correlated (padding K//2)
    with sum_g softmax_g(kernel_logits) * weight[g], plus sum_g softmax_g(bias_logits) * bias[g].
    """
    _check(x.dim() == 4, lambda: f"idconv: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    _check(weight.dim() == 4 and weight.shape[1] == C and weight.shape[2] == weight.shape[3],
           lambda: f"idconv: weight must be [G, {C}, K, K], got {tuple(weight.shape)}")
    G, _, K, _ = weight.shape
    _check(K % 2 == 1, lambda: f"idconv: kernel size must be odd, got {K}")
    _check(tuple(kernel_logits.shape) == (B, G, C, K, K),
           lambda: f"idconv: kernel_logits must be {(B, G, C, K, K)}, got {tuple(kernel_logits.shape)}")
    _check((bias is None) == (bias_logits is None), lambda: "idconv: pass both bias_logits and bias, or neither")
    if bias is not None:
        _check(tuple(bias.shape) == (G, C), lambda: f"idconv: bias must be {(G, C)}, got {tuple(bias.shape)}")
        _check(tuple(bias_logits.shape) == (B, G, C),
               lambda: f"idconv: bias_logits must be {(B, G, C)}, got {tuple(bias_logits.shape)}")
    return select("idconv", x, kernel_logits, weight, bias_logits, bias)(x, kernel_logits, weight, bias_logits, bias)


def _check_multiscale(name: str, x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> None:
    _check(x.dim() == 4, lambda: f"{name}: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    _check(len(weights) == len(biases) and len(weights) > 0,
           lambda: f"{name}: need one bias per weight, got {len(weights)} weights and {len(biases)} biases")
    for i, (w, b) in enumerate(zip(weights, biases)):
        _check(w.dim() == 4 and w.shape[1] == 1 and w.shape[2] == w.shape[3] and w.shape[2] % 2 == 1,
               lambda: f"{name}: weights[{i}] must be [c_i, 1, k_i, k_i] with odd k_i, got {tuple(w.shape)}")
        _check(tuple(b.shape) == (w.shape[0],), lambda: f"{name}: biases[{i}] must be [{w.shape[0]}], got {tuple(b.shape)}")
    total = sum(w.shape[0] for w in weights)
    _check(total == x.shape[1], lambda: f"{name}: the groups cover {total} channels but x has {x.shape[1]}")


def multiscale_dwconv(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-group depthwise convs over consecutive channel groups, concatenated.

    x [B, sum(c_i), H, W]; weights[i] [c_i, 1, k_i, k_i] (odd k_i); biases[i] [c_i].
    """
    weights, biases = list(weights), list(biases)
    _check_multiscale("multiscale_dwconv", x, weights, biases)
    return select("multiscale_dwconv", x, *weights, *biases)(x, weights, biases)


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
    """BatchNorm(GELU(multiscale_dwconv(x) + x)) with F.batch_norm semantics."""
    weights, biases = list(weights), list(biases)
    _check_multiscale("ms_ffn_middle", x, weights, biases)
    C = x.shape[1]
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        _check(t is None or tuple(t.shape) == (C,), lambda: f"ms_ffn_middle: {name} must be [{C}], got {None if t is None else tuple(t.shape)}")
    _check(training or (running_mean is not None and running_var is not None),
           lambda: "ms_ffn_middle: eval mode needs running_mean and running_var")
    fn = select("ms_ffn_middle", x, *weights, *biases, norm_weight, norm_bias, training=training)
    return fn(x, weights, biases, norm_weight, norm_bias, running_mean, running_var, training, momentum, eps)


def ms_ffn_middle_eval(
    x: torch.Tensor,
    input_scale: torch.Tensor,
    input_shift: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    output_scale: torch.Tensor,
    output_shift: torch.Tensor,
) -> torch.Tensor:
    """Inference-only MS-FFN middle with fc1's GELU + BatchNorm folded in front:
    GELU(msdw(y) + y) * output_scale + output_shift with y = GELU(x) * input_scale + input_shift."""
    weights, biases = list(weights), list(biases)
    _check_multiscale("ms_ffn_middle_eval", x, weights, biases)
    C = x.shape[1]
    for name, t in (("input_scale", input_scale), ("input_shift", input_shift),
                    ("output_scale", output_scale), ("output_shift", output_shift)):
        _check(tuple(t.shape) == (C,), lambda: f"ms_ffn_middle_eval: {name} must be [{C}], got {tuple(t.shape)}")
    fn = select("ms_ffn_middle_eval", x, input_scale, input_shift, *weights, *biases, output_scale, output_shift)
    return fn(x, input_scale, input_shift, weights, biases, output_scale, output_shift)


def has_fused(op: str, x: torch.Tensor) -> bool:
    """Whether a call of `op` on tensors like x (no gradients) would run a fused (non-reference)
    backend under the current backend choice; False where a forced backend lacks it."""
    return runs_fused(op, x.detach())


def osra_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """softmax(q @ k^T * scale + bias) @ v.

    q [B, h, N, d]; k, v [B, h, M, d]; bias broadcastable to [B, h, N, M] with
    batch dim 1 or B; scale defaults to d**-0.5. Returns [B, h, N, d].
    """
    _check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "osra_attention: q, k, v must be 4-D [B, h, L, d]")
    B, h, N, d = q.shape
    M = k.shape[2]
    _check(tuple(k.shape) == (B, h, M, d) and tuple(v.shape) == (B, h, M, d),
           lambda: f"osra_attention: k and v must be {(B, h, 'M', d)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if bias is not None:
        # `== 1 or == B` (not `in (1, B)`) so torch.compile keeps a dynamic batch size symbolic
        _check(bias.dim() == 4 and (bias.shape[0] == 1 or bias.shape[0] == B) and bias.shape[1] in (1, h)
               and tuple(bias.shape[2:]) == (N, M),
               lambda: f"osra_attention: bias must be [1 or {B}, 1 or {h}, {N}, {M}], got {tuple(bias.shape)}")
    return select("osra_attention", q, k, v, bias)(q, k, v, bias, scale)
