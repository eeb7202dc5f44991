"""The readers behind the data-set table: files brought to hand (unpacked from a Debian package
or downloaded with torchvision when allowed), idx files (MNIST, Fashion-MNIST) with their checks,
CIFAR-100 pickles read without executing them, and the generated ``tiny`` set.

Raw files live in torchvision's layout under the data root; nothing is downloaded unless
``download`` is set, and every failure to find or parse data raises :class:`DataError` with a
one-line message that says which files are expected where and how to obtain them.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import Tensor

from moe_cl.data.spec import DataError, DataOptions, DatasetSpec, LoadedDataset, Stats
from moe_cl.storage.run_folder import folder_problem

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

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_DOWNLOAD_HINT = "data.download=true (download=True in Python) on a machine with network access"
# Set to 1 where nothing may be downloaded (a compute node, the tests): data sets then come only
# from the data root or a Debian package, and a missing one is named at once.
OFFLINE_ENV = "MOE_CL_OFFLINE"
PROBE_TIMEOUT_S = 2.0  # how long the data set's source may take to answer before we call it offline


# --------------------------------------------------------------------------------------------
# Files at hand: checks, Debian package, download
# --------------------------------------------------------------------------------------------


def check_data_root(root: Path) -> None:
    problem = folder_problem(root)
    if problem:
        raise DataError(f"unusable data folder: {problem}; point data_root (data.root) at a folder")


def _missing(folder: Path, names: Sequence[str]) -> list[str]:
    try:
        return [n for n in names if not (folder / n).is_file()]
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DataError(f"cannot look into the data folder {folder}: {reason}") from exc


def _absent_dirs(folder: Path) -> list[Path]:
    """``folder`` and its ancestors not existing yet, deepest first, for cleanup on failure."""
    absent = []
    d = folder.absolute()
    while not d.exists() and d != d.parent:
        absent.append(d)
        d = d.parent
    return absent


def _remove_if_empty(dirs: Sequence[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()  # only succeeds when empty
        except OSError:
            pass


def files_at_hand(spec: DatasetSpec, root: Path, options: DataOptions) -> Path:
    """The folder holding the data set's files, which are unpacked from its Debian package or
    downloaded (when allowed) if missing; a DataError says what to put where otherwise."""
    folder = spec.files_dir(root)
    missing = _missing(folder, spec.files)
    debian = spec.debian.folder_in_use(options.debian_fmnist_dir) if spec.debian else None
    if missing and debian is not None and all((debian / f"{n}.gz").is_file() for n in missing):
        _unpack_debian(spec, debian, folder, missing)
        missing = []
    offline = None
    if missing and options.download:
        offline = _offline(spec)
        if offline is None:
            _download(spec, root)
            missing = _missing(folder, spec.files)
    if missing:
        raise DataError(_missing_message(spec, folder, missing, debian, offline))
    return folder


def _offline(spec: DatasetSpec) -> str | None:
    """Why the data set cannot be downloaded from here (one phrase), or None if its source
    answers within PROBE_TIMEOUT_S: an offline machine learns it in seconds, not after
    torchvision's retries."""
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        return f"{OFFLINE_ENV} is set"
    source = urlsplit(_source_url(spec))
    port = source.port or (443 if source.scheme == "https" else 80)
    try:
        socket.create_connection((source.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return f"{source.hostname} did not answer within {PROBE_TIMEOUT_S:g} s"
    return None


def _source_url(spec: DatasetSpec) -> str:
    cls = _torchvision_class(spec)
    return getattr(cls, "url", None) or cls.mirrors[0]


def _missing_message(
    spec: DatasetSpec, folder: Path, missing: Sequence[str], debian: Path | None,
    offline: str | None = None,
) -> str:
    msg = (
        f"{spec.title} data not found: expected the {spec.file_kind} {', '.join(spec.files)} "
        f"in {folder} (missing: {', '.join(missing)})"
    )
    if offline is not None:
        msg += f"; no download from here ({offline}): {spec.copy_instruction}"
        if spec.debian is not None:
            msg += f", or on Debian/Ubuntu run `apt-get install -y {spec.debian.name}`"
        return msg + "."
    msg += ". "
    if spec.debian is not None:
        msg += (
            f"On Debian/Ubuntu run `apt-get install -y {spec.debian.name}`: moe-cl then "
            f"unpacks {debian}/*.gz into that folder automatically, with no network. "
            "Otherwise pass "
        )
    else:
        msg += "Pass "
    return msg + f"{_DOWNLOAD_HINT}, or {spec.copy_instruction}."


def _unpack_debian(spec: DatasetSpec, debian: Path, folder: Path, names: Sequence[str]) -> None:
    """Decompress a Debian package's .gz files into torchvision's folder, atomically per file.

    Debian recompresses the archives, so torchvision's checksums of the .gz files fail; the
    uncompressed files are what torchvision actually reads.
    """
    created = _absent_dirs(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_if_empty(created)
        why = folder_problem(folder) or exc.strerror or str(exc)
        raise DataError(
            f"cannot create the folder {folder} to unpack the {spec.title} files of {debian} "
            f"into: {why}"
        ) from exc
    for name in names:
        src = debian / f"{name}.gz"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, length=1 << 20)
            os.chmod(tmp, _readable_mode())  # mkstemp's 0600 would hide a shared data.root
            os.replace(tmp, folder / name)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            Path(tmp).unlink(missing_ok=True)
            _remove_if_empty(created)
            raise DataError(f"could not decompress {src} into {folder}: {exc}") from exc


def _readable_mode() -> int:
    """What a plain file created now gets: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _download(spec: DatasetSpec, root: Path) -> None:
    """Fetch a data set with torchvision; on failure leave no empty folders behind."""
    created = _absent_dirs(spec.files_dir(root))
    try:
        spec.fetch(spec, root)
    except (RuntimeError, URLError, OSError, ValueError) as exc:
        _remove_if_empty(created)
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        debian_hint = (
            f", or on Debian/Ubuntu run `apt-get install -y {spec.debian.name}`"
            if spec.debian is not None
            else ""
        )
        raise DataError(
            f"downloading {spec.folder} into {root} failed ({reason}). Without network, "
            f"copy the files into {spec.files_dir(root)} yourself{debian_hint}."
        ) from exc


def _torchvision_class(spec: DatasetSpec) -> Any:
    import torchvision.datasets as tvd

    return getattr(tvd, str(spec.torchvision_class))


def fetch_with_torchvision(spec: DatasetSpec, root: Path) -> None:
    _torchvision_class(spec)(root=str(root), train=True, download=True)


def fetch_archive(spec: DatasetSpec, root: Path) -> None:
    """Download and unpack the archive that torchvision's class for the data set names."""
    import torchvision.datasets.utils as tvu

    cls = _torchvision_class(spec)
    tvu.download_and_extract_archive(
        cls.url, download_root=str(root), filename=cls.filename, md5=cls.tgz_md5
    )


def _normalise(data: Tensor | np.ndarray, stats: Stats) -> Tensor:
    """uint8 [N, C, H, W] -> float32 scaled to [0, 1] and standardised, in one pass."""
    x = torch.as_tensor(data).to(torch.float32).div_(255.0)
    mean = torch.tensor(stats[0], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(stats[1], dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


# --------------------------------------------------------------------------------------------
# idx files: MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------


def _replace_hint(spec: DatasetSpec, debian: Path | None) -> str:
    """How to get an intact copy of a corrupt idx file."""
    hint = "replace it with the original uncompressed file, or delete it and run again with "
    hint += _DOWNLOAD_HINT
    if spec.debian is not None:
        hint += (
            f"; on Debian/Ubuntu, after `apt-get install -y {spec.debian.name}`, deleting it "
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
            f"{path} is not an idx file with magic number {magic} (corrupt or wrong file); " + hint
        )
    dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = len(header) + math.prod(dims)
    if size != expected:
        raise DataError(
            f"{path} is truncated or corrupt: {size} bytes, header {dims} needs {expected}; " + hint
        )
    if ndim == 1 + len(item_shape) and dims[1:] != list(item_shape):
        want = ", ".join(["N", *map(str, item_shape)])
        raise DataError(
            f"{path} is corrupt or the wrong file: its header gives dimensions {dims}, "
            f"expected [{want}]; " + hint
        )
    return dims[0]


def read_idx(spec: DatasetSpec, root: Path, options: DataOptions) -> LoadedDataset:
    """MNIST-format train/test sets: every file checked, then read with torchvision."""
    raw = files_at_hand(spec, root, options)
    debian = spec.debian.folder_in_use(options.debian_fmnist_dir) if spec.debian else None
    hint = _replace_hint(spec, debian)
    counts = {}
    for name in spec.files:
        if "images" in name:
            counts[name] = _check_idx_file(raw / name, 2051, spec.input_shape[1:], hint)
        else:
            counts[name] = _check_idx_file(raw / name, 2049, (), hint)
    for split in ("train", "t10k"):
        ni, nl = counts[f"{split}-images-idx3-ubyte"], counts[f"{split}-labels-idx1-ubyte"]
        if ni != nl:
            raise DataError(
                f"{raw / f'{split}-labels-idx1-ubyte'} holds {nl} labels but "
                f"{raw / f'{split}-images-idx3-ubyte'} holds {ni} images; one of them is corrupt"
            )

    out: list[Tensor] = []
    for train in (True, False):
        try:
            ds = _torchvision_class(spec)(root=str(root), train=train, download=False)
        except Exception as exc:  # torchvision raises assorted types on unreadable files
            raise DataError(f"could not read the {spec.folder} files in {raw}: {exc}") from exc
        labels = ds.targets.to(torch.int64)
        if labels.numel() and int(labels.max()) >= spec.n_classes:
            raise DataError(
                f"{raw}: labels outside 0..{spec.n_classes - 1}, the label files are corrupt"
            )
        out += [_normalise(ds.data.unsqueeze(1), spec.stats), labels]
    return LoadedDataset(out[0], out[1], out[2], out[3], n_classes=spec.n_classes)


# --------------------------------------------------------------------------------------------
# CIFAR-100: python pickles, read directly so synthetic files need no md5 match
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


def read_cifar100(spec: DatasetSpec, root: Path, options: DataOptions) -> LoadedDataset:
    folder = files_at_hand(spec, root, options)
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
        images = data.reshape(n, *spec.input_shape)
        tensors += [_normalise(images, spec.stats), torch.from_numpy(fine)]
    return LoadedDataset(
        tensors[0],
        tensors[1],
        tensors[2],
        tensors[3],
        n_classes=spec.n_classes,
        class_names=fine_names,
        superclass_names=coarse_names,
        superclasses=[s if s >= 0 else CIFAR100_SUPERCLASS_OF[i] for i, s in enumerate(super_of)],
    )


# --------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------


def generate_tiny(spec: DatasetSpec, root: Path, options: DataOptions) -> LoadedDataset:
    """Gaussian clusters, one random mean pattern per class, far apart relative to noise."""
    n_classes = options.synthetic_classes
    g = torch.Generator().manual_seed(options.seed)
    means = torch.randn(n_classes, *spec.input_shape, generator=g)

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n_classes).repeat_interleave(per_class)
        x = means[y] + 0.5 * torch.randn(len(y), *spec.input_shape, generator=g)
        return x, y

    xtr, ytr = draw(int(options.samples_per_class))
    xte, yte = draw(int(options.test_samples_per_class))
    return LoadedDataset(xtr, ytr, xte, yte, n_classes=n_classes)


