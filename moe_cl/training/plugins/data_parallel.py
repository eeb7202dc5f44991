"""What keeps the ranks of a torchrun one model: gradients, weights, random state, statistics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics.mean import Mean
from torch import nn

from moe_cl.data.tensors import TensorBatches
from moe_cl.errors import AgreedFailure, NonFiniteLossError
from moe_cl.training.plugins.nonfinite_loss import training_position

if TYPE_CHECKING:
    from moe_cl.training.ranks import Ranks


class DataParallel(SupervisedPlugin, supports_distributed=True):
    """Keeps the ranks of :class:`~moe_cl.training.strategies.MoEStrategy` one model: the same
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
        has none), which ranks had one, and the ranks' non-finite losses; all of it is built
        on the device and read back in one transfer per step."""
        ranks = self.ranks
        params = [p for p in strategy.model.parameters() if p.requires_grad]
        device = strategy.loss.device
        loss = strategy.loss.detach().reshape(())
        losses = torch.zeros(ranks.world_size, device=device)
        losses[ranks.rank] = torch.where(torch.isfinite(loss), 0.0, loss)  # 0: finite
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                            device=device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        ranks.sum_([*grads, used, losses])
        flags = torch.cat([losses, used]).tolist()  # the step's one read from the device
        bad = [(r, v) for r, v in enumerate(flags[:ranks.world_size]) if v != 0]
        if bad:
            error = NonFiniteLossError(
                f"loss is {bad[0][1]} on rank {bad[0][0]} of {ranks.world_size} at "
                f"{training_position(strategy)}")
            error.every_rank = True
            raise error
        for param, grad, had in zip(params, grads, flags[ranks.world_size:], strict=True):
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
