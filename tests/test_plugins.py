"""The plugins: routing regularisers under any Avalanche strategy, the NaN-loss guard."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import ReplayPlugin

from moe_cl.models import MixtureOfExperts, SingleExpertModel
from moe_cl.plugins import (
    ImportanceRegularizer,
    NonFiniteLossError,
    NonFiniteLossGuard,
    SampleSimilarityRegularizer,
)
from tests.helpers import moe_strategy, quiet_evaluator, tiny


def test_regularisers_compose_with_avalanche_naive_and_replay():
    torch.manual_seed(4)
    bundle, arch = tiny(2)
    model = MixtureOfExperts(architecture=arch, num_experts=2, gate="softmax")
    strategy = Naive(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
        criterion=torch.nn.NLLLoss(), train_mb_size=32, train_epochs=2, eval_mb_size=128,
        plugins=[ImportanceRegularizer(weight=0.5), SampleSimilarityRegularizer(beta_s=1e-3,
                 beta_d=1e-2), ReplayPlugin(mem_size=64)],
        evaluator=quiet_evaluator(),
    )
    for exp in bundle.benchmark.train_stream:
        strategy.train(exp)
    results = strategy.eval(bundle.benchmark.test_stream)
    assert any(k.startswith("Routing_MI/") for k in results)


def test_regulariser_adds_its_term_to_the_loss():
    class Capture(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.losses = []

        def after_backward(self, strategy, **kwargs):
            self.losses.append(float(strategy.loss))

    bundle, arch = tiny(2)
    losses = []
    for weight in (0.0, 100.0):
        torch.manual_seed(5)
        model = MixtureOfExperts(architecture=arch, num_experts=3, gate="softmax")
        capture = Capture()
        strategy = moe_strategy(model, epochs=1, plugins=[ImportanceRegularizer(weight=weight),
                                                        capture])
        strategy.train(bundle.benchmark.train_stream[0])
        losses.append(capture.losses[0])
    assert losses[1] > losses[0]


def test_regularisers_use_the_training_forward_even_if_the_model_runs_again():
    """LwF runs the model once more in its before_backward (other routing): L_s must still
    regularise the gate of the training forward pass."""
    from moe_cl.core.losses import pairwise_distances, sample_similarity_loss

    class RunsModelAgain(SupervisedPlugin):  # placed before L_s, as a user may place LwF
        def after_forward(self, strategy, **kwargs):
            self.gate = strategy.model.last_output.gate.detach().clone()

        def before_backward(self, strategy, **kwargs):
            self.loss = float(strategy.loss)
            strategy.model(torch.randn_like(strategy.mb_x), strategy.mb_task_id)

    class LossAfter(SupervisedPlugin):
        def before_backward(self, strategy, **kwargs):
            self.loss = float(strategy.loss)
            self.x = strategy.mb_x.detach().clone()

    torch.manual_seed(5)
    bundle, arch = tiny(2)
    model = MixtureOfExperts(architecture=arch, num_experts=3, gate="softmax")
    again, after = RunsModelAgain(), LossAfter()
    ls = SampleSimilarityRegularizer(beta_s=0.5, beta_d=2.0)
    strategy = moe_strategy(model, epochs=1, plugins=[again, ls, after], train_mb_size=512)
    strategy.train(bundle.benchmark.train_stream[0])  # one mini-batch: the whole experience
    expected = sample_similarity_loss(again.gate, pairwise_distances(after.x), beta_s=0.5,
                                      beta_d=2.0)
    assert abs(float(expected)) > 1e-3
    assert after.loss - again.loss == pytest.approx(float(expected), rel=1e-4, abs=1e-6)


def test_plugins_need_a_mixture():
    bundle, arch = tiny(2)
    model = SingleExpertModel(architecture=arch)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=torch.nn.NLLLoss(), train_mb_size=32,
                     plugins=[ImportanceRegularizer(weight=1.0)], evaluator=quiet_evaluator(False))
    with pytest.raises(TypeError, match="MixtureOfExperts"):
        strategy.train(bundle.benchmark.train_stream[0])


def test_nan_loss_stops_with_experience_and_iteration():
    bundle, arch = tiny(2)
    model = MixtureOfExperts(architecture=arch, num_experts=2)
    with torch.no_grad():
        model.core.bank.groups[0].layers[1].weight.fill_(float("nan"))
    strategy = moe_strategy(model, epochs=1, plugins=[NonFiniteLossGuard()])
    with pytest.raises(NonFiniteLossError, match="experience 0, epoch 0, iteration 0"):
        strategy.train(bundle.benchmark.train_stream[0])
