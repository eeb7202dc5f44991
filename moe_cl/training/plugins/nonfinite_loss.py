"""A guard that stops training on a NaN or infinite loss before it reaches the weights."""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin

from moe_cl.errors import NonFiniteLossError


class NonFiniteLossGuard(SupervisedPlugin):
    """Stops training on a NaN or infinite loss, naming the experience and iteration, before
    the bad gradient reaches the weights.

    It looks just before the optimiser's step, at the whole loss (the terms plugins add before
    the backward pass too): finiteness is tested on the device and read once per step, after
    the backward pass is queued, so the GPU is not left idle while the host launches it."""

    def before_update(self, strategy, **kwargs) -> None:
        loss = strategy.loss.detach()
        if not torch.isfinite(loss).all().item():
            raise NonFiniteLossError(f"loss is {float(loss)} at {training_position(strategy)}")


def training_position(strategy) -> str:
    """Where training is: experience, epoch and iteration (for error messages)."""
    return (f"training experience {strategy.experience.current_experience}, epoch "
            f"{strategy.clock.train_exp_epochs}, iteration {strategy.clock.train_epoch_iterations}")
