"""From a resolved configuration to a finished run: the builders and the experience loop.

The CLI, the reproduction command and the benchmarks all build through these functions, so a
configuration means the same thing everywhere. Data flow is one way: config -> benchmark,
model, strategy with plugins, evaluator -> Avalanche's train/eval loop after every experience
-> metrics -> results.json, logs, figures and a checkpoint per experience. Under torchrun every
rank runs the same stages (``ranks``, :mod:`moe_cl.training.ranks`) and rank 0 alone reads and
writes the run folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from omegaconf import DictConfig

from moe_cl.data.streams import BenchmarkBundle
from moe_cl.run.builders import (
    build_benchmark,
    build_evaluator,
    build_model,
    build_optimizer,
    build_strategy,
    resolve_device,
    seed_everything,
    strategy_arguments,
)
from moe_cl.run.config import check_settings, finished_results, to_yaml, training_settings
from moe_cl.run.record import Progress, per_experience_values, results_record, train_error
from moe_cl.run.results import average_accuracy, summary_table, write_figures
from moe_cl.run.teacher import load_teacher
from moe_cl.storage.run_folder import (
    CHECKPOINT,
    CONFIG,
    RESULTS,
    atomic_write_text,
    has_checkpoint,
    is_complete,
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
from moe_cl.training.evaluation import RoutingMetrics
from moe_cl.training.methods import METHODS, Method, mixture_strategy
from moe_cl.training.plugins import reference_train_error
from moe_cl.training.strategies import MoEStrategy

if TYPE_CHECKING:
    from moe_cl.training.ranks import Ranks

T = TypeVar("T")

ACCURACY = "Top1_Acc_Exp/eval_phase/test_stream"
TASK_AWARE_ACCURACY = "TaskAwareAcc_Exp/eval_phase/test_stream"


# ----------------------------------------------------------------------------- the run


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

    def record(self, model: torch.nn.Module, *, complete: bool, n_train: int) -> dict:
        """results.json's content for ``model``, the model evaluated last."""
        return results_record(self.cfg, self.progress, model, device=str(self.device),
                              world_size=1 if self.ranks is None else self.ranks.world_size,
                              complete=complete, n_train=n_train)

    def save_checkpoint(self, epochs_done: int = 0) -> None:
        self.progress.epochs_done = epochs_done
        if not self.is_main:
            return
        save_checkpoint(self.out / CHECKPOINT, {
            "model": model_state(self.model),
            "optimizer": optimizer_state(self.optimizer, self.model),
            "plugins": plugin_states(self.strategy.plugins),
            "rng": rng_state(self.device),
            "progress": dict(self.progress.__dict__),
            "settings": training_settings(self.cfg),  # config.yaml is checked against them
        })


def run_experiment(cfg: DictConfig, out: Path, *, resume: bool = False,
                   bundle: BenchmarkBundle | None = None, echo=print,
                   ranks: Ranks | None = None, overridden: Collection[str] = ()) -> dict:
    """Run (or continue) the configured experiment in ``out``; returns results.json's dict
    (under torchrun, ``ranks``, rank 0 alone writes it; a finished run read back is rank 0's
    alone, the others return an empty dict). ``overridden``: settings the command line changed.

    Stages: build, restore (a checkpoint, or a finished teacher to distil), then per stage of
    experiences train, distil, evaluate and write; figures last."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device) if ranks is None else ranks.device
    bundle = bundle or build_benchmark(cfg)
    model = build_model(cfg, bundle)
    optimizer = build_optimizer(cfg, model)
    state = _from_main(ranks, lambda: load_checkpoint(out / CHECKPOINT)
                       if resume and has_checkpoint(out) else {})
    run = Run(cfg, out, bundle, device, model, optimizer, Progress.restored(state, out),
              ranks=ranks)
    finished = run.progress.completed and run.progress.completed >= _stage_count(cfg, bundle)
    check_settings(state, cfg, out, overridden=() if finished else overridden, echo=echo)
    if finished:
        echo(f"{out} is already complete")
        return _finished_results(run, state)
    _start(run, resumed=bool(state), overridden=bool(overridden))
    from_teacher = bool(cfg.distill.teacher) and not state
    if from_teacher:
        _use_teacher(run, echo)
    if state:
        _restore(run, state, echo)
    results: dict = {}
    try:
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
    except KeyboardInterrupt as stop:  # Ctrl-C, or a SIGTERM (moe_cl.errors.Interrupted)
        offset = run.epoch_checkpoints.offset if run.epoch_checkpoints else 0
        stop.position = (run.progress.completed, offset + run.strategy.clock.train_exp_epochs)
        raise
    return _add_figures(run, results)


def _from_main(ranks: Ranks | None, work: Callable[[], T]) -> T:
    """``work()`` (reading the run folder) in the process that owns it; under torchrun rank 0's
    result on every rank."""
    return work() if ranks is None else ranks.from_main(work)


def _start(run: Run, *, resumed: bool, overridden: bool = False) -> None:
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
    if run.is_main and (overridden or not (out / CONFIG).exists()):
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
    set_rng_state(teacher["rng"], run.device)


def _restore(run: Run, state: dict, echo) -> None:
    """Continue from a checkpoint: model, optimizer, plugins, then the RNG states."""
    load_model_state(run.model, state["model"])
    run.model.to(run.device)
    run.strategy.optimized_param_id = restore_optimizer(run.optimizer, run.model,
                                                        state["optimizer"])
    load_plugin_states(run.strategy.plugins, state["plugins"], run.model)
    set_rng_state(state["rng"], run.device)  # last: nothing may draw random numbers after this
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
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.train.lr)
    common = strategy_arguments(cfg, student, optimizer, run.evaluator, run.device, run.ranks,
                                epochs=cfg.distill.epochs)
    strategy = mixture_strategy(cfg, common, run.bundle)
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
    progress.train_errors.append(train_error(train_metrics))
    progress.reference_train_errors.append(reference_train_error(evaluating))


def _write(run: Run, evaluated: torch.nn.Module, echo) -> dict:
    """The checkpoint, then results.json, of the stages done so far; returns the results."""
    progress = run.progress
    run.save_checkpoint()
    echo(f"experience {progress.completed}/{len(run.stages)}: accuracy on the test stream "
         f"{average_accuracy(progress.accuracy_matrix):.4f}")
    results = run.record(evaluated, complete=progress.completed == len(run.stages),
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


def _finished_results(run: Run, state: dict) -> dict:
    """results.json of a finished run; rebuilt from the checkpoint when the file is missing,
    unreadable or older than it (a kill between the two writes), and its figures drawn when a
    kill came before them (written last). Under torchrun, rank 0's work."""
    if not run.is_main:
        return {}
    results = finished_results(run.out, run.cfg)
    if not is_complete(results):
        load_model_state(run.model, state["model"])
        # The evaluated model: with distillation, the same experts under the distilled gate.
        evaluated = run.model.distilled_copy() if run.distils else run.model
        results = run.record(evaluated, complete=True,
                             n_train=len(run.bundle.benchmark.train_stream))
        write_json(run.out / RESULTS, results)
    return _add_figures(run, results)


def _stage_count(cfg: DictConfig, bundle: BenchmarkBundle) -> int:
    return 1 if METHODS[cfg.method].joint else len(bundle.benchmark.train_stream)


def print_summary(results: dict, echo=print) -> None:
    echo(summary_table(results))
