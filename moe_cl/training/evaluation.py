"""Routing metrics as an Avalanche ``PluginMetric``, and a CSV logger for every scalar metric.

:class:`RoutingMetrics` reads the routing of each evaluation forward pass (no second pass) and
emits, per test experience and per stream: H_s, H_u, MI (true labels), MI_pred (class predicted
by the selected expert, as in the paper), the number of experts, expert usage and the expert x
class matrix. Avalanche's loggers record them like any metric. For a routed mixture whose expert
groups vote (``router.experts_vote``), the stream's result also counts what the vote changed
(:class:`VoteCounts`).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue, TensorImage
from avalanche.evaluation.metric_utils import get_metric_name
from avalanche.logging import BaseLogger

from moe_cl.core.metrics import RoutingAccumulator
from moe_cl.storage.figures import expert_class_heatmap, figure_to_image_tensor
from moe_cl.training.models import routing_output
from moe_cl.training.routed import RoutedOutput

SCALARS = ("H_s", "H_u", "MI", "MI_pred")


@dataclass
class VoteCounts:
    """What the expert groups' vote decided: ``changed``, the samples whose predicted class
    (the argmax of the router's posterior) the vote changed; of those, ``fixed`` the ones the
    router got wrong and the vote right, ``broke`` the ones the router got right and the vote
    wrong (the rest went from one wrong class to another). fixed - broke is the vote's gain in
    correct predictions of the router's posterior."""

    changed: int = 0
    fixed: int = 0
    broke: int = 0

    def update(self, router_log_probs: torch.Tensor, voted_log_probs: torch.Tensor,
               labels: torch.Tensor) -> None:
        router, voted = router_log_probs.argmax(-1), voted_log_probs.argmax(-1)
        changed = router != voted
        self.changed += int(changed.sum())
        self.fixed += int((changed & (voted == labels)).sum())
        self.broke += int((changed & (router == labels)).sum())


class RoutingMetrics(PluginMetric[dict]):
    """Routing and specialisation of a :class:`~.models.MixtureOfExperts` on each test
    experience and on the whole stream.

    :param heatmaps: also emit the stream's expert x class matrix as an image (TensorBoard).
    """

    def __init__(self, *, experience: bool = True, stream: bool = True,
                 heatmaps: bool = False) -> None:
        super().__init__()
        self.per_experience = experience
        self.per_stream = stream
        self.heatmaps = heatmaps
        self._experience: RoutingAccumulator | None = None
        self._stream: RoutingAccumulator | None = None
        self._vote: VoteCounts | None = None  # the stream's, when the expert groups vote
        self.last_stream_result: dict = {}

    def reset(self) -> None:
        self._experience = None
        self._stream = None

    def result(self) -> dict:
        if self._stream is None:
            return {}
        result = self._stream.compute()
        if self._vote is not None:
            result["experts_vote"] = asdict(self._vote)
        return result

    def before_eval(self, strategy, **kwargs) -> None:
        self._stream = None
        self._vote = None

    def before_eval_exp(self, strategy, **kwargs) -> None:
        self._experience = None

    def after_eval_iteration(self, strategy, **kwargs) -> None:
        out = routing_output(strategy.model)
        k = strategy.mb_output.shape[-1]
        if self._experience is None:
            self._experience = RoutingAccumulator(k)
        if self._stream is None:
            self._stream = RoutingAccumulator(k)
        prediction = out.selected_expert_prediction()
        for acc in (self._experience, self._stream):
            acc.update(out.gate, strategy.mb_y, log_probs=strategy.mb_output,
                       expert_prediction=prediction, router_log_probs=out.router_log_probs)
        if isinstance(out, RoutedOutput) and out.voted_log_probs is not None:
            self._vote = self._vote or VoteCounts()
            self._vote.update(out.router_log_probs, out.voted_log_probs, strategy.mb_y)

    def after_eval_exp(self, strategy, **kwargs):
        if not self.per_experience or self._experience is None:
            return None
        return self._emit(strategy, self._experience.compute(), add_experience=True)

    def after_eval(self, strategy, **kwargs):
        if self._stream is None:
            return None
        result = self.result()
        self.last_stream_result = result
        if not self.per_stream:
            return None
        values = self._emit(strategy, result, add_experience=False)
        if self.heatmaps:
            fig = expert_class_heatmap(result["expert_class_counts"])
            name = get_metric_name("ExpertClassHeatmap", strategy, add_task=False)
            values.append(MetricValue(self, name, TensorImage(figure_to_image_tensor(fig)),
                                      strategy.clock.train_iterations))
        return values

    def _emit(self, strategy, result: dict, *, add_experience: bool) -> list[MetricValue]:
        x = strategy.clock.train_iterations
        values = []
        for key in (*SCALARS, "num_experts"):
            name = get_metric_name(f"Routing_{key}", strategy, add_experience=add_experience,
                                   add_task=False)
            values.append(MetricValue(self, name, float(result[key]), x))
        for key in ("expert_usage", "expert_class_counts"):
            name = get_metric_name(f"Routing_{key}", strategy, add_experience=add_experience,
                                   add_task=False)
            values.append(MetricValue(self, name, torch.tensor(result[key]), x))
        return values

    def __str__(self) -> str:
        return "Routing"


class MetricsCSVLogger(BaseLogger):
    """Every scalar metric value as one CSV row (name, x, value), flushed as it comes.

    Avalanche's own ``CSVLogger`` writes a fixed set of columns (accuracy, loss, forgetting);
    this one keeps everything, routing metrics included.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="")  # noqa: SIM115 - lives with the logger
        self._writer = csv.writer(self._file)
        self._writer.writerow(["metric", "x", "value"])

    def log_single_metric(self, name, value, x_plot) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        self._writer.writerow([name, x_plot, value])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TaskAwareAccuracy(PluginMetric[float]):
    """Accuracy when the task is known: the prediction is restricted to the classes of the test
    experience being evaluated. Beside class-incremental accuracy it gives the task-incremental
    view of the same model, from the same forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self._correct = 0
        self._total = 0
        self._classes: torch.Tensor | None = None

    def reset(self) -> None:
        self._correct = 0
        self._total = 0

    def result(self) -> float:
        return self._correct / self._total if self._total else 0.0

    def before_eval_exp(self, strategy, **kwargs) -> None:
        self.reset()
        classes = sorted(strategy.experience.classes_in_this_experience)
        self._classes = torch.tensor(classes, dtype=torch.long)

    def after_eval_iteration(self, strategy, **kwargs) -> None:
        classes = self._classes.to(strategy.mb_output.device)
        picked = classes[strategy.mb_output.index_select(1, classes).argmax(-1)]
        self._correct += int((picked == strategy.mb_y).sum())
        self._total += len(strategy.mb_y)

    def after_eval_exp(self, strategy, **kwargs):
        name = get_metric_name("TaskAwareAcc_Exp", strategy, add_experience=True, add_task=False)
        return [MetricValue(self, name, self.result(), strategy.clock.train_iterations)]

    def __str__(self) -> str:
        return "TaskAwareAcc"
