"""``python -m moe_cl.reproduce paper_fmnist --seeds 5``: the paper's tables, beside its numbers.

Runs every paper variant (single model, original MoE +- L_importance / L_s, attentive +- the
same, and the two distilled models) on a paper benchmark, then writes

* ``runs.csv`` / ``runs.json``: one row per run (train and test error, I(E;Y_pred), H_s, H_u...),
* ``table.md`` / ``table.json``: both aggregations, (a) the paper's: per category the run with
  the minimum training error over all runs and hyperparameters, and the std of the test error
  over all runs of the category; (b) mean +- std over seeds at the preset hyperparameters,
  each beside the published value and the difference; (c) a category whose published row was
  trained otherwise than its name says (CIFAR-100 attentive + L_s: without L_s) beside that
  row and beside our run of what it was trained as.

The training error comes in two measures: the reference code's (``train_error_reference``: a
second no-grad forward after each optimiser step, averaged over the epoch's batches; the paper_*
benchmarks measure it) and Avalanche's (``train_error``: the accuracy of the forward before each
step). The paper's selection uses the reference's; a category with runs that lack it (made
before it was measured) falls back to Avalanche's, and the table says so.

The tables cover every finished run in --out (any variant, seed or grid point), so a run of a
subset adds to them. Interrupted, it resumes: finished runs are read back, the interrupted one
continues from its checkpoint. ``--grid`` adds the paper's hyperparameter grids.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import yaml

from moe_cl.storage.figures import heatmaps_side_by_side, save_figure
from moe_cl.storage.run_folder import read_results
from moe_cl.suite import grids
from moe_cl.suite.arguments import parse_suite_arguments
from moe_cl.suite.command import train_and_tabulate
from moe_cl.suite.spec import SuiteError, Variant
from moe_cl.suite.tables import COLLAPSE_H_U, collapsed, format_mean_std, mean_std

GRID = "reproduce"
REFERENCE, PRE_STEP = "train_error_reference", "train_error"  # the two train-error measures
COLUMNS = (REFERENCE, PRE_STEP, "test_error", "MI_pred", "H_s", "H_u")
# Both train-error measures are compared with the published one (the reference's).
PUBLISHED_COLUMNS = {REFERENCE: "train", PRE_STEP: "train", "test_error": "test",
                     "MI_pred": "MI_pred", "H_s": "H_s", "H_u": "H_u"}


def published(benchmark: str) -> dict:
    text = resources.files("moe_cl.suite").joinpath("published.yaml").read_text()
    return yaml.safe_load(text).get(benchmark, {})


def benchmarks() -> list[str]:
    """The paper benchmarks of the grid file."""
    return list(grids.load(GRID).get("benchmarks", dict))


def categories() -> list[str]:
    """The paper's variants (model categories), in the tables' order."""
    return list(grids.load(GRID).get("categories", dict))


def variants(benchmark: str, names: list[str], grid: bool) -> list[Variant]:
    """The runs of the categories ``names`` on ``benchmark``: each at its preset
    hyperparameters, and with ``grid`` each point of its grid (a distilled point distils the
    same point of its teacher)."""
    data = grids.load(GRID)
    parameters = data.get("benchmarks", dict).get(benchmark)
    parameters = data.check(parameters, dict, f"benchmarks.{benchmark}")
    out = []
    for name in names:
        where = f"categories.{name}"
        category = data.check(data.get("categories", dict).get(name), dict, where)
        unknown = set(category) - {"argv", "grid", "teacher"}
        if unknown:
            raise data.error(f"{where}: unknown keys {', '.join(map(str, unknown))} (a category "
                             "has argv, grid, teacher)")
        argv = tuple(data.fill(a, parameters, f"{where}.argv")
                     for a in data.get("argv", list, category, at=where))
        teacher = data.get("teacher", str, category, default="", at=where)
        out.append(Variant(name, argv, name, teacher=teacher))
        if not grid or "grid" not in category:
            continue
        group = data.get("grids", dict).get(data.get("grid", str, category, at=where))
        for point in data.expand(group, parameters, f"grids.{category['grid']}"):
            out.append(Variant(f"{name}{point.name}", (*argv, *point.argv), name, point.values,
                               teacher and f"{teacher}{point.name}"))
    return out


def selection_measure(runs: list[dict]) -> str:
    """The train error the paper's selection minimises over ``runs``: the reference's when
    every run has it, else Avalanche's pre-step one (runs made before the reference's was
    measured lack it, and the two measures do not compare)."""
    return REFERENCE if all(r.get(REFERENCE) is not None for r in runs) else PRE_STEP


def aggregate(rows: list[dict], benchmark: str, names: list[str]) -> dict:
    """Both aggregations per category, with the published numbers and differences."""
    paper = published(benchmark)
    table = {}
    for name in names:
        runs = [r for r in rows if r["category"] == name]
        fixed = [r for r in runs if r["run"] == name]
        if not runs:
            continue
        measure = selection_measure(runs)
        finished = [r for r in runs if r.get(measure) is not None]
        best = min(finished, key=lambda r: r[measure]) if finished else runs[0]
        test_std = mean_std([r["test_error"] for r in runs])
        entry = {
            "runs": len(runs),
            "selected_by": measure,
            "runs_without_reference": sum(r.get(REFERENCE) is None for r in runs),
            "best_run": {"run": best["run"], "seed": best["seed"],
                         **{c: best.get(c) for c in COLUMNS}},
            "std_test_error_all_runs": test_std[1] if test_std else None,
            "mean_std_fixed": {c: mean_std([r.get(c) for r in fixed]) for c in COLUMNS},
            "seeds_fixed": len(fixed),
            "collapsed_runs": collapsed(runs),
            "published": paper.get(name),
        }
        table[name] = entry
    return table


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _diff(value, ref) -> str:
    if value is None or ref is None:
        return ""
    return f" ({value - ref:+.3f})"


HEADERS = {REFERENCE: "train (reference)", PRE_STEP: "train (pre-step)", "test_error": "test",
           "MI_pred": "I(E;Y_pred)", "H_s": "H_s", "H_u": "H_u"}
SELECTION_NOTE = (
    "Train errors: *reference* is measured as the reference code does (a second forward without "
    "gradients after each optimiser step, averaged over the epoch's batches), *pre-step* is "
    "Avalanche's accuracy of the training forward before each step; both are compared with the "
    "published (reference) value. The selection minimises the reference's; a category with runs "
    "made before it was measured falls back to the pre-step one, as its *selected by* says.")


def markdown(table: dict, benchmark: str) -> str:
    lines = [f"### {benchmark}: run with the minimum training error per category (paper's "
             "selection); in brackets: difference to the published value", "", SELECTION_NOTE,
             "", _header("model", "runs", "selected by", *HEADERS.values(), "std test (all runs)",
                         "collapsed")]
    for name, entry in table.items():
        best, pub = entry["best_run"], entry["published"] or {}
        cells = [_num(best[c]) + _diff(best[c], pub.get(PUBLISHED_COLUMNS[c])) for c in COLUMNS]
        std = entry["std_test_error_all_runs"]
        lines.append(f"| {_label(name, pub)} | {entry['runs']} | {_selected_by(entry)} | "
                     + " | ".join(cells)
                     + f" | {_num(std)}{_diff(std, pub.get('std'))} | {entry['collapsed_runs']} |")
    lines += ["", f"### {benchmark}: mean +- std over seeds at the preset hyperparameters", "",
              _header("model", "seeds", *HEADERS.values(), "published test",
                      "test within 2 published std")]
    for name, entry in table.items():
        pub = entry["published"] or {}
        stats = entry["mean_std_fixed"]
        cells = [format_mean_std(stats[c]) for c in COLUMNS]
        within = _within(entry)
        verdict = "" if within is None else "yes" if within else "no"
        lines.append(f"| {_label(name, pub)} | {entry['seeds_fixed']} | " + " | ".join(cells)
                     + f" | {_num(pub.get('test'))} | {verdict} |")
    lines += _trained_otherwise(table, benchmark)
    verdicts = targets(table)
    if verdicts:
        lines += ["", "Targets (means over seeds at the preset hyperparameters):", "", *verdicts]
    return "\n".join(lines) + "\n"


def _header(*names: str) -> str:
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)


def _label(name: str, pub: dict) -> str:
    """The category's name, with what its published row was trained as when that differs."""
    other = pub.get("trained_as")
    return f"{name} (published row trained as {other})" if other else name


def _selected_by(entry: dict) -> str:
    if entry["selected_by"] == REFERENCE:
        return "reference"
    return f"pre-step ({entry['runs_without_reference']} of {entry['runs']} runs lack reference)"


def _trained_otherwise(table: dict, benchmark: str) -> list[str]:
    """For each category whose published row was trained as another category (its
    ``trained_as``), a table of it beside that row and beside our runs of the other one."""
    lines = []
    for name, entry in table.items():
        pub = entry["published"] or {}
        other = pub.get("trained_as")
        if not other:
            continue
        lines += ["", f"### {benchmark}: {name} beside the published row, which was trained as "
                  f"{other}", "", f"{pub.get('caveat', '')} Selected runs (paper's selection) and "
                  "the mean over seeds at the preset hyperparameters:", "",
                  _header("row", "runs", *HEADERS.values(), "mean test over seeds")]
        for category in (name, other):
            ours, theirs = table.get(category), published(benchmark).get(category) or {}
            if ours is not None:
                best = ours["best_run"]
                lines.append(f"| ours: {category} | {ours['runs']} | "
                             + " | ".join(_num(best[c]) for c in COLUMNS) + " | "
                             + format_mean_std(ours["mean_std_fixed"]["test_error"]) + " |")
            else:
                lines.append(f"| ours: {category} | 0 | " + " | ".join("-" for _ in COLUMNS)
                             + " | - |")
            cells = [_num(theirs.get(PUBLISHED_COLUMNS[c])) if c != PRE_STEP else "-"
                     for c in COLUMNS]
            mean = theirs.get("mean_test")
            lines.append(f"| published: {category} | - | " + " | ".join(cells) + " | "
                         + format_mean_std(tuple(mean) if mean else None) + " |")
    return lines


def _within(entry: dict) -> bool | None:
    stats, pub = entry["mean_std_fixed"]["test_error"], entry["published"] or {}
    if stats is None or pub.get("test") is None:
        return None
    return stats[0] <= pub["test"] + 2 * pub["std"]


def within_published_std(table: dict) -> list[str]:
    judged = {name: _within(entry) for name, entry in table.items()}
    judged = {name: ok for name, ok in judged.items() if ok is not None}
    if not judged:
        return []
    missed = [name for name, ok in judged.items() if not ok]
    return [f"- mean test error within 2 published std (or better): {len(judged) - len(missed)} "
            f"of {len(judged)} variants"
            + (f"; NOT met by {', '.join(missed)}" if missed else ": met")]


def better_and_more_specialised(table: dict, category: str, than: str, label: str) -> list[str]:
    """``category`` has the lower mean test error and the higher I(E;Y_pred) than ``than``."""
    if than not in table or category not in table:
        return []
    other, ours = table[than]["mean_std_fixed"], table[category]["mean_std_fixed"]
    if not (other["test_error"] and ours["test_error"] and other["MI_pred"] and ours["MI_pred"]):
        return []
    better = (ours["test_error"][0] < other["test_error"][0]
              and ours["MI_pred"][0] > other["MI_pred"][0])
    return [f"- {label}: test error {ours['test_error'][0]:.3f} vs {other['test_error'][0]:.3f}, "
            f"I(E;Y_pred) {ours['MI_pred'][0]:.3f} vs {other['MI_pred'][0]:.3f}: "
            f"{'met' if better else 'NOT met'}"]


def collapse(table: dict, category: str, label: str) -> list[str]:
    """How many runs of ``category`` collapsed (the paper's case for its regularisers)."""
    if category not in table:
        return []
    entry = table[category]
    shown = entry["collapsed_runs"] > 0
    return [f"- collapse of {label} (H_u < {COLLAPSE_H_U} bits): {entry['collapsed_runs']} of "
            f"{entry['runs']} runs{'' if shown else ' (not reproduced)'}"]


CHECKS: dict[str, Callable[..., list[str]]] = {check.__name__: check for check in (
    within_published_std, better_and_more_specialised, collapse)}


def targets(table: dict) -> list[str]:
    """The grid file's reproduction targets, each with its verdict and numbers."""
    return [line for target in grids.load(GRID).targets(CHECKS) for line in target.verdicts(table)]


def write_heatmaps(out: Path, table: dict, rows: list[dict],
                   names: tuple[str, ...] = ("moe", "attentive_ls")) -> Path | None:
    """``heatmaps.png``: expert x class counts of the selected run of each named category."""
    matrices = {}
    for name in names:
        if name not in table:
            continue
        best = table[name]["best_run"]
        results = read_results(out / best["run"] / f"seed-{best['seed']}") or {}
        counts = results.get("expert_class_counts")
        if counts:
            matrices[f"{name} (seed {best['seed']}, test error {best['test_error']:.3f})"] = counts
    if not matrices:
        return None
    path = out / "heatmaps.png"
    save_figure(heatmaps_side_by_side(matrices), path)
    return path


def main(argv: list[str] | None = None) -> int:
    try:
        choices, names = benchmarks(), categories()
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    parser = argparse.ArgumentParser(prog="python -m moe_cl.reproduce",
                                     description="Reproduce the paper's tables (they cover every "
                                                 "finished run in --out).")
    parser.add_argument("benchmark", choices=choices)
    parser.add_argument("--variants", nargs="+", choices=names, default=names,
                        help="variants to train (default all)")
    parser.add_argument("--grid", action="store_true", help="also run the paper's grids")
    args, overrides = parse_suite_arguments(
        parser, argv, "reproduce", seeds=5, example="data.root=data device=cuda",
        controlled={"strategy": "choose with --variants"})
    try:
        chosen = variants(args.benchmark, args.variants, args.grid)
        everything = variants(args.benchmark, names, True)
        targets({})  # a bad target is an error before any run starts
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code

    def tabulate(rows: list[dict]) -> tuple[dict, str]:
        table = aggregate(rows, args.benchmark, names)
        write_heatmaps(args.out, table, rows)
        return table, markdown(table, args.benchmark)

    code = train_and_tabulate(args, overrides, chosen, everything, tabulate)
    if code == 0:
        out = args.out
        print(f"raw runs: {out / 'runs.csv'}; tables: {out / 'table.md'}, {out / 'table.json'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
