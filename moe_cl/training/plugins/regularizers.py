"""The paper's routing regularisers as Avalanche plugins: L_importance and L_s.

They keep the routing of the training forward pass (``model.last_output``, read in
``after_forward``) and add their term to ``strategy.loss`` before the backward pass, so they
work with any Avalanche strategy whose model is a :class:`~moe_cl.training.models.MixtureOfExperts`,
next to Avalanche's own plugins, including those that run the model again in between (LwF runs
a multi-task model once more, with other routing, in its own ``before_backward``).

Under torchrun (:mod:`moe_cl.training.ranks`) each rank holds a shard of the batch; the
regularisers are batch statistics (L_s is pairwise over the batch), so they read the whole
batch: the gate gathered from every rank with gradients, and the whole batch's inputs.
"""

from __future__ import annotations

from collections.abc import Callable

from avalanche.core import SupervisedPlugin
from torch import Tensor

from moe_cl.core.losses import Scaling, importance_loss, pairwise_distances, sample_similarity_loss
from moe_cl.training.models import routing_output


class RoutingRegularizer(SupervisedPlugin, supports_distributed=True):
    """Keeps the gate of the training forward pass for a term added before the backward."""

    def __init__(self) -> None:
        super().__init__()
        self._gate: Tensor | None = None

    def after_forward(self, strategy, **kwargs) -> None:
        self._gate = routing_output(strategy.model).gate

    def training_gate(self, strategy) -> Tensor:
        """g(x) of the current training mini-batch (released for the next iteration); the
        model's last routing for templates that skip ``after_forward``. Under torchrun, the
        whole batch's, gathered from every rank with gradients."""
        gate, self._gate = self._gate, None
        gate = routing_output(strategy.model).gate if gate is None else gate
        whole_batch = getattr(strategy, "whole_batch", None)
        return gate if whole_batch is None else whole_batch(gate)


class ImportanceRegularizer(RoutingRegularizer, supports_distributed=True):
    """Adds L_importance = w * CV(sum_n g(x_n))^2 (Shazeer et al. 2017)."""

    def __init__(self, *, weight: float) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"regularizer.importance must be >= 0, got {weight}")
        self.weight = weight

    def before_backward(self, strategy, **kwargs) -> None:
        strategy.loss = strategy.loss + importance_loss(self.training_gate(strategy), self.weight)


class SampleSimilarityRegularizer(RoutingRegularizer, supports_distributed=True):
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
        self.beta_s, self.beta_d = beta_s, beta_d
        self.scaling = scaling
        self.normalize_max = normalize_max
        self.features = features

    def before_backward(self, strategy, **kwargs) -> None:
        gate = self.training_gate(strategy)
        inputs = getattr(strategy, "whole_batch_inputs", None)  # the batch of every rank
        distances = pairwise_distances(
            strategy.mb_x if inputs is None else inputs, normalize_max=self.normalize_max,
            features=self.features,
        )
        strategy.loss = strategy.loss + sample_similarity_loss(
            gate, distances, beta_s=self.beta_s, beta_d=self.beta_d, scaling=self.scaling
        )
