"""Continual-learning benchmarks: streams of in-memory normalised tensors.

The data sets come from :mod:`moe_cl.data.datasets` (files, readers, normalisation); this module
turns them into Avalanche 0.6 streams: the class order, optional seeded subsets, split and
paper streams. Nothing is transformed per sample: random augmentation is a per-batch callable
(``batch_augment``) that a strategy applies on the device, which keeps the data path a plain
tensor gather.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from moe_cl.data.datasets import DataError, DataOptions, dataset_of, load
from moe_cl.data.names import BENCHMARK_NAMES

if TYPE_CHECKING:
    from avalanche.benchmarks.scenarios.generic_scenario import CLScenario

__all__ = [
    "BENCHMARK_NAMES",
    "BenchmarkBundle",
    "DataError",
    "cifar_batch_augment",
    "make_benchmark",
    "random_flip_crop",
]

_DATA_OPTIONS = ("samples_per_class", "test_samples_per_class", "debian_fmnist_dir")
_SUBSET_OPTIONS = ("max_train_samples", "max_test_samples")
_KNOWN_KWARGS = frozenset(_DATA_OPTIONS + _SUBSET_OPTIONS)


@dataclass
class BenchmarkBundle:
    """A benchmark plus what models and reports need to know about it."""

    benchmark: CLScenario
    name: str
    n_classes: int
    input_shape: tuple[int, int, int]
    scenario: str
    batch_augment: Callable[[Tensor], Tensor] | None
    class_order: list[int]
    classes_per_experience: list[list[int]]
    class_names: list[str] | None = None
    superclasses: list[int] | None = None  # superclass of each class id (CIFAR-100 only)
    superclass_names: list[str] | None = None


# --------------------------------------------------------------------------------------------
# Per-batch augmentation
# --------------------------------------------------------------------------------------------


def _reflect(i: Tensor, size: int) -> Tensor:
    """Index into a reflect-padded axis (edge not repeated, as ``F.pad(mode="reflect")``)."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def random_flip_crop(
    x: Tensor, padding: int = 4, generator: torch.Generator | None = None
) -> Tensor:
    """Random horizontal flip (p=0.5) and random crop after reflect padding, for a whole batch.

    Sample ``b`` becomes ``F.pad(x, padding, mode="reflect")[b, :, oy:oy+H, ox:ox+W]``, mirrored
    left-right when its flip flag is set. The padding is never materialised: reflected source
    indices are computed for every output pixel and read with one ``gather``, so there is no
    Python loop over samples and a single pass over memory. Random numbers come from
    ``generator`` (drawn on its device) or from the global RNG of ``x``'s device.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if not 0 <= padding < min(h, w):
        raise ValueError(f"reflect padding must be in [0, {min(h, w)}), got {padding}")
    if b == 0:
        return x
    rng_device = generator.device if generator is not None else x.device
    flip = torch.rand(b, generator=generator, device=rng_device) < 0.5
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=rng_device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=rng_device)
    flip, oy, ox = flip.to(x.device), oy.to(x.device), ox.to(x.device)

    rows = _reflect(oy[:, None] - padding + torch.arange(h, device=x.device), h)  # [B, H]
    j = torch.arange(w, device=x.device).expand(b, w)
    j = torch.where(flip[:, None], (w - 1) - j, j)
    cols = _reflect(ox[:, None] - padding + j, w)  # [B, W]
    flat_idx = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, h * w)
    out = torch.gather(x.reshape(b, c, h * w), 2, flat_idx.expand(b, c, h * w))
    return out.view(b, c, h, w)


def cifar_batch_augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The paper's CIFAR-100 train augmentation: flip + RandomCrop(32, padding 4, reflect)."""
    return random_flip_crop(x, padding=4, generator=generator)


# --------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------


def _subsample(x: Tensor, y: Tensor, limit: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded class-balanced subset (file order kept), for quick runs on a few samples.

    Classes are drawn round-robin so every class keeps samples whenever ``limit`` allows: a
    class missing from the training subset would silently vanish from the test stream too.
    """
    if limit is None or limit >= len(y):
        return x, y
    if limit <= 0:
        raise ValueError(f"sample limits must be positive, got {limit}")
    n = len(y)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    y_perm = y[perm]
    by_class = torch.sort(y_perm, stable=True).indices  # grouped by class, random within
    sorted_y = y_perm[by_class]
    group_start = torch.searchsorted(sorted_y, sorted_y, right=False)
    rank = torch.empty(n, dtype=torch.int64)
    rank[by_class] = torch.arange(n) - group_start  # rank of each sample within its class
    take = torch.argsort(rank * n + torch.arange(n))[:limit]
    keep = perm[take].sort().values
    return x[keep].clone(), y[keep].clone()


def _avalanche_dataset(x: Tensor, y: Tensor) -> Any:
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    return _make_taskaware_tensor_classification_dataset(x, y, targets=y, task_labels=0)


def _class_order(
    classes: list[int], n_experiences: int, seed: int, fixed: Sequence[int] | None
) -> list[int]:
    if fixed is not None:
        order = [int(c) for c in fixed]
        if len(set(order)) != len(order) or not set(order) <= set(classes):
            raise ValueError(
                f"fixed_class_order must list distinct classes among {classes}, got {order}"
            )
    else:
        # A private generator: Avalanche's own shuffling reseeds the global torch RNG.
        perm = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))
        order = [classes[i] for i in perm.tolist()]
    if n_experiences < 1 or len(order) % n_experiences:
        raise ValueError(
            f"{len(order)} classes cannot be split evenly into n_experiences={n_experiences}"
        )
    return order


def make_benchmark(
    name: str,
    *,
    n_experiences: int = 5,
    scenario: str = "class",
    seed: int = 0,
    data_root: str | Path = "data",
    download: bool = True,
    fixed_class_order: Sequence[int] | None = None,
    **kwargs: Any,
) -> BenchmarkBundle:
    """Build a benchmark by name (see ``BENCHMARK_NAMES``).

    ``split_*`` and ``tiny`` split the classes over ``n_experiences`` in an order shuffled by
    ``seed`` (or ``fixed_class_order``); ``scenario="task"`` gives experience i task label i
    while class ids stay global, so one head can be masked per task. ``paper_*`` is one
    experience holding the whole train and test sets. Extra keyword arguments:
    ``samples_per_class``/``test_samples_per_class`` (tiny), ``debian_fmnist_dir`` (Fashion-MNIST
    fallback folder), ``max_train_samples``/``max_test_samples`` (seeded subset, for quick runs).
    """
    if name not in BENCHMARK_NAMES:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARK_NAMES)}")
    if scenario not in ("class", "task"):
        raise ValueError(f"scenario must be 'class' or 'task', got {scenario!r}")
    if int(n_experiences) < 1:
        raise ValueError(f"n_experiences must be at least 1, got {n_experiences}")
    unknown = set(kwargs) - _KNOWN_KWARGS
    if unknown:
        raise TypeError(
            f"unknown benchmark option(s) {sorted(unknown)}; known: {sorted(_KNOWN_KWARGS)}"
        )
    spec = dataset_of(name)
    options = DataOptions(
        download=download,
        seed=seed,
        synthetic_classes=2 * n_experiences,
        **{key: kwargs[key] for key in _DATA_OPTIONS if key in kwargs},
    )
    data = load(spec.name, data_root, options)
    xtr, ytr = _subsample(data.train_x, data.train_y, kwargs.get("max_train_samples"), seed)
    xte, yte = _subsample(data.test_x, data.test_y, kwargs.get("max_test_samples"), seed + 1)

    present = sorted(set(ytr.tolist()))
    if name.startswith("paper_"):
        n_experiences = 1
        order = (
            present
            if fixed_class_order is None
            else _class_order(present, 1, seed, fixed_class_order)
        )
    else:
        order = _class_order(present, n_experiences, seed, fixed_class_order)

    from avalanche.benchmarks import nc_benchmark

    bm = nc_benchmark(
        _avalanche_dataset(xtr, ytr),
        _avalanche_dataset(xte, yte),
        n_experiences=n_experiences,
        task_labels=scenario == "task" and n_experiences > 1,
        shuffle=False,
        fixed_class_order=order,
        class_ids_from_zero_from_first_exp=False,
        class_ids_from_zero_in_each_exp=False,
    )
    per_exp = len(order) // n_experiences
    return BenchmarkBundle(
        benchmark=bm,
        name=name,
        n_classes=data.n_classes,
        input_shape=spec.input_shape,
        scenario=scenario,
        batch_augment=cifar_batch_augment if spec.augment_flip_crop else None,
        class_order=order,
        classes_per_experience=[
            sorted(order[i * per_exp : (i + 1) * per_exp]) for i in range(n_experiences)
        ],
        class_names=data.class_names,
        superclasses=data.superclasses,
        superclass_names=data.superclass_names,
    )
