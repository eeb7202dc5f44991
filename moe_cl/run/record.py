"""What a run has measured so far and the results.json made of it."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from moe_cl.core.bank import count_parameters
from moe_cl.run.results import average_accuracy, average_forgetting
from moe_cl.storage.environment import package_versions
from moe_cl.storage.run_folder import CHECKPOINT, COMPLETE, RUNNING
from moe_cl.training.checkpoint import CheckpointError
from moe_cl.training.models import MixtureOfExperts


@dataclass
class Progress:
    """Everything measured so far; saved in each checkpoint."""

    completed: int = 0
    accuracy_matrix: list = field(default_factory=list)
    task_aware_matrix: list = field(default_factory=list)
    routing_history: list = field(default_factory=list)
    train_errors: list = field(default_factory=list)
    reference_train_errors: list = field(default_factory=list)
    wall_time_s: float = 0.0
    epochs_done: int = 0  # inside experience ``completed`` (epoch checkpoints)

    @classmethod
    def restored(cls, state: dict, out: Path) -> Progress:
        """The progress the checkpoint ``state`` of run folder ``out`` saved (none: a run that
        starts), its fields checked first: an edited one is a :class:`CheckpointError` naming
        the field, not a crash later."""
        saved, path = state.get("progress", {}), out / CHECKPOINT
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {path}: progress is not a mapping")
        types = {f.name: f.default_factory if f.default is MISSING else type(f.default)
                 for f in fields(cls)}
        for key, value in saved.items():
            expected = types.get(key)
            if expected is None:
                raise CheckpointError(f"checkpoint {path}: progress has an unknown field {key!r}")
            allowed = (int, float) if expected is float else (expected,)
            if not isinstance(value, allowed) or isinstance(value, bool) or (
                    expected is int and value < 0):
                raise CheckpointError(f"checkpoint {path}: progress.{key} is {value!r}, not "
                                      f"{'a count' if expected is int else expected.__name__}")
        return cls(**saved)




def per_experience_values(metrics: dict, prefix: str, n: int) -> list[float]:
    """The value of the metric named ``prefix`` on each of ``n`` test experiences, from
    Avalanche's metric dict (task suffixes vary, so names are matched by prefix; nan where
    an experience has none)."""
    row = []
    for j in range(n):
        suffix = f"Exp{j:03d}"
        values = [v for k, v in metrics.items() if k.startswith(prefix) and k.endswith(suffix)]
        row.append(float(values[-1]) if values else float("nan"))
    return row


def train_error(metrics: dict) -> float | None:
    values = [v for k, v in metrics.items() if k.startswith("Top1_Acc_Epoch/train_phase")]
    return 1.0 - float(values[-1]) if values else None


def results_record(cfg: DictConfig, progress: Progress, model: nn.Module, *, device: str,
                   world_size: int, complete: bool, n_train: int) -> dict:
    """results.json's content: what was measured, about the model evaluated last."""
    routing = progress.routing_history[-1] if progress.routing_history else {}
    is_moe = isinstance(model, MixtureOfExperts)
    growth = model.growth_log if is_moe else []
    task_aware = progress.task_aware_matrix if cfg.scenario == "class" else None
    matrix = progress.accuracy_matrix
    return {
        "status": COMPLETE if complete else RUNNING,
        "benchmark": cfg.benchmark,
        "strategy": cfg.strategy,
        "method": cfg.method,
        "scenario": cfg.scenario,
        "seed": cfg.seed,
        "device": device,
        "ranks": world_size,  # torchrun's processes
        "experiences_completed": progress.completed,
        "n_experiences": n_train,
        "accuracy_matrix": matrix,
        "average_accuracy": average_accuracy(matrix),
        "forgetting": average_forgetting(matrix),
        "task_aware_accuracy_matrix": task_aware,
        "task_aware_average_accuracy": average_accuracy(task_aware) if task_aware else None,
        "train_error": progress.train_errors[-1] if progress.train_errors else None,
        # after each optimiser step, as the reference code measures it (train.reference_train_error)
        "train_error_reference": (progress.reference_train_errors[-1]
                                  if progress.reference_train_errors else None),
        "test_error": routing.get("error", 1.0 - average_accuracy(matrix)) if matrix else None,
        "top5_error": routing.get("top5_error"),
        # a routed mixture: its router's own error, what its expert groups' vote changed in
        # the router's predictions (router.experts_vote; training.evaluation.VoteCounts), and
        # the bytes of what it keeps instead of samples
        "router_error": routing.get("router_error"),
        "experts_vote": routing.get("experts_vote"),
        "statistics_bytes": getattr(model, "statistics_bytes", None),
        "H_s": routing.get("H_s"),
        "H_u": routing.get("H_u"),
        "MI": routing.get("MI"),
        "MI_pred": routing.get("MI_pred"),
        "expert_usage": routing.get("expert_usage"),
        "expert_class_counts": routing.get("expert_class_counts"),
        "routing_history": [
            {k: r.get(k) for k in ("H_s", "H_u", "MI", "MI_pred", "num_experts", "expert_usage")}
            for r in progress.routing_history
        ],
        "num_experts": model.num_experts if is_moe else 1,
        "experts_added": sum(e["added"] for e in growth),
        "growth_log": growth,
        "num_parameters": count_parameters(model),
        "wall_time_s": progress.wall_time_s,
        "versions": package_versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "summary": None,
    }
