"""A suite command once its arguments are parsed: train the runs chosen, then tabulate every
finished run in the suite folder (the tables are written once, at the end)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from moe_cl.suite.launch import Launch
from moe_cl.suite.schedule import train_runs
from moe_cl.suite.spec import SuiteError, Variant
from moe_cl.suite.tables import finished_runs, write_tables


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


