"""``python -m moe_cl.compare split_fmnist --seeds 3``: MoE strategies against Avalanche's
baselines on a continual-learning stream, class- and task-incremental.

Every MoE expert policy (fixed, grow, grow with frozen old experts, the same with added experts
copied from the busiest ones, grow on demand; task-incremental also with each task routed to its
own experts) with the attentive gate, each with and without L_s and with and without replay,
and the unregularised original (softmax-gate) mixture with a fixed set of experts; the routed
mixture (``routed+FEATURES``: routing that cannot forget, training/routed.py) in each feature space
of its router, and in its default one also with replay, without L_s, with a cap of 6 experts
(reuse) and with the experts' SEED vote (``+seed``) (task-incremental: the default one, with and
without replay); next to
every method of the registry without a mixture, all with the same epochs: Avalanche's naive,
EWC, LwF, replay, joint training and SI on the single-expert backbone; the continual ones also
on the gate network as a classifier (``gate-NAME``: model.backbone=gate, about the mixture's
parameters); and Avalanche's streaming LDA in each feature space of the router
(``slda+FEATURES``), which keeps no sample and needs no task label: in task-incremental runs its
scores are masked to each sample's task's classes, like every model's. Writes ``runs.csv``,
``table.json`` and ``table.md`` (mean +- std over seeds) covering every finished run in --out,
so a run of a subset (``--only``, fewer seeds) adds to the table. Interrupted, it resumes.
The runs and targets: moe_cl/suite/grids/compare_<benchmark>.yaml, else compare_generic.yaml.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from moe_cl.suite import grids
from moe_cl.suite.arguments import parse_suite_arguments
from moe_cl.suite.command import train_and_tabulate
from moe_cl.suite.spec import SuiteError, Variant
from moe_cl.suite.tables import COLLAPSE_H_U, collapsed, format_mean_std, mean_std
from moe_cl.training.methods import METHODS, key_applies

GENERIC = "compare_generic"
SCENARIOS = ("class", "task")
COLUMNS = ("average_accuracy", "forgetting", "task_aware_average_accuracy", "H_s", "H_u", "MI",
           "router_error", "num_experts", "num_parameters", "wall_time_s")


def benchmarks() -> list[str]:
    """The benchmarks with a comparison: the generic grid's and those with a grid of their own."""
    own = [name.removeprefix("compare_") for name in grids.names()
           if name.startswith("compare_") and name != GENERIC]
    listed = grids.load(GENERIC).get("benchmarks", list)
    return list(dict.fromkeys([*listed, *own]))


def grid_of(benchmark: str | None) -> grids.Grid:
    """The benchmark's own grid file, else the generic one."""
    own = f"compare_{benchmark}"
    return grids.load(own if own in grids.names() else GENERIC)


def variants(scenario: str, benchmark: str | None = None) -> list[Variant]:
    """The runs of ``scenario`` in the benchmark's grid, in the table's order."""
    grid = grid_of(benchmark)
    return [Variant(point.name, point.argv) for point in
            grid.variants(grid.get("variants", list), {"scenario": scenario})]


def baselines() -> list[str]:
    """The methods without a mixture, each run with its strategy preset: Avalanche's strategies
    on the single-expert backbone (the continual ones also on the gate network) and streaming
    LDA on frozen features (``slda``)."""
    return [name for name, method in METHODS.items() if not method.mixture]


def table(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["run"] for r in rows):
        runs = [r for r in rows if r["run"] == name]
        out[name] = {"seeds": len(runs), **{c: mean_std([r[c] for r in runs]) for c in COLUMNS},
                     "collapsed": collapsed(runs) if runs[0]["H_u"] is not None else None}
    return out


def markdown(summary: dict, benchmark: str) -> str:
    head = ("| strategy | seeds | final avg accuracy | forgetting | task-aware accuracy | H_s |"
            " H_u | I(E;Y) | router error | experts | parameters | wall time (s) | collapsed |")
    lines = [f"### {benchmark}: mean +- std over seeds; collapsed: runs with H_u < "
             f"{COLLAPSE_H_U} bits (every test sample on one expert)", "", head,
             "|" + "---|" * (len(COLUMNS) + 3)]
    for name, entry in summary.items():
        cells = []
        for column in COLUMNS:
            value = entry[column]
            if value is None:
                cells.append("-")
            elif column in ("num_parameters", "num_experts"):
                cells.append(f"{value[0]:,.0f}")
            elif column == "wall_time_s":
                cells.append(f"{value[0]:.0f}")
            else:
                cells.append(format_mean_std(value))
        cells.append("-" if entry["collapsed"] is None else str(entry["collapsed"]))
        lines.append(f"| {name} | {entry['seeds']} | " + " | ".join(cells) + " |")
    verdicts = targets(summary, benchmark)
    if verdicts:
        lines += ["", "Targets (final average accuracy, means over seeds):", "", *verdicts]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Summary:
    """What a target reads: the table (run name -> its entry) and the grid's runs."""

    entries: dict
    variants: dict[str, list[Variant]]  # per scenario

    def mean(self, name: str, column: str = "average_accuracy") -> float | None:
        value = self.entries.get(name, {}).get(column)
        return value[0] if value else None

    def best(self, names: list[str]) -> tuple[str, float] | None:
        scored = [(n, self.mean(n)) for n in names]
        scored = [(n, v) for n, v in scored if v is not None]
        return max(scored, key=lambda item: item[1]) if scored else None

    def rows_of(self, methods: list[str], scenario: str) -> list[str]:
        """The rows in the table of ``methods`` run with their strategy preset (every form
        each is compared in)."""
        names = [v.name for method in methods for v in self.variants[scenario]
                 if f"strategy={method}" in v.argv]
        return [name for name in names if name in self.entries]

    def mixtures(self, prefix: str, scenario: str) -> list[str]:
        return [n for n in self.entries if n.startswith(prefix) and n.endswith(f"-{scenario}")]


def _continual(replays: bool) -> list[str]:
    """The continual baselines (the joint upper bound is none) with or without a memory of
    past samples."""
    return [b for b in baselines()
            if not METHODS[b].joint and key_applies(b, "replay.mem_size") == replays]


def moe_without_replay_beats_baselines(summary: Summary, scenario: str) -> list[str]:
    best = summary.best([n for n in summary.mixtures("moe-", scenario) if "+replay" not in n])
    no_replay = _continual(replays=False)
    baseline = summary.best(summary.rows_of(no_replay, scenario))
    if not (best and baseline):
        return []
    verdict = "met" if best[1] > baseline[1] else "NOT met"
    compared = [b for b in no_replay if summary.rows_of([b], scenario)]
    return [f"- {scenario}-incremental, no replay: best MoE {best[0]} {best[1]:.3f} vs best of "
            f"{'/'.join(compared)} {baseline[0]} {baseline[1]:.3f}: {verdict}"]


def best_moe_reaches(summary: Summary, scenario: str, accuracy: float) -> list[str]:
    moe = summary.mixtures("moe-", scenario)
    best_any, best = summary.best(moe), summary.best([n for n in moe if "+replay" not in n])
    if not best_any:
        return []
    verdict = "met" if best_any[1] >= accuracy else "NOT met"
    return [f"- {scenario}-incremental: best MoE {best_any[0]} {best_any[1]:.3f} (target >= "
            f"{accuracy}): {verdict}; without replay: "
            + (f"{best[0]} {best[1]:.3f}" if best else "-")]


def moe_with_replay_beats_replaying_baselines(summary: Summary, scenario: str,
                                              samples: int) -> list[str]:
    with_replay = summary.best([n for n in summary.mixtures("moe-", scenario) if "+replay" in n])
    replay = summary.best(summary.rows_of(_continual(replays=True), scenario))
    if not (with_replay and replay):
        return []
    verdict = "met" if with_replay[1] >= replay[1] else "NOT met"
    return [f"- {scenario}-incremental with replay ({samples} samples): best MoE "
            f"{with_replay[0]} {with_replay[1]:.3f} vs {replay[0].removesuffix(f'-{scenario}')} "
            f"{replay[1]:.3f}: {verdict}"]


def _best_routed_without_replay(summary: Summary) -> tuple[str, float] | None:
    return summary.best([n for n in summary.mixtures("routed+", "class") if "+replay" not in n])


def routed_beats_slda(summary: Summary, accuracy: float, margin: float) -> list[str]:
    best = _best_routed_without_replay(summary)
    slda = summary.best(summary.rows_of(["slda"], "class"))
    if not (best and slda):
        return []
    verdict = "met" if best[1] >= accuracy and best[1] >= slda[1] + margin else "NOT met"
    return [f"- routed, class-incremental, no stored samples: {best[0]} {best[1]:.3f} (target >= "
            f"{accuracy} and >= best SLDA {slda[0]} {slda[1]:.3f} + {margin}): {verdict}"]


def routed_buffer_helps(summary: Summary, buffered: str, plain: str, samples: int,
                        accuracy: float) -> list[str]:
    value, without = summary.mean(buffered), summary.mean(plain)
    if value is None or without is None:
        return []
    verdict = "met" if value >= accuracy and value > without else "NOT met"
    return [f"- routed, class-incremental, {samples}-sample buffer: {value:.3f} (target >= "
            f"{accuracy} and above {without:.3f} without it): {verdict}"]


def routed_task_reaches(summary: Summary, accuracy: float) -> list[str]:
    task = summary.best(summary.mixtures("routed+", "task"))
    if not task:
        return []
    verdict = "met" if task[1] >= accuracy else "NOT met"
    return [f"- routed, task-incremental: {task[0]} {task[1]:.3f} (target >= {accuracy}): "
            f"{verdict}"]


def routed_experts_specialise(summary: Summary, bits: float) -> list[str]:
    best = _best_routed_without_replay(summary)
    mi = summary.mean(best[0], "MI") if best else None
    if mi is None:
        return []
    collapsed_runs = sum(summary.entries[n]["collapsed"] or 0
                         for n in summary.mixtures("routed+", "class"))
    verdict = "met" if mi >= bits and not collapsed_runs else "NOT met"
    return [f"- routed, experts specialise: I(E;Y) of {best[0]} {mi:.2f} bits (target >= "
            f"{bits}), collapsed runs among the routed rows {collapsed_runs} (target 0): "
            f"{verdict}"]


CHECKS: dict[str, Callable[..., list[str]]] = {check.__name__: check for check in (
    moe_without_replay_beats_baselines, moe_with_replay_beats_replaying_baselines,
    best_moe_reaches, routed_beats_slda, routed_buffer_helps, routed_task_reaches,
    routed_experts_specialise)}


def targets(summary: dict, benchmark: str | None = None) -> list[str]:
    """The targets of the benchmark's grid, each with its verdict and the numbers behind it."""
    grid = grid_of(benchmark)
    context = Summary(summary, {s: variants(s, benchmark) for s in SCENARIOS})
    return [line for target in grid.targets(CHECKS) for line in target.verdicts(context)]


def main(argv: list[str] | None = None) -> int:
    try:
        choices = benchmarks()
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    parser = argparse.ArgumentParser(prog="python -m moe_cl.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=choices)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--only", nargs="+", default=None,
                        help="run names to train (prefix match, e.g. moe-grow naive); each must "
                             "match a run of --scenarios. The table still covers every finished "
                             "run in --out")
    args, overrides = parse_suite_arguments(
        parser, argv, "compare", seeds=3, example="train.epochs=1 device=cuda",
        controlled={"strategy": "choose runs with --only", "scenario": "use --scenarios"})
    try:
        pool = [v for s in args.scenarios for v in variants(s, args.benchmark)]
        everything = [v for s in SCENARIOS for v in variants(s, args.benchmark)]
        targets({}, args.benchmark)  # a bad target is an error before any run starts
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if args.only is not None:
        unmatched = [p for p in args.only if not any(v.name.startswith(p) for v in pool)]
        if unmatched:
            names = dict.fromkeys(v.name.rsplit("-", 1)[0] for v in pool)
            hint = ("; key=value overrides go before --only" if any("=" in p for p in unmatched)
                    else "")
            parser.error(f"--only {' '.join(unmatched)}: no such run in scenarios "
                         f"{' '.join(args.scenarios)}{hint}; valid names (prefixes of "
                         f"NAME-<scenario>): {', '.join(names)}")
    chosen = [v for v in pool if args.only is None or v.name.startswith(tuple(args.only))]

    def tabulate(rows: list[dict]) -> tuple[dict, str]:
        summary = table(rows)
        return summary, markdown(summary, args.benchmark)

    return train_and_tabulate(args, overrides, chosen, everything, tabulate)


if __name__ == "__main__":
    sys.exit(main())
