"""Suite grids as data: each suite command's variants and targets live in a YAML file of
``moe_cl/suite/grids/`` (``compare_<benchmark>.yaml``, else ``compare_generic.yaml``;
``reproduce.yaml``), so that a new grid is a new file. This module reads and checks a file,
expands its groups of variants and binds its targets to the checks its command offers; a
problem in a file is a :class:`GridError` naming the file (one line, exit 2).

A group of variants is ``name`` and ``argv`` (templates), ``axes`` (their product, in order)
and an optional ``when`` (template parameters it needs, e.g. ``{scenario: task}``). An axis is
a list of values, a mapping of tags to arguments (a tag's arguments may be
``{argv: [...], when: {...}}``), ``{from: PARAMETER}`` (the values of a list parameter),
``{methods: {mixture: false, joint: false, reads: KEY}}`` (the method registry's entries that
match) or ``{options: {TAG: [...]}, if_method_reads: KEY}`` (those options where the variant's
method reads KEY, else one empty option). Templates name axes and parameters in braces; an
argument that is just ``{AXIS}`` stands for the arguments of that axis's option.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from moe_cl.suite.spec import SuiteError
from moe_cl.training.methods import METHODS, key_applies

FOLDER = "grids"
SPECIAL_AXIS_KEYS = ("from", "methods", "options")
METHOD_FILTERS = ("mixture", "joint", "reads")


class GridError(SuiteError):
    """A grid file that cannot be used: its message names the file and the problem."""


@dataclass(frozen=True)
class Option:
    """One choice of an axis: the value its templates see, and the arguments it adds."""

    value: Any
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class Point:
    """One variant a group expands to: its name, its arguments and each axis's value."""

    name: str
    argv: tuple[str, ...]
    values: dict


@dataclass(frozen=True)
class Target:
    """A check of the command, bound to the parameters the grid file gives it."""

    check: Callable[..., list[str]]
    parameters: dict

    def verdicts(self, summary: Any) -> list[str]:
        return self.check(summary, **self.parameters)


def names() -> list[str]:
    """The grid files there are, by name (without .yaml)."""
    folder = resources.files("moe_cl.suite").joinpath(FOLDER)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                  if p.name.endswith(".yaml"))


@functools.cache
def load(name: str) -> Grid:
    """The grid file ``grids/<name>.yaml``, which must hold a mapping."""
    grid = Grid(name, {})
    try:
        text = resources.files("moe_cl.suite").joinpath(FOLDER, f"{name}.yaml").read_text()
        data = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as err:
        raise grid.error(f"cannot be read ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise grid.error("expected a mapping of keys to values at the top")
    return Grid(name, data)


@dataclass(frozen=True)
class Grid:
    """A grid file's contents, with the checks that make every problem one line naming it."""

    name: str
    data: dict

    @property
    def path(self) -> str:
        return f"moe_cl/suite/{FOLDER}/{self.name}.yaml"

    def error(self, problem: str) -> GridError:
        return GridError(f"{self.path}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], where: Mapping | None = None,
            default: Any = None, at: str = "") -> Any:
        """``where[key]`` (``where`` defaults to the top of the file; ``at`` is where that
        is, for errors), which must be a ``kind``; ``default`` when it is absent and a default
        is given."""
        where = self.data if where is None else where
        if key not in where and default is not None:
            return default
        return self.check(where.get(key), kind, f"{at}.{key}" if at else key)

    def check(self, value: Any, kind: type | tuple[type, ...], where: str) -> Any:
        """``value``, which must be a ``kind`` (a bool is no number)."""
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            expected = " or ".join(k.__name__ for k in kinds)
            raise self.error(f"{where}: expected a {expected}, got {_shown(value)}")
        return value

    def variants(self, groups: list, parameters: dict) -> list[Point]:
        """Every group's variants for the template ``parameters``, in order; a run name twice
        is an error."""
        points = [point for k, group in enumerate(groups)
                  for point in self.expand(group, parameters, f"variants[{k}]")]
        seen = set()
        for point in points:
            if point.name in seen:
                raise self.error(f"the run name {point.name} comes twice (for {parameters})")
            seen.add(point.name)
        return points

    def targets(self, checks: Mapping[str, Callable[..., list[str]]]) -> list[Target]:
        """The file's ``targets``: each ``{check: NAME, ...parameters}``, NAME one of
        ``checks`` (whose first argument is the table)."""
        bound = []
        for k, entry in enumerate(self.get("targets", list, default=[])):
            where = f"targets[{k}]"
            entry = self.check(entry, dict, where)
            parameters = {key: value for key, value in entry.items() if key != "check"}
            check = checks.get(entry.get("check"))
            if check is None:
                raise self.error(f"{where}: check must be one of {', '.join(checks)}, got "
                                 f"{_shown(entry.get('check'))}")
            try:
                inspect.signature(check).bind(None, **parameters)
            except TypeError as err:
                raise self.error(f"{where} ({entry['check']}): {err}") from None
            bound.append(Target(check, parameters))
        return bound

    def fill(self, template: Any, values: dict, where: str) -> str:
        """``template`` with its ``{names}`` replaced by ``values``."""
        if not isinstance(template, str):
            raise self.error(f"{where}: expected a text, got {_shown(template)}")
        try:
            return template.format_map(values)
        except KeyError as err:
            raise self.error(f"{where}: {{{err.args[0]}}} in {template!r} is neither an axis "
                             f"nor a parameter ({', '.join(values)})") from None
        except (ValueError, IndexError, AttributeError) as err:
            raise self.error(f"{where}: bad template {template!r} ({err})") from None

    def expand(self, group: Any, parameters: dict, where: str) -> list[Point]:
        """One group's variants for the template ``parameters`` (see the module's docstring)."""
        group = self.check(group, dict, where)
        unknown = set(group) - {"name", "argv", "axes", "when"}
        if unknown:
            raise self.error(f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))} "
                             "(a group has name, argv, axes, when)")
        if not self._holds(group.get("when"), parameters, f"{where}.when"):
            return []
        axes = self.get("axes", dict, group, default={}, at=where)
        combinations: list[dict[str, Option]] = [{}]
        for axis, spec in axes.items():
            at = f"{where}.axes.{axis}"
            combinations = [{**chosen, axis: option} for chosen in combinations
                            for option in self._options(spec, chosen, parameters, at)]
        templates = self.get("argv", list, group, default=[], at=where)
        points = []
        for chosen in combinations:
            values = parameters | {axis: option.value for axis, option in chosen.items()}
            argv: list[str] = []
            for template in templates:
                axis = template[1:-1] if isinstance(template, str) else None
                if template == f"{{{axis}}}" and axis in chosen:
                    argv += [self.fill(a, values, f"{where}.argv") for a in chosen[axis].argv]
                else:
                    argv.append(self.fill(template, values, f"{where}.argv"))
            name = self.fill(self.get("name", str, group, at=where), values, f"{where}.name")
            points.append(Point(name, tuple(argv), {a: o.value for a, o in chosen.items()}))
        return points

    def _options(self, spec: Any, chosen: dict[str, Option], parameters: dict,
                 where: str) -> list[Option]:
        """An axis's options, given the options chosen on the axes before it."""
        if isinstance(spec, list):
            return [Option(self._scalar(v, where)) for v in spec]
        spec = self.check(spec, dict, where)
        special = [key for key in SPECIAL_AXIS_KEYS if key in spec]
        if not special:
            return self._tagged(spec, parameters, where)
        if len(special) > 1 or set(spec) - {special[0], "if_method_reads"}:
            raise self.error(f"{where}: expected one of {', '.join(SPECIAL_AXIS_KEYS)} (options "
                             "with if_method_reads), got keys " + ", ".join(map(str, spec)))
        if special[0] == "from":
            source = self.get("from", str, spec, at=where)
            values = self.get(source, list, parameters, at="parameters")
            return self._options(values, chosen, parameters, where)
        if special[0] == "methods":
            return [Option(name) for name in self._methods(spec["methods"], where)]
        reads = spec.get("if_method_reads")
        if reads is not None:
            method = chosen.get("method")
            if method is None:
                raise self.error(f"{where}: if_method_reads needs a method axis before it")
            if not key_applies(method.value, self.get("if_method_reads", str, spec, at=where)):
                return [Option("")]
        return self._tagged(self.get("options", dict, spec, at=where), parameters, where)

    def _tagged(self, spec: dict, parameters: dict, where: str) -> list[Option]:
        options = []
        for tag, argv in spec.items():
            at = f"{where}.{tag}"
            if isinstance(argv, dict):
                unknown = set(argv) - {"argv", "when"}
                if unknown:
                    raise self.error(f"{at}: unknown keys {', '.join(map(str, unknown))} "
                                     "(an option has argv, when)")
                if not self._holds(argv.get("when"), parameters, f"{at}.when"):
                    continue
                argv = self.get("argv", list, argv, at=at)
            argv = self.check(argv, list, at)
            options.append(Option(self._scalar(tag, where), tuple(self.check(a, str, at)
                                                                  for a in argv)))
        return options

    def _methods(self, spec: Any, where: str) -> list[str]:
        """The registry's methods that match ``spec``: mixture, joint (booleans), reads (a
        key they read)."""
        spec = self.check(spec, dict, f"{where}.methods")
        unknown = set(spec) - set(METHOD_FILTERS)
        if unknown:
            raise self.error(f"{where}.methods: unknown keys {', '.join(map(str, unknown))} "
                             f"(choose from {', '.join(METHOD_FILTERS)})")
        chosen = []
        for name, method in METHODS.items():
            if "mixture" in spec and method.mixture != self.get("mixture", bool, spec, at=where):
                continue
            if "joint" in spec and method.joint != self.get("joint", bool, spec, at=where):
                continue
            if "reads" in spec and not key_applies(name, self.get("reads", str, spec, at=where)):
                continue
            chosen.append(name)
        return chosen

    def _holds(self, when: Any, parameters: dict, where: str) -> bool:
        """Whether the template ``parameters`` are as ``when`` asks (each a value or a list)."""
        if when is None:
            return True
        when = self.check(when, dict, where)
        for key, wanted in when.items():
            if key not in parameters:
                raise self.error(f"{where}: {key} is not a parameter ({', '.join(parameters)})")
            if parameters[key] not in (wanted if isinstance(wanted, list) else [wanted]):
                return False
        return True

    def _scalar(self, value: Any, where: str) -> Any:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise self.error(f"{where}: expected a text or a number, got {_shown(value)}")
        return value


def _shown(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]
