"""The fast data path: experiences held as tensors (on the training device), batched by index.

MNIST, FashionMNIST and CIFAR-100 fit in memory. Gathering an experience's samples once and then
slicing random permutations avoids the per-sample Python work of a ``DataLoader`` in every epoch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

Batch = tuple[Tensor, Tensor, Tensor]


def dataset_tensors(dataset: Dataset, chunk: int = 4096) -> Batch:
    """All (x, y, task label) samples of a dataset as three tensors, as the dataset returns them
    (task label 0 for datasets without task labels, as Avalanche's newer generators make them).

    Avalanche datasets whose only transforms are class-id lookups (every benchmark of
    ``moe_cl.data.streams``, Avalanche's remapped ``nc_benchmark`` streams, their subsets and
    concatenations) are read by following Avalanche's index tree down to the stored tensors,
    each level's lookups applied to the labels: no per-sample work. Anything else is read once
    through a ``DataLoader`` in large chunks, transforms applied. The result may share memory
    with the stored data: treat it as read-only.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    if not has_transforms(dataset, except_class_lookups=True):
        leaves: list[Leaf] = []
        _leaf_rows(dataset, torch.arange(n), torch.arange(n), leaves)
        if all(isinstance(leaf.data, TensorDataset) for leaf in leaves):
            return _gather_tensors(dataset, leaves, n)
    xs, ys, ts = [], [], []
    # A private generator: a DataLoader draws its base seed even without shuffling, and the
    # global RNG must advance the same whether or not these tensors were cached.
    loader = DataLoader(dataset, batch_size=chunk, shuffle=False, num_workers=0,
                        generator=torch.Generator())
    for batch in loader:
        if len(batch) < 2:
            raise ValueError("the fast data path needs samples of the form (x, y[, task_label])")
        xs.append(batch[0])
        ys.append(batch[1])
        ts.append(batch[2] if len(batch) > 2 else torch.zeros(len(batch[1]), dtype=torch.long))
    return torch.cat(xs), torch.cat(ys).long(), torch.cat(ts).long()


@dataclass(frozen=True)
class Leaf:
    """Rows of one stored dataset, the positions they fill in the whole, and the class-id
    lookups between them and the top, innermost first (the order ``__getitem__`` applies them)."""

    data: Any
    rows: Tensor
    pos: Tensor
    lookups: tuple[Callable[[Any], Any], ...] = ()


def _gather_tensors(dataset: Any, leaves: list[Leaf], n: int) -> Batch:
    task_labels = getattr(dataset, "targets_task_labels", None)  # none: task 0, as Avalanche
    tasks = torch.zeros(n, dtype=torch.int64) if task_labels is None else _gather_labels(
        task_labels, n)
    if len(leaves) == 1:
        leaf = leaves[0]
        lo = int(leaf.rows[0])
        if torch.equal(leaf.rows, torch.arange(lo, lo + n)):  # a contiguous block: no copy
            x, y = leaf.data.tensors[0][lo : lo + n], leaf.data.tensors[1][lo : lo + n]
        else:
            x, y = leaf.data.tensors[0][leaf.rows], leaf.data.tensors[1][leaf.rows]
        return x, _looked_up(y.long(), leaf.lookups), tasks
    first = leaves[0].data.tensors[0]
    x = first.new_empty((n, *first.shape[1:]))
    y = torch.empty(n, dtype=torch.int64)
    for leaf in leaves:
        x[leaf.pos] = leaf.data.tensors[0][leaf.rows]
        y[leaf.pos] = _looked_up(leaf.data.tensors[1][leaf.rows].long(), leaf.lookups)
    return x, y, tasks


def _looked_up(labels: Tensor, lookups: tuple[Callable[[Any], Any], ...]) -> Tensor:
    """Labels passed through class-id lookups, each called once per distinct class id, exactly
    as Avalanche calls it on every sample."""
    for lookup in lookups:
        ids, where = labels.unique(return_inverse=True)
        labels = torch.tensor([int(lookup(i)) for i in ids.tolist()], dtype=torch.int64)[where]
    return labels


def has_transforms(node: Any, *, except_class_lookups: bool = False) -> bool:
    """Whether any level of an Avalanche dataset applies a transform in its current group.

    Identity class lookups never count; with ``except_class_lookups`` no class-id lookup does
    (they remap targets deterministically, so reading such data once is enough).
    """
    inert = _class_lookup if except_class_lookups else _identity_lookup
    flat = getattr(node, "_flat_data", node)
    if any(_is_transform(t, inert) for t in _current_transforms(flat)):
        return True
    children = getattr(flat, "_datasets", []) or []
    return any(has_transforms(c, except_class_lookups=except_class_lookups) for c in children)


def _current_transforms(flat: Any) -> list[Any]:
    """The frozen and the changeable transform of one level in its current group, in the order
    ``__getitem__`` applies them.

    Avalanche keeps a remapping's lookup in a ``defaultdict`` that holds no entry for a group
    until a sample of it is read: the default is what a read would use, so it is what counts.
    """
    found = []
    for attr in ("_frozen_transform_groups", "_transform_groups"):
        groups = getattr(flat, attr, None)
        if groups is None:
            continue
        table, group = groups.transform_groups, groups.current_group
        if group in table:
            found.append(table[group])
        elif getattr(table, "default_factory", None) is not None:
            found.append(table.default_factory())
    return found


def _label_lookups(flat: Any) -> tuple[Callable[[Any], Any], ...]:
    """The class-id lookups one level applies to the labels (the second element of a sample)."""
    lookups = []
    for transform in _current_transforms(flat):
        parts = getattr(transform, "transforms", None) or ()
        lookups.extend(p for i, p in enumerate(parts) if i == 1 and p is not None)
    return tuple(lookups)


def _is_transform(transform: Any, inert: Callable[[Any], bool]) -> bool:
    """None and Avalanche's TupleTransform of Nones or ``inert`` label parts do nothing."""
    if transform is None:
        return False
    parts = getattr(transform, "transforms", None)
    if parts is None:
        return True
    return any(p is not None and (i != 1 or not inert(p)) for i, p in enumerate(parts))


def _class_lookup(part: Any) -> bool:
    """Avalanche remaps class ids with ``partial(lookup, mapping)`` on the targets."""
    return isinstance(part, functools.partial) and getattr(part.func, "__name__", "") == "lookup"


def _identity_lookup(part: Any) -> bool:
    """A class lookup of a benchmark that keeps the original class ids (every class to itself)."""
    if not _class_lookup(part):
        return False
    mapping = part.args[0] if part.args else None
    return isinstance(mapping, list | tuple) and all(v == i for i, v in enumerate(mapping))


def _leaf_rows(
    node: Any,
    rows: Tensor,
    pos: Tensor,
    out: list[Leaf],
    lookups: tuple[Callable[[Any], Any], ...] = (),
) -> None:
    """Map row numbers of an Avalanche dataset / FlatData tree to leaves (stored dataset, rows in
    it, positions in the whole, the class-id lookups on the way).

    Avalanche flattens subsets and concatenations into ``_datasets`` plus ``_indices``, so rows
    can be followed down with tensor index arithmetic instead of one ``__getitem__`` per sample.
    """
    if isinstance(node, TensorDataset):
        out.append(Leaf(node, rows, pos, lookups))
        return
    flat = getattr(node, "_flat_data", None)
    if flat is None:
        flat = getattr(node, "_data", None)  # DataAttribute
    if flat is not None and flat is not node:
        _leaf_rows(flat, rows, pos, out, lookups)
        return
    lookups = _label_lookups(node) + lookups  # this level's apply before the outer ones
    children = getattr(node, "_datasets", None)
    if children is None:
        out.append(Leaf(node, rows, pos, lookups))
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
            _leaf_rows(child, rows[sel] - start, pos[sel], out, lookups)


def _gather_labels(node: Any, n: int) -> Tensor:
    """Integer values (class or task labels) of rows 0..n-1 of a dataset attribute."""
    from avalanche.benchmarks.utils.flat_data import ConstantSequence

    leaves: list[Leaf] = []
    _leaf_rows(node, torch.arange(n), torch.arange(n), leaves)
    out = torch.empty(n, dtype=torch.int64)
    for leaf in leaves:
        if isinstance(leaf.data, ConstantSequence):
            out[leaf.pos] = int(leaf.data[0])
        elif isinstance(leaf.data, Tensor):
            out[leaf.pos] = leaf.data[leaf.rows].to(torch.int64)
        else:
            values = [int(leaf.data[i]) for i in leaf.rows.tolist()]
            out[leaf.pos] = torch.as_tensor(values, dtype=torch.int64)
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
