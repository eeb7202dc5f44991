"""Conformance: the conventions an Avalanche strategy and DynamicModule keep, checked for our
strategy and mixtures against Avalanche's own generators, plugins, loggers and baselines.

Every test runs on small random tensors with tiny MLP experts, for MixtureOfExperts and
RoutedMixture and, where the strategy is ours, with the fast data path on and off.
"""

import csv
import inspect
import io
import math

import pytest
import torch
from avalanche.benchmarks import nc_benchmark, ni_benchmark
from avalanche.benchmarks.scenarios.online import split_online_stream
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.scenarios.validation_scenario import benchmark_with_validation_stream
from avalanche.benchmarks.utils import DataAttribute
from avalanche.benchmarks.utils.classification_dataset import ClassificationDataset
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.logging import CSVLogger, TextLogger
from avalanche.training import EWC, Cumulative, LwF, Naive, Replay
from avalanche.training.plugins import EvaluationPlugin, EWCPlugin, LwFPlugin, ReplayPlugin
from avalanche.training.templates import SupervisedTemplate
from torch.utils.data import TensorDataset

from moe_cl.core.zoo import mlp_architecture
from moe_cl.training.checkpoint import (
    load_checkpoint,
    load_model_state,
    load_plugin_states,
    optimizer_state,
    plugin_states,
    restore_optimizer,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from moe_cl.training.models import ExpertPolicy, MixtureOfExperts, SingleExpertModel
from moe_cl.training.options import RouterOptions
from moe_cl.training.routed import RoutedMixture, RouterUpdate
from moe_cl.training.strategies import MoEStrategy
from tests.helpers import quiet_evaluator, tensor_dataset

FEATURES, CLASSES = 6, 4
ARCH = mlp_architecture((FEATURES,), CLASSES, width=16, hidden=8)
MODEL_KINDS = ("mixture", "routed")

CPU = torch.device("cpu")


def build_model(kind: str):
    """A growing mixture (an expert added per experience) or a routed one, both tiny."""
    if kind == "mixture":
        return MixtureOfExperts(architecture=ARCH, num_experts=2,
                                policy=ExpertPolicy("grow", per_experience=1))
    return RoutedMixture(architecture=ARCH, num_experts=1,
                         router=RouterOptions(feature="pixels"))


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of CLASSES well separated Gaussian blobs (the same centres for every seed)."""
    centres = 5 * torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    return centres[y] + torch.randn(n, FEATURES, generator=generator), y


def plain_dataset(x: torch.Tensor, y: torch.Tensor) -> ClassificationDataset:
    """A dataset without task labels: what Avalanche 0.6's newer generators take."""
    return ClassificationDataset([TensorDataset(x, y)],
                                 data_attributes=[DataAttribute(y, "targets")])


def make_benchmark(name: str):
    """Two experiences of two classes each (ni: every class in both), from Avalanche's
    generators."""
    train, test = blobs(96, seed=1), blobs(32, seed=2)
    if name in ("nc_remapped", "nc"):
        return nc_benchmark(tensor_dataset(*train), tensor_dataset(*test), n_experiences=2,
                            task_labels=False, seed=5,
                            class_ids_from_zero_from_first_exp=name == "nc_remapped")
    if name == "ni":
        return ni_benchmark(tensor_dataset(*train), tensor_dataset(*test), n_experiences=2,
                            seed=5)
    bm = class_incremental_benchmark(
        {"train": plain_dataset(*train), "test": plain_dataset(*test)}, num_experiences=2,
        class_order=[2, 0, 3, 1])
    if name == "with_validation":
        return benchmark_with_validation_stream(bm, validation_size=0.25, seed=0)
    return bm


def moe(model, *, fast: bool, plugins=(), evaluator=None, train_epochs=1, **kwargs) -> MoEStrategy:
    return MoEStrategy(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                       train_mb_size=32, train_epochs=train_epochs, eval_mb_size=64,
                       plugins=list(plugins), evaluator=evaluator or quiet_evaluator(),
                       fast_data=fast, **kwargs)


def stream_accuracy(results: dict) -> float:
    return next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream/eval_phase/test"))


@pytest.fixture(params=[True, False], ids=["fast", "loaders"])
def fast(request) -> bool:
    return request.param


# -- Avalanche's generators


@pytest.mark.parametrize("generator", ["nc_remapped", "nc", "ni", "class_incremental",
                                       "with_validation"])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_trains_and_evaluates_on_avalanche_generators(generator, kind, fast):
    """Generators without task labels (class_incremental_benchmark and its validation split)
    are read as task 0; a routed mixture refuses a stream whose classes recur (ni)."""
    torch.manual_seed(0)
    bm = make_benchmark(generator)
    model = build_model(kind)
    strategy = moe(model, fast=fast)
    if kind == "routed" and generator == "ni":
        with pytest.raises(ValueError, match="each class in one experience"):
            for experience in bm.train_stream:
                strategy.train(experience)
        return
    for experience in bm.train_stream:
        strategy.train(experience)
    if generator == "with_validation":
        strategy.eval(bm.valid_stream)
    assert 0 <= stream_accuracy(strategy.eval(bm.test_stream)) <= 1
    assert model.seen.any(0).sum() == CLASSES


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_online_stream_of_a_stream_without_task_labels(kind, fast):
    """Online mini-experiences name no classes: the model reads them from the data. A routed
    mixture needs each class in one experience, which online streams split."""
    torch.manual_seed(0)
    bm = make_benchmark("class_incremental")
    online = split_online_stream(bm.train_stream, experience_size=24, seed=0)
    model = build_model(kind)
    strategy = moe(model, fast=fast)
    if kind == "routed":
        with pytest.raises(ValueError, match="each class in one experience"):
            for experience in online:
                strategy.train(experience)
        return
    for experience in online:
        strategy.train(experience)
    assert model.num_experts == 2 + 3  # an expert per mini-experience after the first
    assert 0 <= stream_accuracy(strategy.eval(bm.test_stream)) <= 1


def test_single_expert_model_adapts_to_streams_without_task_labels():
    torch.manual_seed(0)
    bm = make_benchmark("class_incremental")
    model = SingleExpertModel(architecture=ARCH)
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                     criterion=torch.nn.NLLLoss(), train_mb_size=32,
                     evaluator=quiet_evaluator(False))
    for experience in bm.train_stream:
        strategy.train(experience)
    assert model.seen.any(0).sum() == CLASSES


# -- the strategy's keywords and periodic evaluation


def test_moe_strategy_takes_every_supervised_template_keyword():
    template = inspect.signature(SupervisedTemplate.__init__).parameters
    ours = inspect.signature(MoEStrategy.__init__).parameters
    named = [name for name, p in template.items() if p.kind is p.KEYWORD_ONLY]
    assert all(ours[name].kind is inspect.Parameter.KEYWORD_ONLY for name in named)
    assert any(p.kind is p.VAR_KEYWORD for p in ours.values())
    model = build_model("mixture")
    with pytest.raises(TypeError, match="no_such_keyword"):
        moe(model, fast=True, no_such_keyword=1)


class _EvalCounter(SupervisedPlugin):
    """The evaluations that ran inside training, as the iterations done before each."""

    def __init__(self):
        super().__init__()
        self.at_iterations: list[int] = []
        self.training = False

    def before_training(self, strategy, **kwargs):
        self.training = True

    def after_training(self, strategy, **kwargs):
        self.training = False

    def before_eval(self, strategy, **kwargs):
        if self.training:
            self.at_iterations.append(strategy.clock.train_exp_iterations)


def _periodic_evaluations(strategy_class, model, peval_mode, **kwargs) -> list[int]:
    torch.manual_seed(0)
    bm = make_benchmark("nc")
    counter = _EvalCounter()
    plugins = [counter, *([RouterUpdate()] if isinstance(model, RoutedMixture) else [])]
    strategy = strategy_class(model=model, optimizer=torch.optim.Adam(model.parameters()),
                              criterion=torch.nn.NLLLoss(), train_mb_size=32, train_epochs=2,
                              eval_mb_size=64, plugins=plugins, evaluator=quiet_evaluator(),
                              eval_every=1, peval_mode=peval_mode, **kwargs)
    strategy.train(bm.train_stream[0], eval_streams=[bm.test_stream[:1]])
    return counter.at_iterations


@pytest.mark.parametrize("peval_mode", ["epoch", "iteration"])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_periodic_evaluation_as_naive(peval_mode, kind, fast):
    ours = _periodic_evaluations(MoEStrategy, build_model(kind), peval_mode, fast_data=fast)
    naive = _periodic_evaluations(Naive, build_model(kind), peval_mode)
    assert ours == naive
    # at the start, then after each epoch (the last one ends the experience) or after each
    # iteration and once more at the end of the experience
    iterations = 2 * math.ceil(48 / 32)
    assert len(ours) == (1 + iterations + 1 if peval_mode == "iteration" else 1 + 2)


# -- callbacks and loggers


class _CallbackRecorder(SupervisedPlugin):
    """The name of every callback, in the order the strategy calls them."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []


for _name in dir(SupervisedPlugin):
    if _name.startswith(("before_", "after_")):
        setattr(_CallbackRecorder, _name,
                lambda self, strategy, *, _n=_name, **kwargs: self.calls.append(_n))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_callback_order_is_naives(kind, fast):
    bm = make_benchmark("nc_remapped")
    calls = {}
    for strategy_class in (MoEStrategy, Naive):
        torch.manual_seed(0)
        model = build_model(kind)
        recorder = _CallbackRecorder()
        plugins = [recorder, *([RouterUpdate()] if kind == "routed" else [])]
        options = {"fast_data": fast} if strategy_class is MoEStrategy else {}
        strategy = strategy_class(model=model, optimizer=torch.optim.Adam(model.parameters()),
                                  criterion=torch.nn.NLLLoss(), train_mb_size=32,
                                  train_epochs=1, eval_mb_size=64, plugins=plugins,
                                  evaluator=quiet_evaluator(), eval_every=1, **options)
        for experience in bm.train_stream:
            strategy.train(experience, eval_streams=[bm.test_stream])
        strategy.eval(bm.test_stream)
        calls[strategy_class] = recorder.calls
    assert calls[MoEStrategy] == calls[Naive]
    assert "before_training_iteration" in calls[Naive]


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_avalanche_loggers(kind, fast, tmp_path):
    torch.manual_seed(0)
    bm = make_benchmark("nc_remapped")
    text = io.StringIO()
    csv_logger = CSVLogger(log_folder=str(tmp_path))
    evaluator = EvaluationPlugin(accuracy_metrics(epoch=True, experience=True, stream=True),
                                 loss_metrics(epoch=True, experience=True, stream=True),
                                 loggers=[TextLogger(text), csv_logger])
    strategy = moe(build_model(kind), fast=fast, evaluator=evaluator, eval_every=1)
    for experience in bm.train_stream:
        strategy.train(experience, eval_streams=[bm.test_stream])
    strategy.eval(bm.test_stream)
    csv_logger.close()
    assert "Top1_Acc_Stream/eval_phase/test_stream" in text.getvalue()
    with open(tmp_path / "training_results.csv") as handle:
        training = list(csv.DictReader(handle))
    with open(tmp_path / "eval_results.csv") as handle:
        evaluation = list(csv.DictReader(handle))
    assert len(training) == 2 * 1  # experiences x epochs
    assert {row["eval_exp"] for row in evaluation} == {"0", "1"}
    assert all(0 <= float(row["eval_accuracy"]) <= 1 for row in evaluation)


# -- Avalanche's baselines and plugins with a mixture as the model


def _baseline(name: str, model):
    plugins = [RouterUpdate()] if isinstance(model, RoutedMixture) else []
    common = {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=1e-2),
              "criterion": torch.nn.NLLLoss(), "train_mb_size": 32, "train_epochs": 1,
              "eval_mb_size": 64, "plugins": plugins, "evaluator": quiet_evaluator()}
    if name == "replay":
        return Replay(mem_size=40, **common)
    if name == "ewc":
        return EWC(ewc_lambda=1.0, **common)
    if name == "lwf":
        return LwF(alpha=1.0, temperature=2.0, **common)
    if name == "cumulative":
        return Cumulative(**common)
    return Naive(**common)


@pytest.mark.parametrize("baseline", ["naive", "replay", "ewc", "lwf", "cumulative"])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_avalanche_baselines_train_a_mixture(baseline, kind):
    torch.manual_seed(0)
    bm = make_benchmark("nc_remapped")
    model = build_model(kind)
    strategy = _baseline(baseline, model)
    for experience in bm.train_stream:
        strategy.train(experience)
    assert 0 <= stream_accuracy(strategy.eval(bm.test_stream)) <= 1
    assert model.seen.any(0).sum() == CLASSES


@pytest.mark.parametrize("plugin", [lambda: ReplayPlugin(mem_size=40), lambda: EWCPlugin(1.0),
                                    LwFPlugin], ids=["replay", "ewc", "lwf"])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_avalanche_plugins_join_our_strategy(plugin, kind, fast):
    torch.manual_seed(0)
    bm = make_benchmark("nc_remapped")  # Avalanche's EWC and LwF need task labels
    strategy = moe(build_model(kind), fast=fast, plugins=[plugin()])
    for experience in bm.train_stream:
        strategy.train(experience)
    assert 0 <= stream_accuracy(strategy.eval(bm.test_stream)) <= 1


# -- state across experiences: optimizer and checkpoints


class _OptimizerWatch(SupervisedPlugin):
    """The optimizer's Adam state per parameter name, at the end of each experience and at
    the first iteration of the next (after the model grew and the optimizer was updated)."""

    def __init__(self):
        super().__init__()
        self.after_experience: dict[str, torch.Tensor] = {}
        self.kept: list[bool] = []
        self.optimized: set[str] = set()

    def after_training_exp(self, strategy, **kwargs):
        self.after_experience = self._states(strategy)

    def before_training_iteration(self, strategy, **kwargs):
        if self.after_experience and not self.kept:
            now = self._states(strategy)
            self.kept = [torch.equal(now[name], state)
                         for name, state in self.after_experience.items()]
            optimized = {id(p) for group in strategy.optimizer.param_groups
                         for p in group["params"]}
            self.optimized = {name for name, p in strategy.model.named_parameters()
                              if id(p) in optimized}

    @staticmethod
    def _states(strategy) -> dict[str, torch.Tensor]:
        return {name: strategy.optimizer.state[p]["exp_avg"].clone()
                for name, p in strategy.model.named_parameters()
                if "exp_avg" in strategy.optimizer.state.get(p, {})}


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_optimizer_state_is_kept_across_growth(kind, fast):
    torch.manual_seed(0)
    bm = make_benchmark("nc_remapped")
    model = build_model(kind)
    watch = _OptimizerWatch()
    strategy = moe(model, fast=fast, plugins=[watch])
    grown_from = None
    for experience in bm.train_stream:
        strategy.train(experience)
        grown_from = grown_from or model.num_experts
    assert model.num_experts > grown_from
    assert watch.after_experience and all(watch.kept)
    assert watch.optimized == {name for name, _ in model.named_parameters()}


def _accuracy_and_loss(results: dict) -> dict:
    return {k: v for k, v in results.items() if k.startswith(("Top1_Acc", "Loss"))}


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_resume_from_a_checkpoint_gives_identical_metrics(kind, fast, tmp_path):
    """Avalanche's own save_checkpoint fails on torch 2.14 with dill 0.4; ours holds
    state_dicts only. Resumed after the first experience, the second one trains and evaluates
    exactly as without the interruption."""
    bm = make_benchmark("nc_remapped")

    def run_strategy(model):
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                     loss_metrics(stream=True), loggers=[TextLogger(io.StringIO())])
        return moe(model, fast=fast, plugins=[ReplayPlugin(mem_size=40)], evaluator=evaluator)

    torch.manual_seed(0)
    model = build_model(kind)
    strategy = run_strategy(model)
    strategy.train(bm.train_stream[0])
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"state_dict": model.state_dict()},
                           "optimizer": optimizer_state(strategy.optimizer, model),
                           "plugins": plugin_states(strategy.plugins), "rng": rng_state(CPU),
                           "progress": {"experiences_done": 1}})
    strategy.train(bm.train_stream[1])
    uninterrupted = _accuracy_and_loss(strategy.eval(bm.test_stream))

    torch.manual_seed(123)  # the resumed run's own draws must not matter
    state = load_checkpoint(path)
    resumed_model = build_model(kind)
    load_model_state(resumed_model, state["model"])
    resumed = run_strategy(resumed_model)
    resumed.optimized_param_id = restore_optimizer(resumed.optimizer, resumed_model,
                                                   state["optimizer"])
    load_plugin_states(resumed.plugins, state["plugins"], resumed_model)
    set_rng_state(state["rng"], CPU)
    resumed.train(bm.train_stream[1])
    assert _accuracy_and_loss(resumed.eval(bm.test_stream)) == uninterrupted


# -- the flat-input architecture key


@pytest.mark.parametrize("model_class", [MixtureOfExperts, RoutedMixture, SingleExpertModel])
def test_flat_architecture_key_sizes_an_mlp_from_input_size_and_num_classes(model_class):
    options = {"router": RouterOptions(feature="pixels")} if model_class is RoutedMixture else {}
    model = model_class(architecture="mlp", input_size=FEATURES, num_classes=CLASSES, **options)
    assert model.architecture.input_shape == (FEATURES,)
    assert model.num_classes == CLASSES
    assert model(torch.randn(3, FEATURES)).shape == (3, CLASSES)
    shaped = model_class(architecture="mlp", input_size=(1, 2, 3), num_classes=CLASSES,
                         **options)
    assert shaped(torch.randn(3, 1, 2, 3)).shape == (3, CLASSES)
    with pytest.raises(ValueError, match="input_size and num_classes"):
        model_class(architecture="mlp", input_size=FEATURES, **options)
    with pytest.raises(ValueError, match="only architecture 'mlp'"):
        model_class(architecture="fmnist", num_classes=CLASSES, **options)


def test_flat_architecture_key_trains_on_a_remapped_nc_benchmark():
    torch.manual_seed(0)
    bm = make_benchmark("nc_remapped")
    model = MixtureOfExperts(architecture="mlp", input_size=FEATURES, num_classes=CLASSES,
                             num_experts=2)
    strategy = moe(model, fast=True, train_epochs=3)
    strategy.train(bm.train_stream[0])
    assert stream_accuracy(strategy.eval(bm.test_stream[:1])) > 0.8
