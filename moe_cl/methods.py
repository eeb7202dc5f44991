"""The training methods, each declared once: name, description, the keys it reads, its model
and its strategy.

Everything that names methods reads :data:`METHODS`: the configuration (``method=`` choices;
which keys a method reads, so that a key set for a method that ignores it is a usage error),
``python -m moe_cl.run --help``, the baselines of ``python -m moe_cl.compare`` and the
experiment's builders. Adding a method is one entry in :data:`METHODS`; a strategy preset
``strategies/NAME.yaml`` holding its hyperparameters offers it as ``strategy=NAME`` and in the
comparison.

This module is read before anything trains (``--help``, usage errors), so it imports neither
torch nor Avalanche: each builder imports what it builds inside itself, and only a run that
trains pays for those imports. Keep it that way when adding a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import nn

    from moe_cl.benchmarks import BenchmarkBundle
    from moe_cl.core.zoo import Architecture

# (cfg, common, bundle) -> an Avalanche strategy; ``common`` holds the keyword arguments every
# strategy takes: model, optimizer, train_mb_size, train_epochs, eval_mb_size, device, plugins,
# evaluator.
StrategyBuilder = Callable[["DictConfig", dict[str, Any], "BenchmarkBundle"], Any]
ModelBuilder = Callable[["DictConfig", "Architecture"], "nn.Module"]


def mixture_model(cfg: DictConfig, architecture: Architecture) -> nn.Module:
    from moe_cl.model_options import ExpertPolicy
    from moe_cl.models import MixtureOfExperts

    return MixtureOfExperts(architecture=architecture, gate=cfg.model.gate,
                            num_experts=cfg.model.num_experts, output=cfg.model.output,
                            policy=ExpertPolicy(**cfg.experts), scenario=cfg.scenario)


def single_expert_model(cfg: DictConfig, architecture: Architecture) -> nn.Module:
    from moe_cl.models import SingleExpertModel

    return SingleExpertModel(architecture=architecture, scenario=cfg.scenario)


@dataclass(frozen=True)
class Method:
    """One way to train a model on the stream.

    ``keys``: the configuration keys (dotted prefixes) this method reads and methods that do not
    list them ignore. ``mixture``: its model is a :class:`~moe_cl.models.MixtureOfExperts`
    (routing metrics, distillation, the mixture's weight-decay rule). ``joint``: it trains once,
    on all experiences together. ``build_model``: only where the model is neither the mixture
    nor the single expert.
    """

    name: str
    description: str
    build_strategy: StrategyBuilder
    keys: tuple[str, ...] = ()
    mixture: bool = False
    joint: bool = False
    build_model: ModelBuilder | None = None

    def make_model(self, cfg: DictConfig, architecture: Architecture) -> nn.Module:
        build = self.build_model or (mixture_model if self.mixture else single_expert_model)
        return build(cfg, architecture)


# ----------------------------------------------------------------------------- strategies


def moe_strategy(cfg: DictConfig, common: dict[str, Any], bundle: BenchmarkBundle):
    from avalanche.training.plugins import ReplayPlugin

    from moe_cl.plugins import ImportanceRegularizer, SampleSimilarityRegularizer
    from moe_cl.strategies import MoEStrategy

    plugins = list(common["plugins"])
    if cfg.regularizer.importance > 0:
        plugins.append(ImportanceRegularizer(weight=cfg.regularizer.importance))
    ls = cfg.regularizer.ls
    if ls.beta_s > 0 or ls.beta_d > 0:
        plugins.append(SampleSimilarityRegularizer(beta_s=ls.beta_s, beta_d=ls.beta_d,
                                                   scaling=ls.scaling,
                                                   normalize_max=ls.normalize_max))
    if cfg.replay.mem_size > 0:
        plugins.append(ReplayPlugin(mem_size=cfg.replay.mem_size))
    return MoEStrategy(**{**common, "plugins": plugins}, batch_augment=bundle.batch_augment,
                       fast_data=cfg.train.fast_data, eval_top_k=cfg.eval.top_k)


def _log_likelihood():
    """The baselines' criterion: the models return log-probabilities."""
    from torch.nn import NLLLoss

    return NLLLoss()


def naive_strategy(cfg: DictConfig, common: dict[str, Any], bundle: BenchmarkBundle):
    from avalanche.training import Naive

    return Naive(**common, criterion=_log_likelihood())


def ewc_strategy(cfg: DictConfig, common: dict[str, Any], bundle: BenchmarkBundle):
    from avalanche.training import EWC

    return EWC(**common, criterion=_log_likelihood(), ewc_lambda=cfg.baseline.ewc_lambda)


def lwf_strategy(cfg: DictConfig, common: dict[str, Any], bundle: BenchmarkBundle):
    from avalanche.training import LwF

    return LwF(**common, criterion=_log_likelihood(), alpha=cfg.baseline.lwf_alpha,
               temperature=cfg.baseline.lwf_temperature)


def replay_strategy(cfg: DictConfig, common: dict[str, Any], bundle: BenchmarkBundle):
    from avalanche.training import Replay

    return Replay(**common, criterion=_log_likelihood(), mem_size=max(cfg.replay.mem_size, 1))


def joint_strategy(cfg: DictConfig, common: dict[str, Any], bundle: BenchmarkBundle):
    from avalanche.training import JointTraining

    return JointTraining(**common, criterion=_log_likelihood())


# ----------------------------------------------------------------------------- the registry

BACKBONE = "on the single-expert backbone"
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("moe", "a mixture of experts (MoEStrategy): gate, expert policy, L_importance, L_s, "
           "replay, distillation", moe_strategy, mixture=True,
           keys=("model.num_experts", "model.gate", "model.output", "experts.", "regularizer.",
                 "distill.", "eval.top_k", "replay.")),
    Method("naive", f"Avalanche Naive (fine-tuning) {BACKBONE}: the lower bound", naive_strategy),
    Method("ewc", f"Avalanche EWC {BACKBONE}", ewc_strategy, keys=("baseline.ewc_lambda",)),
    Method("lwf", f"Avalanche LwF (distillation from the previous model) {BACKBONE}",
           lwf_strategy, keys=("baseline.lwf_alpha", "baseline.lwf_temperature")),
    Method("replay", f"Avalanche Replay (experience-balanced reservoir buffer) {BACKBONE}",
           replay_strategy, keys=("replay.",)),
    Method("joint", f"Avalanche JointTraining on all experiences at once {BACKBONE}: the "
           "offline upper bound", joint_strategy, joint=True),
)}


def key_applies(method: str, key: str) -> bool:
    """Whether ``method`` reads the configuration key ``key`` (a dotted name): keys that no
    method lists apply to all."""
    owners = [m.name for m in METHODS.values() if key.startswith(m.keys)]
    return not owners or method in owners
