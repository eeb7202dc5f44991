"""Problem sizes and presets of a bench run, and the command-line choices sections read.

Imports neither torch nor Avalanche: the command line validates its arguments with these.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

PROG = "python -m moe_cl.bench"
# The gpu section's variants: a precision (train.precision), optionally with train.compile.
GPU_VARIANTS = ("fp32", "tf32", "bf16", "fp32+compile", "bf16+compile")


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repeat counts; presets keep the whole run within its time budget."""

    repeats: int = 5
    warmup: int = 1
    bank_small_batch: int = 512  # MNIST experts, M = 5
    bank_large_batch: int = 256  # CIFAR-100 experts, M = 20
    bank_chunk: int = 32  # diagnostic row: the bank run on slices of the batch (0: none)
    ls_batch: int = 256
    epoch_samples: int | None = None  # None: the whole training set (60000)
    epoch_epochs: int = 2  # epoch 1 pays the set-up, epochs 2.. are the steady state
    epoch_repeats: int = 2
    epoch_batch: int = 512
    topk_batch: int = 256
    topk_experts: int = 20
    router_samples: int | None = None  # split_fmnist training samples (None: all 60000)
    gpu_epochs: int = 20
    gpu_cifar_epochs: int = 1
    gpu_fmnist_samples: int | None = None
    gpu_cifar_samples: int | None = None
    memory_cases: tuple[str, ...] | None = None  # CPU only; None: every case of the memory section


PRESETS: dict[str, Sizes] = {
    "full": Sizes(),
    "quick": Sizes(
        repeats=3,
        bank_large_batch=128,
        bank_chunk=0,
        epoch_samples=10_000,
        epoch_repeats=1,
        topk_batch=64,
        router_samples=10_000,
        gpu_epochs=2,
        gpu_fmnist_samples=10_000,
        gpu_cifar_samples=2_000,
        memory_cases=("bank/mnist/bank", "bank/mnist/loop"),
    ),
    "tiny": Sizes(
        repeats=1,
        warmup=0,
        bank_small_batch=16,
        bank_large_batch=8,
        bank_chunk=4,
        ls_batch=16,
        epoch_samples=300,
        epoch_repeats=1,
        epoch_batch=128,
        topk_batch=8,
        router_samples=500,
        topk_experts=4,
        gpu_epochs=1,
        gpu_fmnist_samples=600,
        gpu_cifar_samples=200,
        memory_cases=("bank/mnist/bank",),
    ),
}


def sizes_for(preset: str, **overrides: int | None) -> Sizes:
    """The preset's sizes with the given fields replaced (an override of None keeps the preset's
    value)."""
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class Options:
    """What sections read from the command line besides sizes and device."""

    preset: str  # passed on to the memory section's child processes
    data_root: Path
    synthetic: bool  # random tensors even where the real data are present
    gpu_variants: tuple[str, ...] = ("fp32",)  # of GPU_VARIANTS, for the gpu section
