"""Many runs of one benchmark (variants x seeds), resumable, feeding the reproduction tables and
the continual-learning comparison.

Each run lives in ``OUT/<run name>/seed-<k>/`` exactly as ``python -m moe_cl.run`` would write
it: finished runs are read back, interrupted ones resume from their checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moe_cl.config import compose
from moe_cl.results import atomic_write_text, write_json

COLLAPSE_H_U = 0.1  # bits: (nearly) every sample routed to one expert
MOE_ONLY = ("regularizer.", "distill.", "experts.", "model.gate", "model.output", "eval.top_k")
FIELDS = ("run", "category", "seed", "train_error", "test_error", "MI_pred", "MI", "H_s", "H_u",
          "average_accuracy", "forgetting", "task_aware_average_accuracy", "num_experts",
          "experts_added", "num_parameters", "wall_time_s")


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


def run_suite(benchmark: str, variants: Sequence[Variant], seeds: Sequence[int], out: Path,
              *, extra: Sequence[str] = (), echo: Callable[[str], None] = print,
              run: bool = True) -> list[dict]:
    """Run every variant with every seed (skipping finished runs); returns one row per run.
    With ``run=False`` nothing is trained: the rows are the runs already finished."""
    from moe_cl.experiment import run_experiment

    rows = []
    total = len(variants) * len(seeds)
    started = time.perf_counter()
    spent_on_new = 0.0
    new_runs = 0
    # Seeds outermost: a partial suite already covers every variant.
    for index, (seed, variant) in enumerate(((s, v) for s in seeds for v in variants), start=1):
        folder = out / variant.name / f"seed-{seed}"
        results_path = folder / "results.json"
        done = _is_complete(results_path)
        if not done and not run:
            continue
        if not done:
            argv = [f"benchmark={benchmark}", *variant.argv, f"seed={seed}", f"out_dir={folder}",
                    "logging.interactive=false", "logging.tensorboard=false"]
            teacher = out / variant.teacher / f"seed-{seed}"
            if variant.teacher and _is_complete(teacher / "results.json"):
                argv.append(f"distill.teacher={teacher}")
            cfg = compose([*argv, *_applicable(compose(argv), extra)])
            resume = (folder / "checkpoint.pt").exists()
            if folder.exists() and not resume:
                shutil.rmtree(folder)  # started but nothing finished: start again
            folder.mkdir(parents=True, exist_ok=True)
            run_started = time.perf_counter()
            run_experiment(cfg, folder, resume=resume, echo=lambda _: None)
            spent_on_new += time.perf_counter() - run_started
            new_runs += 1
        results = json.loads(results_path.read_text())
        row = {"run": variant.name, "category": variant.group, "seed": seed,
               **{k: results.get(k) for k in FIELDS[3:]}}
        row.update({f"hp_{k}": v for k, v in variant.hyperparameters.items()})
        rows.append(row)
        remaining = total - index
        eta = spent_on_new / new_runs * remaining if new_runs else 0.0
        echo(f"[{index}/{total}] {variant.name} seed {seed}: test error "
             f"{_fmt(row['test_error'])}, train error {_fmt(row['train_error'])}"
             f"{' (done before)' if done else ''}; elapsed {time.perf_counter() - started:.0f} s,"
             f" about {eta:.0f} s left")
    return rows


def parse_suite_arguments(parser: argparse.ArgumentParser, argv: list[str] | None,
                          default_out: str) -> tuple[argparse.Namespace, list[str]]:
    """The options every suite command shares: --out, --report-only, and key=value overrides
    applied to every run."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default runs/{default_out}/<benchmark>)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tabulate the runs already finished in --out")
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.out = args.out or Path("runs") / default_out / args.benchmark
    return args, overrides


def _applicable(base, extra: Sequence[str]) -> list[str]:
    """The suite-wide overrides that apply to a run: the mixture's keys only to mixtures, the
    distillation's only to runs that distil."""
    if base.method != "moe":
        return [a for a in extra if not a.startswith(MOE_ONLY)]
    if not base.distill.epochs:
        return [a for a in extra if not a.startswith("distill.")]
    return list(extra)


def _is_complete(results_path: Path) -> bool:
    return results_path.exists() and json.loads(results_path.read_text())["status"] == "complete"


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
