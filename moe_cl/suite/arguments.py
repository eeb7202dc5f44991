"""The options every suite command shares (``python -m moe_cl.compare``, ``python -m
moe_cl.reproduce``): seeds, the suite folder, where the runs execute, and key=value overrides
applied to every run; every usage error is one line, exit 2."""

from __future__ import annotations

import argparse
import importlib
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

from moe_cl.errors import USAGE_ERROR
from moe_cl.suite import launch as launching
from moe_cl.suite.launch import Launch

EXIT_CODES = ("Exit codes: 0 done; 1 a run's process or SLURM task died without a result "
              "(cancelled, timed out, failed; or a bug); 2 usage error (bad option or override, "
              "a run's configuration, data, device or checkpoint, a run folder in use by another "
              "process, a job array SLURM refused or a task it can never start; nothing "
              "finished to tabulate with --report-only); 3 a run stopped on a NaN or infinite "
              "loss; 4 no space left to write a file (free some, then run the same command "
              "again); 130 Ctrl-C (the SLURM tasks submitted are cancelled).")
# Keys the suite sets itself for every run, and how to choose them instead.
CONTROLLED = {
    "seed": "use --seeds N (runs seeds 0..N-1)",
    "benchmark": "the benchmark is the command's first argument",
    "strategy": "the suite's variants set it",
    "out_dir": "use --out (each run goes to OUT/<run name>/seed-<k>)",
    "resume": "the suite resumes by itself: run the same command again",
}


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


