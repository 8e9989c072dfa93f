"""Memory-layout rules shared by every fused backend (torch only, so each backend can import it)."""

from __future__ import annotations

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
