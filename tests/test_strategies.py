"""MoEStrategy: online EWC with growth, the stochastic loss and top-k evaluation, the models it
accepts, the fast data path."""

import pytest
import torch
from avalanche.core import SupervisedPlugin

from moe_cl.core.zoo import mlp_architecture
from moe_cl.training.models import ExpertPolicy, MixtureOfExperts, SingleExpertModel
from moe_cl.training.strategies import MoEStrategy
from tests.helpers import moe_strategy, tiny


def test_online_ewc_follows_a_growing_attentive_mixture_and_refuses_a_softmax_one():
    """Avalanche's online EWC needs the parameters of added experts to come last."""
    from avalanche.training.plugins import EWCPlugin

    torch.manual_seed(2)
    bundle, arch = tiny(3)
    model = MixtureOfExperts(architecture=arch, num_experts=2, policy=ExpertPolicy("grow"))
    ewc = EWCPlugin(1.0, mode="online", decay_factor=0.5)
    strategy = moe_strategy(model, epochs=1, plugins=[ewc])
    for exp in bundle.benchmark.train_stream:
        strategy.train(exp)
    assert model.num_experts == 4
    assert set(ewc.importances[2]) == {name for name, _ in model.named_parameters()}
    softmax = MixtureOfExperts(architecture=arch, num_experts=2, gate="softmax",
                               policy=ExpertPolicy("grow"))
    with pytest.raises(ValueError, match="online"):
        moe_strategy(softmax, plugins=[EWCPlugin(1.0, mode="online", decay_factor=0.5)])
    moe_strategy(softmax, plugins=[EWCPlugin(1.0)])  # separate mode pairs by name: fine


def test_stochastic_output_and_top_k_evaluation():
    torch.manual_seed(6)
    bundle, arch = tiny(2)
    model = MixtureOfExperts(architecture=arch, num_experts=3, gate="softmax",
                             output="stochastic")
    strategy = moe_strategy(model, epochs=6, eval_top_k=1)
    strategy.train(bundle.benchmark.train_stream[0])
    results = strategy.eval(bundle.benchmark.test_stream[:1])
    acc = [v for k, v in results.items() if k.startswith("Top1_Acc_Stream")][0]
    assert acc > 0.8
    assert model.last_output.expert_log_probs is None  # the top-k path ran


def test_moe_strategy_refuses_other_models():
    bundle, arch = tiny(2)
    model = SingleExpertModel(architecture=arch)
    with pytest.raises(TypeError, match="MixtureOfExperts"):
        MoEStrategy(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


class _SampleCounter(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.per_epoch: list[int] = []
        self.seen: list[torch.Tensor] = []

    def before_training_epoch(self, strategy, **kwargs):
        self.per_epoch.append(0)

    def after_training_iteration(self, strategy, **kwargs):
        self.per_epoch[-1] += len(strategy.mb_y)
        self.seen.append(strategy.mb_x.flatten(1)[:, :4].clone())


def test_fast_data_path_matches_the_standard_loader():
    epochs = 3
    bundle, arch = tiny(2)
    outcomes = {}
    for fast in (True, False):
        torch.manual_seed(8)
        model = MixtureOfExperts(architecture=arch, num_experts=2)
        counter = _SampleCounter()
        strategy = moe_strategy(model, epochs=epochs, plugins=[counter], fast_data=fast)
        strategy.train(bundle.benchmark.train_stream[0])
        results = strategy.eval(bundle.benchmark.test_stream[:1])
        accuracy = [v for k, v in results.items() if k.startswith("Top1_Acc_Stream")][0]
        n = len(bundle.benchmark.train_stream[0].dataset)
        assert counter.per_epoch == [n] * epochs
        # Every sample exactly once per epoch: the epoch's rows are a permutation of the data.
        first_epoch = torch.cat(counter.seen)[:n]
        assert len(torch.unique(first_epoch, dim=0)) == n
        outcomes[fast] = accuracy
    assert outcomes[True] > 0.9 and outcomes[False] > 0.9
    assert abs(outcomes[True] - outcomes[False]) < 0.1


def test_random_train_transforms_are_drawn_anew_every_epoch_with_fast_data():
    """An Avalanche benchmark with a random train transform: the fast path must not freeze one
    draw for the whole experience (it leaves such data to Avalanche's loaders)."""
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    class EpochInputs(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.epochs: list[list[float]] = []

        def before_training_epoch(self, strategy, **kwargs):
            self.epochs.append([])

        def after_training_iteration(self, strategy, **kwargs):
            self.epochs[-1] += strategy.mb_x.flatten(1).sum(1).tolist()

    torch.manual_seed(0)
    x, y = torch.randn(120, 1, 4, 4), torch.arange(120) % 4
    data = _make_taskaware_tensor_classification_dataset(x, y, targets=y, task_labels=0)
    bm = nc_benchmark(data, data, n_experiences=1, task_labels=False, shuffle=False,
                      fixed_class_order=[0, 1, 2, 3],
                      train_transform=lambda t: t + torch.randn_like(t))
    model = MixtureOfExperts(architecture=mlp_architecture((1, 4, 4), 4), num_experts=2)
    inputs = EpochInputs()
    strategy = moe_strategy(model, epochs=2, plugins=[inputs], fast_data=True)
    strategy.train(bm.train_stream[0])
    first, second = (sorted(epoch) for epoch in inputs.epochs)
    assert len(first) == len(second) == 120
    assert not torch.allclose(torch.tensor(first), torch.tensor(second))  # fresh noise
    # Without transforms the fast path holds the tensors: epochs see the same samples.
    bundle, arch = tiny(1)
    inputs = EpochInputs()
    plain = MixtureOfExperts(architecture=arch, num_experts=2)
    strategy = moe_strategy(plain, epochs=2, plugins=[inputs], fast_data=True)
    strategy.train(bundle.benchmark.train_stream[0])
    first, second = (sorted(epoch) for epoch in inputs.epochs)
    assert torch.allclose(torch.tensor(first), torch.tensor(second))


class _LabelRecorder(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.labels: list[set[int]] = []

    def before_training_exp(self, strategy, **kwargs):
        self.labels.append(set())

    def before_forward(self, strategy, **kwargs):
        if strategy.is_training:
            self.labels[-1].update(strategy.mb_y.tolist())


def test_fast_data_trains_and_evaluates_on_avalanche_remapped_class_ids():
    """A user's own task-incremental nc_benchmark with class ids remapped from zero, built
    fresh: the mini-batches hold the ids the experience's dataset returns, and the fast path
    learns as well as Avalanche's loaders."""
    from avalanche.benchmarks import nc_benchmark

    from tests.helpers import tensor_dataset

    torch.manual_seed(3)
    centres = 4 * torch.randn(10, 6)
    y = torch.arange(600) % 10
    x = centres[y] + 3 * torch.randn(600, 6)
    accuracy = {}
    for fast in (True, False):
        bm = nc_benchmark(tensor_dataset(x[:500], y[:500]), tensor_dataset(x[500:], y[500:]),
                          n_experiences=5, task_labels=True, seed=3,
                          class_ids_from_zero_from_first_exp=True)
        torch.manual_seed(0)
        model = MixtureOfExperts(architecture=mlp_architecture((6,), 10), num_experts=2,
                                 scenario="task")
        recorder = _LabelRecorder()
        strategy = moe_strategy(model, epochs=3, plugins=[recorder], fast_data=fast)
        for experience in bm.train_stream:
            strategy.train(experience)
        assert recorder.labels == [set(e.classes_in_this_experience) for e in bm.train_stream]
        results = strategy.eval(bm.test_stream)
        accuracy[fast] = [v for k, v in results.items() if k.startswith("Top1_Acc_Stream")][0]
    assert accuracy[False] > 0.85
    assert abs(accuracy[True] - accuracy[False]) < 0.05
