"""The training error as the paper's reference code measures it (a no-grad forward after each
step), measured without changing the run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn


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


def reference_train_error(strategy) -> float | None:
    """The last epoch's reference train error measured in ``strategy``; None without the
    measurement."""
    measured = [p for p in strategy.plugins if isinstance(p, ReferenceTrainError)]
    return measured[-1].last_epoch_error if measured else None
