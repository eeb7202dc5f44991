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


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str], package_root: Path = PACKAGE) -> set[str]:
    """The package's modules that ``path`` imports (a name imported from a package counts as
    its submodule where there is one)."""
    this = module_name(path, package_root)
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


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(p, package): p for p in package.rglob("*.py")}
    modules = set(paths)
    return {name: imported(path, modules, package) - {"moe_cl"}
            for name, path in paths.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return [f"{m} (floor {floor_of(m)}) imports {d} (floor {floor_of(d)})"
            for m, deps in sorted(edges.items()) for d in sorted(deps)
            if floor_of(d) > floor_of(m)]


def circles(edges: dict[str, set[str]]) -> list[str]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == "open":
                found.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_imports_only_its_floor_or_below():
    upward = upward_imports(graph())
    assert not upward, "\n".join(upward)


def test_no_circle_of_imports():
    found = circles(graph())
    assert not found, "\n".join(found)


def test_no_module_over_450_lines():
    long = [f"{p.relative_to(PACKAGE.parent)}: {n}" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 450]
    assert not long, "\n".join(long)


def test_the_checks_see_an_upward_import_and_a_circle(tmp_path):
    """A package where a training module lazily imports the command line (upward) and two
    modules import each other (a circle, through relative imports)."""
    root = tmp_path / "moe_cl"
    files = {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "from . import b\n",
        "core/b.py": "from moe_cl.core import a\n",
        "training/__init__.py": "",
        "training/models.py": "def f():\n    from moe_cl.run.cli import main\n",
        "run/__init__.py": "",
        "run/cli.py": "from moe_cl.training import models\nmain = None\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    edges = graph(root)
    assert upward_imports(edges) == [
        "moe_cl.training.models (floor 3) imports moe_cl.run.cli (floor 4)"]
    assert sorted(circles(edges)) == [
        "moe_cl.core.a -> moe_cl.core.b -> moe_cl.core.a",
        "moe_cl.run.cli -> moe_cl.training.models -> moe_cl.run.cli"]
