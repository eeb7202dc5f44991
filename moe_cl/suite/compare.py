"""``python -m moe_cl.compare split_fmnist --seeds 3``: MoE strategies against Avalanche's
baselines on a continual-learning stream, class- and task-incremental.

Every MoE expert policy (fixed, grow, grow with frozen old experts, the same with added experts
copied from the busiest ones, grow on demand; task-incremental also with each task routed to its
own experts) with the attentive gate, each with and without L_s and with and without replay,
and the unregularised original (softmax-gate) mixture with a fixed set of experts; the routed
mixture (``routed+FEATURES``: routing that cannot forget, training/routed.py) in each feature space
of its router, and in its default one also with replay, without L_s and with a cap of 6 experts
(reuse) (task-incremental: the default one, with and without replay); next to
every method of the registry without a mixture, all with the same epochs: Avalanche's naive,
EWC, LwF, replay, joint training and SI on the single-expert backbone; the continual ones also
on the gate network as a classifier (``gate-NAME``: model.backbone=gate, about the mixture's
parameters); and Avalanche's streaming LDA in each feature space of the router
(``slda+FEATURES``), which keeps no sample and needs no task label: in task-incremental runs its
scores are masked to each sample's task's classes, like every model's. Writes ``runs.csv``,
``table.json`` and ``table.md`` (mean +- std over seeds) covering every finished run in --out,
so a run of a subset (``--only``, fewer seeds) adds to the table. Interrupted, it resumes.
"""

from __future__ import annotations

import argparse
import sys

from moe_cl.suite import engine as suite
from moe_cl.training.methods import METHODS, key_applies
from moe_cl.training.options import ROUTER_FEATURES

POLICIES = {
    "fixed": ("experts.policy=fixed", "model.num_experts=10"),
    "grow": ("experts.policy=grow", "model.num_experts=2", "experts.per_experience=2"),
    "grow_freeze": ("experts.policy=grow", "model.num_experts=2", "experts.per_experience=2",
                    "experts.freeze_old=true"),
    "grow_on_demand": ("experts.policy=grow_on_demand", "model.num_experts=2",
                       "experts.per_experience=2"),
}
# Added experts start as copies of the busiest ones (against the saturated gate).
POLICIES["grow_freeze+copy"] = (*POLICIES["grow_freeze"], "experts.init=copy")
# Task-incremental only: each task routed among its own experts.
TASK_POLICIES = {"grow_freeze+copy+route": (*POLICIES["grow_freeze+copy"],
                                            "experts.route_by_task=true")}
REPLAY_MEMORY = 500
DEFAULT_FEATURES = "random_conv"
# The routed mixture in its default feature space: with a buffer, without L_s, capped (reuse).
ROUTED_VARIANTS = {"": (), "+replay": (f"replay.mem_size={REPLAY_MEMORY}",),
                   "+noLs": ("regularizer.ls.beta_s=0", "regularizer.ls.beta_d=0"),
                   "+max6": ("experts.max=6",)}
COLUMNS = ("average_accuracy", "forgetting", "task_aware_average_accuracy", "H_s", "H_u", "MI",
           "router_error", "num_experts", "num_parameters", "wall_time_s")


def variants(scenario: str) -> list[suite.Variant]:
    out = []
    policies = POLICIES | (TASK_POLICIES if scenario == "task" else {})
    for policy, argv in policies.items():
        for strategy, tag in (("attentive", ""), ("attentive_ls", "+ls")):
            for replay in (0, REPLAY_MEMORY):
                name = f"moe-{policy}{tag}{'+replay' if replay else ''}-{scenario}"
                out.append(suite.Variant(name, (f"strategy={strategy}", *argv,
                                                f"replay.mem_size={replay}",
                                                f"scenario={scenario}")))
    # The original (softmax) gate, unregularised: the paper's collapse case, in this setting.
    out.append(suite.Variant(f"moe-fixed+softmax-{scenario}",
                             ("strategy=moe", *POLICIES["fixed"], "replay.mem_size=0",
                              f"scenario={scenario}")))
    out += routed_variants(scenario)
    # Each baseline's rows on its own network first, then the gate-network rows.
    rows = [row for baseline in baselines() for row in baseline_rows(baseline)]
    rows += [row for baseline in baselines() for row in gate_rows(baseline)]
    for name, baseline, extra in rows:  # replay.mem_size is refused by methods that do not replay
        replay = (f"replay.mem_size={REPLAY_MEMORY}",) if _replays(baseline) else ()
        out.append(suite.Variant(f"{name}-{scenario}", (f"strategy={baseline}",
                                                         f"scenario={scenario}", *replay, *extra)))
    return out


Row = tuple[str, str, tuple[str, ...]]  # run name without the scenario, method, overrides


def routed_variants(scenario: str) -> list[suite.Variant]:
    """The routed mixture in every feature space (class-incremental; the router's space does
    not matter when the task is given) and its variants in the default one."""
    spaces = ROUTER_FEATURES if scenario == "class" else (DEFAULT_FEATURES,)
    rows = [(f"routed+{space}", (f"router.feature={space}",)) for space in spaces]
    variants = ROUTED_VARIANTS if scenario == "class" else {
        k: v for k, v in ROUTED_VARIANTS.items() if k in ("", "+replay")}
    rows += [(f"routed+{DEFAULT_FEATURES}{tag}", (f"router.feature={DEFAULT_FEATURES}", *argv))
             for tag, argv in variants.items() if tag]
    return [suite.Variant(f"{name}-{scenario}", ("strategy=routed", *argv,
                                                  f"scenario={scenario}"))
            for name, argv in rows]


def baseline_rows(baseline: str) -> list[Row]:
    """The baseline with its strategy preset; SLDA once per feature space of the router."""
    if key_applies(baseline, "slda.features"):
        return [(f"{baseline}+{space}", baseline, (f"slda.features={space}",))
                for space in ROUTER_FEATURES]
    return [(baseline, baseline, ())]


def gate_rows(baseline: str) -> list[Row]:
    """A continual single-model baseline again on the gate network (about the mixture's
    parameters); named gate-NAME so that --only NAME keeps selecting the original row alone."""
    if METHODS[baseline].joint or not key_applies(baseline, "model.backbone"):
        return []
    return [(f"gate-{baseline}", baseline, ("model.backbone=gate",))]


def table(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["run"] for r in rows):
        runs = [r for r in rows if r["run"] == name]
        out[name] = {"seeds": len(runs),
                     **{c: suite.mean_std([r[c] for r in runs]) for c in COLUMNS},
                     "collapsed": suite.collapsed(runs) if runs[0]["H_u"] is not None else None}
    return out


def markdown(summary: dict, benchmark: str) -> str:
    head = ("| strategy | seeds | final avg accuracy | forgetting | task-aware accuracy | H_s |"
            " H_u | I(E;Y) | router error | experts | parameters | wall time (s) | collapsed |")
    lines = [f"### {benchmark}: mean +- std over seeds; collapsed: runs with H_u < "
             f"{suite.COLLAPSE_H_U} bits (every test sample on one expert)", "", head,
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
                cells.append(suite.format_mean_std(value))
        cells.append("-" if entry["collapsed"] is None else str(entry["collapsed"]))
        lines.append(f"| {name} | {entry['seeds']} | " + " | ".join(cells) + " |")
    verdicts = targets(summary)
    if verdicts:
        lines += ["", "Targets (final average accuracy, means over seeds):", "", *verdicts]
    return "\n".join(lines) + "\n"


def baselines() -> list[str]:
    """The methods without a mixture, each run with its strategy preset: Avalanche's strategies
    on the single-expert backbone (the continual ones also on the gate network, ``gate_rows``)
    and streaming LDA on frozen features (``slda``)."""
    return [name for name, method in METHODS.items() if not method.mixture]


def _replays(method: str) -> bool:
    return key_applies(method, "replay.mem_size")


def _finished_rows(summary: dict, methods: list[str], scenario: str) -> list[str]:
    """The rows of ``methods`` in ``summary`` (every form each is compared in)."""
    names = [f"{name}-{scenario}" for method in methods
             for name, _, _ in (*baseline_rows(method), *gate_rows(method))]
    return [name for name in names if name in summary]


def _mean(summary: dict, name: str, column: str = "average_accuracy") -> float | None:
    value = summary.get(name, {}).get(column)
    return value[0] if value else None


def _best(summary: dict, names: list[str]) -> tuple[str, float] | None:
    scored = [(n, _mean(summary, n)) for n in names]
    scored = [(n, v) for n, v in scored if v is not None]
    return max(scored, key=lambda item: item[1]) if scored else None


def targets(summary: dict) -> list[str]:
    """The issue's targets, each with its verdict and the numbers behind it (mean accuracy)."""
    lines = []
    # Continual baselines without a memory of past samples, and those with one (the joint
    # upper bound is neither).
    continual = [b for b in baselines() if not METHODS[b].joint]
    no_replay = [b for b in continual if not _replays(b)]
    replaying = [b for b in continual if _replays(b)]
    for scenario in ("class", "task"):
        moe = [n for n in summary if n.startswith("moe-") and n.endswith(f"-{scenario}")]
        best = _best(summary, [n for n in moe if "+replay" not in n])
        baseline = _best(summary, _finished_rows(summary, no_replay, scenario))
        if scenario == "class" and best and baseline:
            verdict = "met" if best[1] > baseline[1] else "NOT met"
            compared = [b for b in no_replay if _finished_rows(summary, [b], scenario)]
            lines.append(f"- class-incremental, no replay: best MoE {best[0]} {best[1]:.3f} vs "
                         f"best of {'/'.join(compared)} {baseline[0]} {baseline[1]:.3f}: "
                         f"{verdict}")
        best_any = _best(summary, moe)
        if scenario == "task" and best_any:
            verdict = "met" if best_any[1] >= 0.97 else "NOT met"
            lines.append(f"- task-incremental: best MoE {best_any[0]} {best_any[1]:.3f} (target >="
                         f" 0.97): {verdict}; without replay: "
                         + (f"{best[0]} {best[1]:.3f}" if best else "-"))
        with_replay = _best(summary, [n for n in moe if "+replay" in n])
        replay = _best(summary, _finished_rows(summary, replaying, scenario))
        if with_replay and replay:
            verdict = "met" if with_replay[1] >= replay[1] else "NOT met"
            lines.append(f"- {scenario}-incremental with replay ({REPLAY_MEMORY} samples): best "
                         f"MoE {with_replay[0]} {with_replay[1]:.3f} vs "
                         f"{replay[0].removesuffix(f'-{scenario}')} {replay[1]:.3f}: {verdict}")
    return lines + routed_targets(summary)


def routed_targets(summary: dict) -> list[str]:
    """Issue 14's targets for the routed mixture (mean final accuracy over seeds)."""
    lines = []
    routed = [n for n in summary if n.startswith("routed+") and n.endswith("-class")]
    best = _best(summary, [n for n in routed if "+replay" not in n])
    slda = _best(summary, _finished_rows(summary, ["slda"], "class"))
    if best and slda:
        verdict = "met" if best[1] >= 0.88 and best[1] >= slda[1] + 0.01 else "NOT met"
        lines.append(f"- routed, class-incremental, no stored samples: {best[0]} {best[1]:.3f} "
                     f"(target >= 0.88 and >= best SLDA {slda[0]} {slda[1]:.3f} + 0.01): "
                     f"{verdict}")
    buffered = f"routed+{DEFAULT_FEATURES}+replay-class"
    plain = f"routed+{DEFAULT_FEATURES}-class"
    if _mean(summary, buffered) is not None and _mean(summary, plain) is not None:
        value, without = _mean(summary, buffered), _mean(summary, plain)
        verdict = "met" if value >= 0.89 and value > without else "NOT met"
        lines.append(f"- routed, class-incremental, {REPLAY_MEMORY}-sample buffer: {value:.3f} "
                     f"(target >= 0.89 and above {without:.3f} without it): {verdict}")
    task = _best(summary, [n for n in summary if n.startswith("routed+")
                           and n.endswith("-task")])
    if task:
        verdict = "met" if task[1] >= 0.98 else "NOT met"
        lines.append(f"- routed, task-incremental: {task[0]} {task[1]:.3f} (target >= 0.98): "
                     f"{verdict}")
    if best and _mean(summary, best[0], "MI") is not None:
        mi = _mean(summary, best[0], "MI")
        collapsed = sum(summary[n]["collapsed"] or 0 for n in routed)
        verdict = "met" if mi >= 2.0 and not collapsed else "NOT met"
        lines.append(f"- routed, experts specialise: I(E;Y) of {best[0]} {mi:.2f} bits (target "
                     f">= 2.0), collapsed runs among the routed rows {collapsed} (target 0): "
                     f"{verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_cl.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=("split_mnist", "split_fmnist", "split_cifar100",
                                              "tiny"))
    parser.add_argument("--scenarios", nargs="+", choices=("class", "task"),
                        default=["class", "task"])
    parser.add_argument("--only", nargs="+", default=None,
                        help="run names to train (prefix match, e.g. moe-grow naive); each must "
                             "match a run of --scenarios. The table still covers every finished "
                             "run in --out")
    args, overrides = suite.parse_suite_arguments(
        parser, argv, "compare", seeds=3, example="train.epochs=1 device=cuda",
        controlled={"strategy": "choose runs with --only", "scenario": "use --scenarios"})
    pool = [v for s in args.scenarios for v in variants(s)]
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
    everything = [v for s in ("class", "task") for v in variants(s)]

    def tabulate(rows: list[dict]) -> tuple[dict, str]:
        summary = table(rows)
        return summary, markdown(summary, args.benchmark)

    return suite.train_and_tabulate(args, overrides, chosen, everything, tabulate)


if __name__ == "__main__":
    sys.exit(main())
