"""The TransXNet backbone (T/S/B), exactly as the authors released it (arXiv 2310.19380).

This module is the released architecture only, readable beside the paper: Sec. 3.1 D-Mixer
(`HybridTokenMixer` = IDConv + OSRA + STE), Sec. 3.2 MS-FFN (`Mlp`), Sec. 3.3 the four-stage network.
Module and attribute names, parameter shapes and the state-dict order match the released checkpoints
(shared/parity/state_dict_keys.json); names such as `Mlp`, `proj`, `local_unit`, `global_unit`,
`network` or `classifier` are the release's and stay for checkpoint and config compatibility. The IDConv,
OSRA attention and multi-scale depthwise math runs through `transxnet_kernels` (backend chosen per call).
`transxnet.accelerated()` swaps in the subclasses of `transxnet.fused`, which fold and fuse.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import transxnet_kernels as tk

ARCHS: Dict[str, dict] = {
    "t": dict(
        layers=(3, 3, 9, 3),
        embed_dims=(48, 96, 224, 448),
        num_groups=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        sr_ratios=(8, 4, 2, 1),
        mlp_ratios=(4, 4, 4, 4),
        kernel_size=7,
        crop_pct=0.9,
    ),
    "s": dict(
        layers=(4, 4, 12, 4),
        embed_dims=(64, 128, 320, 512),
        num_groups=(2, 2, 3, 4),
        num_heads=(1, 2, 5, 8),
        sr_ratios=(8, 4, 2, 1),
        mlp_ratios=(6, 6, 4, 4),
        kernel_size=7,
        crop_pct=0.9,
    ),
    "b": dict(
        layers=(4, 4, 21, 4),
        embed_dims=(76, 152, 336, 672),
        num_groups=(2, 2, 4, 4),
        num_heads=(2, 4, 8, 16),
        sr_ratios=(8, 4, 2, 1),
        mlp_ratios=(8, 8, 4, 4),
        kernel_size=7,
        crop_pct=0.95,
    ),
}

STEM_STRIDE = 4
LAYER_SCALE_INIT = 1e-5


def _pair(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    h, w = v
    return (int(h), int(w))


class ConvNorm(nn.Sequential):
    """conv (no bias) -> BatchNorm2d [-> GELU]; state-dict names `conv`, `bn` (mmcv's ConvModule)."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0, groups=1, act=False):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        if act:
            self.act = nn.GELU()


class PatchEmbed(nn.Module):
    """Stem (7x7 stride 4) and downsampling layers (3x3 stride 2): conv + BN, no activation."""

    def __init__(self, in_ch, out_ch, kernel_size, stride, padding):
        super().__init__()
        self.proj = ConvNorm(in_ch, out_ch, kernel_size, stride=stride, padding=padding)

    def forward(self, x):
        return self.proj(x)


class IDConv(nn.Module):
    """Input-dependent depthwise conv (paper Sec. 3.1, Eq. 2-3; the D-Mixer's `local_unit`).

    A K x K depthwise kernel per sample and channel: softmax over G learned kernels (`weight`), weighted
    by attention logits that `proj` computes from the input pooled to K x K; the bias likewise, from the
    global mean."""

    def __init__(self, dim, kernel_size=7, num_groups=2, reduction=4):
        super().__init__()
        self.num_groups = num_groups
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(num_groups, dim, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(num_groups, dim))
        self.proj = nn.Sequential(
            ConvNorm(dim, dim // reduction, kernel_size=1, act=True),
            nn.Conv2d(dim // reduction, dim * num_groups, kernel_size=1),
        )
        nn.init.trunc_normal_(self.weight, std=0.02)
        nn.init.trunc_normal_(self.bias, std=0.02)

    def forward(self, x):
        B, C = x.shape[:2]
        G, K = self.num_groups, self.kernel_size
        # The same proj runs twice (pooled map, then global mean): in training its BN
        # updates its running statistics twice per forward, as in the released model.
        kernel_logits = self.proj(F.adaptive_avg_pool2d(x, K)).reshape(B, G, C, K, K)
        bias_logits = self.proj(x.mean(dim=(-2, -1), keepdim=True)).reshape(B, G, C)
        return tk.idconv(x, kernel_logits, self.weight, bias_logits, self.bias)


def reduced_size(size: int, sr_ratio: int) -> int:
    """Output side of OSRA's reduction conv (kernel sr+3, stride sr, padding (sr+3)//2)."""
    return math.ceil(size / sr_ratio)


def resize_relative_pos_enc(bias: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The released rule: bicubic resize of [1, h, N0, M0] to [1, h, n, m] when the sizes differ."""
    if tuple(bias.shape[-2:]) == (n, m):
        return bias
    return F.interpolate(bias, size=(n, m), mode="bicubic", align_corners=False)


class OSRA(nn.Module):
    """Overlapping spatial-reduction attention (paper Sec. 3.1, Eq. 4-5; the D-Mixer's `global_unit`).

    Queries from every position; keys and values from the map reduced by an overlapping strided depthwise
    conv (`sr`, kernel sr+3, stride sr) plus a 3x3 local refinement (`local_conv`); a learned relative-position
    bias, shared by the stage's blocks, is added to the scores."""

    def __init__(self, dim, num_heads=1, sr_ratio=1):
        super().__init__()
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Conv2d(dim, dim, kernel_size=1)
        self.kv = nn.Conv2d(dim, dim * 2, kernel_size=1)
        if sr_ratio > 1:
            self.sr = nn.Sequential(
                ConvNorm(
                    dim,
                    dim,
                    kernel_size=sr_ratio + 3,
                    stride=sr_ratio,
                    padding=(sr_ratio + 3) // 2,
                    groups=dim,
                    act=True,
                ),
                ConvNorm(dim, dim, kernel_size=1, groups=dim),
            )
        else:
            self.sr = nn.Identity()
        self.local_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x, relative_pos_enc=None):
        r = self.sr(x)
        r = self.local_conv(r) + r
        return self.attend(self.q(x), self.kv(r), relative_pos_enc)

    def attend(self, q_map, kv_map, relative_pos_enc=None, attention=None):
        """The attention from q(x) [B, C, H, W] and kv(r) [B, 2C, h', w'] (k the first C channels, v the last);
        `attention` computes softmax(q k^T * scale + bias) v: tk.osra_attention (looked up per call, not bound
        as a default: the static audit and tests wrap it), or a kernel taking its arguments."""
        B, C, H, W = q_map.shape
        h = self.num_heads
        d = C // h
        M = kv_map.shape[-2] * kv_map.shape[-1]
        q = q_map.reshape(B, h, d, H * W).transpose(-1, -2)
        k, v = kv_map.chunk(2, dim=1)
        k = k.reshape(B, h, d, M).transpose(-1, -2)
        v = v.reshape(B, h, d, M).transpose(-1, -2)
        if relative_pos_enc is not None:
            relative_pos_enc = resize_relative_pos_enc(relative_pos_enc, H * W, M)
        out = (attention or tk.osra_attention)(q, k, v, relative_pos_enc, self.scale)  # [B, h, N, d]
        if q_map.is_contiguous(memory_format=torch.channels_last) and not q_map.is_contiguous():
            # a channels_last map in, one out: [B, N, h, d] is [B, H, W, C] (one copy, none with one head)
            return out.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
        return out.transpose(-1, -2).reshape(B, C, H, W)


class HybridTokenMixer(nn.Module):
    """D-Mixer (paper Sec. 3.1): IDConv on the first half of the channels, OSRA on the second, concatenated,
    then the squeezed token enhancer (STE, `proj`) with its residual."""

    def __init__(self, dim, kernel_size=7, num_groups=2, num_heads=1, sr_ratio=1):
        super().__init__()
        assert dim % 2 == 0, "D-Mixer splits the channels in two halves"
        self.local_unit = IDConv(dim // 2, kernel_size=kernel_size, num_groups=num_groups)
        self.global_unit = OSRA(dim // 2, num_heads=num_heads, sr_ratio=sr_ratio)
        inner = max(16, dim // 8)
        self.proj = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim),
            nn.GELU(),
            nn.BatchNorm2d(dim),
            nn.Conv2d(dim, inner, kernel_size=1),
            nn.GELU(),
            nn.BatchNorm2d(inner),
            nn.Conv2d(inner, dim, kernel_size=1),
            nn.BatchNorm2d(dim),
        )

    def mix(self, x, relative_pos_enc=None):
        """IDConv and OSRA on the two channel halves, concatenated (the STE's input)."""
        x1, x2 = x.chunk(2, dim=1)
        return torch.cat([self.local_unit(x1), self.global_unit(x2, relative_pos_enc)], dim=1)

    def forward(self, x, relative_pos_enc=None):
        x = self.mix(x, relative_pos_enc)
        return self.proj(x) + x


def multiscale_split(channels: int, scales: Sequence[int] = (1, 3, 5, 7)) -> List[int]:
    """Group widths of MS-FFN's depthwise convs: the first group takes the remainder."""
    n = len(scales)
    return [channels - channels // n * (n - 1)] + [channels // n] * (n - 1)


class MultiScaleDWConv(nn.Module):
    """MS-FFN's multi-scale depthwise convs (paper Sec. 3.2): consecutive channel groups, kernels 1/3/5/7."""

    def __init__(self, dim, scales=(1, 3, 5, 7)):
        super().__init__()
        self.proj = nn.ModuleList(
            nn.Conv2d(c, c, kernel_size=k, padding=k // 2, groups=c)
            for c, k in zip(multiscale_split(dim, scales), scales)
        )

    def forward(self, x):
        return tk.multiscale_dwconv(x, [p.weight for p in self.proj], [p.bias for p in self.proj])


class Mlp(nn.Module):
    """MS-FFN (paper Sec. 3.2; the release's name): fc1 (1x1 conv, GELU, BN), the multi-scale depthwise
    convs with a residual, GELU, BN (`norm`), fc2 (1x1 conv, BN)."""

    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Sequential(nn.Conv2d(dim, hidden, kernel_size=1, bias=False), nn.GELU(), nn.BatchNorm2d(hidden))
        self.dwconv = MultiScaleDWConv(hidden)
        self.act = nn.GELU()
        self.norm = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Sequential(nn.Conv2d(hidden, dim, kernel_size=1, bias=False), nn.BatchNorm2d(dim))
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.dwconv(x) + x
        x = self.drop(self.norm(self.act(x)))
        return self.drop(self.fc2(x))


class LayerScale(nn.Module):
    """Per-channel x * weight + bias (the released code runs it as a grouped 1x1 conv)."""

    def __init__(self, dim, init_value=LAYER_SCALE_INIT):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim, 1, 1, 1), init_value))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self):
        return f"p={self.p}"


class Block(nn.Module):
    """One TransXNet block (paper Fig. 2): conditional position encoding (`pos_embed`, dw 7x7), then D-Mixer
    and MS-FFN, each pre-normed (GroupNorm(1, C)), layer-scaled and residual."""

    def __init__(
        self,
        dim,
        kernel_size=7,
        sr_ratio=1,
        num_groups=2,
        num_heads=1,
        mlp_ratio=4,
        drop=0.0,
        drop_path=0.0,
        grad_checkpoint=False,
    ):
        super().__init__()
        self.grad_checkpoint = grad_checkpoint
        self.pos_embed = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm1 = nn.GroupNorm(1, dim)
        self.token_mixer = HybridTokenMixer(
            dim, kernel_size=kernel_size, num_groups=num_groups, num_heads=num_heads, sr_ratio=sr_ratio
        )
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale_1 = LayerScale(dim)
        self.layer_scale_2 = LayerScale(dim)

    def _forward(self, x, relative_pos_enc=None):
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.layer_scale_1(self.token_mixer(self.norm1(x), relative_pos_enc)))
        x = x + self.drop_path(self.layer_scale_2(self.mlp(self.norm2(x))))
        return x

    def forward(self, x, relative_pos_enc=None):
        if self.grad_checkpoint and torch.is_grad_enabled() and (x.requires_grad or self.training):
            return checkpoint(
                self._forward, x, relative_pos_enc, use_reentrant=False, context_fn=self._checkpoint_contexts
            )
        return self._forward(x, relative_pos_enc)

    def _checkpoint_contexts(self):
        return contextlib.nullcontext(), self._batchnorm_stats_frozen()

    @contextlib.contextmanager
    def _batchnorm_stats_frozen(self):
        """The backward-time recomputation must not update BatchNorm running statistics a
        second time (the released code does): snapshot them and put them back afterwards."""
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
        try:
            yield
        finally:
            with torch.no_grad():
                for m, (mean, var, count) in zip(norms, saved):
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)


class TransXNet(nn.Module):
    """TransXNet-T/S/B.

    arch: "t", "s", "b" or a dict with the keys of `ARCHS["t"]`.
    image_size: the input size the relative-position biases are built for (other
    sizes work; the biases are bicubically resized at run time, as released).
    checkpoint_stage: per stage, how many leading blocks use gradient checkpointing
    when grad_checkpoint=True (the released convention).
    """

    def __init__(
        self,
        arch: Union[str, dict] = "t",
        num_classes: int = 1000,
        fork_feat: bool = False,
        image_size: Union[int, Sequence[int]] = 224,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        grad_checkpoint: bool = False,
        checkpoint_stage: Sequence[int] = (0, 0, 0, 0),
    ):
        super().__init__()
        if isinstance(arch, str):
            if arch.lower() not in ARCHS:
                raise ValueError(f"unknown TransXNet arch {arch!r}; expected one of {sorted(ARCHS)} or a dict")
            cfg = dict(ARCHS[arch.lower()])
        else:
            cfg = dict(ARCHS["t"], **arch)
        self.arch = cfg
        self.num_classes = num_classes
        self.fork_feat = fork_feat
        self.in_chans = in_chans
        dims, layers = cfg["embed_dims"], cfg["layers"]
        self.num_features = dims[-1]
        if len(checkpoint_stage) != len(layers):
            raise ValueError(f"checkpoint_stage needs {len(layers)} entries, got {len(checkpoint_stage)}")

        self.patch_embed = PatchEmbed(in_chans, dims[0], kernel_size=7, stride=STEM_STRIDE, padding=3)

        side = [math.ceil(s / STEM_STRIDE) for s in _pair(image_size)]
        self.relative_pos_enc = nn.ParameterList()
        for heads, sr in zip(cfg["num_heads"], cfg["sr_ratios"]):
            n = side[0] * side[1]
            m = reduced_size(side[0], sr) * reduced_size(side[1], sr)
            self.relative_pos_enc.append(nn.Parameter(torch.zeros(1, heads, n, m)))
            side = [math.ceil(s / 2) for s in side]

        total = sum(layers)
        network = []
        for i, depth in enumerate(layers):
            first = sum(layers[:i])
            network.append(
                nn.ModuleList(
                    Block(
                        dims[i],
                        kernel_size=cfg["kernel_size"],
                        sr_ratio=cfg["sr_ratios"][i],
                        num_groups=cfg["num_groups"][i],
                        num_heads=cfg["num_heads"][i],
                        mlp_ratio=cfg["mlp_ratios"][i],
                        drop=drop_rate,
                        drop_path=drop_path_rate * (first + j) / max(total - 1, 1),
                        grad_checkpoint=grad_checkpoint and j < checkpoint_stage[i],
                    )
                    for j in range(depth)
                )
            )
            if i < len(layers) - 1:
                network.append(PatchEmbed(dims[i], dims[i + 1], kernel_size=3, stride=2, padding=1))
        self.network = nn.ModuleList(network)
        # Index into `network` of each stage's block list.
        self.stage_indices = tuple(range(0, len(network), 2))

        if fork_feat:
            for i, idx in enumerate(self.stage_indices):
                self.add_module(f"norm{idx}", nn.GroupNorm(1, dims[i]))
        else:
            self.classifier = nn.Sequential(
                nn.GroupNorm(1, dims[-1]),
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(dims[-1], num_classes, kernel_size=1) if num_classes > 0 else nn.Identity(),
            )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ input checks
    def check_input(self, x) -> None:
        """Raise ValueError for inputs the network cannot take, before any conv sees them."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"TransXNet expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"TransXNet expects a 4-D [B, {self.in_chans}, H, W] image batch, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"TransXNet expects {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise ValueError(f"TransXNet expects a floating-point image batch, got dtype {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError("TransXNet got an empty batch")
        if min(x.shape[-2:]) < STEM_STRIDE:
            raise ValueError(
                f"image {tuple(x.shape[-2:])} is too small for the stem: H and W must be at least {STEM_STRIDE}"
            )
        param_dtype = self.patch_embed.proj.conv.weight.dtype
        if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"input dtype {x.dtype} differs from the model's {param_dtype}; "
                "cast one of them or run under torch.autocast"
            )
        if x.shape[0] == 1 and any(bn.training for bn in self._idconv_batchnorms()):
            raise ValueError(
                "TransXNet cannot train on a batch of 1: IDConv's BatchNorm normalises the kernel generator's "
                "input with batch statistics, one value per channel and sample, which needs a batch of at least "
                "2. Train with batch >= 2, or put the BatchNorm layers in eval mode (model.eval(), or freeze "
                "them as detection frameworks' norm_eval does) to use their running statistics."
            )

    def _idconv_batchnorms(self):
        for stage in self.stage_indices:
            for blk in self.network[stage]:
                yield blk.token_mixer.local_unit.proj[0].bn

    # ------------------------------------------------------------------ forward
    def stage_relative_pos_enc(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """The bias the blocks of `stage` receive; each OSRA resizes it to its input (the release's rule)."""
        return self.relative_pos_enc[stage]

    def stem(self, x):
        """The checked input through the stem (patch_embed): [B, C0, H/4, W/4]."""
        if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            self.check_input(x)
        return self.patch_embed(x)

    def run_stage(self, stage: int, x):
        """Stage `stage` (0..3): its downsampling layer (from stage 1 on), then its blocks."""
        idx = self.stage_indices[stage]
        if idx > 0:
            x = self.network[idx - 1](x)
        rpe = self.stage_relative_pos_enc(stage, x)
        for blk in self.network[idx]:
            x = blk(x, rpe)
        return x

    def forward_features(self, x):
        """Final feature map [B, C3, H/32, W/32]; with fork_feat, the four normalised stage maps."""
        x = self.stem(x)
        outs = []
        for stage, idx in enumerate(self.stage_indices):
            x = self.run_stage(stage, x)
            if self.fork_feat:
                outs.append(getattr(self, f"norm{idx}")(x))
        return outs if self.fork_feat else x

    def forward_head(self, x, pre_logits: bool = False):
        if self.fork_feat:
            raise RuntimeError("a fork_feat=True backbone has no classification head")
        x = self.classifier[1](self.classifier[0](x))
        if pre_logits:
            return x.flatten(1)
        return self.classifier[2](x).flatten(1)

    def forward(self, x):
        x = self.forward_features(x)
        return x if self.fork_feat else self.forward_head(x)

    # ------------------------------------------------------------------ training utilities (timm's API)
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing for every block (the constructor's checkpoint_stage picks leading blocks)."""
        for stage in self.stage_indices:
            for blk in self.network[stage]:
                blk.grad_checkpoint = enable

    def no_weight_decay(self) -> Set[str]:
        """Parameters to train without weight decay: the relative-position biases."""
        return {f"relative_pos_enc.{i}" for i in range(len(self.relative_pos_enc))}
