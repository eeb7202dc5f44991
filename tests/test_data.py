"""The fast data path: tensors out of Avalanche datasets, batches by index."""

import torch
import torchvision.transforms as T

from moe_cl.data.streams import make_benchmark
from moe_cl.data.tensors import TensorBatches, dataset_tensors


def _loader_tensors(dataset):
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=1000, shuffle=False))
    return tuple(torch.cat([b[i] for b in batches]) for i in range(3))


def test_tree_walk_equals_loader_on_subsets_and_concatenations():
    bundle = make_benchmark("tiny", n_experiences=3, seed=1)
    train = bundle.benchmark.train_stream
    mixed = train[2].dataset.concat(train[0].dataset.subset([5, 1, 9, 3]))
    for dataset in (train[1].dataset, mixed):
        got = dataset_tensors(dataset)
        expected = _loader_tensors(dataset)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


def test_fast_reading_survives_a_per_sample_read():
    """Reading one sample makes Avalanche install an (identity) class lookup: still fast, and
    still equal to the loader."""
    from moe_cl.data.tensors import has_transforms

    bundle = make_benchmark("tiny", n_experiences=2, seed=2)
    dataset = bundle.benchmark.train_stream[1].dataset
    dataset[0]
    assert not has_transforms(dataset)
    for a, b in zip(dataset_tensors(dataset), _loader_tensors(dataset), strict=True):
        assert torch.equal(a, b)


def test_a_class_remapping_is_a_transform_but_a_deterministic_one():
    """Avalanche remaps class ids (here: from zero in each experience) with a lookup on the
    targets: reading goes through it, but the data need not be read anew every epoch."""
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    from moe_cl.data.tensors import has_transforms

    x, y = torch.randn(40, 3), torch.arange(40) % 4
    data = _make_taskaware_tensor_classification_dataset(x, y, targets=y, task_labels=0)
    bm = nc_benchmark(data, data, n_experiences=2, task_labels=True, shuffle=False,
                      fixed_class_order=[0, 1, 2, 3], class_ids_from_zero_in_each_exp=True)
    dataset = bm.train_stream[1].dataset
    dataset[0]  # installs the lookup {2: 0, 3: 1}
    assert has_transforms(dataset)
    assert not has_transforms(dataset, except_class_lookups=True)
    assert set(dataset_tensors(dataset)[1].tolist()) == {0, 1}


def test_datasets_with_transforms_are_read_with_their_transforms():
    bundle = make_benchmark("tiny", n_experiences=2, seed=1)
    dataset = bundle.benchmark.train_stream[0].dataset.train()
    doubled = dataset.replace_current_transform_group(T.Lambda(lambda x: 2 * x))
    x, _, _ = dataset_tensors(dataset)
    x2, _, _ = dataset_tensors(doubled)
    torch.testing.assert_close(x2, 2 * x)


def test_tensor_batches_see_every_sample_once_per_pass():
    x = torch.arange(10).float()[:, None]
    batches = TensorBatches((x, torch.arange(10), torch.zeros(10, dtype=torch.long)), 4,
                            shuffle=True)
    assert len(batches) == 3
    torch.manual_seed(0)
    first = torch.cat([b[1] for b in batches])
    second = torch.cat([b[1] for b in batches])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert first.tolist() != second.tolist()  # a new permutation each pass
    torch.manual_seed(0)
    assert torch.cat([b[1] for b in batches]).tolist() == first.tolist()  # seeded order
    dropped = TensorBatches((x, torch.arange(10), torch.zeros(10)), 4, shuffle=False,
                            drop_last=True)
    assert [len(b[0]) for b in dropped] == [4, 4]


def _remapped_benchmark(**remap):
    """Avalanche's own generator remapping class ids, freshly built: no sample read yet."""
    from avalanche.benchmarks import nc_benchmark

    from tests.helpers import tensor_dataset

    torch.manual_seed(3)
    x, y = torch.randn(200, 6), torch.arange(200) % 10
    return nc_benchmark(tensor_dataset(x, y), tensor_dataset(x, y), n_experiences=5,
                        task_labels="in_each_exp" in str(remap), seed=3, **remap)


def test_remapped_class_ids_are_read_as_the_dataset_returns_them_on_a_fresh_benchmark():
    """Avalanche installs its class lookup in a defaultdict that is empty until a sample is
    read: the fast path must apply it on a fresh benchmark exactly as after a read."""
    from moe_cl.data.tensors import has_transforms

    for remap in ({"class_ids_from_zero_from_first_exp": True},
                  {"class_ids_from_zero_in_each_exp": True}):
        bm = _remapped_benchmark(**remap)
        for experience in bm.train_stream:
            dataset = experience.dataset
            assert has_transforms(dataset) and not has_transforms(dataset,
                                                                  except_class_lookups=True)
            fresh = dataset_tensors(dataset)
            assert set(fresh[1].tolist()) == set(experience.classes_in_this_experience)
            for a, b in zip(fresh, _loader_tensors(dataset), strict=True):
                assert torch.equal(a, b)
            dataset[0]
            for a, b in zip(dataset_tensors(dataset), fresh, strict=True):
                assert torch.equal(a, b)
