"""The fast data path: experiences held as tensors (on the training device), batched by index.

MNIST, FashionMNIST and CIFAR-100 fit in memory. Gathering an experience's samples once and then
slicing random permutations avoids the per-sample Python work of a ``DataLoader`` in every epoch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

Batch = tuple[Tensor, Tensor, Tensor]


def dataset_tensors(dataset: Dataset, chunk: int = 4096) -> Batch:
    """All (x, y, task label) samples of a dataset as three tensors.

    Avalanche datasets without transforms (every benchmark of ``moe_cl.benchmarks``, their
    subsets and concatenations) are read by following Avalanche's index tree down to the stored
    tensors: no per-sample work. Anything else is read once through a ``DataLoader`` in large
    chunks, transforms applied. The result may share memory with the stored data: treat it as
    read-only.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    if not has_transforms(dataset):
        leaves: list[tuple[Any, Tensor, Tensor]] = []
        _leaf_rows(dataset, torch.arange(n), torch.arange(n), leaves)
        if all(isinstance(leaf, TensorDataset) for leaf, _, _ in leaves):
            return _gather_tensors(dataset, leaves, n)
    xs, ys, ts = [], [], []
    # A private generator: a DataLoader draws its base seed even without shuffling, and the
    # global RNG must advance the same whether or not these tensors were cached.
    loader = DataLoader(dataset, batch_size=chunk, shuffle=False, num_workers=0,
                        generator=torch.Generator())
    for batch in loader:
        if len(batch) < 3:
            raise ValueError("the fast data path needs samples of the form (x, y, task_label)")
        xs.append(batch[0])
        ys.append(batch[1])
        ts.append(batch[-1])
    return torch.cat(xs), torch.cat(ys).long(), torch.cat(ts).long()


def _gather_tensors(dataset: Any, leaves: list[tuple[Any, Tensor, Tensor]], n: int) -> Batch:
    tasks = _gather_labels(dataset.targets_task_labels, n)
    if len(leaves) == 1:
        leaf, rows, _ = leaves[0]
        lo = int(rows[0])
        if torch.equal(rows, torch.arange(lo, lo + n)):  # a contiguous block: no copy at all
            return leaf.tensors[0][lo : lo + n], leaf.tensors[1][lo : lo + n].long(), tasks
        return leaf.tensors[0][rows], leaf.tensors[1][rows].long(), tasks
    first = leaves[0][0].tensors[0]
    x = first.new_empty((n, *first.shape[1:]))
    y = torch.empty(n, dtype=torch.int64)
    for leaf, rows, pos in leaves:
        x[pos] = leaf.tensors[0][rows]
        y[pos] = leaf.tensors[1][rows].long()
    return x, y, tasks


def has_transforms(node: Any, *, except_class_lookups: bool = False) -> bool:
    """Whether any level of an Avalanche dataset applies a transform in its current group.

    Identity class lookups never count; with ``except_class_lookups`` no class-id lookup does
    (they remap targets deterministically, so reading such data once is enough).
    """
    inert = _class_lookup if except_class_lookups else _identity_lookup
    flat = getattr(node, "_flat_data", node)
    for attr in ("_transform_groups", "_frozen_transform_groups"):
        groups = getattr(flat, attr, None)
        if groups is not None and _is_transform(
            groups.transform_groups.get(groups.current_group), inert
        ):
            return True
    children = getattr(flat, "_datasets", []) or []
    return any(has_transforms(c, except_class_lookups=except_class_lookups) for c in children)


def _is_transform(transform: Any, inert: Callable[[Any], bool]) -> bool:
    """None and Avalanche's TupleTransform of Nones or ``inert`` parts do nothing."""
    if transform is None:
        return False
    parts = getattr(transform, "transforms", None)
    return parts is None or any(p is not None and not inert(p) for p in parts)


def _class_lookup(part: Any) -> bool:
    """Avalanche installs ``partial(lookup, mapping)`` on targets once a sample has been read."""
    return isinstance(part, functools.partial) and getattr(part.func, "__name__", "") == "lookup"


def _identity_lookup(part: Any) -> bool:
    """A class lookup of a benchmark that keeps the original class ids (every class to itself)."""
    if not _class_lookup(part):
        return False
    mapping = part.args[0] if part.args else None
    return isinstance(mapping, list | tuple) and all(v == i for i, v in enumerate(mapping))


def _leaf_rows(
    node: Any, rows: Tensor, pos: Tensor, out: list[tuple[Any, Tensor, Tensor]]
) -> None:
    """Map row numbers of an Avalanche dataset / FlatData tree to (leaf, rows in leaf, positions).

    Avalanche flattens subsets and concatenations into ``_datasets`` plus ``_indices``, so rows
    can be followed down with tensor index arithmetic instead of one ``__getitem__`` per sample.
    """
    if isinstance(node, TensorDataset):
        out.append((node, rows, pos))
        return
    flat = getattr(node, "_flat_data", None)
    if flat is None:
        flat = getattr(node, "_data", None)  # DataAttribute
    if flat is not None and flat is not node:
        _leaf_rows(flat, rows, pos, out)
        return
    children = getattr(node, "_datasets", None)
    if children is None:
        out.append((node, rows, pos))
        return
    indices = getattr(node, "_indices", None)
    if indices is not None:
        rows = torch.as_tensor(indices, dtype=torch.int64)[rows]
    ends = torch.cumsum(torch.tensor([len(c) for c in children], dtype=torch.int64), 0)
    which = torch.searchsorted(ends, rows, right=True)
    for k, child in enumerate(children):
        sel = which == k
        if bool(sel.any()):
            start = int(ends[k - 1]) if k else 0
            _leaf_rows(child, rows[sel] - start, pos[sel], out)


def _gather_labels(node: Any, n: int) -> Tensor:
    """Integer values (class or task labels) of rows 0..n-1 of a dataset attribute."""
    from avalanche.benchmarks.utils.flat_data import ConstantSequence

    leaves: list[tuple[Any, Tensor, Tensor]] = []
    _leaf_rows(node, torch.arange(n), torch.arange(n), leaves)
    out = torch.empty(n, dtype=torch.int64)
    for leaf, rows, pos in leaves:
        if isinstance(leaf, ConstantSequence):
            out[pos] = int(leaf[0])
        elif isinstance(leaf, Tensor):
            out[pos] = leaf[rows].to(torch.int64)
        else:
            out[pos] = torch.as_tensor([int(leaf[i]) for i in rows.tolist()], dtype=torch.int64)
    return out


class TensorBatches:
    """Mini-batches of tensors by index: every sample exactly once per pass.

    With ``shuffle`` each pass draws its permutation from torch's global RNG when the pass
    starts (as ``DataLoader`` does), so a run's seed fixes the order and restoring the RNG state
    at an epoch boundary reproduces the rest of the run exactly.
    """

    def __init__(
        self, tensors: Batch, batch_size: int, *, shuffle: bool, drop_last: bool = False
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last

    @property
    def num_samples(self) -> int:
        return len(self.tensors[1])

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else (n + b - 1) // b

    def __iter__(self) -> Iterator[list[Tensor]]:
        n = self.num_samples
        order = torch.randperm(n).to(self.tensors[0].device) if self.shuffle else None
        for batch in range(len(self)):
            start = batch * self.batch_size
            stop = min(start + self.batch_size, n)
            if order is None:
                yield [t[start:stop] for t in self.tensors]
            else:
                index = order[start:stop]
                yield [t.index_select(0, index) for t in self.tensors]
