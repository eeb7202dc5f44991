"""Timed training calls of the ``epoch``, ``memory`` and ``gpu`` sections: the paper streams
(real data when present, else random tensors of the real shapes), the attentive mixture, and
strategies that clock every epoch and log only accuracy, to a string."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.logging import TextLogger
from avalanche.training.plugins import EvaluationPlugin
from torch.utils.data import TensorDataset

from moe_cl.bench.harness import sync
from moe_cl.core.zoo import get_architecture
from moe_cl.data.datasets import dataset_of
from moe_cl.data.streams import DataError, make_benchmark
from moe_cl.training.models import MixtureOfExperts

FULL_SIZES = {"paper_fmnist": (60_000, 10_000), "paper_cifar100": (50_000, 10_000)}  # train, test


@dataclass
class EpochRun:
    """One training call: its whole wall time and each epoch's time and sample count."""

    total_s: float
    epoch_s: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)


class EpochClock(SupervisedPlugin):
    """Records every training epoch's wall time and number of samples."""

    def __init__(self, *, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.starts: list[float] = []
        self.run = EpochRun(0.0)

    def next_run(self) -> None:
        """Start a fresh record for the next ``train()`` call of the same strategy."""
        self.starts.clear()
        self.run = EpochRun(0.0)

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        sync(self.device)
        self.starts.append(time.perf_counter())
        self.run.samples.append(0)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.run.samples[-1] += len(strategy.mb_y)

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        sync(self.device)
        self.run.epoch_s.append(time.perf_counter() - self.starts[-1])


def quiet_evaluator() -> EvaluationPlugin:
    """Accuracy only, logged to a string: logging must not dominate what is timed."""
    return EvaluationPlugin(accuracy_metrics(stream=True), loggers=[TextLogger(io.StringIO())])


def synthetic_benchmark(
    n_train: int, n_test: int, shape: tuple[int, ...], n_classes: int, seed: int = 0,
    n_experiences: int = 1,
) -> Any:
    """Random tensors shaped like a real data set (when it is absent), in ``n_experiences``
    experiences of consecutive classes, made by the generator of the real streams, so that they
    are held and read like them."""
    g = torch.Generator().manual_seed(seed)

    def dataset(n: int) -> TensorDataset:
        x = torch.randn(n, *shape, generator=g)
        y = torch.randint(0, n_classes, (n,), generator=g)
        y[: min(n, n_classes)] = torch.arange(min(n, n_classes))  # every class present
        return TensorDataset(x, y)

    return nc_benchmark(dataset(n_train), dataset(n_test), n_experiences=n_experiences,
                        task_labels=False, shuffle=False,
                        fixed_class_order=list(range(n_classes)))


def paper_stream(
    name: str, data_root: str | Path, samples: int | None, synthetic: bool
) -> tuple[Any, str]:
    """(benchmark, source) of ``paper_fmnist``/``paper_cifar100``: real data when present,
    else random tensors of the real shapes. ``samples`` limits the training set (None: all)."""
    n_test = None if samples is None else max(samples // 6, 100)
    if not synthetic:
        try:
            bundle = make_benchmark(
                name, data_root=data_root, seed=0, max_train_samples=samples,
                max_test_samples=n_test,
            )
            n = len(bundle.benchmark.train_stream[0].dataset)
            return bundle.benchmark, f"real {name} ({n} training samples)"
        except DataError as error:
            reason = str(error).splitlines()[0]
        print(f"[bench] {name}: real data not found ({reason}); using synthetic tensors")
    full_train, full_test = FULL_SIZES[name]
    n_train = full_train if samples is None else samples
    arch = get_architecture(dataset_of(name).architecture)
    bm = synthetic_benchmark(n_train, n_test or full_test, arch.input_shape, arch.num_classes)
    return bm, f"synthetic {name}-shaped tensors ({n_train} training samples)"


def paper_model(architecture: str, num_experts: int, gate: str = "attentive") -> MixtureOfExperts:
    """The paper's mixture (attentive by default), with the same initial weights in every
    call."""
    torch.manual_seed(0)
    return MixtureOfExperts(architecture=architecture, gate=gate, num_experts=num_experts)


def timed_strategy(
    strategy_class: type, model: torch.nn.Module, *, epochs: int, batch: int,
    device: torch.device, plugins: Sequence[SupervisedPlugin] = (), **options: Any,
) -> tuple[Any, EpochClock]:
    """A quiet strategy (Adam lr 1e-3) with a per-epoch clock before ``plugins``; returns
    (strategy, clock)."""
    clock = EpochClock(device=device)
    strategy = strategy_class(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        train_mb_size=batch,
        train_epochs=epochs,
        eval_mb_size=1024,
        device=device,
        plugins=[clock, *plugins],
        evaluator=quiet_evaluator(),
        **options,
    )
    return strategy, clock


def timed_train(
    strategy: Any, experience: Any, clock: EpochClock, device: torch.device
) -> EpochRun:
    """``strategy.train(experience)``: the whole call and each epoch."""
    sync(device)
    start = time.perf_counter()
    strategy.train(experience)
    sync(device)
    clock.run.total_s = time.perf_counter() - start
    return clock.run
