"""The package's floors: each module imports only from its own floor or the floors below it, and
no modules import each other in a circle. Read from the source (every import statement, lazy
ones inside functions and TYPE_CHECKING blocks included), so a new upward import fails here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe_cl"

# Lowest first. A module's floor is that of its longest matching prefix.
FLOORS = [
    ("moe_cl.errors", "moe_cl.core"),
    ("moe_cl.storage",),
    ("moe_cl.data",),
    ("moe_cl.training",),
    ("moe_cl.run",),
    ("moe_cl.suite", "moe_cl.bench"),
    ("moe_cl", "moe_cl.compare", "moe_cl.reproduce"),
]


def floor_of(module: str) -> int:
    best, floor = -1, None
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), level
    assert floor is not None, module
    return floor


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (a name imported from a package counts as
    its submodule where there is one)."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("moe_cl") and name != this:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imported(path, modules) - {"moe_cl"} for name, path in paths.items()}


def test_every_module_imports_only_its_floor_or_below():
    upward = [f"{m} (floor {floor_of(m)}) imports {d} (floor {floor_of(d)})"
              for m, deps in sorted(graph().items()) for d in sorted(deps)
              if floor_of(d) > floor_of(m)]
    assert not upward, "\n".join(upward)


def test_no_circle_of_imports():
    edges = graph()
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == "open":
                circles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(circles)


def test_no_module_over_450_lines():
    long = [f"{p.relative_to(PACKAGE.parent)}: {n}" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 450]
    assert not long, "\n".join(long)


def test_the_checks_see_an_upward_import_and_a_circle():
    """The checks can fail: a training module importing the CLI is upward, two modules
    importing each other are a circle."""
    assert floor_of("moe_cl.run.cli") > floor_of("moe_cl.training.models")
    assert floor_of("moe_cl.core.bank") == floor_of("moe_cl.errors") == 0
    edges = graph()
    assert "moe_cl.training.models" in edges["moe_cl.training.routed"]
