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

from moe_cl.training.options import ExpertPolicy

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import nn

    from moe_cl.core.zoo import Architecture
    from moe_cl.data.streams import BenchmarkBundle

# (cfg, common, bundle) -> an Avalanche strategy; ``common`` holds the keyword arguments every
# strategy takes: model, optimizer, train_mb_size, train_epochs, eval_mb_size, device, plugins,
# evaluator.
StrategyBuilder = Callable[["DictConfig", dict[str, Any], "BenchmarkBundle"], Any]
ModelBuilder = Callable[["DictConfig", "Architecture"], "nn.Module"]


def _mixture_arguments(cfg: DictConfig, architecture: Architecture) -> dict[str, Any]:
    return dict(architecture=architecture, gate=cfg.model.gate,
                num_experts=cfg.model.num_experts, output=cfg.model.output,
                policy=ExpertPolicy(**cfg.experts), scenario=cfg.scenario)


def mixture_model(cfg: DictConfig, architecture: Architecture) -> nn.Module:
    from moe_cl.training.models import MixtureOfExperts

    return MixtureOfExperts(**_mixture_arguments(cfg, architecture))


def routed_mixture_model(cfg: DictConfig, architecture: Architecture) -> nn.Module:
    from moe_cl.training.options import RouterOptions
    from moe_cl.training.routed import RoutedMixture

    return RoutedMixture(**_mixture_arguments(cfg, architecture),
                         router=RouterOptions(**cfg.router))


def routed_problem(cfg: DictConfig) -> str | None:
    """What a routed mixture needs: growth, and a cap that leaves room for one experience."""
    if cfg.experts.policy != "grow":
        return (f"method={cfg.method} adds or reuses experts for every experience: "
                f"experts.policy must be grow, got {cfg.experts.policy}")
    needed = max(cfg.model.num_experts, cfg.experts.per_experience)
    if cfg.experts.max and cfg.experts.max < needed:
        return (f"experts.max={cfg.experts.max} is below the experts one experience needs "
                f"({needed}: model.num_experts and experts.per_experience)")
    return None


# The one network of the single-model methods (model.backbone): the single expert, or the gate
# network as a classifier (about the mixture's parameters: baselines.GateClassifier).
BACKBONES = ("expert", "gate")


def single_expert_model(cfg: DictConfig, architecture: Architecture) -> nn.Module:
    from moe_cl.training.models import SingleExpertModel

    if cfg.model.backbone == "gate":
        from moe_cl.training.baselines import GateClassifier

        return GateClassifier(architecture=architecture, scenario=cfg.scenario)
    return SingleExpertModel(architecture=architecture, scenario=cfg.scenario)


def slda_model(cfg: DictConfig, architecture: Architecture) -> nn.Module:
    from moe_cl.training.baselines import SLDAClassifier

    return SLDAClassifier(architecture=architecture, features=cfg.slda.features,
                          shrinkage=cfg.slda.shrinkage, scenario=cfg.scenario)


def slda_problem(cfg: DictConfig) -> str | None:
    """Avalanche weighs the covariance by 1 - shrinkage: above 1 it is no covariance."""
    if not cfg.slda.shrinkage <= 1:
        return f"slda.shrinkage must be in (0, 1], got {cfg.slda.shrinkage}"
    return None


@dataclass(frozen=True)
class Method:
    """One way to train a model on the stream.

    ``keys``: the configuration keys (dotted prefixes) this method reads and methods that do not
    list them ignore. ``mixture``: its model is a :class:`~moe_cl.training.models.MixtureOfExperts`
    (routing metrics, distillation, the mixture's weight-decay rule). ``joint``: it trains once,
    on all experiences together. ``build_model``: only where the model is neither the mixture
    nor the single expert. ``check``: the method's own conditions on a configuration, returning
    what is wrong (one line) or None. ``backward``: it trains by backward passes, so a NaN-loss
    guard has something to watch (not SLDA, whose Avalanche strategy also warns about plugins
    with backward hooks).
    """

    name: str
    description: str
    build_strategy: StrategyBuilder
    keys: tuple[str, ...] = ()
    mixture: bool = False
    joint: bool = False
    build_model: ModelBuilder | None = None
    check: Callable[[DictConfig], str | None] | None = None
    backward: bool = True

    def problem(self, cfg: DictConfig) -> str | None:
        return self.check(cfg) if self.check is not None else None

    def make_model(self, cfg: DictConfig, architecture: Architecture) -> nn.Module:
        build = self.build_model or (mixture_model if self.mixture else single_expert_model)
        return build(cfg, architecture)


# ----------------------------------------------------------------------------- strategies


def moe_strategy(cfg: DictConfig, common: dict[str, Any], bundle: BenchmarkBundle):
    from avalanche.training.plugins import ReplayPlugin

    from moe_cl.training.plugins import ImportanceRegularizer, SampleSimilarityRegularizer

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
    return mixture_strategy(cfg, {**common, "plugins": plugins}, bundle)


def mixture_strategy(cfg: DictConfig, common: dict[str, Any], bundle: BenchmarkBundle):
    """MoEStrategy with the configuration's data path, inference and arithmetic, and the
    plugins in ``common`` alone (a distilled gate's training adds no regulariser)."""
    from moe_cl.training.strategies import MoEStrategy

    return MoEStrategy(**common, batch_augment=bundle.batch_augment,
                       fast_data=cfg.train.fast_data, eval_top_k=cfg.eval.top_k,
                       precision=cfg.train.precision, compile_model=cfg.train.compile)


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


def si_strategy(cfg: DictConfig, common: dict[str, Any], bundle: BenchmarkBundle):
    from avalanche.training import Naive

    from moe_cl.training.baselines import SynapticIntelligenceFixed

    plugins = [*common["plugins"], SynapticIntelligenceFixed(si_lambda=cfg.baseline.si_lambda)]
    return Naive(**{**common, "plugins": plugins}, criterion=_log_likelihood())


def slda_strategy(cfg: DictConfig, common: dict[str, Any], bundle: BenchmarkBundle):
    """No backward pass (the gate trunk's training checks its own loss)."""
    from moe_cl.training.baselines import BatchedStreamingLDA

    rest = {k: v for k, v in common.items() if k not in ("model", "optimizer")}
    return BatchedStreamingLDA(slda_model=common["model"], criterion=_log_likelihood(),
                               feature_optimizer=common["optimizer"],
                               feature_epochs=cfg.train.epochs, **rest)


# ----------------------------------------------------------------------------- the registry

BACKBONE = "on the single-expert backbone (model.backbone=gate: the gate network)"
SINGLE_MODEL_KEYS = ("model.backbone",)
MIXTURE_KEYS = ("model.num_experts", "model.gate", "model.output", "regularizer.", "replay.",
                "train.precision", "train.compile")
# The expert policy's keys; the cap and the reuse distillation are the routed mixture's alone.
ROUTED_EXPERT_KEYS = ("experts.max", "experts.reuse_distillation")
EXPERT_KEYS = tuple(f"experts.{name}" for name in ExpertPolicy.__dataclass_fields__
                    if f"experts.{name}" not in ROUTED_EXPERT_KEYS)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("moe", "a mixture of experts (MoEStrategy): gate, expert policy, L_importance, L_s, "
           "replay, distillation", moe_strategy, mixture=True,
           keys=(*MIXTURE_KEYS, *EXPERT_KEYS, "distill.", "eval.top_k")),
    Method("routed", "a mixture whose routing cannot forget (training/routed.py): class statistics "
           "in a frozen feature space pick the experience, the gate picks among its experts; "
           "experts per experience, frozen after it, reused past experts.max",
           moe_strategy, mixture=True, build_model=routed_mixture_model, check=routed_problem,
           keys=(*MIXTURE_KEYS, "experts.policy", "experts.per_experience", "experts.init",
                 "experts.probe_samples", *ROUTED_EXPERT_KEYS, "router.")),
    Method("naive", f"Avalanche Naive (fine-tuning) {BACKBONE}: the lower bound", naive_strategy,
           keys=SINGLE_MODEL_KEYS),
    Method("ewc", f"Avalanche EWC {BACKBONE}", ewc_strategy,
           keys=("baseline.ewc_lambda", *SINGLE_MODEL_KEYS)),
    Method("lwf", f"Avalanche LwF (distillation from the previous model) {BACKBONE}",
           lwf_strategy, keys=("baseline.lwf_alpha", "baseline.lwf_temperature",
                               *SINGLE_MODEL_KEYS)),
    Method("replay", f"Avalanche Replay (experience-balanced reservoir buffer) {BACKBONE}",
           replay_strategy, keys=("replay.", *SINGLE_MODEL_KEYS)),
    Method("joint", f"Avalanche JointTraining on all experiences at once {BACKBONE}: the "
           "offline upper bound", joint_strategy, joint=True, keys=SINGLE_MODEL_KEYS),
    Method("si", f"Avalanche Synaptic Intelligence {BACKBONE}, its CPU snapshot bug fixed",
           si_strategy, keys=("baseline.si_lambda", *SINGLE_MODEL_KEYS)),
    Method("slda", "Avalanche StreamingLDA, fitted a batch at a time, on frozen features "
           "(slda.features: pixels, the router's random conv, or the gate trunk trained on the "
           "first experience); no sample kept", slda_strategy, build_model=slda_model,
           check=slda_problem, keys=("slda.",), backward=False),
)}


def key_applies(method: str, key: str) -> bool:
    """Whether ``method`` reads the configuration key ``key`` (a dotted name): keys that no
    method lists apply to all."""
    owners = [m.name for m in METHODS.values() if key.startswith(m.keys)]
    return not owners or method in owners
