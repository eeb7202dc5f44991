"""Avalanche plugins: the paper's routing regularisers, a guard against NaN losses and the
reference code's measure of the training error.

The regularisers keep the routing of the training forward pass (``model.last_output``, read
in ``after_forward``) and add their term to ``strategy.loss`` before the backward pass, so they
work with any Avalanche strategy whose model is a :class:`~moe_cl.models.MixtureOfExperts`,
next to Avalanche's own plugins, including those that run the model again in between (LwF runs
a multi-task model once more, with other routing, in its own ``before_backward``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from moe_cl.core.losses import Scaling, importance_loss, pairwise_distances, sample_similarity_loss
from moe_cl.models import routing_output
from moe_cl.run_folder import NON_FINITE_LOSS


class RoutingRegularizer(SupervisedPlugin):
    """Keeps the gate of the training forward pass for a term added before the backward."""

    def __init__(self) -> None:
        super().__init__()
        self._gate: Tensor | None = None

    def after_forward(self, strategy, **kwargs) -> None:
        self._gate = routing_output(strategy.model).gate

    def training_gate(self, strategy) -> Tensor:
        """g(x) of the current training mini-batch (released for the next iteration); the
        model's last routing for templates that skip ``after_forward``."""
        gate, self._gate = self._gate, None
        return routing_output(strategy.model).gate if gate is None else gate


class ImportanceRegularizer(RoutingRegularizer):
    """Adds L_importance = w * CV(sum_n g(x_n))^2 (Shazeer et al. 2017)."""

    def __init__(self, *, weight: float) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"regularizer.importance must be >= 0, got {weight}")
        self.weight = weight

    def before_backward(self, strategy, **kwargs) -> None:
        strategy.loss = strategy.loss + importance_loss(self.training_gate(strategy), self.weight)


class SampleSimilarityRegularizer(RoutingRegularizer):
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
        distances = pairwise_distances(
            strategy.mb_x, normalize_max=self.normalize_max, features=self.features
        )
        strategy.loss = strategy.loss + sample_similarity_loss(
            gate, distances, beta_s=self.beta_s, beta_d=self.beta_d, scaling=self.scaling
        )


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""

    exit_code = NON_FINITE_LOSS


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


class ReferenceTrainError(SupervisedPlugin):
    """The training error as the paper's reference code measures it: after each optimiser step,
    a second forward of the same (augmented) mini-batch without gradients; the errors averaged
    over the epoch's mini-batches, weighted by their sizes. ``last_epoch_error`` holds the
    last finished epoch's value (None before one).

    The second forward runs in train mode, as the spec's "second, no-grad forward" (the
    reference never switches to eval mode for it): BatchNorm normalises with the batch's own
    statistics and a stochastic output draws its expert. It changes nothing else: BatchNorm
    running statistics, the random number streams and the model's routing slot are put back,
    and the strategy's output, loss and metrics are not touched.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_epoch_error: float | None = None
        self._wrong: Tensor | int = 0  # on the device: no synchronisation per step
        self._seen = 0

    def before_training_epoch(self, strategy, **kwargs) -> None:
        self._wrong, self._seen = 0, 0

    def after_update(self, strategy, **kwargs) -> None:
        with torch.no_grad(), _measurement_only(strategy.model, strategy.mb_x.device):
            output = strategy.forward()
        self._wrong = self._wrong + (output.argmax(-1) != strategy.mb_y).sum()
        self._seen += len(strategy.mb_y)

    def after_training_epoch(self, strategy, **kwargs) -> None:
        if self._seen:
            self.last_epoch_error = float(self._wrong) / self._seen


_NO_SLOT = object()  # a model without a routing slot


@contextmanager
def _measurement_only(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Whatever a forward pass of ``model`` in train mode changes besides its output, restored
    on exit: running statistics of normalisation layers, the torch random streams (CPU and
    ``device``) and the routing slot of a mixture."""
    tracking = [buffer for module in model.modules()
                if module.training and getattr(module, "track_running_stats", False)
                for buffer in module.buffers(recurse=False)]
    saved = [buffer.clone() for buffer in tracking]
    routing = getattr(model, "last_output", _NO_SLOT)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        for buffer, value in zip(tracking, saved, strict=True):
            buffer.copy_(value)
        if routing is not _NO_SLOT:
            model.last_output = routing


def training_plugins(*, reference_train_error: bool) -> list[SupervisedPlugin]:
    """The plugins every training strategy of a run carries: the NaN-loss guard, and the
    reference's train error when asked for (it costs a forward per step)."""
    plugins: list[SupervisedPlugin] = [NonFiniteLossGuard()]
    if reference_train_error:
        plugins.append(ReferenceTrainError())
    return plugins


def reference_train_error(strategy) -> float | None:
    """The last epoch's reference train error measured in ``strategy``; None without the
    measurement."""
    measured = [p for p in strategy.plugins if isinstance(p, ReferenceTrainError)]
    return measured[-1].last_epoch_error if measured else None
