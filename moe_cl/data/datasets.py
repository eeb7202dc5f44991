"""The data sets: one table entry each, and :func:`load`.

``DATASETS`` holds one entry per data set (its torchvision folder and file names, normalisation
statistics, input shape, number of classes, reader, default architecture); :func:`load` reads one
into normalised float tensors ``[N, C, H, W]`` and :func:`dataset_of` finds a benchmark's. Adding
a data set is one table entry plus, for a new file format, its reader (:mod:`moe_cl.data.readers`)
and its name in :mod:`moe_cl.data.names`.
"""

from __future__ import annotations

from pathlib import Path

from moe_cl.data.names import BENCHMARK_DATASET
from moe_cl.data.readers import (
    CIFAR100_SUPERCLASS_OF,
    IDX_FILES,
    check_data_root,
    fetch_archive,
    fetch_with_torchvision,
    files_at_hand,
    generate_tiny,
    read_cifar100,
    read_idx,
)
from moe_cl.data.spec import (
    DataError,
    DataOptions,
    DatasetSpec,
    DebianPackage,
    LoadedDataset,
    Stats,
)

__all__ = [
    "CIFAR100_SUPERCLASS_OF",
    "DATASETS",
    "DEBIAN_FMNIST_DIR",
    "DataError",
    "DataOptions",
    "DatasetSpec",
    "DebianPackage",
    "LoadedDataset",
    "cifar100_superclass_of",
    "dataset_of",
    "load",
]

# Where Debian's ``dataset-fashion-mnist`` package puts its gzipped idx files; the environment
# variable lets tests (and unusual installs) point elsewhere.
DEBIAN_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_FMNIST_ENV = "MOE_CL_DEBIAN_FMNIST"


def load(name: str, root: str | Path, options: DataOptions | None = None) -> LoadedDataset:
    """Read data set ``name`` (a key of ``DATASETS``) from ``root`` into normalised tensors."""
    spec = DATASETS[name]
    options = options or DataOptions()
    if spec.folder is None:
        return spec.read(spec, Path(root), options)
    root = Path(root).expanduser()
    check_data_root(root)
    try:
        return spec.read(spec, root, options)
    except OSError as exc:  # a last resort: the readers name their own failures
        raise DataError(f"cannot read the data under {root}: {exc}") from exc


def prepare_files(benchmark: str, root: str | Path, options: DataOptions) -> None:
    """Make sure the files of ``benchmark``'s data set are under ``root``: there already,
    unpacked from a Debian package, or downloaded (``options.download``, when the source
    answers); a DataError naming the files to copy otherwise. Cheap where they are there: the
    command line calls it before the heavy imports, so an offline machine learns in seconds."""
    spec = dataset_of(benchmark)
    if spec.folder is None:
        return
    root = Path(root).expanduser()
    check_data_root(root)
    files_at_hand(spec, root, options)


def dataset_of(benchmark: str) -> DatasetSpec:
    """The table entry of the data set that benchmark ``benchmark`` draws from."""
    return DATASETS[BENCHMARK_DATASET[benchmark]]


def cifar100_superclass_of(fine_label: int) -> int:
    """Superclass (coarse label, 0..19) of a CIFAR-100 fine label (0..99)."""
    if not 0 <= int(fine_label) < 100:
        raise ValueError(f"CIFAR-100 fine labels are 0..99, got {fine_label}")
    return CIFAR100_SUPERCLASS_OF[int(fine_label)]


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def _idx_dataset(
    *,
    name: str,
    title: str,
    torchvision_class: str,
    stats: Stats,
    copy_instruction: str,
    architecture: str,
    debian: DebianPackage | None = None,
) -> DatasetSpec:
    """An MNIST-format data set: 28x28 grey images of 10 classes in four idx files, in the
    ``raw`` subfolder of a folder named, as torchvision does, after its class."""
    return DatasetSpec(
        name=name,
        title=title,
        input_shape=(1, 28, 28),
        n_classes=10,
        read=read_idx,
        folder=torchvision_class,
        subfolder="raw",
        files=IDX_FILES,
        file_kind="uncompressed files",
        copy_instruction=copy_instruction,
        stats=stats,
        torchvision_class=torchvision_class,
        fetch=fetch_with_torchvision,
        debian=debian,
        architecture=architecture,
    )


# Normalisation statistics are the paper's (section 4).
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _idx_dataset(
            name="mnist",
            title="MNIST",
            torchvision_class="MNIST",
            stats=((0.1307,), (0.3081,)),
            copy_instruction="copy the four files there (gunzip the *.gz originals)",
            architecture="mnist",
        ),
        _idx_dataset(
            name="fmnist",
            title="Fashion-MNIST",
            torchvision_class="FashionMNIST",
            stats=((0.2859,), (0.3530,)),
            copy_instruction="copy the four files there",
            architecture="fmnist",
            debian=DebianPackage("dataset-fashion-mnist", DEBIAN_FMNIST_DIR, DEBIAN_FMNIST_ENV),
        ),
        DatasetSpec(
            name="cifar100",
            title="CIFAR-100",
            input_shape=(3, 32, 32),
            n_classes=100,
            read=read_cifar100,
            folder="cifar-100-python",
            files=("train", "test", "meta"),
            file_kind="python pickles",
            copy_instruction="copy the folder extracted from cifar-100-python.tar.gz there",
            stats=((0.5074, 0.4867, 0.4411), (0.2011, 0.1987, 0.2025)),
            torchvision_class="CIFAR100",
            fetch=fetch_archive,
            augment_flip_crop=True,
            architecture="cifar100",
        ),
        DatasetSpec(
            name="tiny", title="tiny", input_shape=(1, 8, 8), n_classes=None, read=generate_tiny
        ),
    )
}
