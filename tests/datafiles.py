"""Writers of small synthetic data sets in the exact on-disk formats of the real ones.

Tests run offline, so the real loaders are exercised on these files instead: idx files for
MNIST/Fashion-MNIST (also gzipped, as Debian ships them) and the CIFAR-100 python pickles.
Images depend on their class, so a model trained on them can learn something.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from moe_cl.data.datasets import CIFAR100_SUPERCLASS_OF

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialise a uint8 array as an idx file: magic 0x0000 08 <ndim>, big-endian dims."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = (0x0800 | arr.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def mnist_like_arrays(
    n: int, seed: int, n_classes: int = 10, size: int = 28
) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent grey images: a bright bar whose position encodes the class, plus noise."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % n_classes)[rng.permutation(n)].astype(np.uint8)
    images = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
    band = size // n_classes
    for c in range(n_classes):
        rows = slice(c * band, c * band + max(band, 2))
        images[labels == c, rows, 4 : size - 4] = 230
    return images, labels


def write_mnist_like(
    root: str | Path,
    folder: str = "MNIST",
    n_train: int = 200,
    n_test: int = 100,
    seed: int = 0,
) -> Path:
    """Write ROOT/<folder>/raw/ with the four uncompressed idx files; return that raw folder."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = mnist_like_arrays(n, s)
        img_name, lbl_name = IDX_NAMES[split]
        (raw / img_name).write_bytes(idx_bytes(images))
        (raw / lbl_name).write_bytes(idx_bytes(labels))
    return raw


def write_mnist_like_gz(
    folder: str | Path, n_train: int = 200, n_test: int = 100, seed: int = 0
) -> Path:
    """Write the four idx files gzipped into one flat folder, as Debian's package does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = mnist_like_arrays(n, s)
        img_name, lbl_name = IDX_NAMES[split]
        (folder / f"{img_name}.gz").write_bytes(gzip.compress(idx_bytes(images), mtime=0))
        (folder / f"{lbl_name}.gz").write_bytes(gzip.compress(idx_bytes(labels), mtime=0))
    return folder


def cifar100_like_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent colour images [N, 3072] (R, G, B planes, row-major) and fine labels."""
    rng = np.random.default_rng(seed)
    fine = (np.arange(n) % 100)[rng.permutation(n)]
    colours = np.random.default_rng(1234).integers(20, 236, size=(100, 3))
    images = rng.integers(-20, 21, size=(n, 3, 32, 32)) + colours[fine][:, :, None, None]
    # A class-specific bright square, so classes differ in layout as well as colour.
    for c in range(100):
        r, q = divmod(c, 10)
        images[fine == c, :, 3 * r : 3 * r + 3, 3 * q : 3 * q + 3] = 255
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072), fine


def write_cifar100_like(
    root: str | Path,
    n_train: int = 300,
    n_test: int = 200,
    seed: int = 0,
    legacy_format: bool = False,
) -> Path:
    """Write ROOT/cifar-100-python/{train,test,meta}; return that folder.

    By default keys are bytes, as the real files show when loaded with encoding="bytes".
    ``legacy_format`` imitates the real (Python 2, numpy 1) files as a latin1 load sees them:
    str keys and arrays rebuilt through ``numpy.core.multiarray._reconstruct``.
    """
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)

    def key(k: str) -> str | bytes:
        return k if legacy_format else k.encode()

    def dump(obj: dict, path: Path) -> None:
        if legacy_format:
            blob = pickle.dumps(obj, protocol=3)  # protocol 3 names globals in plain text
            blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        else:
            blob = pickle.dumps(obj, protocol=4)
        path.write_bytes(blob)

    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        data, fine = cifar100_like_arrays(n, s)
        entry = {
            key("filenames"): [f"img_{i}.png".encode() for i in range(n)],
            key("batch_label"): f"{split} batch".encode(),
            key("fine_labels"): fine.tolist(),
            key("coarse_labels"): [CIFAR100_SUPERCLASS_OF[f] for f in fine.tolist()],
            key("data"): data,
        }
        dump(entry, folder / split)
    meta = {
        key("fine_label_names"): [f"fine_{i:02d}" for i in range(100)],
        key("coarse_label_names"): [f"coarse_{i:02d}" for i in range(20)],
    }
    dump(meta, folder / "meta")
    return folder
