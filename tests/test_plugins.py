"""The plugins: routing regularisers under any Avalanche strategy, the NaN-loss guard, the
reference code's train error (a measurement that changes nothing else)."""

import io

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.logging import TextLogger
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin

from moe_cl.errors import NonFiniteLossError
from moe_cl.training.models import MixtureOfExperts, SingleExpertModel
from moe_cl.training.plugins import (
    ImportanceRegularizer,
    NonFiniteLossGuard,
    ReferenceTrainError,
    SampleSimilarityRegularizer,
    reference_train_error,
)
from tests.helpers import moe_strategy, quiet_evaluator, stream_from_tensors, tiny


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


class _BiasOnly(torch.nn.Module):
    """Log-probabilities log_softmax([b, 0]) for every sample, whatever the input."""

    def __init__(self, bias: float) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(bias))

    def forward(self, x):
        logits = torch.stack([self.bias.expand(len(x)), torch.zeros(len(x))], 1)
        return torch.log_softmax(logits, 1)


def test_reference_train_error_is_measured_after_each_step_weighted_by_batch_size():
    """Batch 1: three samples of class 1 with b = 1 (all wrong), after its SGD step (lr 10,
    d loss / d b = sigmoid(1)) b = -6.3: all right. Batch 2: classes 0 and 1, wrong on class 0
    before its step; after it, exactly one of the two is wrong whatever b. Reference: (0 + 1) /
    5 = 0.2 (not the unweighted (0 + 1/2) / 2); Avalanche's pre-step accuracy: 4 / 5 wrong."""
    x = torch.zeros(5, 1)
    y = torch.tensor([1, 1, 1, 0, 1])
    bm = stream_from_tensors([(x, y)], [(x, y)])
    model = _BiasOnly(1.0)
    measured = ReferenceTrainError()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=10.0),
                     criterion=torch.nn.NLLLoss(), train_mb_size=3, train_epochs=1,
                     plugins=[measured], evaluator=EvaluationPlugin(
                         accuracy_metrics(epoch=True), loggers=[TextLogger(io.StringIO())]))
    assert measured.last_epoch_error is None
    strategy.train(bm.train_stream[0], shuffle=False)
    assert measured.last_epoch_error == pytest.approx(0.2)
    assert reference_train_error(strategy) == pytest.approx(0.2)
    pre_step = [v for k, v in strategy.evaluator.get_last_metrics().items()
                if k.startswith("Top1_Acc_Epoch/train_phase")]
    assert pre_step == [pytest.approx(1 / 5)]


class _Record(SupervisedPlugin):
    """What the training sees after each step: loss, output, the routing slot's gate."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def after_training_iteration(self, strategy, **kwargs):
        self.seen.append((float(strategy.loss), strategy.mb_output.detach().clone(),
                          strategy.model.last_output.gate.detach().clone()))


def _train_fmnist_mixture(*plugins):
    """Two epochs of a stochastic-output mixture whose gate has BatchNorm, with L_s."""
    torch.manual_seed(2)
    x, y = torch.randn(96, 1, 28, 28), torch.arange(96) % 10
    bm = stream_from_tensors([(x, y)], [(x, y)])
    model = MixtureOfExperts(architecture="fmnist", gate="softmax", num_experts=3,
                             output="stochastic")
    record = _Record()
    strategy = moe_strategy(model, epochs=2, plugins=[
        *plugins, SampleSimilarityRegularizer(beta_s=1e-3, beta_d=1e-2), record])
    strategy.train(bm.train_stream[0])
    trained = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    rng = torch.get_rng_state()
    strategy.eval(bm.test_stream)
    return trained, rng, record.seen, strategy.evaluator.get_all_metrics(), model


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_reference_train_error_changes_nothing_else():
    measured = ReferenceTrainError()
    with_it = _train_fmnist_mixture(measured)
    without = _train_fmnist_mixture()
    assert measured.last_epoch_error is not None and 0 <= measured.last_epoch_error <= 1
    (weights, rng, seen, metrics, model), (weights0, rng0, seen0, metrics0, _) = with_it, without
    assert weights.keys() == weights0.keys()
    for name, value in weights.items():  # parameters and BatchNorm running statistics
        assert torch.equal(value, weights0[name]), name
    assert torch.equal(rng, rng0)
    assert len(seen) == len(seen0) == 6
    for (loss, out, gate), (loss0, out0, gate0) in zip(seen, seen0, strict=True):
        assert loss == loss0 and torch.equal(out, out0) and torch.equal(gate, gate0)
    assert metrics.keys() == metrics0.keys()
    for name, value in metrics.items():  # the training epochs' metrics and the evaluation's
        assert _same(value, metrics0[name]), name
    # What it guards against: a no-grad forward in train mode moves the running statistics
    # and draws from the random stream (the stochastic output's expert).
    model.train()
    running = model.core.gate.network[1].running_mean.clone()
    state = torch.get_rng_state()
    with torch.no_grad():
        model(torch.randn(8, 1, 28, 28))
    assert not torch.equal(running, model.core.gate.network[1].running_mean)
    assert not torch.equal(state, torch.get_rng_state())


def test_a_run_with_the_reference_train_error_differs_only_by_that_field(tmp_path):
    """Tiny benchmark, three experiences, stochastic output and a distilled gate: results.json
    with train.reference_train_error=true equals the run without it but for the new field."""
    from moe_cl.run.config import compose
    from moe_cl.run.experiment import run_experiment

    results = {}
    for measured in (False, True):
        cfg = compose(["benchmark=tiny", "strategy=distilled", "model.output=stochastic",
                       "train.epochs=2", "distill.epochs=1", "logging.interactive=false",
                       "logging.tensorboard=false", "logging.figures=false",
                       f"train.reference_train_error={str(measured).lower()}"])
        results[measured] = run_experiment(cfg, tmp_path / str(measured), echo=lambda _: None)
    on, off = results[True], results[False]
    assert off["train_error_reference"] is None
    assert 0 <= on.pop("train_error_reference") <= 1
    off.pop("train_error_reference")
    for result in (on, off):
        result.pop("wall_time_s")
        assert result["config"]["train"].pop("reference_train_error") is (result is on)
    assert on == off
