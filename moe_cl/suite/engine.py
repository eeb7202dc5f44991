"""Many runs of one benchmark (variants x seeds), resumable, feeding the reproduction tables and
the continual-learning comparison.

Each run lives in ``OUT/<run name>/seed-<k>/`` exactly as ``python -m moe_cl.run`` would write
it: finished runs are read back, interrupted ones resume from their checkpoint (so does a run
whose results.json is unreadable: a finished checkpoint rebuilds it).
The tables cover every finished run found in OUT, so a run of a subset adds to them; a run
found there that was made with other settings (say, another ``train.lr=``) is an error, never
a row of the table.

Runs execute one at a time in this process, ``--jobs K`` at a time in worker processes, or as
a SLURM job array (:mod:`.launch`); ``--shard i/n`` takes the i-th of n disjoint parts of
them, so that any scheduler can spread a suite over machines. Every run holds its folder's lock
while it trains (:mod:`moe_cl.run.lifecycle`), and a distilled run starts after its
teacher, so it distils the teacher's finished run rather than training it again.

A run that fails stops the suite with a :class:`SuiteError` naming it, whose ``exit_code`` is
``python -m moe_cl.run``'s (:data:`EXIT_CODES`); no further run starts, and the runs already
running finish first (their work is kept).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import math
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig

from moe_cl.errors import NO_SPACE, USAGE_ERROR
from moe_cl.run.config import compose
from moe_cl.run.lifecycle import RunFailed, claimed, resume_or_start, train
from moe_cl.storage.run_folder import (
    CONFIG,
    RESULTS,
    atomic_write_text,
    has_checkpoint,
    is_complete,
    read_results,
    write_json,
)
from moe_cl.suite import launch as launching
from moe_cl.suite.launch import Launch, RunDied
from moe_cl.training.methods import key_applies

EXIT_CODES = ("Exit codes: 0 done; 1 a run's process or SLURM job died without a result (or a "
              "bug); 2 usage error (bad option or override, a run's configuration, data, device "
              "or checkpoint, a run folder in use by another process; nothing finished to "
              "tabulate with --report-only); 3 a run stopped on a NaN or infinite loss; 4 no "
              "space left to write a file (free some, then run the same command again).")
RUN_DIED = 1
COLLAPSE_H_U = 0.1  # bits: (nearly) every sample routed to one expert
FIELDS = ("run", "category", "seed", "train_error", "train_error_reference", "test_error",
          "MI_pred", "MI", "H_s", "H_u", "average_accuracy", "forgetting",
          "task_aware_average_accuracy", "router_error", "num_experts", "experts_added",
          "num_parameters", "wall_time_s")
# Keys the suite sets itself for every run, and how to choose them instead.
CONTROLLED = {
    "seed": "use --seeds N (runs seeds 0..N-1)",
    "benchmark": "the benchmark is the command's first argument",
    "strategy": "the suite's variants set it",
    "out_dir": "use --out (each run goes to OUT/<run name>/seed-<k>)",
    "resume": "the suite resumes by itself: run the same command again",
}


class SuiteError(Exception):
    """A run of the suite failed; ``exit_code`` is what the command returns."""

    def __init__(self, message: str, exit_code: int = USAGE_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Variant:
    """One configuration: a run name, the category it reports under, and its arguments."""

    name: str
    argv: tuple[str, ...]
    category: str = ""
    hyperparameters: dict = field(default_factory=dict, compare=False, hash=False)
    # A variant whose finished run of the same seed is distilled instead of training anew.
    teacher: str = ""

    @property
    def group(self) -> str:
        return self.category or self.name


@dataclass(frozen=True)
class RunSpec:
    """One run of a suite, all a process needs to bring it to its end (:func:`finish_run`)."""

    benchmark: str
    variant: Variant
    seed: int
    out: Path
    extra: tuple[str, ...] = ()  # the suite-wide overrides
    device: str | None = None  # a GPU given by --jobs (replaces device=)
    threads: int | None = None  # torch threads; None leaves torch's default

    @property
    def folder(self) -> Path:
        return folder_of(self.out, self.variant.name, self.seed)

    @property
    def label(self) -> str:
        return f"run {self.variant.name} seed {self.seed} ({self.folder})"

    @property
    def key(self) -> tuple[str, int]:
        return self.variant.name, self.seed

    @property
    def teacher_key(self) -> tuple[str, int]:
        return self.variant.teacher, self.seed


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its finished results, or an exit code and the error line."""

    results: dict | None = None
    done_before: bool = False
    wall_time_s: float = 0.0  # spent on it by this call
    exit_code: int = 0
    error: str = ""


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
            _check_benchmark(results, benchmark, spec.folder)
            progress.report(spec, Outcome(results, done_before=True))
        else:
            todo.append(spec)
    if not todo:
        return
    gpus = _gpus_to_share(todo[0], launch)
    with _executor(launch, out) as executor:
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


def _executor(launch: Launch, out: Path):
    if launch.launcher == "slurm":
        from moe_cl.suite import slurm

        problem = slurm.problem()
        if problem:
            raise SuiteError(problem)
        return slurm.SlurmArray(out, launch)
    if (launch.jobs or 1) > 1:
        return launching.Workers(launch.jobs)
    return launching.InProcess()


def _run_all(executor, runs: Sequence[RunSpec], progress: _Progress, gpus: Sequence[str],
             threads: int | None) -> Outcome | None:
    """Run ``runs`` on ``executor`` in their order (on the least busy of ``gpus``, if any, with
    ``threads`` torch threads), each run with a teacher among them after that teacher, and
    report each. The first failure stops new starts; it is returned once the runs still
    running have ended."""
    pending, running = list(runs), {}
    failure = None
    while running or (pending and failure is None):
        if failure is None:
            started = []
            for spec in _startable(pending, running.values(), executor.capacity):
                pending.remove(spec)
                busy = [s.device for s in (*running.values(), *started)]
                device = launching.least_loaded(gpus, busy) if gpus else None
                started.append(replace(spec, device=device, threads=threads))
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
            if running:
                progress.echo(f"{outcome.error}; waiting for the {len(running)} run(s) still "
                              "running to end")
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
                  f"error {_fmt(results.get('test_error'))}, train error "
                  f"{_fmt(results.get('train_error'))}"
                  f"{' (done before)' if outcome.done_before else ''}; elapsed "
                  f"{time.perf_counter() - self.started:.0f} s, about {eta:.0f} s left")


def finished_runs(benchmark: str, variants: Sequence[Variant], out: Path) -> list[dict]:
    """One row per finished run of any of ``variants`` in ``out``, whichever seeds and selection
    made it: what the tables cover. Trains nothing; a finished run of another benchmark is a
    :class:`SuiteError`."""
    seeds = set()
    for variant in variants:
        folder = out / variant.name
        if folder.is_dir():
            seeds |= {int(p.name[5:]) for p in folder.iterdir()
                      if p.name.startswith("seed-") and p.name[5:].isdigit()}
    rows = []
    for seed in sorted(seeds):  # seeds outermost, as the runs are trained
        for variant in variants:
            folder = folder_of(out, variant.name, seed)
            results = read_results(folder)
            if is_complete(results):
                _check_benchmark(results, benchmark, folder)
                rows.append({"run": variant.name, "category": variant.group, "seed": seed,
                             **{k: results.get(k) for k in FIELDS[3:]},
                             **{f"hp_{k}": v for k, v in variant.hyperparameters.items()}})
    return rows


def folder_of(out: Path, run: str, seed: int) -> Path:
    """The folder of the run named ``run`` with ``seed`` in the suite folder ``out``."""
    return out / run / f"seed-{seed}"


def _check_benchmark(results: dict, benchmark: str, folder: Path) -> None:
    if results.get("benchmark", benchmark) != benchmark:
        raise SuiteError(f"{folder} holds a run of benchmark {results['benchmark']}, not "
                         f"{benchmark}; choose another --out")


def train_and_collect(benchmark: str, chosen: Sequence[Variant], everything: Sequence[Variant],
                      seeds: Sequence[int], out: Path, *, extra: Sequence[str] = (),
                      report_only: bool = False, launch: Launch | None = None) -> list[dict]:
    """Train the ``chosen`` runs (unless ``report_only``) as ``launch`` says, then return the
    rows of every finished run of ``everything`` in ``out``: what the tables show. Nothing to
    show is a SuiteError."""
    if not report_only:
        train_runs(benchmark, chosen, seeds, out, extra=extra, launch=launch)
    rows = finished_runs(benchmark, everything, out)
    if not rows:
        raise SuiteError(f"no finished runs in {out} to tabulate (run without --report-only "
                         "first); nothing written")
    return rows


def train_and_tabulate(args: argparse.Namespace, overrides: Sequence[str],
                       chosen: Sequence[Variant], everything: Sequence[Variant],
                       tabulate: Callable[[list[dict]], tuple[dict, str]]) -> int:
    """A suite command once its arguments are parsed: train the ``chosen`` runs (see
    :func:`train_and_collect`), turn the rows of every finished run into a table and its text
    (``tabulate``), write and print them. Returns the exit code; a failure is one error line."""
    try:
        rows = train_and_collect(args.benchmark, chosen, everything, range(args.seeds), args.out,
                                 extra=overrides, report_only=args.report_only,
                                 launch=args.launch)
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    table, text = tabulate(rows)
    write_tables(args.out, rows, table, text)
    print(text)
    return 0


def write_tables(out: Path, rows: list[dict], table: dict, text: str) -> None:
    """runs.csv/json, table.json and table.md, each written whole."""
    write_rows(rows, out / "runs.csv")
    write_json(out / "table.json", table)
    atomic_write_text(out / "table.md", text)


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
        _check_benchmark(results, spec.benchmark, folder)
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


# Where a run lies, how it was logged or placed and what more it measured; not what it
# computes (runs made before train.reference_train_error existed stay valid; they lack its field).
NOT_SETTINGS = ("resume", "out_dir", "logging", "device", "data.root", "distill.teacher",
                "train.checkpoint_every_epochs", "train.reference_train_error")


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


def positive_int(text: str) -> int:
    """argparse type of --seeds, --jobs and the like: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def shard_argument(text: str) -> tuple[int, int]:
    """argparse type of --shard: I/N, 1 <= I <= N."""
    index, slash, count = text.partition("/")
    if not (slash and index.isdigit() and count.isdigit()) or not 1 <= int(index) <= int(count):
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N (e.g. 2/4), got "
                                         f"{text!r}")
    return int(index), int(count)


def parse_suite_arguments(parser: argparse.ArgumentParser, argv: list[str] | None,
                          default_out: str, *, seeds: int, example: str,
                          controlled: dict[str, str] | None = None
                          ) -> tuple[argparse.Namespace, list[str]]:
    """The options every suite command shares: --seeds (default ``seeds``), --out,
    --report-only, where the runs execute (``args.launch``: --jobs, --per-gpu, --shard,
    --launcher, --slurm-*), and key=value overrides applied to every run (``example``: some, for
    the help). Overrides of keys the suite sets itself (:data:`CONTROLLED`, plus the command's
    ``controlled``) are usage errors naming the option to use instead; every usage error is
    one line, exit 2."""
    forbidden = CONTROLLED | (controlled or {})
    _errors_in_one_line(parser)
    parser.add_argument("--seeds", type=positive_int, default=seeds,
                        help=f"seeds 0..N-1, N >= 1 (default {seeds})")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default runs/{default_out}/<benchmark>)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tabulate the runs already finished in --out "
                             "(an error if there are none)")
    _add_launch_options(parser)
    overrides_help = (f"Any key=value argument is applied to every run that reads it (keys of "
                      f"the mixture only to its runs), e.g. {example}; {', '.join(forbidden)} "
                      "are set by the suite.")
    parser.epilog = "\n\n".join(textwrap.fill(p) for p in (overrides_help, EXIT_CODES))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps those paragraphs
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key in forbidden:
            parser.error(f"{override}: the suite sets {key} for its runs; {forbidden[key]}")
    problem = _launch_problem(args)
    if problem:
        parser.error(problem)
    args.launch = Launch(**{f.name: getattr(args, f.name) for f in fields(Launch)})
    args.out = args.out or Path("runs") / default_out / args.benchmark
    return args, overrides


def _errors_in_one_line(parser: argparse.ArgumentParser) -> None:
    """Usage errors as one line (argparse prints the usage first), exit 2."""

    def error(message: str) -> NoReturn:
        parser.exit(USAGE_ERROR, f"{parser.prog}: error: {message} (--help lists the "
                                 "options)\n")

    parser.error = error  # type: ignore[method-assign]


def _add_launch_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where the runs execute (the tables are written once, "
                                      "at the end)")
    group.add_argument("--jobs", type=positive_int, default=None, metavar="K",
                       help="K runs at once, each in a worker process of this machine (CPU "
                            "threads divided among them, GPUs shared out); default 1, in this "
                            "process. With --launcher slurm: at most K array tasks at once "
                            "(default no limit)")
    group.add_argument("--per-gpu", type=positive_int, default=1, metavar="P",
                       help="with --jobs on GPUs: at most P runs on one GPU at a time "
                            "(default 1)")
    group.add_argument("--shard", type=shard_argument, default=(1, 1), metavar="I/N",
                       help="train only the I-th of N disjoint parts of the runs (the same "
                            "parts on every machine, for the same options), e.g. one part per "
                            "machine sharing --out")
    group.add_argument("--launcher", choices=launching.LAUNCHERS, default="local",
                       help="local (default): this machine; slurm: SLURM job arrays through "
                            "submitit (pip install 'moe-cl[slurm]'), logs in OUT/slurm")
    group.add_argument("--slurm-time", type=positive_int, metavar="MINUTES",
                       help="each array task's time limit (required with --launcher slurm); a "
                            "task that reaches it is requeued and resumes")
    group.add_argument("--slurm-partition", metavar="NAME")
    group.add_argument("--slurm-gpus-per-task", type=positive_int, metavar="G")
    group.add_argument("--slurm-cpus-per-task", type=positive_int, metavar="C",
                       help="also the torch threads of each run (default: SLURM's)")


SLURM_OPTIONS = ("slurm_time", "slurm_partition", "slurm_gpus_per_task", "slurm_cpus_per_task")


def _launch_problem(args: argparse.Namespace) -> str | None:
    """Why the launch options cannot work together; None when they can."""
    if args.launcher != "slurm":
        given = [f"--{name.replace('_', '-')}" for name in SLURM_OPTIONS
                 if getattr(args, name) is not None]
        return f"{', '.join(given)}: only with --launcher slurm" if given else None
    try:
        importlib.import_module("submitit")
    except ImportError:
        return "--launcher slurm needs submitit: pip install 'moe-cl[slurm]'"
    if args.slurm_time is None:
        return "--launcher slurm needs --slurm-time MINUTES (each array task's time limit)"
    return None


def _applicable(base, extra: Sequence[str]) -> list[str]:
    """The suite-wide overrides that apply to a run: keys only some methods read (the mixture's,
    replay's, EWC's, LwF's) only to those, the distillation's only to runs that distil."""
    kept = [a for a in extra if key_applies(base.method, a.split("=", 1)[0].strip())]
    if not base.distill.epochs:
        kept = [a for a in kept if not a.startswith("distill.")]
    return kept


def write_rows(rows: list[dict], csv_path: Path) -> None:
    """All runs as CSV (written whole, atomically)."""
    keys = list(FIELDS) + sorted({k for r in rows for k in r if k.startswith("hp_")})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, buffer.getvalue())
    write_json(csv_path.with_suffix(".json"), rows)


def collapsed(rows: Sequence[dict]) -> int:
    """How many runs routed (nearly) every test sample to one expert."""
    return sum(1 for r in rows if r.get("H_u") is not None and r["H_u"] < COLLAPSE_H_U)


def mean_std(values: Sequence[float | None]) -> tuple[float, float | None] | None:
    """Mean and sample std of the values present (std None for a single value)."""
    clean = [v for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return None
    return statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else None


def format_mean_std(value: tuple[float, float | None] | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} +- {std:.{digits}f}"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
