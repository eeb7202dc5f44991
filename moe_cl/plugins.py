"""Avalanche plugins: the paper's routing regularisers and a guard against NaN losses.

They read the routing of the forward pass that just ran (``model.last_output``) and add their
term to ``strategy.loss`` before the backward pass, so they work with any Avalanche strategy
whose model is a :class:`~moe_cl.models.MixtureOfExperts`, next to Avalanche's own plugins.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from avalanche.core import SupervisedPlugin
from torch import Tensor

from moe_cl.core.losses import Scaling, importance_loss, pairwise_distances, sample_similarity_loss
from moe_cl.models import routing_output


class ImportanceRegularizer(SupervisedPlugin):
    """Adds L_importance = w * CV(sum_n g(x_n))^2 (Shazeer et al. 2017)."""

    def __init__(self, *, weight: float) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"regularizer.importance must be >= 0, got {weight}")
        self.weight = weight

    def before_backward(self, strategy, **kwargs) -> None:
        strategy.loss = strategy.loss + importance_loss(
            routing_output(strategy.model).gate, self.weight
        )


class SampleSimilarityRegularizer(SupervisedPlugin):
    """Adds the paper's L_s: dissimilar samples should go to different experts.

    ``scaling="reference"`` reproduces the published numbers (only S_diff divided by B^2);
    ``normalize_max`` divides distances by their maximum; ``features`` maps inputs to the space
    where distances are measured (pixels by default).
    """

    def __init__(
        self,
        *,
        beta_s: float,
        beta_d: float,
        scaling: Scaling = "clean",
        normalize_max: bool = False,
        features: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("beta_s", beta_s), ("beta_d", beta_d)):
            if value < 0:
                raise ValueError(f"regularizer.ls.{name} must be >= 0, got {value}")
        self.beta_s = beta_s
        self.beta_d = beta_d
        self.scaling = scaling
        self.normalize_max = normalize_max
        self.features = features

    def before_backward(self, strategy, **kwargs) -> None:
        gate = routing_output(strategy.model).gate
        distances = pairwise_distances(
            strategy.mb_x, normalize_max=self.normalize_max, features=self.features
        )
        strategy.loss = strategy.loss + sample_similarity_loss(
            gate, distances, beta_s=self.beta_s, beta_d=self.beta_d, scaling=self.scaling
        )


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class NonFiniteLossGuard(SupervisedPlugin):
    """Stops training on a NaN or infinite loss, naming the experience and iteration, before
    the bad gradient reaches the weights."""

    def before_backward(self, strategy, **kwargs) -> None:
        value = float(strategy.loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss is {value} at training experience {strategy.experience.current_experience}"
                f", epoch {strategy.clock.train_exp_epochs}, iteration "
                f"{strategy.clock.train_epoch_iterations}"
            )
