"""What a data set's table entry says and what reading one gives.

:class:`DatasetSpec` is one entry of ``moe_cl.data.datasets.DATASETS``: where the files lie, how
they are obtained and read (:mod:`moe_cl.data.readers`), what the samples are, and the
architecture a run takes by default. A reader returns a :class:`LoadedDataset` or raises
:class:`DataError`, whose one-line message says which files are expected where.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from moe_cl.errors import USAGE_ERROR

Stats = tuple[tuple[float, ...], tuple[float, ...]]


class DataError(Exception):
    """Data missing, unreadable or corrupt; the message tells the user what to do."""

    exit_code = USAGE_ERROR


@dataclass(frozen=True)
class DataOptions:
    """What a reader may need besides the data root."""

    download: bool = True  # on first use, as torchvision and Avalanche do
    seed: int = 0
    synthetic_classes: int = 10  # class count of a generated data set; files fix their own
    samples_per_class: int = 64  # generated data sets: train samples per class
    test_samples_per_class: int = 32
    debian_fmnist_dir: str | Path | None = None  # overrides DebianPackage.folder


@dataclass
class LoadedDataset:
    """A data set's train and test tensors (inputs normalised) and what it says of its
    classes."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    n_classes: int
    class_names: list[str] | None = None
    superclasses: list[int] | None = None  # superclass of each class id
    superclass_names: list[str] | None = None


@dataclass(frozen=True)
class DebianPackage:
    """A Debian/Ubuntu package that ships a data set's files gzipped in one folder."""

    name: str
    folder: str
    folder_env: str  # environment variable naming another folder (tests, unusual installs)

    def folder_in_use(self, override: str | Path | None) -> Path:
        if override is not None:
            return Path(override)
        return Path(os.environ.get(self.folder_env, self.folder))


Reader = Callable[["DatasetSpec", Path, DataOptions], LoadedDataset]


@dataclass(frozen=True)
class DatasetSpec:
    """One data set: where its files lie, how to get and read them, what its samples are."""

    name: str
    title: str  # how messages name it
    input_shape: tuple[int, int, int]
    n_classes: int | None  # None: generated, as many as DataOptions.synthetic_classes
    read: Reader
    folder: str | None = None  # torchvision's folder under the data root; None: no files
    subfolder: str = ""  # where in that folder the files lie
    files: tuple[str, ...] = ()
    file_kind: str = "files"  # how the missing-data message calls them
    copy_instruction: str = ""  # the manual way of getting them, for that message
    stats: Stats | None = None  # per-channel (mean, std) of the raw pixels scaled to [0, 1]
    torchvision_class: str | None = None  # name in torchvision.datasets, for downloads
    fetch: Callable[[DatasetSpec, Path], None] | None = None  # download into the data root
    debian: DebianPackage | None = None
    augment_flip_crop: bool = False  # trained on random flips and reflect-padded crops
    # model.architecture=auto: one of core.choices.PAPER_ARCHITECTURES, or mlp (sized to the data)
    architecture: str = "mlp"

    def files_dir(self, root: Path) -> Path:
        return root / str(self.folder) / self.subfolder

