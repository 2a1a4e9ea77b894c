"""The house rules of docs/ARCHITECTURE.md, checked on the source: layers without import cycles,
imports at the top of modules, small files, thin commands, no private names across packages."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmforge"
MAX_LINES = 600
MAX_COMMAND_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def type_checking_nodes(tree: ast.Module) -> set[int]:
    """Ids of the nodes under ``if TYPE_CHECKING:`` (imports for type hints only)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found |= {id(n) for n in ast.walk(node)}
    return found


def imports_of(name: str) -> list[tuple[ast.ImportFrom | ast.Import, str, bool]]:
    """(node, imported lmforge module, at module level) for every import of ``name`` that runs."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = type_checking_nodes(tree)
    top = {id(n) for n in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("lmforge"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node, sub if sub in MODULES else target, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(node, a.name, id(node) in top) for a in node.names if a.name.startswith("lmforge")]
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the modules importing it runs. Importing ``a.b.c`` runs the packages ``a`` and
    ``a.b`` first, unless the importer is inside them (a package's own submodules)."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for _, target, _ in imports_of(name):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                inside = name == prefix or name.startswith(prefix + ".")
                if prefix in MODULES and prefix != name and (prefix == target or not inside):
                    edges[name].add(prefix)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lmforge_modules_are_imported_at_the_top() -> None:
    inside_functions = [
        f"{MODULES[name].relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)}"
        for name in MODULES
        for node, _, top in imports_of(name)
        if not top
    ]
    assert not inside_functions, "imports inside functions (cycles in disguise):\n" + "\n".join(inside_functions)


def test_no_private_names_across_packages() -> None:
    offenders = []
    for name in MODULES:
        package = name.rpartition(".")[0] if MODULES[name].name != "__init__.py" else name
        for node, target, _ in imports_of(name):
            if not isinstance(node, ast.ImportFrom):
                continue
            source_package = target if target in MODULES and MODULES[target].name == "__init__.py" else target.rpartition(".")[0]
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private and source_package != package:
                offenders.append(f"{name}: {ast.unparse(node)}")
    assert not offenders, "\n".join(offenders)


def test_files_stay_small() -> None:
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in MODULES.values()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("command", sorted(__import__("lmforge.cli", fromlist=["COMMANDS"]).COMMANDS))
def test_commands_are_thin(command: str) -> None:
    from lmforge.cli import _commands

    function = _commands()[command]
    lines = len(inspect.getsource(function).splitlines())
    docstring = len((inspect.getdoc(function) or "").splitlines()) + 2
    assert lines - docstring <= MAX_COMMAND_LINES, f"{command}: {lines - docstring} lines of code"
