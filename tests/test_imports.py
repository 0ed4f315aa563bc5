"""No import cycle anywhere in esdmri: the module graph, read from the source, is acyclic.

Every ``import`` statement counts, at module level or inside a function: an
import deferred into a function still ties the two modules together and
breaks when either moves.
"""

import ast
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_folders():
    """Package name -> folder, read from setup.cfg's package_dir (the one copy of it)."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["package_dir"].strip().splitlines()
    return {name.strip(): ROOT / folder.strip()
            for name, folder in (line.split("=") for line in lines)}


PACKAGES = package_folders()


def module_files():
    """Dotted module name -> file of every module of the installed packages."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if not name.startswith("esdmri.workflows") or package == "esdmri.workflows":
                modules[name] = path
    return modules


def imported_modules(name, path, modules):
    """The esdmri modules that module ``name`` imports."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[:len(name.split(".")) - node.level + is_package]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            # ``from package import module`` imports the module, else the package.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules)
    found.discard(name)
    return found


def find_cycle(graph):
    """One cycle of a directed graph as a list of nodes, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for successor in sorted(graph[node]):
            if state.get(successor) == "open":
                return path[path.index(successor):] + [successor]
            if successor not in state:
                cycle = visit(successor, path + [successor])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_relative_imports_resolve(tmp_path):
    modules = {"esdmri.reconst.models": None, "esdmri.serialization": None,
               "esdmri.reconst": None}
    source = tmp_path / "models.py"
    source.write_text("from .. import serialization\nfrom .fit import X\n"
                      "def f():\n    from esdmri.reconst import models\n")
    assert imported_modules("esdmri.reconst.models", source, modules) == {
        "esdmri.serialization"}


def test_no_import_cycle_in_esdmri():
    modules = module_files()
    assert "esdmri.reconst.models" in modules and "esdmri.workflows.fit" in modules
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert "esdmri.serialization" in graph["esdmri.reconst.models"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
