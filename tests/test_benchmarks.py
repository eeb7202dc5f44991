"""Tests of the streams: split and paper streams, class order, subsets, the flip-and-crop batch
augmentation, on small synthetic files in the real on-disk formats (no network). The file
readers are tested in test_datasets.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from moe_cl.data.datasets import CIFAR100_SUPERCLASS_OF, load
from moe_cl.data.streams import (
    BENCHMARK_NAMES,
    BenchmarkBundle,
    DataError,
    cifar_batch_augment,
    make_benchmark,
    random_flip_crop,
)
from moe_cl.data.tensors import dataset_tensors
from tests.datafiles import write_cifar100_like, write_mnist_like, write_mnist_like_gz


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    write_mnist_like(root, n_train=200, n_test=100, seed=0)
    return root


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100_like(root, n_train=300, n_test=200, seed=0)
    return root


def _check_split(bundle: BenchmarkBundle, n_exp: int, n_classes: int) -> None:
    train, test = bundle.benchmark.train_stream, bundle.benchmark.test_stream
    assert len(train) == len(test) == n_exp == len(bundle.classes_per_experience)
    seen: set[int] = set()
    for i, (tr, te) in enumerate(zip(train, test, strict=True)):
        classes = sorted(tr.classes_in_this_experience)
        assert classes == sorted(te.classes_in_this_experience) == bundle.classes_per_experience[i]
        assert not seen & set(classes)
        seen |= set(classes)
        assert set(dataset_tensors(tr.dataset)[1].tolist()) == set(classes)
        assert set(dataset_tensors(te.dataset)[1].tolist()) == set(classes)
    assert seen == set(range(n_classes)) == set(bundle.class_order)
    per = n_classes // n_exp
    assert [sorted(bundle.class_order[i * per : (i + 1) * per]) for i in range(n_exp)] == (
        bundle.classes_per_experience
    )


# ------------------------------------------------------------------------------ MNIST


def test_split_mnist_class_incremental(mnist_root: Path) -> None:
    b = make_benchmark("split_mnist", n_experiences=5, data_root=mnist_root)
    assert (b.name, b.n_classes, b.input_shape, b.scenario) == (
        "split_mnist",
        10,
        (1, 28, 28),
        "class",
    )
    assert b.batch_augment is None
    _check_split(b, 5, 10)
    assert all(e.task_label == 0 for e in b.benchmark.train_stream)
    assert all(e.task_label == 0 for e in b.benchmark.test_stream)
    exp = b.benchmark.train_stream[1]
    x, y, t = next(iter(DataLoader(exp.dataset, batch_size=16)))
    assert x.dtype == torch.float32 and x.shape == (16, 1, 28, 28)
    assert set(y.tolist()) <= set(exp.classes_in_this_experience) and t.eq(0).all()


def test_split_mnist_task_incremental_keeps_global_ids(mnist_root: Path) -> None:
    b = make_benchmark("split_mnist", n_experiences=5, scenario="task", data_root=mnist_root)
    _check_split(b, 5, 10)
    streams = zip(b.benchmark.train_stream, b.benchmark.test_stream, strict=True)
    for i, (tr, te) in enumerate(streams):
        assert tr.task_label == te.task_label == i
        _, y, t = next(iter(DataLoader(tr.dataset, batch_size=len(tr.dataset))))
        assert t.eq(i).all()
        assert set(y.tolist()) == set(b.classes_per_experience[i])  # not remapped to 0..1


def test_paper_stream_holds_the_loaded_data_grouped_by_class(mnist_root: Path) -> None:
    b = make_benchmark("paper_mnist", data_root=mnist_root)
    data = load("mnist", mnist_root)
    for experience, x, y in (
        (b.benchmark.train_stream[0], data.train_x, data.train_y),
        (b.benchmark.test_stream[0], data.test_x, data.test_y),
    ):
        # Avalanche groups samples by class, keeping file order within a class.
        order = torch.argsort(y, stable=True)
        got_x, got_y, _ = dataset_tensors(experience.dataset)
        assert torch.equal(got_y, y[order]) and torch.equal(got_x, x[order])


def test_data_options_and_errors_reach_the_reader(tmp_path: Path) -> None:
    debian = write_mnist_like_gz(tmp_path / "debian", n_train=100, n_test=50, seed=5)
    b = make_benchmark("split_fmnist", data_root=tmp_path / "data", debian_fmnist_dir=debian)
    _check_split(b, 5, 10)
    with pytest.raises(DataError, match="MNIST data not found"):
        make_benchmark("split_mnist", data_root=tmp_path / "nowhere")


def test_class_order_seeded_reproducible_and_fixed(mnist_root: Path) -> None:
    rng_before = torch.get_rng_state()
    a = make_benchmark("split_mnist", seed=3, data_root=mnist_root)
    again = make_benchmark("split_mnist", seed=3, data_root=mnist_root)
    other = make_benchmark("split_mnist", seed=4, data_root=mnist_root)
    assert torch.equal(rng_before, torch.get_rng_state())  # the global RNG is left alone
    assert a.class_order == again.class_order
    assert a.classes_per_experience == again.classes_per_experience
    assert a.class_order != other.class_order
    fixed = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    f = make_benchmark(
        "split_mnist", n_experiences=2, fixed_class_order=fixed, data_root=mnist_root
    )
    assert f.class_order == fixed and f.classes_per_experience == [[5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]
    assert sorted(f.benchmark.train_stream[0].classes_in_this_experience) == [5, 6, 7, 8, 9]


def test_paper_mnist_single_experience(mnist_root: Path) -> None:
    b = make_benchmark("paper_mnist", n_experiences=5, scenario="task", data_root=mnist_root)
    assert len(b.benchmark.train_stream) == len(b.benchmark.test_stream) == 1
    tr, te = b.benchmark.train_stream[0], b.benchmark.test_stream[0]
    assert (len(tr.dataset), len(te.dataset)) == (200, 100)
    assert sorted(tr.classes_in_this_experience) == list(range(10))
    assert tr.task_label == te.task_label == 0
    assert b.classes_per_experience == [list(range(10))] and b.batch_augment is None


# ------------------------------------------------------------------------------ CIFAR-100


def test_split_cifar100(cifar_root: Path) -> None:
    b = make_benchmark("split_cifar100", n_experiences=5, scenario="task", data_root=cifar_root)
    assert (b.n_classes, b.input_shape) == (100, (3, 32, 32))
    assert b.batch_augment is cifar_batch_augment
    _check_split(b, 5, 100)
    assert [e.task_label for e in b.benchmark.train_stream] == [0, 1, 2, 3, 4]
    assert b.superclasses == list(CIFAR100_SUPERCLASS_OF)
    assert b.class_names is not None and b.class_names[7] == "fine_07"
    assert b.superclass_names is not None and len(b.superclass_names) == 20
    x, _, _ = next(iter(DataLoader(b.benchmark.train_stream[0].dataset, batch_size=8)))
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)


def test_paper_cifar100_single_experience(cifar_root: Path) -> None:
    b = make_benchmark("paper_cifar100", data_root=cifar_root)
    assert len(b.benchmark.train_stream) == 1 and b.batch_augment is cifar_batch_augment
    assert len(b.benchmark.train_stream[0].dataset) == 300
    assert len(b.benchmark.test_stream[0].dataset) == 200


# ------------------------------------------------------------------------------ arguments


def test_bad_arguments(mnist_root: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark"):
        make_benchmark("split_svhn")
    with pytest.raises(ValueError, match="scenario"):
        make_benchmark("tiny", scenario="domain")
    with pytest.raises(ValueError, match="n_experiences"):
        make_benchmark("split_mnist", n_experiences=3, data_root=mnist_root)
    with pytest.raises(ValueError, match="n_experiences"):
        make_benchmark("tiny", n_experiences=0)
    with pytest.raises(ValueError, match="fixed_class_order"):
        make_benchmark("split_mnist", fixed_class_order=[0, 0, 1, 2, 3], data_root=mnist_root)
    with pytest.raises(TypeError, match="samples_per_clas"):
        make_benchmark("tiny", samples_per_clas=3)
    assert set(BENCHMARK_NAMES) >= {"split_mnist", "paper_cifar100", "tiny"}


def test_max_samples_subsets(mnist_root: Path) -> None:
    b = make_benchmark(
        "paper_mnist", data_root=mnist_root, max_train_samples=50, max_test_samples=30
    )
    assert len(b.benchmark.train_stream[0].dataset) == 50
    assert len(b.benchmark.test_stream[0].dataset) == 30


# ------------------------------------------------------------------------------ augmentation


def _known_batch(b: int = 64, c: int = 3, h: int = 32, w: int = 32) -> torch.Tensor:
    # Every pixel value distinct, so any flip or shift is visible.
    return torch.arange(c * h * w, dtype=torch.float32).view(1, c, h, w).repeat(b, 1, 1, 1)


def test_augment_shape_and_determinism() -> None:
    x = torch.randn(32, 3, 32, 32)
    a = cifar_batch_augment(x, torch.Generator().manual_seed(1))
    b = cifar_batch_augment(x, torch.Generator().manual_seed(1))
    c = cifar_batch_augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = cifar_batch_augment(x)
    torch.manual_seed(0)
    assert torch.equal(d, cifar_batch_augment(x))


def test_flip_only_matches_hand_flip() -> None:
    x = _known_batch()
    out = random_flip_crop(x, padding=0, generator=torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all()
    assert 10 < int(flipped.sum()) < 54  # about half of 64


def test_crops_are_reflect_padded_windows() -> None:
    x = _known_batch()
    out = cifar_batch_augment(x, torch.Generator().manual_seed(0))
    padded = F.pad(x[:1], (4, 4, 4, 4), mode="reflect")[0]
    windows = {}
    for oy in range(9):
        for ox in range(9):
            win = padded[:, oy : oy + 32, ox : ox + 32]
            windows[(oy, ox, False)] = win
            windows[(oy, ox, True)] = win.flip(-1)
    found = []
    for i in range(len(out)):
        keys = [k for k, win in windows.items() if torch.equal(out[i], win)]
        assert len(keys) == 1, f"sample {i} is no flipped/cropped window of the input"
        found.append(keys[0])
    assert any(k[2] for k in found) and not all(k[2] for k in found)
    assert len({k[:2] for k in found}) > 10  # many different offsets
    assert any(k[:2] != (4, 4) for k in found)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_augment_on_cuda() -> None:
    x = _known_batch().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = cifar_batch_augment(x, g)
    assert out.device == x.device and out.shape == x.shape
    cpu = cifar_batch_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(cpu.cpu(), cifar_batch_augment(x.cpu(), torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------------ tiny


def test_tiny_deterministic_and_learnable() -> None:
    make_benchmark("tiny")  # warm-up: the first call pays for importing Avalanche
    t0 = time.perf_counter()
    a = make_benchmark("tiny", n_experiences=3, seed=7)
    elapsed = time.perf_counter() - t0
    b = make_benchmark("tiny", n_experiences=3, seed=7)
    c = make_benchmark("tiny", n_experiences=3, seed=8)
    assert elapsed < 0.5
    assert (a.n_classes, a.input_shape) == (6, (1, 8, 8))
    _check_split(a, 3, 6)
    xa, ya, _ = dataset_tensors(a.benchmark.train_stream[0].dataset)
    xb, yb, _ = dataset_tensors(b.benchmark.train_stream[0].dataset)
    xc, _, _ = dataset_tensors(c.benchmark.train_stream[0].dataset)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    assert len(xa) == 2 * 64 and len(a.benchmark.test_stream[0].dataset) == 2 * 32
    # Well separated: nearest class mean of the training data classifies the test data.
    one = make_benchmark("tiny", n_experiences=1, seed=7).benchmark
    xtr, ytr, _ = dataset_tensors(one.train_stream[0].dataset)
    xte, yte, _ = dataset_tensors(one.test_stream[0].dataset)
    means = torch.stack([xtr[ytr == k].mean(0) for k in range(2)]).flatten(1)
    pred = torch.cdist(xte.flatten(1), means).argmin(1)
    assert (pred == yte).float().mean() > 0.95
    small = make_benchmark("tiny", n_experiences=2, samples_per_class=5, test_samples_per_class=3)
    assert len(small.benchmark.train_stream[0].dataset) == 10
    assert len(small.benchmark.test_stream[0].dataset) == 6


def test_dataset_tensors_matches_loader_and_concat(mnist_root: Path) -> None:
    b = make_benchmark("split_mnist", scenario="task", data_root=mnist_root)
    e0, e1 = b.benchmark.train_stream[0], b.benchmark.train_stream[1]
    both = e0.dataset.concat(e1.dataset).subset(list(range(5, 70, 3)))
    x, y, t = dataset_tensors(both)
    lx, ly, lt = next(iter(DataLoader(both, batch_size=len(both))))
    assert torch.equal(x, lx) and torch.equal(y, ly) and torch.equal(t, lt)
    assert set(t.tolist()) == {0, 1}


def test_subset_is_class_balanced(mnist_root: Path) -> None:
    b = make_benchmark("paper_mnist", data_root=mnist_root, max_train_samples=20)
    _, y, _ = dataset_tensors(b.benchmark.train_stream[0].dataset)
    assert torch.bincount(y, minlength=10).tolist() == [2] * 10


def test_augment_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        random_flip_crop(torch.zeros(2, 3, 4, 4), padding=4)
    with pytest.raises(ValueError):
        cifar_batch_augment(torch.zeros(3, 32, 32))
    assert cifar_batch_augment(torch.zeros(0, 3, 32, 32)).shape == (0, 3, 32, 32)
