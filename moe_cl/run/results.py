"""The numbers derived from an accuracy matrix, the run's figures and its printed summary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moe_cl.storage.figures import (
    accuracy_matrix_figure,
    expert_class_heatmap,
    expert_usage_figure,
    save_figure,
)


def average_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over all test experiences after the last training experience."""
    return sum(matrix[-1]) / len(matrix[-1]) if matrix else 0.0


def average_forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """Mean over earlier experiences j of (best accuracy on j before the end) - (final on j)."""
    if len(matrix) < 2:
        return 0.0
    last = len(matrix) - 1
    drops = [max(matrix[i][j] for i in range(j, last)) - matrix[last][j] for j in range(last)]
    return sum(drops) / len(drops)


def write_figures(out: Path, history: list[dict], matrix: list[list[float]],
                  class_names: Sequence[str] | None = None) -> list[str]:
    """PNG figures: an expert x class heatmap after each experience, expert usage across
    experiences, the accuracy matrix. Returns the written paths relative to ``out``."""
    written = []
    figures = out / "figures"
    usages = []
    for i, routing in enumerate(history):
        if not routing:
            continue
        usages.append(routing["expert_usage"])
        name = f"expert_class_after_exp{i:02d}.png"
        save_figure(
            expert_class_heatmap(routing["expert_class_counts"], class_names=class_names,
                                 title=f"expert x class after experience {i}"),
            figures / name,
        )
        written.append(f"figures/{name}")
    if usages:
        save_figure(expert_usage_figure(usages), figures / "expert_usage.png")
        written.append("figures/expert_usage.png")
    if matrix:
        save_figure(accuracy_matrix_figure(matrix), figures / "accuracy_matrix.png")
        written.append("figures/accuracy_matrix.png")
    return written


def summary_table(results: dict) -> str:
    """A short plain-text summary printed at the end of a run."""
    rows = [
        ("benchmark / strategy", f"{results['benchmark']} / {results['strategy']}"),
        ("average accuracy", f"{results['average_accuracy']:.4f}"),
        ("forgetting", f"{results['forgetting']:.4f}"),
    ]
    if results.get("task_aware_average_accuracy") is not None:
        rows.append(("task-aware accuracy", f"{results['task_aware_average_accuracy']:.4f}"))
    for key in ("H_s", "H_u", "MI", "MI_pred"):
        if results.get(key) is not None:
            rows.append((f"{key} (bits)", f"{results[key]:.3f}"))
    rows += [
        ("experts (added)", f"{results['num_experts']} ({results['experts_added']})"),
        ("parameters", f"{results['num_parameters']:,}"),
        ("wall time", f"{results['wall_time_s']:.1f} s on {results['device']}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "moe-cl summary", "-" * (width + 24)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    matrix = results["accuracy_matrix"]
    lines.append("accuracy matrix (row: after training experience i; column: test experience j)")
    lines += ["  " + " ".join(f"{v:.3f}" for v in row) for row in matrix]
    return "\n".join(lines)
