"""Many runs of one benchmark (variants x seeds), resumable, feeding the reproduction tables and
the continual-learning comparison.

Each run lives in ``OUT/<run name>/seed-<k>/`` exactly as ``python -m moe_cl.run`` would write
it: finished runs are read back, interrupted ones resume from their checkpoint (so does a run
whose results.json is unreadable: a finished checkpoint rebuilds it).
The tables cover every finished run found in OUT, so a run of a subset adds to them; a run
found there that was made with other settings (say, another ``train.lr=``) is an error, never
a row of the table.

A run that fails stops the suite with a :class:`SuiteError` naming it, whose ``exit_code`` is
``python -m moe_cl.run``'s (:data:`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shutil
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from moe_cl.config import compose
from moe_cl.methods import key_applies
from moe_cl.run_folder import (
    CONFIG,
    RESULTS,
    USAGE_ERROR,
    atomic_write_text,
    end_failed_run,
    has_checkpoint,
    is_complete,
    make_folder,
    read_results,
    write_json,
)

EXIT_CODES = ("Exit codes: 0 done; 2 usage error (bad option or override, a run's configuration, "
              "data, device or checkpoint; nothing finished to tabulate with --report-only); 3 "
              "a run stopped on a NaN or infinite loss.")
COLLAPSE_H_U = 0.1  # bits: (nearly) every sample routed to one expert
FIELDS = ("run", "category", "seed", "train_error", "train_error_reference", "test_error",
          "MI_pred", "MI", "H_s", "H_u", "average_accuracy", "forgetting",
          "task_aware_average_accuracy", "num_experts", "experts_added", "num_parameters",
          "wall_time_s")
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


def train_runs(benchmark: str, variants: Sequence[Variant], seeds: Sequence[int], out: Path,
               *, extra: Sequence[str] = (), echo: Callable[[str], None] = print) -> None:
    """Train every variant with every seed that has no finished run in ``out`` (an interrupted
    run resumes), reporting each run. Raises :class:`SuiteError` naming the run that failed, or
    a run found in ``out`` that was made with other settings or for another benchmark."""
    total = len(variants) * len(seeds)
    started = time.perf_counter()
    spent_on_new = 0.0
    new_runs = 0
    # Seeds outermost: a partial suite already covers every variant.
    for index, (seed, variant) in enumerate(((s, v) for s in seeds for v in variants), start=1):
        folder = folder_of(out, variant.name, seed)
        results = read_results(folder)
        done = is_complete(results)
        if done or has_checkpoint(folder):
            _check_settings(benchmark, variant, seed, out, extra)
        if done:
            _check_benchmark(results, benchmark, folder)
        else:
            run_started = time.perf_counter()
            results = _train(benchmark, variant, seed, out, extra, echo)
            spent_on_new += time.perf_counter() - run_started
            new_runs += 1
        eta = spent_on_new / new_runs * (total - index) if new_runs else 0.0
        echo(f"[{index}/{total}] {variant.name} seed {seed}: test error "
             f"{_fmt(results.get('test_error'))}, train error {_fmt(results.get('train_error'))}"
             f"{' (done before)' if done else ''}; elapsed {time.perf_counter() - started:.0f} s,"
             f" about {eta:.0f} s left")


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
                      report_only: bool = False) -> list[dict]:
    """Train the ``chosen`` runs (unless ``report_only``), then return the rows of every finished
    run of ``everything`` in ``out``: what the tables show. Nothing to show is a SuiteError."""
    if not report_only:
        train_runs(benchmark, chosen, seeds, out, extra=extra)
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
                                 extra=overrides, report_only=args.report_only)
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


def _train(benchmark: str, variant: Variant, seed: int, out: Path, extra: Sequence[str],
           echo: Callable[[str], None]) -> dict:
    """Train one run, or resume it from its checkpoint; returns its finished results. Errors
    become SuiteErrors naming the run, with python -m moe_cl.run's exit codes."""
    from moe_cl.checkpoint import CheckpointError
    from moe_cl.experiment import run_experiment

    folder = folder_of(out, variant.name, seed)
    label = f"run {variant.name} seed {seed} ({folder})"
    if (folder / RESULTS).exists() and read_results(folder) is None:
        echo(f"{folder / RESULTS} is unreadable: the run is resumed (or trained again)")
    made = None
    try:
        cfg = _run_config(benchmark, variant, seed, out, extra)
        resume = has_checkpoint(folder)
        if folder.exists() and not resume:
            shutil.rmtree(folder)  # started but nothing finished: start again
        made = make_folder(folder)
        run_experiment(cfg, folder, resume=resume, echo=lambda _: None)
    except Exception as err:
        code, message = end_failed_run(err, folder, made)  # raises err again if it is a bug
        if isinstance(err, CheckpointError):
            message += "; delete the folder of that checkpoint to train its run again"
        raise SuiteError(f"{label}: {message}", code) from None
    results = read_results(folder)
    if not is_complete(results):
        raise SuiteError(f"{label}: training ended without a complete {folder / RESULTS}")
    return results


def _run_config(benchmark: str, variant: Variant, seed: int, out: Path,
                extra: Sequence[str]) -> DictConfig:
    folder = folder_of(out, variant.name, seed)
    argv = [f"benchmark={benchmark}", *variant.argv, f"seed={seed}", f"out_dir={folder}",
            "logging.interactive=false", "logging.tensorboard=false"]
    teacher = folder_of(out, variant.teacher, seed)
    if variant.teacher and is_complete(read_results(teacher)):
        argv.append(f"distill.teacher={teacher}")
    return compose([*argv, *_applicable(compose(argv), extra)])


# Where a run lies, how it was logged or placed and what more it measured; not what it
# computes (runs made before train.reference_train_error existed stay valid; they lack its field).
NOT_SETTINGS = ("resume", "out_dir", "logging", "device", "data.root", "distill.teacher",
                "train.checkpoint_every_epochs", "train.reference_train_error")


def _check_settings(benchmark: str, variant: Variant, seed: int, out: Path,
                    extra: Sequence[str]) -> None:
    """A run found in ``out`` (finished, or to be resumed) must have been made with the
    settings this call asks for: otherwise the tables would mix settings silently."""
    from moe_cl.config import ConfigError, changed_settings, load_saved

    folder = folder_of(out, variant.name, seed)
    try:
        changed = changed_settings(load_saved(folder / CONFIG),
                                   _run_config(benchmark, variant, seed, out, extra), NOT_SETTINGS)
    except ConfigError as err:
        raise SuiteError(f"run {variant.name} seed {seed} ({folder}): {err}") from None
    if changed:
        raise SuiteError(f"run {variant.name} seed {seed} ({folder}) was made with other "
                         f"settings ({'; '.join(changed[:3])}); repeat its overrides or choose "
                         "another --out")


def positive_int(text: str) -> int:
    """argparse type of --seeds: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_suite_arguments(parser: argparse.ArgumentParser, argv: list[str] | None,
                          default_out: str, *, seeds: int, example: str,
                          controlled: dict[str, str] | None = None
                          ) -> tuple[argparse.Namespace, list[str]]:
    """The options every suite command shares: --seeds (default ``seeds``), --out,
    --report-only, and key=value overrides applied to every run (``example``: some, for the
    help). Overrides of keys the suite sets itself (:data:`CONTROLLED`, plus the command's
    ``controlled``) are usage errors naming the option to use instead."""
    forbidden = CONTROLLED | (controlled or {})
    parser.add_argument("--seeds", type=positive_int, default=seeds,
                        help=f"seeds 0..N-1, N >= 1 (default {seeds})")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default runs/{default_out}/<benchmark>)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tabulate the runs already finished in --out "
                             "(an error if there are none)")
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
    args.out = args.out or Path("runs") / default_out / args.benchmark
    return args, overrides


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
