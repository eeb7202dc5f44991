"""Bringing a suite's runs to their end: which runs (``--shard i/n`` takes the i-th of n
disjoint parts of them, so that any scheduler can spread a suite over machines), in which order
(a distilled run starts after its teacher, so it distils the teacher's finished run rather than
training it again), on which executor (one at a time in this process, ``--jobs K`` at a time in
worker processes, or a SLURM job array: :mod:`.launch`).

Each run lives in ``OUT/<run name>/seed-<k>/`` exactly as ``python -m moe_cl.run`` would write
it: finished runs are read back, interrupted ones resume from their checkpoint (so does a run
whose results.json is unreadable: a finished checkpoint rebuilds it). A run found there that
was made with other settings (say, another ``train.lr=``) is an error, never a row of a table.
Every run holds its folder's lock while it trains (:mod:`moe_cl.run.lifecycle`).

A run that fails stops the suite with a :class:`SuiteError` naming it, whose ``exit_code`` is
``python -m moe_cl.run``'s; no further run starts, and the runs already running finish first
(their work is kept).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from moe_cl.errors import NO_SPACE
from moe_cl.run.config import compose
from moe_cl.run.lifecycle import RunFailed, claimed, resume_or_start, train
from moe_cl.run.schema import NOT_SHAPING
from moe_cl.storage.run_folder import CONFIG, RESULTS, has_checkpoint, is_complete, read_results
from moe_cl.suite import launch as launching
from moe_cl.suite.launch import Launch, RunDied
from moe_cl.suite.spec import Outcome, RunSpec, SuiteError, Variant, check_benchmark, folder_of
from moe_cl.suite.tables import format_number
from moe_cl.training.methods import key_applies

RUN_DIED = 1  # the exit code of a run whose process or SLURM job died without a result


def train_runs(benchmark: str, variants: Sequence[Variant], seeds: Sequence[int], out: Path,
               *, extra: Sequence[str] = (), echo: Callable[[str], None] = print,
               launch: Launch | None = None) -> None:
    """Train every variant with every seed (of ``launch.shard``) that has no finished run in
    ``out`` (an interrupted run resumes), on ``launch``'s executor, reporting each run. Raises
    :class:`SuiteError` naming the run that failed, once the runs still running have ended; or,
    before any run starts, naming a run found in ``out`` that was made with other settings or
    for another benchmark, or settings the executor cannot serve."""
    launch = launch or Launch()
    # Seeds outermost: a partial suite already covers every variant.
    runs = shard([RunSpec(benchmark, v, s, out, tuple(extra)) for s in seeds for v in variants],
                 *launch.shard)
    progress = _Progress(len(runs), launch.jobs or (len(runs) if launch.parallel else 1), echo)
    todo = []
    for spec in runs:
        results = read_results(spec.folder)
        if is_complete(results) or has_checkpoint(spec.folder):
            _check_settings(spec)
        if is_complete(results):
            check_benchmark(results, benchmark, spec.folder)
            progress.report(spec, Outcome(results, done_before=True))
        else:
            todo.append(spec)
    if not todo:
        return
    gpus = _gpus_to_share(todo[0], launch)
    with _executor(launch, out, progress.echo) as executor:
        failure = _run_all(executor, todo, progress, gpus, launching.run_threads(launch))
    if failure is not None:
        raise SuiteError(failure.error, failure.exit_code)


def shard(runs: Sequence[RunSpec], index: int, count: int) -> list[RunSpec]:
    """The ``index``-th (from 1) of ``count`` disjoint parts of ``runs``: every ``count``-th run,
    a run whose teacher is among them going with its teacher; the same on every machine."""
    position = {spec.key: k for k, spec in enumerate(runs)}
    return [spec for k, spec in enumerate(runs)
            if position.get(spec.teacher_key, k) % count == index - 1]


def _gpus_to_share(spec: RunSpec, launch: Launch) -> list[str]:
    """The GPUs that --jobs spreads runs over (none with one job, on SLURM or on the CPU);
    too many jobs for them at --per-gpu is a usage error, before any run starts."""
    if launch.launcher != "local" or (launch.jobs or 1) == 1:
        return []
    gpus = launching.visible_gpus(str(_run_config(spec).device))
    problem = launching.gpu_problem(launch.jobs, launch.per_gpu, gpus)
    if problem:
        raise SuiteError(problem)
    return gpus


def _executor(launch: Launch, out: Path, echo: Callable[[str], None]):
    if launch.launcher == "slurm":
        from moe_cl.suite import slurm

        problem = slurm.problem()
        if problem:
            raise SuiteError(problem)
        return slurm.SlurmArray(out, launch, echo)
    if (launch.jobs or 1) > 1:
        return launching.Workers(launch.jobs)
    return launching.InProcess()


def _run_all(executor, runs: Sequence[RunSpec], progress: _Progress, gpus: Sequence[str],
             threads: int | None) -> Outcome | None:
    """Run ``runs`` on ``executor`` in their order (on the least busy of ``gpus``, if any, with
    ``threads`` torch threads), each run with a teacher among them after that teacher, and
    report each. The first failure stops new starts; it is returned once the runs still
    running have ended, naming the runs that failed after it too."""
    pending, running = list(runs), {}
    failure, failed_too = None, []
    while running or (pending and failure is None):
        if failure is None:
            started = []
            for spec in _startable(pending, running.values(), executor.capacity):
                pending.remove(spec)
                busy = [s.device for s in (*running.values(), *started)]
                device = launching.least_loaded(gpus, busy) if gpus else None
                started.append(replace(spec, device=device, threads=threads))
            if started:  # an empty submission is no array (submitit warns about each)
                running.update(zip(executor.submit(finish_run, started), started, strict=True))
        finished = [handle for handle in running if handle.done()]
        if not finished:
            time.sleep(executor.poll_s)
        for handle in finished:
            spec = running.pop(handle)
            try:
                outcome = executor.result(handle)
            except RunDied as died:
                outcome = Outcome(exit_code=RUN_DIED, error=f"{spec.label}: {died}")
            if not outcome.exit_code:
                progress.report(spec, outcome)
                continue
            failure = failure or outcome
            if outcome is not failure:
                failed_too.append(f"{spec.variant.name} seed {spec.seed}")
            if running or outcome is not failure:
                waiting = f"; waiting for the {len(running)} run(s) still running to end"
                progress.echo(f"{outcome.error}{waiting if running else ''}")
    if failed_too:
        failure = replace(failure, error=f"{failure.error} ({len(failed_too)} more run(s) "
                                         f"failed: {', '.join(failed_too)}; their lines are above)")
    return failure


def _startable(pending: Sequence[RunSpec], running: Iterable[RunSpec],
               capacity: int) -> list[RunSpec]:
    """The pending runs to start now, in order, as many as the executor takes: those whose
    teacher is neither pending nor running."""
    running = list(running)
    waiting = {spec.key for spec in (*pending, *running)}
    ready = [spec for spec in pending if spec.teacher_key not in waiting]
    if not ready and not running:  # teachers in a cycle: cannot happen, but never hang
        ready = list(pending[:1])
    return ready[:max(0, capacity - len(running))]


class _Progress:
    """One line per run: its errors, the time so far and an estimate of the time left."""

    def __init__(self, total: int, parallel: int, echo: Callable[[str], None]) -> None:
        self.total, self.parallel, self.echo = total, max(1, parallel), echo
        self.started = time.perf_counter()
        self.reported = self.new_runs = 0
        self.spent_on_new = 0.0

    def report(self, spec: RunSpec, outcome: Outcome) -> None:
        self.reported += 1
        if not outcome.done_before:
            self.new_runs += 1
            self.spent_on_new += outcome.wall_time_s
        left = self.total - self.reported
        eta = (self.spent_on_new / self.new_runs * left / min(self.parallel, max(left, 1))
               if self.new_runs else 0.0)
        results = outcome.results or {}
        self.echo(f"[{self.reported}/{self.total}] {spec.variant.name} seed {spec.seed}: test "
                  f"error {format_number(results.get('test_error'))}, train error "
                  f"{format_number(results.get('train_error'))}"
                  f"{' (done before)' if outcome.done_before else ''}; elapsed "
                  f"{time.perf_counter() - self.started:.0f} s, about {eta:.0f} s left")


def finish_run(spec: RunSpec) -> Outcome:
    """Bring the run ``spec`` to its end, holding its folder's lock: read it back if it is
    finished, resume it from its checkpoint, or train it (:mod:`moe_cl.run.lifecycle`). What
    every executor runs (in this process, a worker process or a SLURM task). A failure is an
    Outcome with ``python -m moe_cl.run``'s exit code and one line naming the run; a bug
    raises."""
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    started = time.perf_counter()
    try:
        with claimed(spec.folder):
            try:
                results, done_before = _finish(spec)
            except SuiteError as err:  # the suite's own verdict: the folder stays as it is
                return Outcome(exit_code=err.exit_code, error=str(err))
    except RunFailed as failed:
        from moe_cl.training.checkpoint import CheckpointError

        message = failed.message
        if isinstance(failed.__cause__, CheckpointError):
            message += "; delete the folder of that checkpoint to train its run again"
        if failed.exit_code == NO_SPACE:
            message += "; free space, then run the same command again"
        return Outcome(exit_code=failed.exit_code, error=f"{spec.label}: {message}")
    return Outcome(results, done_before, time.perf_counter() - started)


def _finish(spec: RunSpec) -> tuple[dict, bool]:
    """:func:`finish_run` once the folder is locked: the run's finished results, and whether
    they were there before."""
    folder = spec.folder
    results = read_results(folder)
    if is_complete(results) or has_checkpoint(folder):
        _check_settings(spec)
    if is_complete(results):  # finished by another process since the suite looked
        check_benchmark(results, spec.benchmark, folder)
        return results, True
    if (folder / RESULTS).exists() and results is None:
        print(f"{folder / RESULTS} is unreadable: the run is resumed (or trained again)")
    resume = resume_or_start(folder)
    train(_run_config(spec), folder, resume=resume, echo=lambda _: None)
    results = read_results(folder)
    if not is_complete(results):
        raise SuiteError(f"{spec.label}: training ended without a complete {folder / RESULTS}")
    return results, False


def _run_config(spec: RunSpec) -> DictConfig:
    """The run's configuration: its variant's arguments, the suite's and the overrides that
    apply to it, and the GPU --jobs gave it."""
    argv = [f"benchmark={spec.benchmark}", *spec.variant.argv, f"seed={spec.seed}",
            f"out_dir={spec.folder}", "logging.interactive=false", "logging.tensorboard=false"]
    teacher = folder_of(spec.out, spec.variant.teacher, spec.seed)
    if spec.variant.teacher and is_complete(read_results(teacher)):
        argv.append(f"distill.teacher={teacher}")
    extra = list(spec.extra)
    if spec.device:
        extra = [a for a in extra if not a.startswith("device=")] + [f"device={spec.device}"]
    return compose([*argv, *_applicable(compose(argv), extra)])


# What does not shape a run (where it lies, runs and logs), its teacher's folder and what more it
# measured (runs made before train.reference_train_error existed stay valid; they lack its field).
NOT_SETTINGS = (*NOT_SHAPING, "distill.teacher", "train.reference_train_error")


def _check_settings(spec: RunSpec) -> None:
    """A run found in ``out`` (finished, or to be resumed) must have been made with the
    settings this call asks for: otherwise the tables would mix settings silently."""
    from moe_cl.errors import ConfigError
    from moe_cl.run.config import changed_settings, load_saved

    try:
        changed = changed_settings(load_saved(spec.folder / CONFIG), _run_config(spec),
                                   NOT_SETTINGS)
    except ConfigError as err:
        raise SuiteError(f"{spec.label}: {err}") from None
    if changed:
        raise SuiteError(f"{spec.label} was made with other settings "
                         f"({'; '.join(changed[:3])}); repeat its overrides or choose another "
                         "--out")


def _applicable(base, extra: Sequence[str]) -> list[str]:
    """The suite-wide overrides that apply to a run: keys only some methods read (the mixture's,
    replay's, EWC's, LwF's) only to those, the distillation's only to runs that distil."""
    kept = [a for a in extra if key_applies(base.method, a.split("=", 1)[0].strip())]
    if not base.distill.epochs:
        kept = [a for a in kept if not a.startswith("distill.")]
    return kept


