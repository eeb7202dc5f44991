"""From a resolved configuration to a finished run: the builders and the experience loop.

The CLI, the reproduction command and the benchmarks all build through these functions, so a
configuration means the same thing everywhere. Data flow is one way: config -> benchmark,
model, strategy with plugins, evaluator -> Avalanche's train/eval loop after every experience
-> metrics -> results.json, logs, figures and a checkpoint per experience. Under torchrun every
rank runs the same stages (``ranks``, :mod:`moe_cl.training.ranks`) and rank 0 alone reads and
writes the run folder.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from omegaconf import DictConfig, OmegaConf

from moe_cl.core.bank import count_parameters
from moe_cl.core.zoo import Architecture, get_architecture, mlp_architecture
from moe_cl.data.streams import BenchmarkBundle, make_benchmark
from moe_cl.errors import ConfigError
from moe_cl.run.config import load_saved, to_yaml
from moe_cl.run.results import average_accuracy, average_forgetting, summary_table, write_figures
from moe_cl.storage.environment import package_versions
from moe_cl.storage.run_folder import (
    CHECKPOINT,
    COMPLETE,
    CONFIG,
    RESULTS,
    RUNNING,
    atomic_write_text,
    folder_is_complete,
    has_checkpoint,
    is_complete,
    read_results,
    write_json,
)
from moe_cl.training.checkpoint import (
    load_checkpoint,
    load_model_state,
    load_plugin_states,
    model_state,
    optimizer_state,
    plugin_states,
    restore_optimizer,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from moe_cl.training.evaluation import MetricsCSVLogger, RoutingMetrics, TaskAwareAccuracy
from moe_cl.training.methods import METHODS, Method
from moe_cl.training.models import MixtureOfExperts
from moe_cl.training.plugins import reference_train_error, training_plugins
from moe_cl.training.strategies import MoEStrategy

if TYPE_CHECKING:
    from moe_cl.training.ranks import Ranks

T = TypeVar("T")

ACCURACY = "Top1_Acc_Exp/eval_phase/test_stream"
TASK_AWARE_ACCURACY = "TaskAwareAcc_Exp/eval_phase/test_stream"
DATASET_ARCHITECTURE = {"mnist": "mnist", "fmnist": "fmnist", "cifar100": "cifar100"}


# ----------------------------------------------------------------------------- builders


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is available "
                         "(use device=auto or cpu)")
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
        dataset = bundle.name.split("_", 1)[-1]
        name = DATASET_ARCHITECTURE.get(dataset, "mlp")
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
    """The method's strategy, every method's with the NaN-loss guard (and the reference's
    train error when train.reference_train_error is set); under torchrun (``ranks``: mixture
    methods only, moe_cl.training.ranks.data_parallel_problem) MoEStrategy's ``ranks``."""
    common = dict(model=model, optimizer=optimizer, train_mb_size=cfg.train.batch_size,
                  train_epochs=cfg.train.epochs, eval_mb_size=cfg.train.eval_batch_size,
                  device=device, evaluator=evaluator,
                  plugins=training_plugins(reference_train_error=cfg.train.reference_train_error))
    if ranks is not None:
        common["ranks"] = ranks
    return METHODS[cfg.method].build_strategy(cfg, common, bundle)


# ----------------------------------------------------------------------------- the run


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


class EpochCheckpoint(SupervisedPlugin, supports_distributed=True):
    """Calls ``save(epochs_done)`` every ``every`` epochs inside a training experience.

    It counts epochs itself (from ``offset`` when resuming inside an experience) rather than
    reading Avalanche's clock, whose update may come before or after this plugin.
    """

    def __init__(self, every: int, save) -> None:
        super().__init__()
        self.every = every
        self.save = save
        self.offset = 0
        self._done = 0

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._done = self.offset

    def after_training_epoch(self, strategy, **kwargs) -> None:
        self._done += 1
        if self._done % self.every == 0 and self._done < self.offset + strategy.train_epochs:
            self.save(self._done)


@dataclass
class Run:
    """What the stages of one run share: its settings, folder and built pieces."""

    cfg: DictConfig
    out: Path
    bundle: BenchmarkBundle
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    progress: Progress
    evaluator: EvaluationPlugin | None = None
    strategy: SupervisedTemplate | None = None
    epoch_checkpoints: EpochCheckpoint | None = None
    train_stream: list = field(default_factory=list)
    test_stream: list = field(default_factory=list)
    ranks: Ranks | None = None  # torchrun: this process's place among the run's processes

    @property
    def is_main(self) -> bool:
        """Whether this process owns the run folder (rank 0, or the only process)."""
        return self.ranks is None or self.ranks.is_main

    @property
    def method(self) -> Method:
        return METHODS[self.cfg.method]

    @property
    def distils(self) -> bool:
        """Whether each stage ends by distilling the mixture's gate (the model evaluated)."""
        return self.method.mixture and bool(self.cfg.distill.epochs)

    @property
    def stages(self) -> list[list]:
        """The experiences trained together, in order: one each, or all at once (joint)."""
        return [self.train_stream] if self.method.joint else [[e] for e in self.train_stream]

    def save_checkpoint(self, epochs_done: int = 0) -> None:
        self.progress.epochs_done = epochs_done
        if not self.is_main:
            return
        save_checkpoint(self.out / CHECKPOINT, {
            "model": model_state(self.model),
            "optimizer": optimizer_state(self.optimizer, self.model),
            "plugins": plugin_states(self.strategy.plugins),
            "rng": rng_state(),
            "progress": dict(self.progress.__dict__),
        })


def run_experiment(cfg: DictConfig, out: Path, *, resume: bool = False,
                   bundle: BenchmarkBundle | None = None, echo=print,
                   ranks: Ranks | None = None) -> dict:
    """Run (or continue) the configured experiment in ``out``; returns results.json's dict
    (under torchrun, ``ranks``, rank 0 alone writes it; a finished run read back is rank 0's
    alone, the others return an empty dict).

    Stages: build, restore (a checkpoint, or a finished teacher to distil), then per stage of
    experiences train, distil, evaluate and write; figures last."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device) if ranks is None else ranks.device
    bundle = bundle or build_benchmark(cfg)
    model = build_model(cfg, bundle)
    optimizer = build_optimizer(cfg, model)
    state = _from_main(ranks, lambda: load_checkpoint(out / CHECKPOINT)
                       if resume and has_checkpoint(out) else {})
    run = Run(cfg, out, bundle, device, model, optimizer, Progress(**state.get("progress", {})),
              ranks=ranks)
    if run.progress.completed and run.progress.completed >= _stage_count(cfg, bundle):
        echo(f"{out} is already complete")
        return _finished_results(run, state)
    _start(run, resumed=bool(state))
    from_teacher = bool(cfg.distill.teacher) and not state
    if from_teacher:
        _use_teacher(run, echo)
    if state:
        _restore(run, state, echo)
    results: dict = {}
    for index in range(run.progress.completed, len(run.stages)):
        started = time.perf_counter()
        stage = run.stages[index]
        if not from_teacher:
            _train(run, stage)
        evaluating = distill(run, stage[0]) if run.distils else run.strategy
        _evaluate(run, evaluating)
        run.progress.completed = index + 1
        run.progress.wall_time_s += time.perf_counter() - started
        results = _write(run, evaluating.model, echo)
    return _add_figures(run, results)


def _from_main(ranks: Ranks | None, work: Callable[[], T]) -> T:
    """``work()`` (reading the run folder) in the process that owns it; under torchrun rank 0's
    result on every rank."""
    return work() if ranks is None else ranks.from_main(work)


def _start(run: Run, *, resumed: bool) -> None:
    """Build the evaluator and the strategy, write config.yaml and fix the streams."""
    cfg, out = run.cfg, run.out
    log_dir = out / "logs"
    if resumed:
        progress = run.progress
        log_dir = log_dir / f"resumed-exp{progress.completed:02d}-epoch{progress.epochs_done}"
    run.evaluator = build_evaluator(cfg, log_dir if run.is_main else None,
                                    routing=run.method.mixture, logging=run.is_main)
    run.strategy = build_strategy(cfg, run.model, run.optimizer, run.evaluator, run.bundle,
                                  run.device, run.ranks)
    if run.is_main and not (out / CONFIG).exists():
        atomic_write_text(out / CONFIG, to_yaml(cfg))
    if cfg.train.checkpoint_every_epochs:
        run.epoch_checkpoints = EpochCheckpoint(cfg.train.checkpoint_every_epochs,
                                                run.save_checkpoint)
        run.strategy.plugins.append(run.epoch_checkpoints)
    # Materialise the streams now: Avalanche reseeds the global RNG when it builds them.
    run.train_stream = list(run.bundle.benchmark.train_stream)
    run.test_stream = list(run.bundle.benchmark.test_stream)


def _use_teacher(run: Run, echo) -> None:
    """Start from the trained model of the finished run distill.teacher, as if its training
    had just ended in this process."""
    teacher = _from_main(run.ranks, lambda: load_teacher(run.cfg, run.model, len(run.stages)))
    if not run.is_main:
        load_model_state(run.model, teacher["model"])
    run.model.to(run.device)
    echo(f"distilling the trained model of {run.cfg.distill.teacher}")
    set_rng_state(teacher["rng"])


def _restore(run: Run, state: dict, echo) -> None:
    """Continue from a checkpoint: model, optimizer, plugins, then the RNG states."""
    load_model_state(run.model, state["model"])
    run.model.to(run.device)
    run.strategy.optimized_param_id = restore_optimizer(run.optimizer, run.model,
                                                        state["optimizer"])
    load_plugin_states(run.strategy.plugins, state["plugins"], run.model)
    set_rng_state(state["rng"])  # last: nothing may draw random numbers after this
    echo(f"resuming at experience {run.progress.completed}, epoch {run.progress.epochs_done}, "
         f"from {run.out / CHECKPOINT}")


def _train(run: Run, stage: list) -> None:
    """Train the stage's experiences for the epochs left (all of them unless resuming inside
    the stage)."""
    epochs = run.cfg.train.epochs
    done = run.progress.epochs_done
    if run.epoch_checkpoints is not None:
        run.epoch_checkpoints.offset = done
    run.strategy.train_epochs = epochs - done
    run.strategy.train(stage if run.method.joint else stage[0], eval_streams=[])
    run.strategy.train_epochs = epochs


def distill(run: Run, experience) -> MoEStrategy:
    """Train a softmax gate routing without the experts' hidden vectors (experts frozen, gate
    network initialised from the trained attentive gate's) on the experience; returns its
    strategy, whose model is the one evaluated."""
    cfg = run.cfg
    student = run.model.distilled_copy()
    strategy = MoEStrategy(model=student, optimizer=torch.optim.Adam(student.parameters(),
                                                                      lr=cfg.train.lr),
                           train_mb_size=cfg.train.batch_size, train_epochs=cfg.distill.epochs,
                           eval_mb_size=cfg.train.eval_batch_size, device=run.device,
                           plugins=training_plugins(
                               reference_train_error=cfg.train.reference_train_error),
                           evaluator=run.evaluator,
                           batch_augment=run.bundle.batch_augment, fast_data=cfg.train.fast_data,
                           eval_top_k=cfg.eval.top_k, precision=cfg.train.precision,
                           compile_model=cfg.train.compile, ranks=run.ranks)
    strategy.train(experience, eval_streams=[])
    return strategy


def _evaluate(run: Run, evaluating: SupervisedTemplate) -> None:
    """Evaluate the stage's model on the test stream and record what it measured."""
    train_metrics = evaluating.evaluator.get_last_metrics()  # the distilled gate's, if any
    metrics = evaluating.eval(run.test_stream)
    n_test, progress = len(run.test_stream), run.progress
    progress.accuracy_matrix.append(per_experience_values(metrics, ACCURACY, n_test))
    progress.task_aware_matrix.append(per_experience_values(metrics, TASK_AWARE_ACCURACY, n_test))
    routing = [m.last_stream_result for m in evaluating.evaluator.metrics
               if isinstance(m, RoutingMetrics)]
    progress.routing_history.append(routing[-1] if routing else {})
    progress.train_errors.append(_train_error(train_metrics))
    progress.reference_train_errors.append(reference_train_error(evaluating))


def _write(run: Run, evaluated: torch.nn.Module, echo) -> dict:
    """The checkpoint, then results.json, of the stages done so far; returns the results."""
    progress = run.progress
    run.save_checkpoint()
    echo(f"experience {progress.completed}/{len(run.stages)}: accuracy on the test stream "
         f"{average_accuracy(progress.accuracy_matrix):.4f}")
    results = _results(run, evaluated, complete=progress.completed == len(run.stages),
                       n_train=len(run.train_stream))
    if run.is_main:
        write_json(run.out / RESULTS, results)
    return results


def _add_figures(run: Run, results: dict) -> dict:
    """Draw the figures (unless logging.figures=false or they are listed already), list them
    in the results and write those again: figures come last."""
    if run.is_main and run.cfg.logging.figures and "figures" not in results:
        progress = run.progress
        results["figures"] = write_figures(run.out, progress.routing_history,
                                           progress.accuracy_matrix,
                                           getattr(run.bundle, "class_names", None))
        write_json(run.out / RESULTS, results)
    return results


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


def _train_error(metrics: dict) -> float | None:
    values = [v for k, v in metrics.items() if k.startswith("Top1_Acc_Epoch/train_phase")]
    return 1.0 - float(values[-1]) if values else None


def _finished_results(run: Run, state: dict) -> dict:
    """results.json of a finished run; rebuilt from the checkpoint when the file is missing,
    unreadable or older than it (a kill between the two writes), and its figures drawn when a
    kill came before them (written last). Under torchrun, rank 0's work."""
    if not run.is_main:
        return {}
    results = read_results(run.out)
    if not is_complete(results):
        load_model_state(run.model, state["model"])
        # The evaluated model: with distillation, the same experts under the distilled gate.
        evaluated = run.model.distilled_copy() if run.distils else run.model
        results = _results(run, evaluated, complete=True,
                           n_train=len(run.bundle.benchmark.train_stream))
        write_json(run.out / RESULTS, results)
    return _add_figures(run, results)


# What must match between a run and the teacher it distils (the rest is bookkeeping).
TEACHER_KEYS = ("benchmark", "seed", "scenario", "data.stream", "data.max_train_samples",
                "model", "experts", "regularizer", "train.epochs", "train.batch_size", "train.lr",
                "train.weight_decay")


def load_teacher(cfg: DictConfig, model: torch.nn.Module, n_stages: int) -> dict:
    """Load the trained model of the finished run ``cfg.distill.teacher`` into ``model`` and
    return its checkpoint; refuses a run whose training differs from this configuration's."""
    folder = Path(cfg.distill.teacher)
    if n_stages != 1:
        raise ConfigError("distill.teacher works on single-experience benchmarks (paper_*); "
                          f"{cfg.benchmark} has {n_stages} experiences")
    if not (folder_is_complete(folder) and has_checkpoint(folder)):
        raise ConfigError(f"distill.teacher={folder}: no finished run there (expected "
                          f"{CONFIG}, {RESULTS} with status {COMPLETE} and {CHECKPOINT})")
    saved = load_saved(folder / CONFIG)
    if saved.distill.epochs:
        raise ConfigError(f"distill.teacher={folder} is itself a distilled run")
    differing = [key for key in TEACHER_KEYS
                 if _plain(OmegaConf.select(saved, key)) != _plain(OmegaConf.select(cfg, key))]
    if differing:
        raise ConfigError(f"distill.teacher={folder} was trained with different "
                          f"{', '.join(differing)}")
    checkpoint = load_checkpoint(folder / CHECKPOINT)
    load_model_state(model, checkpoint["model"])
    return checkpoint


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _stage_count(cfg: DictConfig, bundle: BenchmarkBundle) -> int:
    return 1 if METHODS[cfg.method].joint else len(bundle.benchmark.train_stream)


def _results(run: Run, model: torch.nn.Module, *, complete: bool, n_train: int) -> dict:
    """results.json's content: what was measured, about the model evaluated last."""
    cfg, progress = run.cfg, run.progress
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
        "device": str(run.device),
        "ranks": 1 if run.ranks is None else run.ranks.world_size,  # torchrun's processes
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
        # a routed mixture: its router's own error, and the bytes of what it keeps instead of
        # samples
        "router_error": routing.get("router_error"),
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


def print_summary(results: dict, echo=print) -> None:
    echo(summary_table(results))
