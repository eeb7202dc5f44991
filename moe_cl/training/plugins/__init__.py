"""Avalanche plugins of moe-cl, one concern per module: the routing regularisers, the NaN-loss
guard, the reference code's train error, and what keeps the ranks of a torchrun one model."""

from avalanche.core import SupervisedPlugin

from moe_cl.training.plugins.data_parallel import DataParallel
from moe_cl.training.plugins.nonfinite_loss import NonFiniteLossGuard, training_position
from moe_cl.training.plugins.reference_train_error import (
    ReferenceTrainError,
    reference_train_error,
)
from moe_cl.training.plugins.regularizers import (
    ImportanceRegularizer,
    RoutingRegularizer,
    SampleSimilarityRegularizer,
)

__all__ = [
    "DataParallel",
    "ImportanceRegularizer",
    "NonFiniteLossGuard",
    "ReferenceTrainError",
    "RoutingRegularizer",
    "SampleSimilarityRegularizer",
    "reference_train_error",
    "training_plugins",
    "training_position",
]


def training_plugins(*, guard_losses: bool, reference_train_error: bool) -> list[SupervisedPlugin]:
    """The plugins a run's training strategy carries: the NaN-loss guard where there is a loss
    to guard (not under torchrun, where DataParallel checks every rank's loss together), and
    the reference's train error when asked for (it costs a forward per step)."""
    plugins: list[SupervisedPlugin] = [NonFiniteLossGuard()] if guard_losses else []
    if reference_train_error:
        plugins.append(ReferenceTrainError())
    return plugins
