"""The fast data path: experiences held as tensors (on the training device), batched by index.

MNIST, FashionMNIST and CIFAR-100 fit in memory. Gathering an experience's samples once and then
slicing random permutations avoids the per-sample Python work of a ``DataLoader`` in every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

Batch = tuple[Tensor, Tensor, Tensor]


def dataset_tensors(dataset: Dataset, chunk: int = 4096) -> Batch:
    """All samples of a (x, y, task) dataset as three tensors, read once in large chunks."""
    xs, ys, ts = [], [], []
    for batch in DataLoader(dataset, batch_size=chunk, shuffle=False, num_workers=0):
        if len(batch) < 3:
            raise ValueError("the fast data path needs samples of the form (x, y, task_label)")
        xs.append(batch[0])
        ys.append(batch[1])
        ts.append(batch[-1])
    if not xs:
        raise ValueError("the dataset is empty")
    return torch.cat(xs), torch.cat(ys).long(), torch.cat(ts).long()


class TensorBatches:
    """Mini-batches of tensors by index: every sample exactly once per pass.

    ``shuffle`` draws a new permutation on each pass from ``generator`` (seeded from torch's
    global RNG when omitted, so a run's seed fixes the order).
    """

    def __init__(
        self,
        tensors: Batch,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        if generator is None and shuffle:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
        self.generator = generator

    @property
    def num_samples(self) -> int:
        return len(self.tensors[1])

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else (n + b - 1) // b

    def __iter__(self) -> Iterator[list[Tensor]]:
        n = self.num_samples
        device = self.tensors[0].device
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(device)
        else:
            order = None
        for batch in range(len(self)):
            start = batch * self.batch_size
            stop = min(start + self.batch_size, n)
            if order is None:
                yield [t[start:stop] for t in self.tensors]
            else:
                index = order[start:stop]
                yield [t.index_select(0, index) for t in self.tensors]
