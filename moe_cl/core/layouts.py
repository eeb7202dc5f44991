"""The CPU memory layouts of the experts', gates' and router's convolutions and poolings.

The layouts change the speed (and the summation order of convolutions), never the values a
layer computes. Each module that convolves or pools carries its :class:`CpuLayouts` (the
experts' groups and bank, :class:`LayoutConv2d`, :class:`LayoutMaxPool2d`, the router's random
convolution): today's rules unless :func:`use_layouts` gives a built model other ones, as the
bench does for its baseline step (the layouts before issue 16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# On the CPU, stacked convolutions with this many output channels or more run in channels-last
# layout: 1.55x faster forward + backward for the CIFAR-100 experts at M = 20 (160 channels),
# while the one-channel MNIST experts (5 channels at M = 5) were slower (0.84x) that way
# (docs/performance.md). The activations keep the layout until the experts flatten them.
CHANNELS_LAST_MIN = 64


# On the CPU, max-pooling of NCHW maps is several times slower than of channels-last maps once
# they have a few channels (3-10x at 5-8 channels of 26x26; equal at 1-2), and so is the weight
# gradient of a convolution writing such maps. From this many channels on, maps are pooled
# channels-last, and a one-channel input is viewed channels-last (free), so that its convolution
# writes channels-last maps (docs/performance.md).
NARROW_CHANNELS_LAST_MIN = 4


@dataclass(frozen=True)
class CpuLayouts:
    """Which memory layouts the CPU convolves and pools in.

    ``narrow_channels_last``: the rule above for one-channel inputs and pooled maps of
    ``NARROW_CHANNELS_LAST_MIN`` channels or more; without it they stay NCHW, as before issue 16.
    """

    narrow_channels_last: bool = True

    def narrow_rule_applies(self, x: Tensor, channels: int) -> bool:
        """Whether maps of ``channels`` channels on x's device go channels-last by that rule."""
        return (x.device.type == "cpu" and self.narrow_channels_last
                and channels >= NARROW_CHANNELS_LAST_MIN)

    def conv_input(self, x: Tensor, out_channels: int) -> Tensor:
        """``x`` [N, C, H, W] in the memory layout in which a convolution to ``out_channels``
        channels runs fastest on its device (the same values either way).

        On the CPU: a one-channel input convolved to ``NARROW_CHANNELS_LAST_MIN`` channels or
        more is viewed channels-last (its memory is the same in both layouts: nothing is
        copied), and any input convolved to ``CHANNELS_LAST_MIN`` channels or more is copied to
        channels-last (once: the outputs keep the layout). Elsewhere ``x`` as it is. BatchNorm
        of channels-last maps sums its statistics in a less accurate order on the CPU (relative
        errors of 1e-5-1e-4 instead of 1e-7): the gates keep it in NCHW; the paper's
        one-channel experts have none.
        """
        if x.shape[1] == 1 and self.narrow_rule_applies(x, out_channels):
            n, _, height, width = x.shape
            return x.reshape(n, height, width, 1).permute(0, 3, 1, 2)
        if x.device.type == "cpu" and out_channels >= CHANNELS_LAST_MIN:
            return x.contiguous(memory_format=torch.channels_last)  # no-op once it is
        return x

    def max_pool(self, x: Tensor, pool: Callable[[Tensor], Tensor]) -> Tensor:
        """``pool(x)`` (a max-pooling), in x's layout, computed channels-last on the CPU for
        maps of ``NARROW_CHANNELS_LAST_MIN`` channels or more: the same values and gradients (a
        maximum is exact, and both layouts keep the first maximum of a window)."""
        if x.is_contiguous(memory_format=torch.channels_last) or not self.narrow_rule_applies(
                x, x.shape[1]):
            return pool(x)
        return relayout(pool(relayout(x, torch.channels_last)), _memory_format(x))


# Today's layouts: every module's unless use_layouts says otherwise.
LAYOUTS = CpuLayouts()


def use_layouts(model: nn.Module, layouts: CpuLayouts) -> None:
    """Make every module of ``model`` that chooses layouts use ``layouts`` (expert groups a
    bank adds later too)."""
    for module in model.modules():
        if isinstance(getattr(module, "layouts", None), CpuLayouts):
            module.layouts = layouts


class _Relayout(torch.autograd.Function):
    """A copy of x in another memory format whose gradient goes back in x's format (autograd's
    own copy hands the gradient on in the new format, and NCHW BatchNorm's backward is slow on a
    channels-last gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, memory_format: torch.memory_format) -> Tensor:
        ctx.source = _memory_format(x)
        return x.contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad.contiguous(memory_format=ctx.source), None


def _memory_format(x: Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def relayout(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """``x`` in ``memory_format`` (itself if it is already), its gradient in x's format."""
    if x.is_contiguous(memory_format=memory_format):
        return x
    return _Relayout.apply(x, memory_format)


class LayoutConv2d(nn.Conv2d):
    """``nn.Conv2d`` that convolves a one-channel input in the layout its ``layouts`` choose and
    returns its output in NCHW (so that a BatchNorm after it stays accurate): the gates' first
    convolution. The same parameters and state_dict as ``nn.Conv2d``."""

    layouts = LAYOUTS

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != 1 or not self.layouts.narrow_rule_applies(x, self.out_channels):
            return super().forward(x)
        return relayout(super().forward(self.layouts.conv_input(x, self.out_channels)),
                        torch.contiguous_format)


class LayoutMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` through its ``layouts``' :meth:`~CpuLayouts.max_pool`: the gates'
    pooling."""

    layouts = LAYOUTS

    def forward(self, x: Tensor) -> Tensor:
        return self.layouts.max_pool(x, super().forward)
