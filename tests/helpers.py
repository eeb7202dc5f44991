"""Small builders shared by the Avalanche-level tests."""

import io

import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
from avalanche.logging import TextLogger
from avalanche.training.plugins import EvaluationPlugin

from moe_cl.evaluation import RoutingMetrics


def quiet_evaluator(routing: bool = True) -> EvaluationPlugin:
    metrics = [
        accuracy_metrics(experience=True, stream=True),
        loss_metrics(stream=True),
        forgetting_metrics(experience=True),
    ]
    if routing:
        metrics.append(RoutingMetrics())
    return EvaluationPlugin(*metrics, loggers=[TextLogger(io.StringIO())])


def tensor_dataset(x: torch.Tensor, y: torch.Tensor):
    return _make_taskaware_tensor_classification_dataset(x, y, targets=y, task_labels=0)


def stream_from_tensors(train: list, test: list):
    """A benchmark whose experience i is train[i] = (x, y) (test likewise)."""
    bm = benchmark_from_datasets(
        train=[tensor_dataset(*t) for t in train], test=[tensor_dataset(*t) for t in test]
    )
    return with_task_labels(with_classes_timeline(bm))
