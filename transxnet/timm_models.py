"""timm integration: `timm.create_model("transxnet_t.in1k", ...)` and its feature machinery.

Imported by `transxnet.register_timm_models()` only when timm is installed (it imports timm).

* `transxnet_t` / `transxnet_s` / `transxnet_b` are registered with a full `pretrained_cfg` under
  the `in1k` tag (the released ImageNet-1k weights, their crop_pct and preprocessing).
* The models are `TimmTransXNet`s: the released `TransXNet` (same state dict, `accelerated()`
  works on them) plus timm's conventions: `feature_info`, `forward_intermediates`,
  `prune_intermediate_layers`, `get_classifier` / `reset_classifier`. The blocks take
  `(x, relative_pos_enc)`, so `features_only=True` uses timm's 'getter' feature class
  (`FeatureGetterNet`, which calls `forward_intermediates`), not the module-walking ones.
* `checkpoint_filter_fn` takes any released checkpoint format (raw, or wrapped under state_dict /
  model / state_dict_ema, with or without DDP's `module.` prefix) and adapts it to the model as
  `transxnet.load_checkpoint` does, so `pretrained_cfg_overlay=dict(file=path)` loads a local copy.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .checkpoint import RELEASE_URL, adapt_state_dict, extract_state_dict
from .model import ARCHS, STEM_STRIDE, TransXNet


class TimmTransXNet(TransXNet):
    """TransXNet with timm's model conventions (feature info, intermediates, pruning, head reset)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        dims = self.arch["embed_dims"]
        self.feature_info = [
            dict(num_chs=dims[i], reduction=STEM_STRIDE * 2**i, module=f"network.{idx}")
            for i, idx in enumerate(self.stage_indices)
        ]

    def get_classifier(self) -> nn.Module:
        return self.classifier[2]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh classifier for `num_classes` classes (0: none, forward returns pooled features)."""
        if global_pool not in (None, "", "avg"):
            raise ValueError(f"TransXNet pools by average only, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        conv = nn.Conv2d(self.num_features, num_classes, 1) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(conv)
        self.classifier[2] = conv.to(self.classifier[0].weight.device)

    def _stage_output(self, stage: int, x: torch.Tensor, norm: bool) -> torch.Tensor:
        """A stage's feature map as an intermediate: a fork_feat backbone's own normalised map; else the raw
        map, the last one through the head's GroupNorm when `norm`."""
        if self.fork_feat:
            return getattr(self, f"norm{self.stage_indices[stage]}")(x)
        if norm and stage == len(self.arch["layers"]) - 1:
            return self.classifier[0](x)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The stage feature maps selected by `indices` (timm's convention: None all, an int the last n,
        a sequence those stages), and unless `intermediates_only` the final map (forward_features' output).

        Runs the same path as `forward_features`, accelerated or not (accelerated CPU inference returns
        channels_last maps)."""
        if output_fmt != "NCHW":
            raise ValueError(f"TransXNet feature maps are NCHW, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stage_indices), indices)
        x = self.stem(x)
        intermediates = []
        for stage in range(max_index + 1 if stop_early else len(self.stage_indices)):
            x = self.run_stage(stage, x)
            if stage in take_indices:
                intermediates.append(self._stage_output(stage, x, norm))
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, Sequence[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last one `indices` selects, and the head (and the final norm) where
        asked or where stages were dropped; returns the absolute stage indices kept."""
        take_indices, max_index = feature_take_indices(len(self.stage_indices), indices)
        prune_end = max_index < len(self.stage_indices) - 1
        self.network = self.network[: self.stage_indices[max_index] + 1]
        self.relative_pos_enc = self.relative_pos_enc[: max_index + 1]
        self.stage_indices = self.stage_indices[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        if self.fork_feat:
            for idx in range(self.stage_indices[-1] + 1, len(self.arch["layers"]) * 2):
                if hasattr(self, f"norm{idx}"):
                    delattr(self, f"norm{idx}")
            return take_indices
        if prune_head or prune_end:
            self.reset_classifier(0)
        if prune_norm or prune_end:
            self.classifier[0] = nn.Identity()
        if prune_end:
            self.num_features = self.feature_info[-1]["num_chs"]
        return take_indices


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: TransXNet) -> Dict[str, torch.Tensor]:
    """A released checkpoint in any of its formats, adapted to `model` (see `transxnet.load_checkpoint`)."""
    return adapt_state_dict(model, extract_state_dict(state_dict))


def _cfg(arch: str) -> dict:
    return dict(
        url=RELEASE_URL.format(arch=arch),
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=ARCHS[arch]["crop_pct"],
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj.conv",
        classifier="classifier.2",
        license="apache-2.0",
        paper_ids="arXiv:2310.19380",
        paper_name="TransXNet: Learning Both Global and Local Dynamics with a Dual Dynamic Token Mixer",
        origin_url="https://github.com/LMMMEng/TransXNet",
    )


default_cfgs = generate_default_cfgs({f"transxnet_{arch}.in1k": _cfg(arch) for arch in ("t", "s", "b")})


def _create(arch: str, pretrained: bool, **kwargs) -> TimmTransXNet:
    return build_model_with_cfg(
        TimmTransXNet,
        f"transxnet_{arch}",
        pretrained,
        arch=arch,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


@register_model
def transxnet_t(pretrained: bool = False, **kwargs) -> TimmTransXNet:
    """TransXNet-T (12.8 M params) for timm."""
    return _create("t", pretrained, **kwargs)


@register_model
def transxnet_s(pretrained: bool = False, **kwargs) -> TimmTransXNet:
    """TransXNet-S (26.9 M params) for timm."""
    return _create("s", pretrained, **kwargs)


@register_model
def transxnet_b(pretrained: bool = False, **kwargs) -> TimmTransXNet:
    """TransXNet-B (48.0 M params) for timm."""
    return _create("b", pretrained, **kwargs)
