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

from moe_cl.training.evaluation import RoutingMetrics


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


def moe_strategy(model, *, epochs=4, plugins=(), evaluator=None, train_mb_size=32, **kwargs):
    """An MoEStrategy with the settings the Avalanche-level tests share."""
    from moe_cl.training.strategies import MoEStrategy

    return MoEStrategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
        train_mb_size=train_mb_size,
        train_epochs=epochs,
        eval_mb_size=256,
        plugins=list(plugins),
        evaluator=evaluator or quiet_evaluator(),
        **kwargs,
    )


def tiny(n_experiences=3, scenario="class", seed=0):
    """The tiny benchmark and a small mlp architecture for it."""
    from moe_cl.core.zoo import mlp_architecture
    from moe_cl.data.streams import make_benchmark

    bundle = make_benchmark("tiny", n_experiences=n_experiences, scenario=scenario, seed=seed)
    arch = mlp_architecture(bundle.input_shape, bundle.n_classes, width=32, hidden=16)
    return bundle, arch



def grown_task_mixture():
    """A task-incremental mixture grown on the first two of tiny's three tasks (an expert
    added per experience, the old ones frozen), a builder of fresh ones like it, and the data."""
    from moe_cl.training.models import ExpertPolicy, MixtureOfExperts

    torch.manual_seed(3)
    bundle, arch = tiny(3, scenario="task")
    policy = ExpertPolicy("grow", per_experience=1, freeze_old=True)

    def build():
        return MixtureOfExperts(architecture=arch, num_experts=2, scenario="task", policy=policy)

    model = build()
    strategy = moe_strategy(model, epochs=1)
    for exp in bundle.benchmark.train_stream[:2]:
        strategy.train(exp)
    return model, build, bundle


def one_error_line(capsys) -> str:
    """The one line a usage or run error prints (``error: ...``, no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
