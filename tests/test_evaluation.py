"""Evaluation: routing metrics per experience and stream, task-aware accuracy, every scalar
metric in the CSV log."""

import io

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.logging import TextLogger
from avalanche.training.plugins import EvaluationPlugin

from moe_cl.training.evaluation import MetricsCSVLogger, RoutingMetrics, TaskAwareAccuracy
from moe_cl.training.models import MixtureOfExperts
from tests.helpers import moe_strategy, tiny


def _trained_mixture(*metrics):
    torch.manual_seed(0)
    bundle, arch = tiny(2)
    model = MixtureOfExperts(architecture=arch, num_experts=2)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), *metrics,
                                 loggers=[TextLogger(io.StringIO())])
    strategy = moe_strategy(model, epochs=2, evaluator=evaluator)
    strategy.train(bundle.benchmark.train_stream[0])
    return bundle, model, strategy


def test_routing_metrics_per_experience_and_stream():
    routing = RoutingMetrics(heatmaps=True)
    bundle, model, strategy = _trained_mixture(routing)
    results = strategy.eval(bundle.benchmark.test_stream)
    for name in ("H_s", "H_u", "MI", "MI_pred", "num_experts", "expert_usage"):
        for where in ("Exp000", "Exp001"):
            assert f"Routing_{name}/eval_phase/test_stream/{where}" in results, (name, where)
        assert f"Routing_{name}/eval_phase/test_stream" in results, name
    assert any(k.startswith("ExpertClassHeatmap") for k in results)
    stream = routing.last_stream_result
    assert stream["num_experts"] == 2 and len(stream["expert_usage"]) == 2
    assert 0 <= stream["H_u"] <= 1.0 + 1e-6 and 0 <= stream["error"] <= 1


def test_task_aware_accuracy_restricts_the_prediction_to_the_experience_classes():
    bundle, model, strategy = _trained_mixture(TaskAwareAccuracy())
    results = strategy.eval(bundle.benchmark.test_stream)
    model.eval()
    for j, experience in enumerate(bundle.benchmark.test_stream):
        x = torch.stack([experience.dataset[i][0] for i in range(len(experience.dataset))])
        y = torch.tensor([experience.dataset[i][1] for i in range(len(experience.dataset))])
        classes = torch.tensor(sorted(experience.classes_in_this_experience))
        with torch.no_grad():
            picked = classes[model(x)[:, classes].argmax(-1)]
        expected = float((picked == y).float().mean())
        name = f"TaskAwareAcc_Exp/eval_phase/test_stream/Exp{j:03d}"
        assert abs(results[name] - expected) < 1e-6
    # trained on experience 0 only: class-incremental accuracy on experience 1 is 0, task-aware
    # accuracy (the classes of experience 1 given) is not
    assert results["TaskAwareAcc_Exp/eval_phase/test_stream/Exp001"] > 0
    assert results["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001"] == 0


def test_the_csv_log_keeps_every_scalar_and_nothing_else(tmp_path):
    logger = MetricsCSVLogger(tmp_path / "logs" / "metrics.csv")
    for name, value in (("a", 0.5), ("b", 3), ("flag", True), ("usage", torch.ones(2))):
        logger.log_single_metric(name, value, 7)
    logger.close()
    lines = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    assert lines == ["metric,x,value", "a,7,0.5", "b,7,3"]
