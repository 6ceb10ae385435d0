"""The package's layering, read from the source with ``ast``: ops -> models/inference/checkpoints/data/... ->
stages (train, align, masks, eval) -> the demo pipeline -> cli. Every import counts, also inside functions."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"dmfast.train", "dmfast.align", "dmfast.masks", "dmfast.eval", "dmfast.predict"}
PIPELINE = {"dmfast.demo"}


def _module_files() -> dict:
    files = {}
    for folder, package in ((ROOT / "dmfast", "dmfast"), (ROOT / "cli", "dmfast.cli")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


FILES = _module_files()


def _imports(name: str, path: Path) -> set:
    """The dmfast modules that module ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` imports the module, `from pkg import name` pkg
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in FILES else base)
    # A module's own parent packages are imported before it anyway (`from . import _C` names dmfast itself).
    return {m for m in found if m in FILES and m != name and not name.startswith(m + ".")}


GRAPH = {name: _imports(name, path) for name, path in FILES.items()}


def test_the_walk_sees_the_package():
    assert {"dmfast.ops", "dmfast.train", "dmfast.data.cache", "dmfast.cli.main"} <= set(FILES)
    assert "dmfast.config" in GRAPH["dmfast.train"] and "dmfast.data.cache" in GRAPH["dmfast.train"]
    assert STAGES <= GRAPH["dmfast.demo"]


def test_no_import_cycle():
    done, active = set(), []

    def visit(module):
        if module in active:
            pytest.fail("import cycle: " + " -> ".join(active[active.index(module):] + [module]))
        if module in done:
            return
        active.append(module)
        for other in sorted(GRAPH[module]):
            visit(other)
        active.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


@pytest.mark.parametrize("module", sorted(FILES))
def test_modules_depend_only_downward(module):
    imported = GRAPH[module]
    if module.startswith("dmfast.cli"):
        return
    above = PIPELINE | {m for m in FILES if m.startswith("dmfast.cli")}
    if module in PIPELINE:
        assert not imported & above, f"{module} imports {sorted(imported & above)}"
    elif module in STAGES:
        assert not imported & (STAGES | above), f"stage {module} imports {sorted(imported & (STAGES | above))}"
    else:
        assert not imported & (STAGES | above), f"library module {module} imports {sorted(imported & (STAGES | above))}"
