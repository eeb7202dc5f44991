"""From a resolved configuration to the pieces of a run: seed, device, stream, architecture,
model, optimizer, evaluator and strategy. The command line, the suites and the benchmarks all
build through these functions, so a configuration means the same thing everywhere."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin
from omegaconf import DictConfig

from moe_cl.core.zoo import Architecture, get_architecture, mlp_architecture
from moe_cl.data.datasets import dataset_of
from moe_cl.data.streams import BenchmarkBundle, make_benchmark
from moe_cl.training.evaluation import MetricsCSVLogger, RoutingMetrics, TaskAwareAccuracy
from moe_cl.training.methods import METHODS
from moe_cl.training.plugins import training_plugins
from moe_cl.training.precision import cuda_device_problem

if TYPE_CHECKING:
    from moe_cl.training.ranks import Ranks


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = cuda_device_problem(name)
    if problem:
        raise ValueError(problem)
    return torch.device(name)


def build_benchmark(cfg: DictConfig) -> BenchmarkBundle:
    extra = {k: cfg.data[k] for k in ("max_train_samples", "max_test_samples")
             if cfg.data[k] is not None}
    return make_benchmark(cfg.data.stream, n_experiences=cfg.data.n_experiences,
                          scenario=cfg.scenario, seed=cfg.seed, data_root=cfg.data.root,
                          download=cfg.data.download, **extra)


def build_architecture(cfg: DictConfig, bundle: BenchmarkBundle) -> Architecture:
    name = cfg.model.architecture
    if name == "auto":
        name = dataset_of(bundle.name).architecture
    if name == "mlp":
        return mlp_architecture(bundle.input_shape, bundle.n_classes, width=cfg.model.mlp_width,
                                hidden=cfg.model.mlp_hidden, num_experts=cfg.model.num_experts)
    arch = get_architecture(name)
    if tuple(arch.input_shape) != tuple(bundle.input_shape) or arch.num_classes < bundle.n_classes:
        raise ValueError(
            f"model.architecture={name} expects inputs {arch.input_shape} and "
            f"{arch.num_classes} classes; benchmark {bundle.name} has {bundle.input_shape} and "
            f"{bundle.n_classes}"
        )
    return arch


def build_model(cfg: DictConfig, bundle: BenchmarkBundle) -> torch.nn.Module:
    return METHODS[cfg.method].make_model(cfg, build_architecture(cfg, bundle))


def weight_decay(cfg: DictConfig, model: torch.nn.Module) -> float:
    """The paper: 1e-3 for softmax-gate and single models on CIFAR-100, none otherwise."""
    if cfg.train.weight_decay != "auto":
        return float(cfg.train.weight_decay)
    arch = model.architecture.name
    softmax_or_single = not METHODS[cfg.method].mixture or cfg.model.gate == "softmax"
    return 1e-3 if arch.startswith("cifar100") and softmax_or_single else 0.0


def build_optimizer(cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # A model without parameters (SLDA on fixed features) gets an empty group: same checkpoints.
    params = list(model.parameters()) or [{"params": []}]
    return torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=weight_decay(cfg, model))


def build_evaluator(cfg: DictConfig, log_dir: Path | None, *, routing: bool,
                    logging: bool = True) -> EvaluationPlugin:
    """The run's metrics, and its loggers unless ``logging`` is false (the ranks but 0 of a
    torchrun: Avalanche's loggers refuse them)."""
    metrics = [
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True, experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        TaskAwareAccuracy(),
    ]
    if routing:
        metrics.append(RoutingMetrics(heatmaps=cfg.logging.tensorboard and log_dir is not None))
    if not logging:
        return EvaluationPlugin(*metrics, loggers=[])
    loggers: list = []
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        loggers.append(TextLogger(open(log_dir / "log.txt", "a")))  # noqa: SIM115
        if cfg.logging.csv:
            loggers += [CSVLogger(str(log_dir / "csv")), MetricsCSVLogger(log_dir / "metrics.csv")]
        if cfg.logging.tensorboard:
            loggers.append(TensorboardLogger(str(log_dir / "tensorboard")))
    if cfg.logging.interactive:
        loggers.append(InteractiveLogger())
    if not loggers:
        loggers.append(TextLogger(open("/dev/null", "w")))  # noqa: SIM115
    return EvaluationPlugin(*metrics, loggers=loggers)


def build_strategy(cfg: DictConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   evaluator: EvaluationPlugin, bundle: BenchmarkBundle, device: torch.device,
                   ranks: Ranks | None = None):
    """The method's strategy (see :func:`strategy_arguments`)."""
    common = strategy_arguments(cfg, model, optimizer, evaluator, device, ranks)
    return METHODS[cfg.method].build_strategy(cfg, common, bundle)


def strategy_arguments(cfg: DictConfig, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, evaluator: EvaluationPlugin,
                       device: torch.device, ranks: Ranks | None = None, *,
                       epochs: int | None = None) -> dict:
    """The keyword arguments every strategy of a run takes: the NaN-loss guard for methods
    with a backward pass (under torchrun, ``ranks``: mixture methods only, DataParallel checks
    every rank's loss instead), the reference's train error when train.reference_train_error is
    set, and MoEStrategy's ``ranks``."""
    guard = METHODS[cfg.method].backward and ranks is None
    common = dict(model=model, optimizer=optimizer, train_mb_size=cfg.train.batch_size,
                  train_epochs=cfg.train.epochs if epochs is None else epochs,
                  eval_mb_size=cfg.train.eval_batch_size, device=device, evaluator=evaluator,
                  plugins=training_plugins(
                      guard_losses=guard,
                      reference_train_error=cfg.train.reference_train_error))
    if ranks is not None:
        common["ranks"] = ranks
    return common


