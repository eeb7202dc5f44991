"""The layers an expert is made of, as plain descriptions: an
:class:`~moe_cl.core.bank.ExpertSpec` lists them, and the bank builds from them both the plain
per-expert modules and the stacked, batched ones."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Conv:
    in_channels: int
    out_channels: int
    kernel_size: int = 3
    padding: int = 0
    bias: bool = True


@dataclass(frozen=True)
class BatchNorm:
    channels: int


@dataclass(frozen=True)
class ReLU:
    pass


@dataclass(frozen=True)
class MaxPool:
    size: int = 2


@dataclass(frozen=True)
class Flatten:
    pass


@dataclass(frozen=True)
class Linear:
    in_features: int
    out_features: int
    bias: bool = True


@dataclass(frozen=True)
class Hidden:
    """Marks where the expert's hidden vector h is read: right after the preceding Linear."""


Layer = Conv | BatchNorm | ReLU | MaxPool | Flatten | Linear | Hidden
