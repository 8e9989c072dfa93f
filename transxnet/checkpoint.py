"""Loading released (or user) TransXNet checkpoints into our modules."""

from __future__ import annotations

import os
import re
import warnings
from typing import Dict, Mapping, Union

import torch
import torch.nn as nn

RELEASE_URL = "https://github.com/LMMMEng/TransXNet/releases/download/v1.0/transx-{arch}.pth.tar"
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema")
_NORM_KEY = re.compile(r"^norm[0-9]+\.")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys do not match the model's."""


def _read(source: str) -> object:
    if re.match(r"^https?://", source):
        return torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=True, check_hash=False)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"checkpoint {source!r} does not exist")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # training checkpoints may pickle extra objects (args, optimizer state)
        warnings.warn(
            f"{source}: not loadable with weights_only=True ({type(exc).__name__}); "
            "loading with full unpickling, which runs code from the file",
            stacklevel=2,
        )
        return torch.load(source, map_location="cpu", weights_only=False)


def extract_state_dict(obj: object) -> Dict[str, torch.Tensor]:
    """The tensors of a raw state dict or one wrapped under state_dict / model / state_dict_ema,
    with any DistributedDataParallel `module.` prefix removed."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(
            f"checkpoint holds no state dict (expected a mapping of tensors, optionally under one of {WRAPPER_KEYS})"
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_checkpoint(model: nn.Module, source: Union[str, Mapping]) -> nn.Module:
    """Load `source` (a path, an http(s) URL or an already loaded dict) into `model` strictly.

    Adaptations, each announced with a warning: a classifier whose class count differs
    from the model's is dropped (and a fork_feat backbone drops the classifier and keeps its
    fresh output norms); relative-position biases built for another image size are resized
    with the model's own bicubic rule. Any other difference raises CheckpointMismatchError
    listing the missing and unexpected keys.
    """
    state = adapt_state_dict(model, extract_state_dict(_read(source) if isinstance(source, str) else source))
    model.load_state_dict(state, strict=True)
    return model


def adapt_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state` (keys as in the release) adapted to `model` as `load_checkpoint` describes: the result
    has exactly the model's keys and shapes, or CheckpointMismatchError is raised."""
    from .model import resize_relative_pos_enc

    state = dict(state)
    own = model.state_dict()

    classifier_keys = [k for k in state if k.startswith("classifier.")]
    if getattr(model, "fork_feat", False) and classifier_keys:
        warnings.warn("fork_feat backbone: dropping the checkpoint's classifier weights", stacklevel=2)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    elif "classifier.2.weight" in state and (
        "classifier.2.weight" not in own or own["classifier.2.weight"].shape[0] != state["classifier.2.weight"].shape[0]
    ):
        warnings.warn(
            f"dropping the checkpoint's {state['classifier.2.weight'].shape[0]}-class classifier: "
            f"the model has num_classes={getattr(model, 'num_classes', '?')}; it stays freshly initialised",
            stacklevel=2,
        )
        state = {k: v for k, v in state.items() if not k.startswith("classifier.2.")}

    for key, value in list(state.items()):
        if (
            key.startswith("relative_pos_enc.")
            and key in own
            and own[key].shape != value.shape
            and value.dim() == 4
            and value.shape[:2] == own[key].shape[:2]
        ):
            warnings.warn(f"{key}: resizing {tuple(value.shape)} to {tuple(own[key].shape)} (bicubic)", stacklevel=2)
            state[key] = resize_relative_pos_enc(value, *own[key].shape[-2:])

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    allowed_missing = [
        k
        for k in missing
        if k.startswith("classifier.2.") or (getattr(model, "fork_feat", False) and _NORM_KEY.match(k))
    ]
    if allowed_missing and len(allowed_missing) == len(missing) and not unexpected:
        if any(_NORM_KEY.match(k) for k in allowed_missing):
            warnings.warn(
                "fork_feat backbone: the checkpoint has no output norms; they stay freshly initialised", stacklevel=2
            )
        state = {**{k: own[k] for k in allowed_missing}, **state}
        missing = []
    wrong_shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        lines = ["checkpoint does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if wrong_shape:
            lines.append(f"  shape mismatches ({len(wrong_shape)}): {wrong_shape}")
        raise CheckpointMismatchError("\n".join(lines))
    return state
