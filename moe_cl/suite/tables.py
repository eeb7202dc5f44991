"""A suite's rows and the numbers its tables are made of: one row per finished run in the suite
folder (whichever seeds and selection made it, so a run of a subset adds to the tables), their
statistics, and the files written from them (runs.csv/json, table.json, table.md)."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from moe_cl.storage.run_folder import atomic_write_text, is_complete, read_results, write_json
from moe_cl.suite.spec import Variant, check_benchmark, folder_of

COLLAPSE_H_U = 0.1  # bits: (nearly) every sample routed to one expert
FIELDS = ("run", "category", "seed", "train_error", "train_error_reference", "test_error",
          "MI_pred", "MI", "H_s", "H_u", "average_accuracy", "forgetting",
          "task_aware_average_accuracy", "router_error", "num_experts", "experts_added",
          "num_parameters", "wall_time_s")


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
                check_benchmark(results, benchmark, folder)
                rows.append({"run": variant.name, "category": variant.group, "seed": seed,
                             **{k: results.get(k) for k in FIELDS[3:]},
                             **{f"hp_{k}": v for k, v in variant.hyperparameters.items()}})
    return rows


def write_tables(out: Path, rows: list[dict], table: dict, text: str) -> None:
    """runs.csv/json, table.json and table.md, each written whole."""
    write_rows(rows, out / "runs.csv")
    write_json(out / "table.json", table)
    atomic_write_text(out / "table.md", text)


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


def format_number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
