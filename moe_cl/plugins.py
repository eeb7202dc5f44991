"""Avalanche plugins: the paper's routing regularisers, a guard against NaN losses, the
reference code's measure of the training error, and what keeps the ranks of a torchrun one run.

The regularisers keep the routing of the training forward pass (``model.last_output``, read
in ``after_forward``) and add their term to ``strategy.loss`` before the backward pass, so they
work with any Avalanche strategy whose model is a :class:`~moe_cl.models.MixtureOfExperts`,
next to Avalanche's own plugins, including those that run the model again in between (LwF runs
a multi-task model once more, with other routing, in its own ``before_backward``).

Under torchrun (:mod:`moe_cl.distributed`) each rank holds a shard of the batch; the
regularisers are batch statistics (L_s is pairwise over the batch), so they read the whole
batch: the gate gathered from every rank with gradients, and the whole batch's inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics.mean import Mean
from torch import Tensor, nn

from moe_cl.core.losses import Scaling, importance_loss, pairwise_distances, sample_similarity_loss
from moe_cl.data import TensorBatches
from moe_cl.distributed import AgreedFailure
from moe_cl.models import routing_output
from moe_cl.run_folder import NON_FINITE_LOSS

if TYPE_CHECKING:
    from moe_cl.distributed import Ranks


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


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""

    exit_code = NON_FINITE_LOSS


class NonFiniteLossGuard(SupervisedPlugin):
    """Stops training on a NaN or infinite loss, naming the experience and iteration, before
    the bad gradient reaches the weights."""

    def before_backward(self, strategy, **kwargs) -> None:
        value = float(strategy.loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} at {training_position(strategy)}")


def training_position(strategy) -> str:
    """Where training is: experience, epoch and iteration (for error messages)."""
    return (f"training experience {strategy.experience.current_experience}, epoch "
            f"{strategy.clock.train_exp_epochs}, iteration {strategy.clock.train_epoch_iterations}")


class ReferenceTrainError(SupervisedPlugin, supports_distributed=True):
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
        wrong, seen = self._wrong, self._seen
        ranks = getattr(strategy, "ranks", None)
        if ranks is not None:  # torchrun: every rank counted its shard
            wrong, seen = ranks.sum_numbers(wrong, seen)
        if seen:
            self.last_epoch_error = float(wrong) / seen


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


class DataParallel(SupervisedPlugin, supports_distributed=True):
    """Keeps the ranks of :class:`~moe_cl.strategies.MoEStrategy` one model: the same
    structure and weights at each experience's start, the same random state at each epoch's
    start, gradients summed over the ranks after each backward pass (with the NaN-loss check of
    every rank), SyncBatchNorm on GPUs, the training epoch's metrics summed over the ranks and
    rank 0's buffers at each epoch's and experience's end."""

    def __init__(self, ranks: Ranks) -> None:
        super().__init__()
        self.ranks = ranks

    def before_training_exp(self, strategy, **kwargs) -> None:
        if not isinstance(strategy.dataloader, TensorBatches):
            error = ValueError("under torchrun the training data must take the fast data path "
                               "(train.fast_data=true, no replay, data without per-sample "
                               "transforms)")
            error.every_rank = True  # every rank finds the same
            raise error
        model = strategy.model
        self._check_same_structure(model, strategy.experience.current_experience)
        if self.ranks.device.type == "cuda":
            _synchronise_batch_norm(model, self.ranks.group)
        self.ranks.broadcast_([*model.parameters(), *model.buffers()])

    def _check_same_structure(self, model: nn.Module, experience: int) -> None:
        """The ranks' models after adaptation: the same tensors (names, shapes, trainable)."""
        structure = [(name, tuple(t.shape), t.requires_grad) for name, t in
                     [*model.named_parameters(), *model.named_buffers()]]
        structures = self.ranks.gather(structure)
        differing = [r for r, s in enumerate(structures) if s != structures[0]]
        if differing:
            raise AgreedFailure(f"the ranks' models differ after adapting to experience "
                                f"{experience} (ranks {differing} against rank 0): their "
                                "growth decisions differ", 1)

    def before_training_epoch(self, strategy, **kwargs) -> None:
        self.ranks.same_random_state()

    def after_backward(self, strategy, **kwargs) -> None:
        """One all-reduce carries every trainable parameter's gradient (zeros where a rank
        has none), which ranks had one, and the ranks' non-finite losses."""
        ranks = self.ranks
        params = [p for p in strategy.model.parameters() if p.requires_grad]
        device = strategy.loss.device
        loss = float(strategy.loss.detach())
        losses = torch.zeros(ranks.world_size, device=device)
        if not math.isfinite(loss):
            losses[ranks.rank] = loss
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                            device=device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        ranks.sum_([*grads, used, losses])
        bad = [(r, v) for r, v in enumerate(losses.tolist()) if v != 0]
        if bad:
            error = NonFiniteLossError(
                f"loss is {bad[0][1]} on rank {bad[0][0]} of {ranks.world_size} at "
                f"{training_position(strategy)}")
            error.every_rank = True
            raise error
        for param, grad, had in zip(params, grads, used.tolist(), strict=True):
            param.grad = grad if had else None

    def after_training_epoch(self, strategy, **kwargs) -> None:
        _sum_epoch_metrics(strategy, self.ranks)
        self.ranks.broadcast_(list(strategy.model.buffers()))

    def after_training(self, strategy, **kwargs) -> None:
        # after every plugin's after_training_exp: a routed mixture's router statistics too
        self.ranks.broadcast_(list(strategy.model.buffers()))


def _synchronise_batch_norm(model: nn.Module, group) -> None:
    """Every BatchNorm layer (added by growth, too) as SyncBatchNorm: the same parameters and
    buffers (so names, optimiser state and checkpoints stay), statistics over the whole
    batch."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if (isinstance(child, nn.modules.batchnorm._BatchNorm)
                    and not isinstance(child, nn.SyncBatchNorm)):
                setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child, group))


def _sum_epoch_metrics(strategy, ranks: Ranks) -> None:
    """The training epoch's metrics of Avalanche's evaluator (accuracy, loss: weighted means)
    summed over the ranks before they are emitted: the whole epoch's values."""
    means = []
    for metric in strategy.evaluator.metrics:
        if getattr(metric, "_mode", None) != "train" or getattr(metric, "_emit_at", "") != "epoch":
            continue
        for part in vars(getattr(metric, "_metric", None) or object()).values():
            if isinstance(part, Mean):
                means.append(part)
            elif isinstance(part, dict):
                means += [m for _, m in sorted(part.items()) if isinstance(m, Mean)]
    if not means:
        return
    sums = ranks.sum_numbers(*[m.summed for m in means], *[m.weight for m in means])
    for mean, summed, weight in zip(means, sums[: len(means)], sums[len(means):], strict=True):
        mean.summed, mean.weight = summed, weight


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
