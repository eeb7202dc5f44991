"""Tests of the data-set readers on small synthetic files in the real on-disk formats (no
network): values, the Debian Fashion-MNIST package, downloads, and the one-line errors."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

from moe_cl.core.choices import PAPER_ARCHITECTURES
from moe_cl.data.datasets import (
    CIFAR100_SUPERCLASS_OF,
    DATASETS,
    DEBIAN_FMNIST_DIR,
    DataError,
    DataOptions,
    cifar100_superclass_of,
    dataset_of,
    load,
)
from moe_cl.data.names import BENCHMARK_NAMES
from tests.datafiles import (
    IDX_NAMES,
    cifar100_like_arrays,
    idx_bytes,
    mnist_like_arrays,
    write_cifar100_like,
    write_mnist_like,
    write_mnist_like_gz,
)

IDX_FILES = [name for pair in IDX_NAMES.values() for name in pair]
NO_DEBIAN = "/nonexistent/moe-cl-debian-fmnist"


@pytest.fixture(autouse=True)
def _no_debian_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # The machine may have the real Debian package; tests opt in to it explicitly.
    monkeypatch.setenv("MOE_CL_DEBIAN_FMNIST", NO_DEBIAN)


def _norm(raw: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = torch.from_numpy(raw.astype(np.float32) / 255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def _debian(folder: Path) -> DataOptions:
    return DataOptions(debian_fmnist_dir=folder)


# ------------------------------------------------------------------------------ the table


def test_table_entries_are_complete() -> None:
    assert set(DATASETS) == {"mnist", "fmnist", "cifar100", "tiny"}
    for name, spec in DATASETS.items():
        assert spec.name == name
        if spec.folder is None:  # generated: no files, no statistics
            assert not spec.files and spec.stats is None and spec.n_classes is None
            continue
        assert spec.files and spec.fetch is not None and spec.n_classes
        assert hasattr(tvd, str(spec.torchvision_class))
        assert spec.stats is not None
        assert len(spec.stats[0]) == len(spec.stats[1]) == spec.input_shape[0]
    assert [n for n, s in DATASETS.items() if s.augment_flip_crop] == ["cifar100"]


def test_each_benchmark_finds_its_data_set_and_its_default_architecture() -> None:
    assert {dataset_of(name).name for name in BENCHMARK_NAMES} == set(DATASETS)
    assert dataset_of("split_cifar100") is dataset_of("paper_cifar100") is DATASETS["cifar100"]
    assert dataset_of("tiny") is DATASETS["tiny"]
    assert {name: spec.architecture for name, spec in DATASETS.items()} == {
        "mnist": "mnist", "fmnist": "fmnist", "cifar100": "cifar100", "tiny": "mlp"}
    assert {spec.architecture for spec in DATASETS.values()} <= {*PAPER_ARCHITECTURES, "mlp"}


# ------------------------------------------------------------------------------ MNIST / FMNIST


def test_mnist_is_read_normalised_in_file_order(tmp_path: Path) -> None:
    write_mnist_like(tmp_path, n_train=200, n_test=100, seed=0)
    data = load("mnist", tmp_path)
    assert data.n_classes == 10 and data.class_names is None and data.superclasses is None
    for x, y, n, seed in ((data.train_x, data.train_y, 200, 0), (data.test_x, data.test_y, 100, 1)):
        images, labels = mnist_like_arrays(n, seed=seed)
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
        torch.testing.assert_close(x, _norm(images[:, None], (0.1307,), (0.3081,)))


def test_fmnist_from_debian_gz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = write_mnist_like_gz(tmp_path / "debian", n_train=100, n_test=50, seed=5)
    root = tmp_path / "data"
    previous = os.umask(0o022)
    try:
        data = load("fmnist", root, _debian(debian))
    finally:
        os.umask(previous)
    raw = root / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(IDX_FILES)  # no leftover temporary files
    for name in IDX_FILES:
        assert (raw / name).read_bytes() == gzip.decompress((debian / f"{name}.gz").read_bytes())
        # readable by the other users of a shared data.root, as any file made under umask 022
        assert (raw / name).stat().st_mode & 0o777 == 0o644, name
    images, labels = mnist_like_arrays(100, seed=5)
    assert torch.equal(data.train_y, torch.from_numpy(labels.astype(np.int64)))
    torch.testing.assert_close(data.train_x, _norm(images[:, None], (0.2859,), (0.3530,)))
    assert len(data.test_y) == 50
    # Once unpacked, the files are read without the Debian folder.
    assert torch.equal(load("fmnist", root).train_x, data.train_x)
    # The environment variable is an equivalent way to point at the Debian folder.
    monkeypatch.setenv("MOE_CL_DEBIAN_FMNIST", str(debian))
    root2 = tmp_path / "data2"
    assert len(load("fmnist", root2).train_y) == 100
    assert (root2 / "FashionMNIST" / "raw" / IDX_FILES[0]).is_file()


@pytest.mark.skipif(
    not Path(DEBIAN_FMNIST_DIR, "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_debian_fmnist(tmp_path: Path) -> None:
    data = load("fmnist", tmp_path, _debian(Path(DEBIAN_FMNIST_DIR)))
    assert (len(data.train_y), len(data.test_y)) == (60000, 10000)
    assert data.train_x.shape[1:] == DATASETS["fmnist"].input_shape
    assert sorted(set(data.train_y.tolist())) == list(range(10))
    x = data.train_x
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1.0) < 0.1


# ------------------------------------------------------------------------------ CIFAR-100


def test_cifar100_values_names_and_superclasses(tmp_path: Path) -> None:
    write_cifar100_like(tmp_path, n_train=300, n_test=200, seed=0)
    data = load("cifar100", tmp_path)
    assert data.n_classes == 100 and len(data.train_y) == 300
    raw, fine = cifar100_like_arrays(200, seed=1)
    assert torch.equal(data.test_y, torch.from_numpy(fine))
    expected = _norm(raw.reshape(-1, 3, 32, 32), (0.5074, 0.4867, 0.4411), (0.2011, 0.1987, 0.2025))
    torch.testing.assert_close(data.test_x, expected)
    assert data.superclasses == list(CIFAR100_SUPERCLASS_OF)
    assert data.class_names is not None and data.class_names[7] == "fine_07"
    assert data.superclass_names is not None and len(data.superclass_names) == 20


def test_cifar100_legacy_pickles(tmp_path: Path) -> None:
    folder = write_cifar100_like(tmp_path, n_train=100, n_test=100, legacy_format=True)
    assert b"numpy.core.multiarray" in (folder / "train").read_bytes()
    data = load("cifar100", tmp_path)
    assert len(data.train_y) == 100
    assert data.class_names is not None and data.class_names[0] == "fine_00"


def test_cifar100_superclass_of() -> None:
    assert cifar100_superclass_of(0) == 4 and cifar100_superclass_of(99) == 13
    assert np.bincount(CIFAR100_SUPERCLASS_OF).tolist() == [5] * 20
    with pytest.raises(ValueError):
        cifar100_superclass_of(100)


# ------------------------------------------------------------------------------ generated


def test_tiny_is_seeded_and_sized_by_the_options() -> None:
    options = DataOptions(seed=7, synthetic_classes=6, samples_per_class=5)
    a, b = load("tiny", "unused", options), load("tiny", "unused", options)
    other = load("tiny", "unused", DataOptions(seed=8, synthetic_classes=6, samples_per_class=5))
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, other.train_x)
    assert a.n_classes == 6 and a.train_x.shape == (30, *DATASETS["tiny"].input_shape)
    assert len(a.test_y) == 6 * 32


# ------------------------------------------------------------------------------ failures


@pytest.mark.parametrize(
    ("name", "folder", "files", "hint"),
    [
        ("mnist", "MNIST/raw", IDX_FILES, "copy the four files there"),
        ("fmnist", "FashionMNIST/raw", IDX_FILES, "apt-get install -y dataset-fashion-mnist"),
        ("cifar100", "cifar-100-python", ["train", "test", "meta"], "copy"),
    ],
)
def test_missing_data_message_and_no_folder(
    tmp_path: Path, name: str, folder: str, files: list[str], hint: str
) -> None:
    """Downloads are on by default; offline (the tests are: conftest sets MOE_CL_OFFLINE) the
    one line names the folder, the files and how to get them; with downloads off, the setting
    that allows them."""
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load(name, root)
    msg = str(err.value)
    assert str(root / folder) in msg and hint in msg and "MOE_CL_OFFLINE is set" in msg
    assert all(f in msg for f in files)
    assert not root.exists()
    with pytest.raises(DataError, match="data.download=true"):
        load(name, root, DataOptions(download=False))
    assert not root.exists()


def test_an_unanswering_source_is_offline_within_the_probe_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the offline switch the data set's source is asked first, with a short timeout;
    no answer is the same one line, and no download starts."""
    import socket

    from moe_cl.data import readers

    asked = []

    def no_answer(address, timeout=None):
        asked.append((address, timeout))
        raise OSError("network unreachable")

    def no_download(*args):
        raise AssertionError("downloaded although the source did not answer")

    monkeypatch.delenv(readers.OFFLINE_ENV)
    monkeypatch.setattr(socket, "create_connection", no_answer)
    monkeypatch.setattr(readers, "_download", no_download)
    with pytest.raises(DataError, match="did not answer within 2 s") as err:
        load("cifar100", tmp_path)
    assert "cifar-100-python" in str(err.value)
    assert len(asked) == 1 and asked[0][1] == readers.PROBE_TIMEOUT_S


def test_download_failure_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tvu

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no network in tests")

    from moe_cl.data import readers

    monkeypatch.setattr(readers, "_offline", lambda spec: None)  # the source answers...
    monkeypatch.setattr(tvu, "download_url", offline)  # ...but the download fails
    for name in ("mnist", "fmnist", "cifar100"):
        root = tmp_path / "a" / "b"
        with pytest.raises(DataError, match="download"):
            load(name, root, DataOptions(download=True))
        assert not (tmp_path / "a").exists(), name


def test_truncated_idx_file_is_named(tmp_path: Path) -> None:
    raw = write_mnist_like(tmp_path, n_train=50, n_test=20)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load("mnist", tmp_path)
    write_mnist_like(tmp_path, n_train=50, n_test=20)
    path = raw / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + path.read_bytes()[4:])  # wrong magic number
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load("mnist", tmp_path)


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fmnist", "FashionMNIST")])
def test_idx_file_with_wrong_dimensions_is_named(tmp_path: Path, name: str, folder: str) -> None:
    # Right magic number and a size matching the header, but 50 x 784 x 1 "images".
    raw = write_mnist_like(tmp_path, folder=folder, n_train=50, n_test=20)
    images, _ = mnist_like_arrays(50, seed=0)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images.reshape(50, 784, 1)))
    with pytest.raises(DataError) as err:
        load(name, tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "[50, 784, 1]" in msg and "[N, 28, 28]" in msg
    assert "download=true" in msg
    assert ("dataset-fashion-mnist" in msg) == (folder == "FashionMNIST")


@pytest.mark.parametrize("name", ["mnist", "fmnist", "cifar100"])
def test_data_root_that_is_no_folder_is_named(tmp_path: Path, name: str) -> None:
    debian = write_mnist_like_gz(tmp_path / "debian", n_train=20, n_test=10)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for root in (a_file, a_file / "sub"):
        with pytest.raises(DataError) as err:
            load(name, root, _debian(debian))
        msg = str(err.value)
        assert str(root) in msg and f"{a_file} is " in msg and "not a folder" in msg
    assert a_file.read_text() == "not a folder"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unpacking_debian_fmnist_into_an_uncreatable_folder(tmp_path: Path) -> None:
    debian = write_mnist_like_gz(tmp_path / "debian", n_train=20, n_test=10)
    root = Path("/proc/moe-cl-no-such-folder")
    with pytest.raises(DataError) as err:
        load("fmnist", root, _debian(debian))
    assert f"cannot create the folder {root / 'FashionMNIST' / 'raw'}" in str(err.value)


def test_corrupt_debian_gz_is_named_and_cleaned(tmp_path: Path) -> None:
    debian = write_mnist_like_gz(tmp_path / "debian", n_train=20, n_test=10)
    bad = debian / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:30])
    root = tmp_path / "data"
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load("fmnist", root, _debian(debian))
    raw = root / "FashionMNIST" / "raw"
    assert not any(p.name.endswith(".part") for p in raw.glob(".*"))  # no half-written file


def test_corrupt_cifar_pickles_are_named(tmp_path: Path) -> None:
    folder = write_cifar100_like(tmp_path, n_train=100, n_test=100)
    blob = (folder / "train").read_bytes()
    (folder / "train").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=str(folder / "train")):
        load("cifar100", tmp_path)
    # A pickle that would run code is refused, not executed.
    marker = tmp_path / "pwned"
    (folder / "train").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(DataError, match="train"):
        load("cifar100", tmp_path)
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.path), "x"))  # type: ignore[return-value]


def test_the_command_names_missing_data_before_importing_avalanche(tmp_path: Path) -> None:
    """python -m moe_cl.run on a stream whose files are missing and cannot be downloaded: one
    line naming the files, exit 2, before Avalanche (seconds of imports) is loaded."""
    import subprocess
    import sys

    code = ("import sys; from moe_cl.run.cli import main; "
            f"code = main(['benchmark=split_mnist', 'data.root={tmp_path / 'empty'}', "
            f"'out_dir={tmp_path / 'run'}']); "
            "print('avalanche loaded' if 'avalanche' in sys.modules else 'avalanche not loaded');"
            " sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout.strip() == "avalanche not loaded"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-images-idx3-ubyte" in lines[0]
    assert "no download from here" in lines[0]
    assert not (tmp_path / "run").exists()
