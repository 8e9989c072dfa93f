"""The accelerated forwards: subclasses of the released modules that fold and fuse, and the folding math.

`transxnet.accelerated()` swaps each released module's class for its subclass here (`ACCELERATED`), and
`transxnet.revert()` swaps it back: no parameter or buffer is created, copied or re-registered, so the
state dict keeps its keys, order and values. What the subclasses change:

* Training and eval: the MS-FFN middle (multi-scale depthwise convs + residual + GELU + BatchNorm) runs as
  one op, `ms_ffn_middle`, with nn.BatchNorm2d's exact batch-statistics and running-statistics semantics;
  the relative-position bias is resized once per stage instead of once per block, and cached per input
  size when no gradient is needed.
* Eval only: every BatchNorm next to a conv is folded into it (stem, downsamplers, IDConv's projection,
  OSRA's reduction, the STE's three BatchNorms, fc2), and so are the blocks' layer scales (into the STE's
  last conv and fc2); where a fused backend has it, fc1's GELU + BatchNorm, the multi-scale depthwise convs,
  the residual, GELU and BatchNorm run as one op (`ms_ffn_middle_eval`). All of it is exact in real
  arithmetic: results differ from eager by float rounding only.
* CPU inference (eval, no gradients): the network runs in channels_last, where oneDNN's convolutions are
  about twice as fast and the C++ kernels work natively; conv + GELU pairs run as one oneDNN convolution
  with a fused exact-GELU post-op.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import transxnet_kernels as tk

from .model import Block, ConvNorm, HybridTokenMixer, LayerScale, Mlp, TransXNet, reduced_size, resize_relative_pos_enc

# ------------------------------------------------------------------------------------- folding math


def batchnorm_scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode bn as a per-channel affine map x * scale + shift."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def scale_conv_output(weight, bias, scale, shift) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a conv whose output is then mapped per channel to out * scale + shift."""
    return weight * scale.view(-1, 1, 1, 1), bias * scale + shift


def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of conv followed by eval-mode bn, as one conv (exact up to rounding)."""
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return scale_conv_output(conv.weight, bias, *batchnorm_scale_shift(bn))


def fold_bn_into_next_pointwise(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of eval-mode bn followed by a 1x1 conv (groups=1), as one conv."""
    scale, shift = batchnorm_scale_shift(bn)
    weight = conv.weight * scale.view(1, -1, 1, 1)
    bias = conv.weight.flatten(1) @ shift
    if conv.bias is not None:
        bias = bias + conv.bias
    return weight, bias


def layer_scale_affine(layer_scale: Optional[LayerScale], channels: int, like: torch.Tensor):
    """(weight, bias) of a layer scale as flat [C] vectors; identity when there is none."""
    if layer_scale is None:
        return like.new_ones(channels), like.new_zeros(channels)
    return layer_scale.weight.flatten(), layer_scale.bias


def conv_with(conv: nn.Conv2d, x, weight, bias):
    """conv's geometry (stride, padding, dilation, groups) with other weights."""
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


_ONEDNN_CONV_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def conv_gelu(conv: nn.Conv2d, x, weight, bias):
    """GELU(conv(x)); on CPU inference one oneDNN convolution with a fused exact-GELU post-op."""
    if (
        _ONEDNN_CONV_POINTWISE
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    ):
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, "gelu", [], "none"
        )
    return F.gelu(conv_with(conv, x, weight, bias))


def mlp_weights(mlp: Mlp):
    """The multi-scale depthwise convs' weights and biases, as the MS-FFN ops take them."""
    return [p.weight for p in mlp.dwconv.proj], [p.bias for p in mlp.dwconv.proj]


# ------------------------------------------------------------------------------- accelerated modules


class AcceleratedConvNorm(ConvNorm):
    """Eval: conv and BatchNorm (and GELU) as one conv."""

    def forward(self, x):
        if self.training:
            return super().forward(x)
        weight, bias = fold_bn_into_conv(self.conv, self.bn)
        if hasattr(self, "act"):
            return conv_gelu(self.conv, x, weight, bias)
        return conv_with(self.conv, x, weight, bias)


class AcceleratedHybridTokenMixer(HybridTokenMixer):
    """Eval: the STE's BatchNorms folded into its convs and the block's layer scale into its last conv."""

    def forward(self, x, relative_pos_enc=None, layer_scale: Optional[LayerScale] = None):
        if self.training:
            assert layer_scale is None, "the layer scale is folded in eval mode only"
            return super().forward(x, relative_pos_enc)
        x = self.mix(x, relative_pos_enc)
        ls_weight, ls_bias = layer_scale_affine(layer_scale, x.shape[1], x)
        # ls(proj(x) + x) = [ls folded into proj's last conv](x) + ls_weight * x
        return torch.addcmul(self.folded_ste(x, ls_weight, ls_bias), x, ls_weight.view(1, -1, 1, 1))

    def folded_ste(self, x, out_scale, out_shift):
        """The STE in eval mode, its three BatchNorms folded into the 1x1 convs and its output
        mapped to out * out_scale + out_shift: dw3x3 -> GELU -> 1x1 -> GELU -> 1x1."""
        dw, _, bn1, pw1, _, bn2, pw2, bn3 = self.proj  # the GELUs are fused into the convs
        x = conv_gelu(dw, x, dw.weight, dw.bias)
        x = conv_gelu(pw1, x, *fold_bn_into_next_pointwise(bn1, pw1))
        w, b = scale_conv_output(*fold_bn_into_next_pointwise(bn2, pw2), *batchnorm_scale_shift(bn3))
        return F.conv2d(x, *scale_conv_output(w, b, out_scale, out_shift))


class AcceleratedMlp(Mlp):
    """The MS-FFN middle as one op; eval: fc2's BatchNorm and the block's layer scale folded into fc2, and
    fc1's GELU + BatchNorm into the middle op where a fused backend has `ms_ffn_middle_eval`."""

    def forward(self, x, layer_scale: Optional[LayerScale] = None):
        if self.training:
            assert layer_scale is None, "the layer scale is folded in eval mode only"
            return self.drop(self.fc2(self.drop(self.fused_middle(self.fc1(x)))))
        h = self.fc1[0](x)
        if tk.has_fused("ms_ffn_middle_eval", h):
            x = self.fused_eval(h)
        else:
            x = self.fused_middle(self.fc1[2](self.fc1[1](h)))
        return self.drop(self.folded_fc2(self.drop(x), layer_scale))

    def folded_fc2(self, x, layer_scale: Optional[LayerScale] = None):
        """fc2 in eval mode with its BatchNorm (and the block's layer scale) folded into the conv."""
        conv = self.fc2[0]
        weight, bias = scale_conv_output(
            *fold_bn_into_conv(conv, self.fc2[1]), *layer_scale_affine(layer_scale, conv.out_channels, conv.weight)
        )
        return conv_with(conv, x, weight, bias)

    def fused_eval(self, h):
        """Eval: fc1's GELU + BatchNorm, the middle and its BatchNorm in one op (`h` is fc1's conv output)."""
        in_scale, in_shift = batchnorm_scale_shift(self.fc1[2])
        out_scale, out_shift = batchnorm_scale_shift(self.norm)
        return tk.ms_ffn_middle_eval(h, in_scale, in_shift, *mlp_weights(self), out_scale, out_shift)

    def fused_middle(self, x):
        """norm(act(dwconv(x) + x)) in one op, with nn.BatchNorm2d's exact semantics."""
        bn = self.norm
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(bn.num_batches_tracked)
        use_batch_stats = bn.training or bn.running_mean is None
        track = not bn.training or bn.track_running_stats
        return tk.ms_ffn_middle(
            x,
            *mlp_weights(self),
            bn.weight,
            bn.bias,
            bn.running_mean if track else None,
            bn.running_var if track else None,
            use_batch_stats,
            momentum,
            bn.eps,
        )


class AcceleratedBlock(Block):
    """Eval: each branch's layer scale folded into the branch's last conv (drop path is off in eval)."""

    def _forward(self, x, relative_pos_enc=None):
        if self.training:
            return super()._forward(x, relative_pos_enc)
        x = x + self.pos_embed(x)
        x = x + self.token_mixer(self.norm1(x), relative_pos_enc, self.layer_scale_1)
        return x + self.mlp(self.norm2(x), self.layer_scale_2)


class AcceleratedTransXNet(TransXNet):
    """The relative-position bias resized once per stage (and cached); CPU inference in channels_last."""

    _rpe_cache: Dict[int, tuple]

    def stage_relative_pos_enc(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """The bias resized to the stage's input once (exact: the blocks share it); when no gradient is
        needed, cached per input size until the parameter changes."""
        rpe = self.relative_pos_enc[stage]
        H, W = x.shape[-2:]
        sr = self.arch["sr_ratios"][stage]
        n, m = H * W, reduced_size(H, sr) * reduced_size(W, sr)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and rpe.requires_grad):
            return resize_relative_pos_enc(rpe, n, m)
        key = (stage, n, m, rpe.device, rpe.dtype, rpe.data_ptr(), rpe._version)
        cached = self._rpe_cache.get(stage)
        if cached is None or cached[0] != key:
            cached = (key, resize_relative_pos_enc(rpe, n, m))
            self._rpe_cache[stage] = cached
        return cached[1]

    def stem(self, x):
        if not self.training and x.device.type == "cpu":
            # oneDNN's convolutions run about twice as fast on channels_last data, and the cpp
            # kernels work on it natively: accelerated CPU inference runs in channels_last.
            x = x.contiguous(memory_format=torch.channels_last)
        return super().stem(x)


# Released class -> accelerated subclass (what accelerated() swaps; revert() swaps back).
ACCELERATED = {
    ConvNorm: AcceleratedConvNorm,
    HybridTokenMixer: AcceleratedHybridTokenMixer,
    Mlp: AcceleratedMlp,
    Block: AcceleratedBlock,
    TransXNet: AcceleratedTransXNet,
}
