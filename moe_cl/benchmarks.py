"""Continual-learning benchmarks held as in-memory normalised tensors.

Every data set is read once from its raw files, turned into a float tensor ``[N, C, H, W]``
normalised with the paper's statistics, and wrapped into Avalanche 0.6 streams. Nothing is
transformed per sample: random augmentation is a per-batch callable (``batch_augment``) that a
strategy applies on the device, which keeps the data path a plain tensor gather.

Raw files live in torchvision's layout under ``data_root``; nothing is downloaded unless
``download=True`` is passed, and every failure to find or parse data raises :class:`DataError`
with a message that says which files are expected where and how to obtain them.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.error import URLError

import numpy as np
import torch
from torch import Tensor

from moe_cl.run_folder import folder_problem

if TYPE_CHECKING:
    from avalanche.benchmarks.scenarios.generic_scenario import CLScenario

__all__ = [
    "BENCHMARK_NAMES",
    "CIFAR100_SUPERCLASS_OF",
    "DEBIAN_FMNIST_DIR",
    "BenchmarkBundle",
    "DataError",
    "cifar100_superclass_of",
    "cifar_batch_augment",
    "make_benchmark",
    "random_flip_crop",
]

BENCHMARK_NAMES: tuple[str, ...] = (
    "split_mnist",
    "split_fmnist",
    "split_cifar100",
    "paper_mnist",
    "paper_fmnist",
    "paper_cifar100",
    "tiny",
)

# Where Debian's ``dataset-fashion-mnist`` package puts its gzipped idx files; the environment
# variable lets tests (and unusual installs) point elsewhere.
DEBIAN_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_FMNIST_ENV = "MOE_CL_DEBIAN_FMNIST"

# Normalisation statistics from the paper (section 4), per channel.
MNIST_STATS = ((0.1307,), (0.3081,))
FMNIST_STATS = ((0.2859,), (0.3530,))
CIFAR100_STATS = ((0.5074, 0.4867, 0.4411), (0.2011, 0.1987, 0.2025))

# Coarse (superclass) label of each CIFAR-100 fine label, in the data set's own numbering: needed
# to read expert x superclass tables without having the files at hand.
CIFAR100_SUPERCLASS_OF: tuple[int, ...] = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3,
    3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
    0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10,
    16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19,
    2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)  # fmt: skip

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR100_FOLDER = "cifar-100-python"
_CIFAR100_FILES = ("train", "test", "meta")
_KNOWN_KWARGS = frozenset(
    {
        "samples_per_class",
        "test_samples_per_class",
        "debian_fmnist_dir",
        "max_train_samples",
        "max_test_samples",
    }
)


class DataError(Exception):
    """Data missing, unreadable or corrupt; the message tells the user what to do."""


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


def cifar100_superclass_of(fine_label: int) -> int:
    """Superclass (coarse label, 0..19) of a CIFAR-100 fine label (0..99)."""
    if not 0 <= int(fine_label) < 100:
        raise ValueError(f"CIFAR-100 fine labels are 0..99, got {fine_label}")
    return CIFAR100_SUPERCLASS_OF[int(fine_label)]


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
# Raw files: MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------


def _missing(folder: Path, names: Sequence[str]) -> list[str]:
    try:
        return [n for n in names if not (folder / n).is_file()]
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DataError(f"cannot look into the data folder {folder}: {reason}") from exc


def _check_data_root(root: Path) -> None:
    problem = folder_problem(root)
    if problem:
        raise DataError(f"unusable data folder: {problem}; point data_root (data.root) at a folder")


def _absent_dirs(*dirs: Path) -> list[Path]:
    """Folders (and their ancestors) not existing yet, deepest first, for cleanup on failure."""
    absent: set[Path] = set()
    for d in dirs:
        d = d.absolute()
        while not d.exists() and d != d.parent:
            absent.add(d)
            d = d.parent
    return sorted(absent, key=lambda p: len(p.parts), reverse=True)


def _remove_if_empty(dirs: Sequence[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()  # only succeeds when empty
        except OSError:
            pass


def _debian_fmnist_dir(override: str | Path | None) -> Path:
    if override is not None:
        return Path(override)
    return Path(os.environ.get(DEBIAN_FMNIST_ENV, DEBIAN_FMNIST_DIR))


def _install_debian_fmnist(debian: Path, raw: Path, names: Sequence[str]) -> None:
    """Decompress Debian's .gz idx files into torchvision's raw folder, atomically per file.

    Debian recompresses the archives, so torchvision's checksums of the .gz files fail; the
    uncompressed files are what torchvision actually reads.
    """
    created = _absent_dirs(raw.parent.parent, raw.parent, raw)
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_if_empty(created)
        why = folder_problem(raw) or exc.strerror or str(exc)
        raise DataError(
            f"cannot create the folder {raw} to unpack the Fashion-MNIST files of {debian} "
            f"into: {why}"
        ) from exc
    for name in names:
        src = debian / f"{name}.gz"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=raw)
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, length=1 << 20)
            os.replace(tmp, raw / name)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            Path(tmp).unlink(missing_ok=True)
            _remove_if_empty(created)
            raise DataError(f"could not decompress {src} into {raw}: {exc}") from exc


def _replace_hint(folder: str, debian: Path) -> str:
    """How to get an intact copy of a corrupt MNIST/Fashion-MNIST idx file."""
    hint = (
        "replace it with the original uncompressed file, or delete it and run again with "
        "data.download=true (download=True in Python) on a machine with network access"
    )
    if folder == "FashionMNIST":
        hint += (
            "; on Debian/Ubuntu, after `apt-get install -y dataset-fashion-mnist`, deleting it "
            f"is enough: moe-cl unpacks it again from {debian}, with no network"
        )
    return hint


def _check_idx_file(
    path: Path, magic: int, item_shape: Sequence[int] = (), hint: str | None = None
) -> int:
    """Validate an idx file's header, dimensions (``[N, *item_shape]``) and size; return N."""
    hint = hint or "replace it with the original uncompressed file"
    ndim = magic & 0xFF
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(header) < 4 + 4 * ndim or int.from_bytes(header[:4], "big") != magic:
        raise DataError(
            f"{path} is not an idx file with magic number {magic} (corrupt or wrong file); "
            + hint
        )
    dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = len(header) + math.prod(dims)
    if size != expected:
        raise DataError(
            f"{path} is truncated or corrupt: {size} bytes, header {dims} needs {expected}; "
            + hint
        )
    if ndim == 1 + len(item_shape) and dims[1:] != list(item_shape):
        want = ", ".join(["N", *map(str, item_shape)])
        raise DataError(
            f"{path} is corrupt or the wrong file: its header gives dimensions {dims}, "
            f"expected [{want}]; " + hint
        )
    return dims[0]


def _load_idx_dataset(
    folder: str,
    data_root: Path,
    download: bool,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    debian_dir: str | Path | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Read MNIST-format train/test sets with torchvision and normalise them."""
    raw = data_root / folder / "raw"
    missing = _missing(raw, _IDX_FILES)
    if missing and folder == "FashionMNIST":
        debian = _debian_fmnist_dir(debian_dir)
        if all((debian / f"{n}.gz").is_file() for n in missing):
            _install_debian_fmnist(debian, raw, missing)
            missing = []
    if missing and download:
        _download_with_torchvision(folder, data_root)
        missing = _missing(raw, _IDX_FILES)
    if missing:
        raise DataError(_missing_idx_message(folder, raw, missing, _debian_fmnist_dir(debian_dir)))

    counts = {}
    hint = _replace_hint(folder, _debian_fmnist_dir(debian_dir))
    for name in _IDX_FILES:
        if "images" in name:
            counts[name] = _check_idx_file(raw / name, 2051, (28, 28), hint)
        else:
            counts[name] = _check_idx_file(raw / name, 2049, (), hint)
    for split in ("train", "t10k"):
        ni, nl = counts[f"{split}-images-idx3-ubyte"], counts[f"{split}-labels-idx1-ubyte"]
        if ni != nl:
            raise DataError(
                f"{raw / f'{split}-labels-idx1-ubyte'} holds {nl} labels but "
                f"{raw / f'{split}-images-idx3-ubyte'} holds {ni} images; one of them is corrupt"
            )

    import torchvision.datasets as tvd

    cls = {"MNIST": tvd.MNIST, "FashionMNIST": tvd.FashionMNIST}[folder]
    out: list[Tensor] = []
    for train in (True, False):
        try:
            ds = cls(root=str(data_root), train=train, download=False)
        except Exception as exc:  # torchvision raises assorted types on unreadable files
            raise DataError(f"could not read the {folder} files in {raw}: {exc}") from exc
        labels = ds.targets.to(torch.int64)
        if labels.numel() and int(labels.max()) > 9:
            raise DataError(f"{raw}: labels outside 0..9, the label files are corrupt")
        out += [_normalise(ds.data.unsqueeze(1), stats), labels]
    return out[0], out[1], out[2], out[3]


def _missing_idx_message(folder: str, raw: Path, missing: Sequence[str], debian: Path) -> str:
    pretty = "Fashion-MNIST" if folder == "FashionMNIST" else "MNIST"
    msg = (
        f"{pretty} data not found: expected the uncompressed files {', '.join(_IDX_FILES)} in "
        f"{raw} (missing: {', '.join(missing)}). "
    )
    if folder == "FashionMNIST":
        msg += (
            "On Debian/Ubuntu run `apt-get install -y dataset-fashion-mnist`: moe-cl then "
            f"unpacks {debian}/*.gz into that folder automatically, with no "
            "network. Otherwise pass data.download=true (download=True in Python) on a "
            "machine with network access, or copy the four files there."
        )
    else:
        msg += (
            "Pass data.download=true (download=True in Python) on a machine with network "
            "access, or copy the four files "
            "there (gunzip the *.gz originals)."
        )
    return msg


def _download_with_torchvision(folder: str, data_root: Path) -> None:
    """Fetch a data set with torchvision; on failure leave no empty folders behind."""
    import torchvision.datasets as tvd
    import torchvision.datasets.utils as tvu

    if folder == _CIFAR100_FOLDER:
        dirs = _absent_dirs(data_root, data_root / folder)
    else:
        dirs = _absent_dirs(data_root, data_root / folder, data_root / folder / "raw")
    try:
        if folder == _CIFAR100_FOLDER:
            tvu.download_and_extract_archive(
                tvd.CIFAR100.url,
                download_root=str(data_root),
                filename=tvd.CIFAR100.filename,
                md5=tvd.CIFAR100.tgz_md5,
            )
        else:
            cls = {"MNIST": tvd.MNIST, "FashionMNIST": tvd.FashionMNIST}[folder]
            cls(root=str(data_root), train=True, download=True)
    except (RuntimeError, URLError, OSError, ValueError) as exc:
        _remove_if_empty(dirs)
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise DataError(
            f"downloading {folder} into {data_root} failed ({reason}). Without network, "
            f"copy the files into {data_root / folder}"
            + ("" if folder == _CIFAR100_FOLDER else "/raw")
            + " yourself"
            + (
                ", or on Debian/Ubuntu run `apt-get install -y dataset-fashion-mnist`"
                if folder == "FashionMNIST"
                else ""
            )
            + "."
        ) from exc


def _normalise(data: Tensor | np.ndarray, stats: tuple[tuple[float, ...], ...]) -> Tensor:
    """uint8 [N, C, H, W] -> float32 scaled to [0, 1] and standardised, in one pass."""
    x = torch.as_tensor(data).to(torch.float32).div_(255.0)
    mean = torch.tensor(stats[0], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(stats[1], dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


# --------------------------------------------------------------------------------------------
# Raw files: CIFAR-100 (python pickles, read directly so synthetic files need no md5 match)
# --------------------------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else: a data file runs no code."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a data file")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            # latin1 is how numpy arrays pickled by Python 2 (the real CIFAR files) load.
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise DataError(
            f"{path} could not be read as a CIFAR-100 pickle ({type(exc).__name__}: {exc}); "
            "the file is truncated or corrupt, replace it with the original"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a CIFAR-100 dictionary")
    # Python 2 str keys load as str; keys written as bytes by Python 3 stay bytes.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(value: Any) -> list[str]:
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in value]


def _load_cifar100(
    data_root: Path, download: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
    folder = data_root / _CIFAR100_FOLDER
    missing = _missing(folder, _CIFAR100_FILES)
    if missing and download:
        _download_with_torchvision(_CIFAR100_FOLDER, data_root)
        missing = _missing(folder, _CIFAR100_FILES)
    if missing:
        raise DataError(
            f"CIFAR-100 data not found: expected the python pickles {', '.join(_CIFAR100_FILES)} "
            f"in {folder} (missing: {', '.join(missing)}). Pass data.download=true "
            "(download=True in Python) on a machine with network access, or copy the folder "
            "extracted from cifar-100-python.tar.gz there."
        )

    meta = _read_pickle(folder / "meta")
    try:
        fine_names = _names(meta["fine_label_names"])
        coarse_names = _names(meta["coarse_label_names"])
    except KeyError as exc:
        raise DataError(f"{folder / 'meta'} lacks {exc}; the file is corrupt") from exc
    if len(fine_names) != 100 or len(coarse_names) != 20:
        raise DataError(f"{folder / 'meta'}: expected 100 fine and 20 coarse label names")

    tensors: list[Tensor] = []
    super_of = [-1] * 100
    for split in ("train", "test"):
        path = folder / split
        d = _read_pickle(path)
        try:
            data = np.asarray(d["data"])
            fine = np.asarray(d["fine_labels"], dtype=np.int64)
            coarse = np.asarray(d["coarse_labels"], dtype=np.int64)
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"{path} lacks a valid {exc} entry; the file is corrupt") from exc
        n = len(fine)
        if data.dtype != np.uint8 or data.shape != (n, 3072) or coarse.shape != (n,):
            raise DataError(
                f"{path}: expected uint8 data [N, 3072] with N labels, got {data.dtype} "
                f"{data.shape} and {n} labels; the file is corrupt"
            )
        if n and (fine.min() < 0 or fine.max() > 99 or coarse.min() < 0 or coarse.max() > 19):
            raise DataError(f"{path}: labels out of range; the file is corrupt")
        # First occurrence of each fine label fixes its superclass (the files are consistent).
        uniq, first = np.unique(fine, return_index=True)
        for f_id, c_id in zip(uniq.tolist(), coarse[first].tolist(), strict=True):
            super_of[f_id] = c_id
        tensors += [_normalise(data.reshape(n, 3, 32, 32), CIFAR100_STATS), torch.from_numpy(fine)]
    info = {
        "class_names": fine_names,
        "superclass_names": coarse_names,
        "superclasses": [
            s if s >= 0 else CIFAR100_SUPERCLASS_OF[i] for i, s in enumerate(super_of)
        ],
    }
    return tensors[0], tensors[1], tensors[2], tensors[3], info


# --------------------------------------------------------------------------------------------
# Synthetic benchmark
# --------------------------------------------------------------------------------------------


def _tiny_data(
    n_classes: int, seed: int, samples_per_class: int, test_samples_per_class: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gaussian clusters, one random 8x8 mean pattern per class, far apart relative to noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_classes, 1, 8, 8, generator=g)

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n_classes).repeat_interleave(per_class)
        x = means[y] + 0.5 * torch.randn(len(y), 1, 8, 8, generator=g)
        return x, y

    xtr, ytr = draw(samples_per_class)
    xte, yte = draw(test_samples_per_class)
    return xtr, ytr, xte, yte


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
    download: bool = False,
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
    root = Path(data_root).expanduser()
    dataset = name.split("_", 1)[-1]
    info: dict[str, Any] = {}
    augment: Callable[[Tensor], Tensor] | None = None
    if dataset != "tiny":
        _check_data_root(root)

    if dataset == "tiny":
        xtr, ytr, xte, yte = _tiny_data(
            2 * n_experiences,
            seed,
            int(kwargs.get("samples_per_class", 64)),
            int(kwargs.get("test_samples_per_class", 32)),
        )
        n_classes = 2 * n_experiences
    else:
        try:
            if dataset == "mnist":
                xtr, ytr, xte, yte = _load_idx_dataset("MNIST", root, download, MNIST_STATS)
                n_classes = 10
            elif dataset == "fmnist":
                xtr, ytr, xte, yte = _load_idx_dataset(
                    "FashionMNIST", root, download, FMNIST_STATS, kwargs.get("debian_fmnist_dir")
                )
                n_classes = 10
            else:
                xtr, ytr, xte, yte, info = _load_cifar100(root, download)
                n_classes = 100
                augment = cifar_batch_augment
        except OSError as exc:  # a last resort: the steps above name their own failures
            raise DataError(f"cannot read the data under {root}: {exc}") from exc

    xtr, ytr = _subsample(xtr, ytr, kwargs.get("max_train_samples"), seed)
    xte, yte = _subsample(xte, yte, kwargs.get("max_test_samples"), seed + 1)

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
        n_classes=n_classes,
        input_shape=(int(xtr.shape[1]), int(xtr.shape[2]), int(xtr.shape[3])),
        scenario=scenario,
        batch_augment=augment,
        class_order=order,
        classes_per_experience=[
            sorted(order[i * per_exp : (i + 1) * per_exp]) for i in range(n_experiences)
        ],
        class_names=info.get("class_names"),
        superclasses=info.get("superclasses"),
        superclass_names=info.get("superclass_names"),
    )
