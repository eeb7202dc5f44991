"""The run configuration: a typed schema, preset catalogues and command-line composition.

Composition, later wins: schema defaults <- ``benchmarks/NAME.yaml`` <- ``strategies/NAME.yaml``
<- ``key=value`` overrides. OmegaConf checks keys and types against the schema; the choices
and ranges it cannot express are checked in :func:`validate`. Every problem becomes a
:class:`ConfigError` with one line naming what is wrong and what is valid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import moe_cl
from moe_cl.core.choices import GATES, OUTPUTS, PAPER_ARCHITECTURES, SCALINGS
from moe_cl.data.names import BENCHMARK_NAMES
from moe_cl.errors import ConfigError
from moe_cl.run.schema import (
    DEFAULT_BENCHMARK,
    DEFAULT_STRATEGY,
    NOT_SHAPING,
    REQUIRED_KEYS,
    RunConfig,
)
from moe_cl.storage.run_folder import CHECKPOINT, CONFIG, RESULTS, check_results, is_complete
from moe_cl.training.methods import BACKBONES, METHODS, key_applies
from moe_cl.training.options import (
    EXPERT_INITS,
    EXPERTS_VOTES,
    POLICIES,
    ROUTER_COMBINES,
    ROUTER_FEATURES,
    SCENARIOS,
)
from moe_cl.training.precision import PRECISIONS

# A benchmark preset may name the strategy its runs use when the command line names none.
PRESET_STRATEGY = "strategy"
# A strategy preset may hold settings for particular benchmarks (e.g. the paper's betas).
BY_BENCHMARK = "by_benchmark"


# Each choice comes from the module that implements it.
CHOICES: dict[str, Collection[str]] = {
    "data.stream": BENCHMARK_NAMES,
    "train.precision": PRECISIONS,
    "method": METHODS.keys(),
    "device": ("auto", "cpu", "cuda"),
    "scenario": SCENARIOS,
    # auto: the benchmark's data set's paper architecture (mlp for tiny)
    "model.architecture": ("auto", *PAPER_ARCHITECTURES, "mlp"),
    "model.gate": GATES,
    "model.output": OUTPUTS,
    "model.backbone": BACKBONES,
    "experts.policy": POLICIES,
    "experts.init": EXPERT_INITS,
    "regularizer.ls.scaling": SCALINGS,
    "router.feature": ROUTER_FEATURES,
    "router.combine": ROUTER_COMBINES,
    "router.experts_vote": EXPERTS_VOTES,
    "slda.features": ROUTER_FEATURES,  # every feature space of the router
}
POSITIVE = ("train.batch_size", "train.eval_batch_size", "model.num_experts",
            "experts.per_experience", "experts.probe_samples", "data.n_experiences",
            "model.mlp_width", "model.mlp_hidden", "router.channels", "router.kernel",
            "router.pool")
NON_NEGATIVE = ("train.epochs", "regularizer.importance", "regularizer.ls.beta_s",
                "regularizer.ls.beta_d", "replay.mem_size", "distill.epochs",
                "train.checkpoint_every_epochs", "baseline.ewc_lambda", "baseline.lwf_alpha",
                "baseline.si_lambda",
                "experts.threshold", "experts.max", "experts.reuse_distillation",
                "router.expert_weight", "router.vote_weight")
ABOVE_ZERO = ("train.lr", "baseline.lwf_temperature", "router.shrinkage", "slda.shrinkage",
              "router.vote_temperature")
MAX_SEED = 2**32 - 1  # numpy's limit; Avalanche seeds numpy, random and torch alike
MAX_COUNT = 2**31 - 1  # a count beyond it (train.epochs=10**23) is a typo, not a plan


# ----------------------------------------------------------------------------- presets


def preset_dirs() -> dict[str, Path]:
    """Where the preset catalogues are: the checkout's top-level folders, or the copies that
    the wheel ships inside the package."""
    package = Path(moe_cl.__file__).resolve().parent
    for base in (package.parent, package / "_presets"):
        if (base / "strategies").is_dir() and (base / "benchmarks").is_dir():
            return {"strategy": base / "strategies", "benchmark": base / "benchmarks"}
    raise ConfigError(f"preset folders not found next to {package}")


def preset_names(kind: str) -> list[str]:
    return sorted(p.stem for p in preset_dirs()[kind].glob("*.yaml"))


def preset_description(kind: str, name: str) -> str:
    """The first comment line of a preset file."""
    for line in (preset_dirs()[kind] / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_preset(kind: str, name: str) -> dict:
    names = preset_names(kind)
    if name not in names:
        raise ConfigError(f"unknown {kind} preset {name!r}; choose one of: {', '.join(names)}")
    path = preset_dirs()[kind] / f"{name}.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(
            f"malformed YAML in {path}{where}: {getattr(err, 'problem', err)}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- composition


def default_strategy(benchmark: str) -> str:
    """The strategy a benchmark runs when none is named: its preset's, else DEFAULT_STRATEGY."""
    return load_preset("benchmark", benchmark).get(PRESET_STRATEGY, DEFAULT_STRATEGY)


def split_arguments(argv: list[str]) -> tuple[str, str, list[str]]:
    """Take ``benchmark=`` and ``strategy=`` (preset choices) out of the overrides; without
    ``strategy=`` the benchmark's default strategy."""
    benchmark, strategy, rest = DEFAULT_BENCHMARK, None, []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"expected key=value, got {arg!r} (see --help)")
        key, value = arg.split("=", 1)
        if not key:
            raise ConfigError(f"expected key=value, got {arg!r} (no key; see --help)")
        if key == "benchmark":
            benchmark = value
        elif key == "strategy":
            strategy = value
        else:
            rest.append(arg)
    return benchmark, strategy or default_strategy(benchmark), rest


def compose(argv: list[str]) -> DictConfig:
    """The resolved, validated configuration of ``benchmark=.. strategy=.. key=value ...``."""
    benchmark, strategy, overrides = split_arguments(argv)
    for key in (a.split("=", 1)[0] for a in overrides):
        if _valid_keys(key):
            raise ConfigError(f"{key} is a section, not a value; set its keys, e.g. "
                              f"{key}.{_valid_keys(key)[0]}=...")
    schema = OmegaConf.structured(RunConfig)
    strategy_preset = load_preset("strategy", strategy)
    per_benchmark = strategy_preset.pop(BY_BENCHMARK, None) or {}
    if not isinstance(per_benchmark, dict):
        raise ConfigError(f"strategy preset {strategy}: {BY_BENCHMARK} must map benchmark names")
    benchmark_preset = load_preset("benchmark", benchmark)
    benchmark_preset.pop(PRESET_STRATEGY, None)  # a choice of preset, not a setting
    layers = [
        ("benchmark preset " + benchmark, benchmark_preset),
        ("strategy preset " + strategy, strategy_preset),
        (f"strategy preset {strategy} ({BY_BENCHMARK}.{benchmark})",
         per_benchmark.get(benchmark) or {}),
    ]
    try:
        override_conf = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {overrides}: {_one_line(err)}") from None
    cfg = schema
    for origin, layer in [*layers, ("command line", override_conf)]:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{origin}: {_describe_merge_error(err)}") from None
    cfg.benchmark = benchmark
    cfg.strategy = strategy
    _resolve(cfg)
    chosen = [a.split("=", 1)[0] for a in overrides]
    chosen += [*_flat(strategy_preset), *_flat(per_benchmark.get(benchmark) or {})]
    _refuse_ignored_keys(cfg.method, list(dict.fromkeys(chosen)), strategy)
    validate(cfg)
    return cfg


def _refuse_ignored_keys(method: str, keys: list[str], strategy: str) -> None:
    """Keys set on the command line or by the strategy preset that the method would ignore
    silently are a usage error (the benchmark preset's are not: they serve every method)."""
    ignored = [key for key in keys if not key_applies(method, key)]
    if ignored and method in METHODS:  # an unknown method is validate's to name
        verb = "does" if len(ignored) == 1 else "do"
        raise ConfigError(f"{', '.join(ignored)} {verb} not apply to method={method} "
                          f"(strategy={strategy}) and would be ignored")


def reject_repeated_keys(argv: list[str]) -> None:
    """A key given twice on one command line is a mistake, not a choice of the last value."""
    seen: dict[str, str] = {}
    for arg in argv:
        key = arg.split("=", 1)[0]
        if key in seen and "=" in arg:
            raise ConfigError(f"{key} is given twice ({seen[key]} and {arg}); keep one")
        seen[key] = arg


def _resolve(cfg: DictConfig) -> None:
    """Resolve ${...} interpolations now, so a broken one is a one-line usage error."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{key + ': ' if key else ''}{_one_line(err)}") from None


def _one_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def _describe_merge_error(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    text = _one_line(err)
    if "not in struct" in text or "Key '" in text and "not" in text:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = _valid_keys(parent)
        return f"unknown key {key!r}; valid keys here: {', '.join(valid)}"
    if key:
        return f"bad value for {key!r}: {text}"
    return text


def _valid_keys(parent: str) -> list[str]:
    node: Any = OmegaConf.structured(RunConfig)
    for part in parent.split(".") if parent else []:
        node = node.get(part) if isinstance(node, DictConfig) else None
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def validate(cfg: DictConfig) -> None:
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if key == "device" and re.fullmatch(r"cuda:\d+", str(value)):
            continue  # one GPU by number (the suites' --jobs hand each run its own)
        if value not in choices:
            named = [*choices, "cuda:N"] if key == "device" else choices
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(named)}")
    for keys, lowest, strict in ((POSITIVE, 1, False), (NON_NEGATIVE, 0, False),
                                 (ABOVE_ZERO, 0, True)):
        for key in keys:
            value = OmegaConf.select(cfg, key)
            if not math.isfinite(value) or value < lowest or (strict and value == lowest):
                bound = f"> {lowest}" if strict else f">= {lowest}"
                raise ConfigError(f"{key} must be a finite number {bound}, got {value}")
            if isinstance(value, int) and value > MAX_COUNT:
                raise ConfigError(f"{key} must be at most {MAX_COUNT}, got {value}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed must be in [0, {MAX_SEED}], got {cfg.seed}")
    wd = cfg.train.weight_decay
    if wd != "auto" and (isinstance(wd, bool) or not isinstance(wd, int | float)
                         or not math.isfinite(wd) or wd < 0):
        raise ConfigError(f"train.weight_decay must be 'auto' or a number >= 0, got {wd!r}")
    _validate_top_k(cfg)
    if not isinstance(cfg.resume, bool | str):
        raise ConfigError(f"resume must be true/false or a run folder, got {cfg.resume!r}")
    if cfg.distill.epochs and cfg.model.gate != "attentive":
        raise ConfigError("distill.epochs needs model.gate=attentive (it distils that gate)")
    if cfg.data.stream.startswith("paper_") and cfg.data.n_experiences != 1:
        raise ConfigError(f"{cfg.data.stream} is one experience (the paper's setting); "
                          f"data.n_experiences={cfg.data.n_experiences} would be ignored")
    if cfg.experts.route_by_task and cfg.scenario != "task":
        raise ConfigError("experts.route_by_task needs scenario=task (task labels at test time)")
    if cfg.distill.teacher and not cfg.distill.epochs:
        raise ConfigError("distill.teacher needs distill.epochs >= 1 (it is what gets distilled)")
    problem = METHODS[cfg.method].problem(cfg)
    if problem:
        raise ConfigError(problem)


def _validate_top_k(cfg: DictConfig) -> None:
    top_k = cfg.eval.top_k
    if top_k is None:
        return
    if not 1 <= top_k <= cfg.model.num_experts:
        raise ConfigError(f"eval.top_k must be in [1, model.num_experts={cfg.model.num_experts}]"
                          f", got {top_k}")
    if cfg.model.gate == "attentive" and not cfg.distill.epochs:
        raise ConfigError("eval.top_k needs a gate that routes before the experts run: "
                          "model.gate=softmax, or distill.epochs >= 1 (the distilled gate)")


def merge_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``cfg`` with ``key=value`` overrides applied and validated."""
    try:
        merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command line: {_describe_merge_error(err)}") from None
    validate(merged)
    return merged


def changed_settings(saved: DictConfig, requested: DictConfig,
                     ignore: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys whose values differ between two run configurations, keys starting
    with one of ``ignore`` aside, each as ``key: saved -> requested``."""
    a, b = _flat(OmegaConf.to_container(saved, resolve=True)), _flat(
        OmegaConf.to_container(requested, resolve=True))
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(a.keys() | b.keys())
            if not k.startswith(ignore) and a.get(k) != b.get(k)]


def training_settings(cfg: DictConfig | dict) -> dict[str, Any]:
    """The settings that shape what a run trains, flat (``train.lr``: value): what its
    checkpoint records, so a config.yaml edited since is found out."""
    tree = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in _flat(tree).items() if not k.startswith(NOT_SHAPING)}


def refuse_changed_settings(recorded: dict, cfg: DictConfig, config: Path, source: str,
                            allowed: Collection[str] = ()) -> list[str]:
    """Compare the training settings ``recorded`` in ``source`` (a checkpoint, results.json)
    with ``cfg``, read from ``config``: a change outside ``allowed`` (explicit overrides of
    what is safe to change) is a ConfigError naming the keys; returns the allowed changes as
    ``key: recorded -> now``. Keys that one side lacks (settings added since) are not
    compared."""
    now = training_settings(cfg)
    changed = [f"{k}: {v} -> {now[k]}" for k, v in sorted(training_settings(recorded).items())
               if k in now and v != now[k]]
    refused = [c for c in changed if c.split(":", 1)[0] not in allowed]
    if refused:
        raise ConfigError(f"{config} no longer matches {source} ({'; '.join(refused[:3])}); "
                          "put those settings back, or start a new run in another out_dir")
    return changed


def check_settings(state: dict, cfg: DictConfig, out: Path, *, overridden: Collection[str],
                   echo: Callable[[str], None]) -> None:
    """Refuse a config.yaml that no longer matches the settings the checkpoint ``state``
    recorded, but for the keys ``overridden`` on the command line (safe to change in a run
    that is not finished), which are said; a run resumed inside an experience needs more
    epochs than its checkpoint has done."""
    path = out / CHECKPOINT
    for change in refuse_changed_settings(state.get("settings", {}), cfg, out / CONFIG,
                                          f"its checkpoint {path}", overridden):
        echo(f"{change}: changed on the command line (config.yaml follows)")
    done = state.get("progress", {}).get("epochs_done", 0)
    if done and done >= cfg.train.epochs:
        raise ConfigError(f"train.epochs={cfg.train.epochs}, but checkpoint {path} is at "
                              f"epoch {done} of its experience; choose more epochs")


def finished_results(out: Path, cfg: DictConfig) -> dict | None:
    """The results.json of run folder ``out`` (None: missing or cut short), refused when it is
    not a run's results or its settings are not those of config.yaml (``cfg``)."""
    results = check_results(out)
    if is_complete(results):
        refuse_changed_settings(results["config"], cfg, out / CONFIG,
                                f"its finished results {out / RESULTS}")
    return results


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def load_saved(path: Path) -> DictConfig:
    """A run folder's config.yaml, checked against the schema."""
    try:
        saved = OmegaConf.load(path)
        if not isinstance(saved, DictConfig) or "method" not in saved:
            raise ConfigError(f"{path} does not hold a run's settings (empty or cut short?)")
        missing = [key for key in REQUIRED_KEYS if OmegaConf.select(saved, key) is None]
        if missing:
            raise ConfigError(f"{path} does not hold a run's settings: {', '.join(missing)} "
                              "missing (the defaults must not stand in for what the run used)")
        return OmegaConf.merge(OmegaConf.structured(RunConfig), saved)
    except (OSError, OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path}: {_one_line(err)}") from None
