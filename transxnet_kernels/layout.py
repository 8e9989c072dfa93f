"""Memory-layout rules shared by every fused backend (torch only, so each backend can import it)."""

from __future__ import annotations

import weakref
from typing import Dict, Tuple

import torch


def channels_last_input(x: torch.Tensor) -> bool:
    """Whether x's channels are unit-stride (channels_last, or a channel slice of a channels_last tensor
    such as the model's ``x.chunk(2, dim=1)[0]``): the kernels then tile channels as the contiguous axis.
    One channel is never called channels_last (its stride is arbitrary). csrc/ops.cpp has the same rule."""
    return x.shape[1] > 1 and x.stride(1) == 1


def sample_span(t: torch.Tensor) -> int:
    """Largest element offset inside one sample of t (all dims but the first)."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:]))


def tensor_span(t: torch.Tensor) -> int:
    """Largest element offset inside t (all dims)."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


def empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like x: channels_last when x's channels are unit-stride, else contiguous."""
    memory_format = torch.channels_last if channels_last_input(x) else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format)


# Storages made by `key_padded_bias`: data pointer -> (the padded tensor, weakly; its real keys M; its row length).
_KEY_PADDED: Dict[int, Tuple[weakref.ref, int, int]] = {}


def key_padded_bias(bias: torch.Tensor, keys: int = 64) -> torch.Tensor:
    """An attention bias [..., N, M] (M <= keys) as a view of a copy whose rows hold `keys` values, -inf past M:
    the same values, which OSRA's Triton short path reads in place (`key_padded_rows`) where it would otherwise pad
    a copy on every call (`triton.osra_attention._padded_bias`). For a bias reused across calls, such as an
    inference model's constant; one copy up front. In-place updates of the view reach its M keys only, never the
    padding."""
    real_keys = bias.shape[-1]
    if real_keys > keys:
        raise ValueError(f"key_padded_bias: {real_keys} keys do not fit rows of {keys}")
    padded = torch.full(bias.shape[:-1] + (keys,), float("-inf"), dtype=bias.dtype, device=bias.device)
    padded[..., :real_keys] = bias
    ptr = padded.untyped_storage().data_ptr()
    _KEY_PADDED[ptr] = (weakref.ref(padded), real_keys, keys)
    weakref.finalize(padded, _KEY_PADDED.pop, ptr, None)
    return padded[..., :real_keys]


def key_padded_rows(bias: torch.Tensor) -> int:
    """The row length of `key_padded_bias`'s copy that `bias` views, with its rows whole (each starting a padded row,
    its M keys, unit key stride), or 0 if it views none."""
    if bias.numel() == 0:
        return 0
    entry = _KEY_PADDED.get(bias.untyped_storage().data_ptr())
    if entry is None or entry[0]() is None:
        return 0
    _, real_keys, keys = entry
    whole_rows = bias.shape[-1] == real_keys and bias.stride(-1) == 1 and bias.storage_offset() % keys == 0
    return keys if whole_rows and (bias.dim() < 2 or bias.shape[-2] == 1 or bias.stride(-2) == keys) else 0
