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
  last conv and fc2); where a fused backend has it and no gradient is recorded, fc1's GELU + BatchNorm, the
  multi-scale depthwise convs, the residual, GELU and BatchNorm run as one op (`ms_ffn_middle_eval`, forward
  only); the position encoding's and OSRA's local-conv residuals are folded into the kernels' centre taps;
  IDConv's projection runs once over the pooled map and the mean side by side. All of it is exact in real
  arithmetic: results differ from eager by float rounding only.
* Eval without an autograd graph: the folded weights are inference constants, computed once and kept until
  a source tensor changes (see `inference_constant`; in CPU inference checked once per forward,
  `checked_forward`).
* CPU inference (eval, no gradients): the network runs in channels_last, where oneDNN's convolutions are
  about twice as fast and the C++ kernels work natively; every conv runs as a oneDNN convolution with its
  weight prepacked once and a following GELU fused as its post-op (small 1x1 and 'same' depthwise convs
  run as a matmul and the cpp depthwise kernel instead: see `FoldedConv`), and the fused ops run their
  kernels unchecked (`inference_op`). At batch 1 per-call costs outweigh the arithmetic of most calls, so IDConv's
  projection (1x1 convs over K*K + 1 pixels) runs as two linear layers in eval, and where the cpp backend
  runs IDConv, the pooling, the projection and the conv are one call (`idconv_eval`).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import transxnet_kernels as tk
from transxnet_kernels.backend import exporting, inference_backend
from transxnet_kernels.layout import key_padded_bias
from transxnet_kernels.ops import autocast_dtype

from .model import (
    OSRA,
    Block,
    ConvNorm,
    HybridTokenMixer,
    IDConv,
    LayerScale,
    Mlp,
    TransXNet,
    reduced_size,
    resize_relative_pos_enc,
)

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


def with_identity_tap(weight: torch.Tensor) -> torch.Tensor:
    """The depthwise kernel w' with conv(x, w') = conv(x, w) + x (odd kernel, padding k//2): w plus one at
    the centre tap, so a depthwise conv and its residual run as one conv."""
    centre = weight.shape[-1] // 2
    weight = weight.clone()
    weight[:, :, centre, centre] += 1
    return weight


def mlp_weights(mlp: Mlp):
    """The multi-scale depthwise convs' weights and biases, as the MS-FFN ops take them."""
    return [p.weight for p in mlp.dwconv.proj], [p.bias for p in mlp.dwconv.proj]


# ------------------------------------------------------------------------------ inference constants
#
# In eval mode the folded weights depend on parameters and buffers only. When no autograd graph is needed
# (no gradient mode, or frozen parameters) and nothing traces, they are computed once and kept until a
# source tensor changes; on fp32 CPU they are kept prepacked in oneDNN's blocked layout, which spares every
# conv call its weight reorder. At batch 1 these per-call costs were about a quarter of the CPU forward.

_ONEDNN_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")

# module -> name -> (key, pinned sources, value, epoch). Weak keys: a collected module frees its entries; a
# deepcopy or pickle of the model never sees them.
_CONSTANTS: weakref.WeakKeyDictionary[nn.Module, Dict[str, tuple]] = weakref.WeakKeyDictionary()


# Devices whose OSRA kernels read a bias padded to KEY_PADDED_KEYS keys in place (`stage_relative_pos_enc`): CUDA,
# where the Triton short path runs (its key block, triton.osra_attention.SHORT_PATH_MAX_KEYS).
KEY_PADDED_DEVICES = {"cuda"}
KEY_PADDED_KEYS = 64


def tracing() -> bool:
    """Whether a tracer records this call (torch.compile / torch.export, or torch.jit as the TorchScript ONNX
    exporter uses): the graph must then hold the folding itself and standard convs, not cached tensors."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def state_of(*sources) -> tuple:
    """The tensors of `sources` (None skipped): a module's own parameters and buffers, a tensor itself; what a
    fold is computed from. Read from the modules' own dicts at every call, so a replaced parameter is seen, and
    fast (no recursion)."""
    return tuple(
        t
        for m in sources
        if m is not None
        for t in ((m,) if isinstance(m, torch.Tensor) else (*m._parameters.values(), *m._buffers.values()))
        if t is not None
    )


def records_grad(*sources) -> bool:
    """Whether autograd records a graph through any tensor of `sources` (`state_of`; gathered only in grad mode)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in state_of(*sources))


def storage_versions(tensors) -> tuple:
    """Each tensor's storage address and version counter (in-place updates bump it): what inference constants key
    on. Raises RuntimeError for an inference-mode tensor, which has no version counter."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


class _CheckedForward(threading.local):
    """The epoch of the CPU inference forward this thread runs under `checked_forward`, else None; and that
    forward's kernel choices (`unchecked_kernel`)."""

    epoch: Optional[int] = None
    kernels: Optional[Dict[Any, Any]] = None


_FORWARD = _CheckedForward()
_EPOCHS = itertools.count(1)
# model -> (state fingerprint, epoch) of its last checked forward
_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, int]] = weakref.WeakKeyDictionary()


try:  # the C++ extension's walk, where it is built
    from transxnet_kernels._C import state_fingerprint as _native_state_fingerprint
except ImportError:
    _native_state_fingerprint = None


def state_fingerprint(model: nn.Module):
    """Storage address and version counter of every parameter and buffer of `model` (what inference constants
    key on), compared for equality only. The C++ extension walks the tree in ~0.25 ms for T's 960 modules and
    1508 tensors; without it `python_state_fingerprint` (~1.2 ms)."""
    if _native_state_fingerprint is not None:
        return _native_state_fingerprint(model)
    return python_state_fingerprint(model)


def python_state_fingerprint(model: nn.Module) -> tuple:
    """state_fingerprint in Python. A plain walk of the module tree: `model.modules()` builds every module's
    name, ~1 ms for T's 960."""
    tensors, stack = [], [model]
    while stack:  # inline rather than state_of per module: that doubled the walk's ~1.4 ms on T
        module = stack.pop()
        tensors += module._parameters.values()
        tensors += module._buffers.values()
        stack.extend(child for child in module._modules.values() if child is not None)
    return storage_versions(t for t in tensors if t is not None)


@contextlib.contextmanager
def checked_forward(model: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """A forward of `model` whose inference constants are checked once, here, instead of at each use.

    At batch 1 on CPU the per-use checks (each source's address and version, the oneDNN-inference test) cost
    a noticeable part of the forward. Here one fingerprint of all of the model's parameters and buffers is
    compared with that of its last checked forward: unchanged, the forward keeps that forward's epoch, and an
    entry validated (or built) in this epoch is served on its name and `key` alone; changed, a new epoch starts
    and every entry is checked in full once more. Only for oneDNN inference (fp32 CPU, no gradient, no
    autocast, not traced: all of the forward's maps are then fp32 CPU), and not nested. A module left in
    training mode updates its BatchNorms' buffers during the forward, but then runs its training path, which
    uses no constant; parameters that the forward itself changes (from a hook) are seen at the next forward."""
    if _FORWARD.epoch is not None or not onednn_inference(x):
        yield
        return
    try:
        fingerprint = state_fingerprint(model)
    except RuntimeError:  # an inference-mode parameter has no version counter: check at each use
        yield
        return
    last = _FINGERPRINTS.get(model)
    epoch = last[1] if last is not None and last[0] == fingerprint else next(_EPOCHS)
    _FINGERPRINTS[model] = (fingerprint, epoch)
    _FORWARD.epoch, _FORWARD.kernels = epoch, {}
    try:
        yield
    finally:
        _FORWARD.epoch = _FORWARD.kernels = None


def inference_constant(module: nn.Module, name: str, sources: tuple, build: Callable[[], Any], key=()) -> Any:
    """build(), a value computed from the tensors of `sources` (modules or tensors: `state_of`); cached per
    (module, name) when it needs no autograd graph and nothing traces, until a source changes.

    The cache key holds each source's storage address and version counter (in-place updates bump it,
    `load_state_dict` and optimizer steps included) plus `key`; the entry pins the sources' storages, so
    while it lives no new tensor can reuse an address it keys on (a `.to()` or a new parameter misses).
    Within a `checked_forward` an entry checked in its epoch is served without reading the sources."""
    epoch = _FORWARD.epoch
    entries = _CONSTANTS.get(module)
    if epoch is not None and entries is not None:
        entry = entries.get(name)
        if entry is not None and entry[3] == epoch and entry[0][0] == key:
            return entry[2]
    if tracing() or records_grad(*sources):
        return build()
    sources = state_of(*sources)
    try:
        full_key = (key, storage_versions(sources))
    except RuntimeError:  # inference-mode tensors carry no version counter: nothing safe to key on
        return build()
    if entries is None:
        entries = _CONSTANTS.setdefault(module, {})
    entry = entries.get(name)
    if entry is None or entry[0] != full_key:
        entry = (full_key, [t.detach() for t in sources], build(), epoch)
    elif entry[3] != epoch:
        entry = (*entry[:3], epoch)
    entries[name] = entry
    return entry[2]


def autocast_constants(module: nn.Module, name: str, x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> tuple:
    """`tensors` (parameters of `module`; None passes through) in the dtype autocast gives the ops on x's device,
    kept as an inference constant of `module`: the ops would cast them at every call, a launch each on a GPU.
    Unchanged where autocast is off or they already have that dtype."""
    dtype = autocast_dtype(x.device.type)
    if dtype is None or all(t is None or t.dtype == dtype for t in tensors):
        return tensors
    return inference_constant(
        module,
        name,
        tuple(t for t in tensors if t is not None),
        lambda: tuple(None if t is None else t.to(dtype) for t in tensors),
        key=dtype,
    )


def drop_inference_constants(module: nn.Module) -> None:
    _CONSTANTS.pop(module, None)


def onednn_inference(x: torch.Tensor) -> bool:
    """Whether convs on x run as oneDNN convolutions with prepacked weights and fused GELU: fp32 CPU
    inference (no gradient, no autocast, not traced); inside a `checked_forward`, which holds only then."""
    return _FORWARD.epoch is not None or (
        _ONEDNN_CONV
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not tracing()
    )


def resolved_per_forward(key, resolve: Callable[[], Any]) -> Any:
    """resolve(), computed once per `checked_forward` under `key` (a kernel choice: all of the forward's maps are
    fp32 CPU; a choice changed by a hook during the forward applies from the next), and at every call outside
    one. At batch 1 the ~120 backend resolutions of a T forward cost ~0.5 ms."""
    kernels = _FORWARD.kernels
    if kernels is None:
        return resolve()
    if key not in kernels:
        kernels[key] = resolve()
    return kernels[key]


def unchecked_kernel(op, x: torch.Tensor, fused_only: bool = False) -> Optional[Callable]:
    """op.unchecked_kernel for calls on tensors like x, resolved once per checked forward."""
    return resolved_per_forward((op.name, fused_only), lambda: op.unchecked_kernel(x.device, x.dtype, fused_only))


def inference_op(op, x: torch.Tensor):
    """`op` (a transxnet_kernels op) for a call on tensors like x; on oneDNN inference its unchecked kernel,
    which skips the argument checks and the torch.library layer (the accelerated modules build the
    arguments; at batch 1 those layers cost about as much as the kernels)."""
    kernel = unchecked_kernel(op, x) if onednn_inference(x) else None
    return op if kernel is None else kernel


def cpp_helpers(x: torch.Tensor, op: str = "multiscale_dwconv"):
    """The cpp backend's non-op kernels (`transxnet_kernels.cpp.ops`: `gelu_`, `strided_dwconv`,
    `ms_ffn_middle_eval_overwriting`, `idconv_eval`) where the cpp backend runs the fused op `op` of this
    oneDNN-inference call, else None (another backend chosen, or no build): under a forced reference backend the
    model runs standard ops throughout. Resolved once per checked forward."""

    def resolve():
        if inference_backend(op, x.device, x.dtype) != "cpp":
            return None
        from transxnet_kernels.cpp import ops as helpers

        return helpers

    return resolved_per_forward(("cpp", op), resolve)


def gelu_fresh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x) for x a fresh result no one else holds (a conv's or matmul's output): on oneDNN inference where
    the cpp backend runs, computed in place by its kernel. Torch's fp32 CPU GELU runs oneDNN's eltwise primitive,
    ~10 us a call even on 300 elements and 30-190 us within T's batch-1 forward (~2.8 ms of its ~68)."""
    helpers = cpp_helpers(x) if onednn_inference(x) else None
    return F.gelu(x) if helpers is None else helpers.gelu_(x)


class FoldedConv:
    """A conv's geometry with (folded) weights. On oneDNN inference the weight is prepacked and GELU runs as the
    convolution's post-op, except where a oneDNN call costs more than its arithmetic (at batch 1 a call costs
    ~50-90 µs whatever its size): 1x1 convs of at most `MATMUL_MAX_MACS` multiply-adds run as one matmul on the
    channels_last map's [pixels, channels] view, depthwise convs with stride 1 and 'same' padding run the
    fused multiscale_dwconv kernel (cpp) when the backend choice has one, and other depthwise convs (OSRA's
    strided reductions: 50-130 us a oneDNN call at batch 1 for ~0.1-0.2M multiply-adds) the cpp backend's
    `strided_dwconv`, with the GELU and affine epilogue fused."""

    # Measured on the 2-core dev machine (2 threads, TransXNet-T at batch 1): oneDNN 8.7 ms against 3.9 ms for
    # the 1x1 convs under 10M MACs, 22.8 against 23.8 ms for those above (its prepacked blocked kernels win there).
    MATMUL_MAX_MACS = 10_000_000
    # Input shapes a conv keeps prepacked weights for (least recently used dropped).
    PACKED_SHAPES = 4

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor):
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.onednn = onednn_inference(x)
        self.weight, self.bias = weight, bias
        self.matmul_weight = self.depthwise = self.strided_depthwise = None
        if self.onednn:
            out_channels, in_per_group, kh, kw = weight.shape
            unit = self.stride == [1, 1] and self.dilation == [1, 1]
            dense_bias = bias if bias is not None else weight.new_zeros(out_channels)
            if unit and (kh, kw) == (1, 1) and self.groups == 1 and self.padding == [0, 0]:
                self.matmul_weight = weight.reshape(out_channels, in_per_group).t().contiguous()  # [in, out]
                self.matmul_bias = dense_bias
            elif (
                unit
                and in_per_group == 1
                and self.groups == out_channels
                and kh == kw
                and self.padding == [kh // 2] * 2
            ):
                self.depthwise = ([weight.contiguous()], [dense_bias])
            elif (
                in_per_group == 1
                and self.groups == out_channels
                and kh == kw
                and self.dilation == [1, 1]
                and self.stride[0] == self.stride[1]
                and self.padding[0] == self.padding[1]
            ):
                self.strided_depthwise = (weight.contiguous(), dense_bias)
            self.packed: Dict[tuple, torch.Tensor] = {}  # input shape -> prepacked weight, oldest first

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight in the blocked layout oneDNN picks for inputs of x's shape, prepacked once per shape. The
        layout depends on the shape: weights packed for a 32-pixel input ran TransXNet-T's 224-pixel forward
        2.7x slower (a 3x3 stride-2 conv packed for 2x2 pixels, ~50x), so a model warmed up or first run at
        another size must not keep them."""
        shape = tuple(x.shape)
        packed = self.packed.pop(shape, None)
        if packed is None:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.contiguous().to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, list(shape)
            )
        self.packed[shape] = packed  # (re)inserted as the most recent
        if len(self.packed) > self.PACKED_SHAPES:
            self.packed.pop(next(iter(self.packed)), None)
        return packed

    def __call__(self, x: torch.Tensor, gelu: bool = False, affine: Optional[tuple] = None) -> torch.Tensor:
        """conv(x), GELU'd if gelu, then mapped per channel to out * scale + shift if affine = (scale, shift)."""
        if self.strided_depthwise is not None:
            helpers = cpp_helpers(x)
            if helpers is not None:
                scale, shift = affine if affine is not None else (None, None)
                weight, bias = self.strided_depthwise
                return helpers.strided_dwconv(x, weight, bias, self.stride[0], self.padding[0], gelu, scale, shift)
        out = self.conv(x, gelu)
        # in the conv output's layout (addcmul(shift, ...) lays its output out as `shift`: contiguous NCHW)
        return out if affine is None else out * affine[0] + affine[1]

    def conv(self, x: torch.Tensor, gelu: bool) -> torch.Tensor:
        """conv(x), GELU'd if gelu."""
        if self.onednn:
            out = None
            if self.matmul_weight is not None:
                B, C, H, W = x.shape
                if B * H * W * C * self.matmul_weight.shape[1] <= self.MATMUL_MAX_MACS:
                    # a view of a channels_last map; the result [B*H*W, out] is one as well
                    flat = torch.addmm(self.matmul_bias, x.permute(0, 2, 3, 1).reshape(-1, C), self.matmul_weight)
                    out = flat.view(B, H, W, -1).permute(0, 3, 1, 2)
            elif self.depthwise is not None:
                kernel = unchecked_kernel(tk.multiscale_dwconv, x, fused_only=True)
                if kernel is not None:
                    out = kernel(x, *self.depthwise)
            if out is not None:
                return gelu_fresh(out) if gelu else out
            attr = "gelu" if gelu else "none"
            return torch.ops.mkldnn._convolution_pointwise(
                x,
                self.packed_weight(x),
                self.bias,
                self.padding,
                self.stride,
                self.dilation,
                self.groups,
                attr,
                [],
                "none",
            )
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.gelu(out) if gelu else out


def folded_conv(module: nn.Module, name: str, conv: nn.Conv2d, x, sources: tuple, weights: Callable[[], tuple]):
    """The FoldedConv of `conv` with weights() = (weight, bias) computed from `sources` (modules or tensors), as
    an inference constant of `module` for inputs like x."""
    mode = (onednn_inference(x), x.device, x.dtype)
    return inference_constant(module, name, sources, lambda: FoldedConv(conv, *weights(), x), key=mode)


def plain_conv(module: nn.Module, name: str, conv: nn.Conv2d, x) -> FoldedConv:
    """`conv` with its own weights, as an inference constant of `module`."""
    return folded_conv(module, name, conv, x, (conv,), lambda: (conv.weight, conv.bias))


# ------------------------------------------------------------------------------- accelerated modules


class AcceleratedConvNorm(ConvNorm):
    """Eval: conv and BatchNorm (and GELU) as one conv."""

    def forward(self, x):
        if self.training:
            return super().forward(x)
        conv = folded_conv(
            self, "conv", self.conv, x, (self.conv, self.bn), lambda: fold_bn_into_conv(self.conv, self.bn)
        )
        return conv(x, gelu=hasattr(self, "act"))


class AcceleratedIDConv(IDConv):
    """Eval: the kernel and bias logits from one pass of `proj` over the pooled map and the mean side by side
    (its BatchNorm is then per pixel, so the two inputs need not run apart); its convs folded and cached."""

    def forward(self, x):
        if self.training:
            return super().forward(x)
        B, C = x.shape[:2]
        G, K = self.num_groups, self.kernel_size
        # proj's 1x1 convs on K*K + 1 pixels as linear layers: a matmul costs a fraction of a conv call there.
        reduce_w, reduce_b, expand_w, expand_b = inference_constant(
            self, "proj", (self.proj[0].conv, self.proj[0].bn, self.proj[1]), self.proj_linear
        )
        helpers = cpp_helpers(x, "idconv") if onednn_inference(x) else None
        if helpers is not None:  # all of the below in one call
            return helpers.idconv_eval(x, reduce_w, reduce_b, expand_w, expand_b, self.weight, self.bias)
        pooled = F.adaptive_avg_pool2d(x, K).flatten(2).transpose(1, 2)
        both = torch.cat([pooled, x.mean(dim=(2, 3)).unsqueeze(1)], dim=1)  # [B, K*K + 1, C]
        logits = F.linear(gelu_fresh(F.linear(both, reduce_w, reduce_b)), expand_w, expand_b)  # [B, K*K + 1, G*C]
        kernel_logits = logits[:, : K * K].reshape(B, K, K, G, C).permute(0, 3, 4, 1, 2)
        bias_logits = logits[:, K * K].reshape(B, G, C)
        weight, bias = autocast_constants(self, "weight_bank", x, self.weight, self.bias)
        return inference_op(tk.idconv, x)(x, kernel_logits, weight, bias_logits, bias)

    def proj_linear(self) -> Tuple[torch.Tensor, ...]:
        """proj in eval mode as two linear layers (weight [out, in], bias): 1x1 conv + BatchNorm, GELU, 1x1 conv."""
        conv_norm, conv = self.proj
        reduce_w, reduce_b = fold_bn_into_conv(conv_norm.conv, conv_norm.bn)
        return reduce_w.flatten(1), reduce_b, conv.weight.flatten(1), conv.bias


class AcceleratedOSRA(OSRA):
    """Eval: the reduction's BatchNorms folded (its depthwise 1x1 + BatchNorm as one per-channel affine map),
    the local conv's residual folded into its centre tap; every conv cached (and prepacked on oneDNN)."""

    def forward(self, x, relative_pos_enc=None):
        if self.training:
            return super().forward(x, relative_pos_enc)
        if onednn_inference(x):
            # x is a channel slice of a channels_last map: one copy here instead of one in each conv reading it
            x = x.contiguous(memory_format=torch.channels_last)
        r = x
        if self.sr_ratio > 1:
            reduce, affine = self.sr
            conv = folded_conv(
                self, "sr", reduce.conv, x, (reduce.conv, reduce.bn), lambda: fold_bn_into_conv(reduce.conv, reduce.bn)
            )
            affine_sources = (affine.conv, affine.bn)
            scale, shift = inference_constant(self, "sr_affine", affine_sources, lambda: self.reduction_affine(affine))
            r = conv(x, gelu=True, affine=(scale, shift))
        local = self.local_conv
        local_weights = lambda: (with_identity_tap(local.weight), local.bias)  # noqa: E731
        r = folded_conv(self, "local", local, r, (local,), local_weights)(r)
        q_map = plain_conv(self, "q", self.q, x)(x)
        kv_map = plain_conv(self, "kv", self.kv, r)(r)
        return self.attend(q_map, kv_map, relative_pos_enc, attention=inference_op(tk.osra_attention, x))

    @staticmethod
    def reduction_affine(conv_norm: ConvNorm) -> Tuple[torch.Tensor, torch.Tensor]:
        """The reduction's depthwise 1x1 conv (no bias) + BatchNorm as [1, C, 1, 1] scale and shift."""
        scale, shift = batchnorm_scale_shift(conv_norm.bn)
        return (conv_norm.conv.weight.flatten() * scale).view(1, -1, 1, 1), shift.view(1, -1, 1, 1)


class AcceleratedHybridTokenMixer(HybridTokenMixer):
    """Eval: the STE's BatchNorms folded into its convs and the block's layer scale into its last conv."""

    def forward(self, x, relative_pos_enc=None, layer_scale: Optional[LayerScale] = None):
        if self.training:
            assert layer_scale is None, "the layer scale is folded in eval mode only"
            return super().forward(x, relative_pos_enc)
        x = self.mix(x, relative_pos_enc)
        dw, pw1, pw2, ls_weight = self.folded_ste(x, layer_scale)
        # ls(proj(x) + x) = [ls folded into proj's last conv](x) + ls_weight * x
        return torch.addcmul(pw2(pw1(dw(x, gelu=True), gelu=True)), x, ls_weight)

    def folded_ste(self, x, layer_scale: Optional[LayerScale]):
        """The STE's convs in eval mode (dw3x3 -> GELU -> 1x1 -> GELU -> 1x1), its three BatchNorms folded
        into the 1x1 convs and the layer scale into the last, and the layer scale's weight as [1, C, 1, 1]."""
        dw, _, bn1, pw1, _, bn2, pw2, bn3 = self.proj  # the GELUs run as the convs' post-ops

        def last_weights():
            w, b = scale_conv_output(*fold_bn_into_next_pointwise(bn2, pw2), *batchnorm_scale_shift(bn3))
            return scale_conv_output(w, b, *layer_scale_affine(layer_scale, pw2.out_channels, w))

        ls_weight = inference_constant(
            self,
            "ls_weight",
            (layer_scale,),
            lambda: layer_scale_affine(layer_scale, x.shape[1], x)[0].view(1, -1, 1, 1),
            key=(x.device, x.dtype),
        )
        return (
            plain_conv(self, "dw", dw, x),
            folded_conv(self, "pw1", pw1, x, (bn1, pw1), lambda: fold_bn_into_next_pointwise(bn1, pw1)),
            folded_conv(self, "pw2", pw2, x, (bn2, pw2, bn3, layer_scale), last_weights),
            ls_weight,
        )


class AcceleratedMlp(Mlp):
    """The MS-FFN middle as one op; eval: fc2's BatchNorm and the block's layer scale folded into fc2, and
    fc1's GELU + BatchNorm into the middle op where a fused backend has `ms_ffn_middle_eval`."""

    def forward(self, x, layer_scale: Optional[LayerScale] = None):
        if self.training:
            assert layer_scale is None, "the layer scale is folded in eval mode only"
            return self.drop(self.fc2(self.drop(self.fused_middle(self.fc1(x)))))
        fc1 = self.fc1[0]
        h = plain_conv(self, "fc1", fc1, x)(x)
        # ms_ffn_middle_eval is forward-only (Triton and cpp): with gradients (frozen BatchNorm while fine-tuning)
        # ms_ffn_middle runs, which has a backward. Exported graphs take the one-op form in every grad mode.
        if tk.has_fused("ms_ffn_middle_eval", h) and (exporting() or not self.middle_records_grad(h)):
            x = self.fused_eval(h)
        else:
            x = self.fused_middle(self.fc1[2](self.fc1[1](h)))
        return self.folded_fc2(x, layer_scale)  # (dropout is the identity in eval)

    def middle_records_grad(self, h) -> bool:
        """Whether the middle (from fc1's GELU to its BatchNorm) on fc1's conv output `h` records an autograd graph."""
        return records_grad(h, self.fc1[2], self.norm, *self.dwconv.proj)

    def folded_fc2(self, x, layer_scale: Optional[LayerScale] = None):
        """fc2 in eval mode with its BatchNorm (and the block's layer scale) folded into the conv."""
        conv = self.fc2[0]

        def weights():
            w, b = fold_bn_into_conv(conv, self.fc2[1])
            return scale_conv_output(w, b, *layer_scale_affine(layer_scale, conv.out_channels, w))

        return folded_conv(self, "fc2", conv, x, (conv, self.fc2[1], layer_scale), weights)(x)

    def fused_eval(self, h):
        """Eval: fc1's GELU + BatchNorm, the middle and its BatchNorm in one op (`h` is fc1's conv output)."""
        scales = inference_constant(
            self,
            "scales",
            (self.fc1[2], self.norm),
            lambda: (*batchnorm_scale_shift(self.fc1[2]), *batchnorm_scale_shift(self.norm)),
        )
        in_scale, in_shift, out_scale, out_shift = scales
        weights, biases = mlp_weights(self)
        # cast once: new tensors at every call would also defeat the Triton op's kept packed weight table
        cast = autocast_constants(self, "multiscale_weights", h, *weights, *biases)
        weights, biases = list(cast[: len(weights)]), list(cast[len(weights) :])
        args = (h, in_scale, in_shift, weights, biases, out_scale, out_shift)
        # h is fc1's fresh conv output, read by nothing else: the cpp kernel may write its result over it
        helpers = cpp_helpers(h, "ms_ffn_middle_eval") if onednn_inference(h) else None
        if helpers is not None:
            return helpers.ms_ffn_middle_eval_overwriting(*args)
        return inference_op(tk.ms_ffn_middle_eval, h)(*args)

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


def group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x) as one aten call: at batch 1 the module call and F.group_norm's Python checks cost about as much
    as a late stage's normalisation (in eval, like the folded BatchNorms, the module's hooks do not run)."""
    return torch.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


class AcceleratedBlock(Block):
    """Eval: each branch's layer scale folded into the branch's last conv (drop path is off in eval), the
    position encoding's residual into its centre tap, the GroupNorms one aten call each (`group_norm`)."""

    def _forward(self, x, relative_pos_enc=None):
        if self.training:
            return super()._forward(x, relative_pos_enc)
        pos = self.pos_embed
        x = folded_conv(pos, "pos_embed", pos, x, (pos,), lambda: (with_identity_tap(pos.weight), pos.bias))(x)
        x = x + self.token_mixer(group_norm(self.norm1, x), relative_pos_enc, self.layer_scale_1)
        return x + self.mlp(group_norm(self.norm2, x), self.layer_scale_2)


class AcceleratedTransXNet(TransXNet):
    """The relative-position bias resized once per stage (and cached); CPU inference in channels_last, its
    inference constants checked once per forward (`checked_forward`)."""

    def forward(self, x):
        with checked_forward(self, x):
            return super().forward(x)

    def forward_features(self, x):
        with checked_forward(self, x):
            return super().forward_features(x)

    def stage_relative_pos_enc(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """The bias resized to the stage's input once (exact: the blocks share it); an inference constant
        per input size (one kept per stage) when no gradient is needed. As a constant on a GPU with at most
        KEY_PADDED_KEYS keys (every stage at 224x224), it views a copy whose rows are padded with -inf
        (`key_padded_bias`), which OSRA's Triton short path reads in place instead of padding a copy per call."""
        rpe = self.relative_pos_enc[stage]
        H, W = x.shape[-2:]
        sr = self.arch["sr_ratios"][stage]
        n, m = H * W, reduced_size(H, sr) * reduced_size(W, sr)

        def build():
            bias = resize_relative_pos_enc(rpe, n, m)
            keep = not (tracing() or records_grad(rpe))  # a constant kept across calls (`inference_constant`)
            if keep and bias.device.type in KEY_PADDED_DEVICES and m <= KEY_PADDED_KEYS:
                bias = key_padded_bias(bias, KEY_PADDED_KEYS)
            return bias

        return inference_constant(self, f"rpe{stage}", (rpe,), build, key=(n, m))

    def stem(self, x):
        if not self.training and x.device.type == "cpu":
            # oneDNN's convolutions run about twice as fast on channels_last data, and the cpp
            # kernels work on it natively: accelerated CPU inference runs in channels_last.
            x = x.contiguous(memory_format=torch.channels_last)
        return super().stem(x)


# Released class -> accelerated subclass (what accelerated() swaps; revert() swaps back).
ACCELERATED = {
    ConvNorm: AcceleratedConvNorm,
    IDConv: AcceleratedIDConv,
    OSRA: AcceleratedOSRA,
    HybridTokenMixer: AcceleratedHybridTokenMixer,
    Mlp: AcceleratedMlp,
    Block: AcceleratedBlock,
    TransXNet: AcceleratedTransXNet,
}
