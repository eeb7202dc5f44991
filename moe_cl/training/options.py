"""What the Avalanche models accept, as plain Python: scenarios, the expert policy, the router's
options and its feature spaces.

:class:`ExpertPolicy` is both the policy a :class:`~.models.MixtureOfExperts` follows and
the ``experts`` section of the run configuration (``experts.policy=grow``, ...). This module
imports nothing heavy, so the configuration and the command line can offer these choices without
importing torch or Avalanche; ``moe_cl.training.models`` takes them from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from torch import nn

Scenario = Literal["class", "task"]
PolicyKind = Literal["fixed", "grow", "grow_on_demand"]
ExpertInit = Literal["random", "copy"]

SCENARIOS: tuple[str, ...] = get_args(Scenario)
POLICIES: tuple[str, ...] = get_args(PolicyKind)
EXPERT_INITS: tuple[str, ...] = get_args(ExpertInit)


@dataclass
class ExpertPolicy:
    """How the pool of experts changes from one training experience to the next.

    ``policy``: ``fixed``: the initial experts are reused on every experience. ``grow``:
    ``per_experience`` experts are added at each experience after the first.
    ``grow_on_demand``: experts are added only when the pool fits the new experience poorly:
    on up to ``probe_samples`` samples of it, the mean over samples of the lowest cross-entropy
    of any single expert (nats, masked to the classes known after adding the experience's ones)
    must exceed ``threshold``.
    ``freeze_old``: when experts are added, the existing ones stop training.
    ``init``: how added experts start. ``random``: freshly initialised. ``copy``: as copies of
    the experts the gate sends most of the new experience's probe samples to (the busiest
    first), so that they start with the same routing score as their source instead of losing
    to a gate that has saturated on it; they then diverge by training.
    ``route_by_task`` (task-incremental only): a sample is routed only among the experts added
    for its task (the initial experts belong to the first task; a task that added none may use
    them all), so the gate cannot send a task to experts that never learnt it.
    ``max`` (routed mixtures; 0: no cap): once adding ``per_experience`` experts would pass it,
    an experience reuses the group of experts that separates its classes best instead, and
    fine-tunes it with ``reuse_distillation`` times the mean squared drift of its hidden
    features from a frozen copy added to the loss (SEED weighs the two terms 0.01 : 0.99).

    The fields are typed ``str`` where a ``Literal`` would do, so that the configuration
    reports a bad choice in its own words (``choose one of: ...``).
    """

    policy: str = "fixed"  # one of POLICIES
    per_experience: int = 1
    freeze_old: bool = False
    threshold: float = 1.0
    probe_samples: int = 256
    init: str = "random"  # one of EXPERT_INITS
    route_by_task: bool = False
    max: int = 0
    reuse_distillation: float = 99.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"experts.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.per_experience < 1:
            raise ValueError(f"experts.per_experience must be >= 1, got {self.per_experience}")
        if self.probe_samples < 1:
            raise ValueError(f"probe_samples must be >= 1, got {self.probe_samples}")
        if self.init not in EXPERT_INITS:
            raise ValueError(f"experts.init must be one of {EXPERT_INITS}, got {self.init!r}")
        if self.max < 0 or self.reuse_distillation < 0:
            raise ValueError("experts.max and experts.reuse_distillation must be >= 0")


RouterCombine = Literal["task", "product"]
ROUTER_COMBINES: tuple[str, ...] = get_args(RouterCombine)
ExpertsVote = Literal["none", "seed"]
EXPERTS_VOTES: tuple[str, ...] = get_args(ExpertsVote)
# Builds a feature space's frozen map for inputs of a shape, with the router's options; None:
# the model's gate network up to its first Flatten (``moe_cl.core.router.trunk_features``).
FeatureMapBuilder = Callable[[Sequence[int], "RouterOptions"], "nn.Module | None"]


def _pixels(input_shape: Sequence[int], options: RouterOptions) -> nn.Module:
    from moe_cl.core.router import PixelFeatures

    return PixelFeatures()


def _random_conv(input_shape: Sequence[int], options: RouterOptions) -> nn.Module:
    from moe_cl.core.router import RandomConvFeatures

    channels, *sides = input_shape
    if (min(sides) - options.kernel + 1) // options.pool < 1:
        raise ValueError(
            f"router.kernel={options.kernel} and router.pool={options.pool} leave no "
            f"features of {'x'.join(map(str, sides))} inputs; choose smaller ones")
    return RandomConvFeatures(channels, options.channels, options.kernel, options.pool,
                              options.seed)


def _gate_trunk(input_shape: Sequence[int], options: RouterOptions) -> None:
    return None  # the model's own gate network, trained on the first experience, then frozen


# The frozen feature spaces of a routed mixture's router (router.feature) and of SLDA
# (slda.features). Each builder imports torch inside itself, so that the configuration reads
# the names without it. Adding a feature space: one entry here (and its test).
FEATURE_SPACES: dict[str, FeatureMapBuilder] = {
    "pixels": _pixels,
    "random_conv": _random_conv,
    "gate_trunk": _gate_trunk,
}
ROUTER_FEATURES: tuple[str, ...] = tuple(FEATURE_SPACES)


@dataclass
class RouterOptions:
    """The router of a routed mixture (:mod:`.routed`): class statistics in a feature space
    fixed once, and how their posterior meets the experts.

    ``feature``: ``pixels``; ``random_conv`` (a frozen random convolution with ``channels``
    filters of size ``kernel``, max-pooled by ``pool``, then ReLU, drawn from ``seed``); or
    ``gate_trunk`` (the gate network's layers up to its first Flatten, frozen with the gate
    after the first experience). ``shrinkage`` is added to the covariance's diagonal.
    ``combine``: ``task``: p(y|x) = p(t(y)|x) p_mix(y|x, t(y)), the router choosing the experience
    and the experts the class; ``product``: p(y|x) ∝ p_router(y|x) p_mix(y|x, t(y))^expert_weight,
    the experts' evidence multiplied into the router's posterior.
    ``experts_vote``: ``none``; ``seed``: every expert group keeps class Gaussians in its hidden
    space (before the last ReLU) for each class from its experience on, and their tempered
    posteriors vote on the class across experiences before the mixture (SEED):
    log p(y|x) = log p_router(y|x) + vote_weight * log p_vote(y|x), the groups' softmax at
    ``vote_temperature`` averaged per class (:func:`moe_cl.core.experience_routing.seed_vote`).
    """

    feature: str = "random_conv"  # one of ROUTER_FEATURES
    channels: int = 96
    kernel: int = 5
    pool: int = 4
    seed: int = 0
    shrinkage: float = 1e-4
    combine: str = "product"  # one of ROUTER_COMBINES
    expert_weight: float = 1.0
    experts_vote: str = "none"  # one of EXPERTS_VOTES
    vote_temperature: float = 10.0
    vote_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.feature not in ROUTER_FEATURES:
            raise ValueError(f"router.feature must be one of {ROUTER_FEATURES}, "
                             f"got {self.feature!r}")
        if self.combine not in ROUTER_COMBINES:
            raise ValueError(f"router.combine must be one of {ROUTER_COMBINES}, "
                             f"got {self.combine!r}")
        if min(self.channels, self.kernel, self.pool) < 1 or not self.shrinkage > 0:
            raise ValueError("router.channels, kernel and pool must be >= 1 and router.shrinkage"
                             " > 0")
        if self.expert_weight < 0:
            raise ValueError(f"router.expert_weight must be >= 0, got {self.expert_weight}")
        if self.experts_vote not in EXPERTS_VOTES:
            raise ValueError(f"router.experts_vote must be one of {EXPERTS_VOTES}, "
                             f"got {self.experts_vote!r}")
        if not self.vote_temperature > 0 or self.vote_weight < 0:
            raise ValueError("router.vote_temperature must be > 0 and router.vote_weight >= 0")
