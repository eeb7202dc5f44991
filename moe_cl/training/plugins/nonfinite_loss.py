"""A guard that stops training on a NaN or infinite loss before it reaches the weights."""

from __future__ import annotations

import math

from avalanche.core import SupervisedPlugin

from moe_cl.errors import NonFiniteLossError


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
