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


def _stage_of(module: str) -> str | None:
    """The stage a module belongs to: the stage's module, or a module of the stage's package (``dmfast.eval.*``)."""
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


@pytest.mark.parametrize("module", sorted(FILES))
def test_modules_depend_only_downward(module):
    imported = GRAPH[module]
    if module.startswith("dmfast.cli"):
        return
    above = PIPELINE | {m for m in FILES if m.startswith("dmfast.cli")}
    stages = {m for m in FILES if _stage_of(m) is not None and _stage_of(m) != _stage_of(module)}  # other stages'
    if module in PIPELINE:
        assert not imported & above, f"{module} imports {sorted(imported & above)}"
    else:
        kind = "stage" if _stage_of(module) else "library"
        assert not imported & (stages | above), f"{kind} module {module} imports {sorted(imported & (stages | above))}"


def test_a_stage_package_is_seen_as_its_stage():
    assert _stage_of("dmfast.eval.scoring") == "dmfast.eval" and _stage_of("dmfast.evaluation") is None
    assert "dmfast.eval.scoring" in GRAPH["dmfast.eval"]


# Raises that are not about a user's input, each with why: internal signals caught nearby, Python protocols, the
# extension's own state.
INTERNAL_RAISES = {
    ("dmfast.data.dataset", "ValueError"),  # LabelPolicy.value: a cell it cannot read, caught by each reader
    ("dmfast.data.cache", "KeyError"),  # ImageCache.batch: names the caller took from the cache itself
    ("dmfast.ops", "RuntimeError"),  # double backward: unsupported, as torch says of its own ops
    ("dmfast", "AttributeError"),  # the module's __getattr__ protocol
    ("dmfast.cpu_variants", "ImportError"),  # no kernels for this CPU or DMFAST_CPU_VARIANT: the import fails
}
OS_ERRORS = {"OSError", "FileNotFoundError", "PermissionError", "FileExistsError"}


def test_every_raise_is_a_dmfast_error():
    """What dmfast raises on purpose is a :class:`dmfast.errors.Error` (the CLI prints it as ``error: ...`` and
    treats anything else as a bug), an OSError (the file system's answer) or one of the internal raises above."""
    import dmfast.errors

    ours = {name for name, value in vars(dmfast.errors).items() if isinstance(value, type)
            and issubclass(value, dmfast.errors.Error)}
    import builtins

    python_errors = {name for name, value in vars(builtins).items() if isinstance(value, type)
                     and issubclass(value, Exception)} - OS_ERRORS
    found = []
    for module, path in FILES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = call.attr if isinstance(call, ast.Attribute) else getattr(call, "id", None)
                if name is None or not name[0].isupper():  # re-raising a caught error, or a helper's (below)
                    continue
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in python_errors:
                name = node.func.id  # an error built anywhere (a helper returning it to be raised)
            else:
                continue
            if name not in ours | OS_ERRORS and (module, name) not in INTERNAL_RAISES and \
                    not name.startswith(("click.", "Bad", "Usage", "Abort", "Exit")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not found, "errors raised or built that are not dmfast errors:\n" + "\n".join(found)


def _cpp_constant(header: str, name: str) -> float:
    import re

    found = re.search(rf"constexpr\s+\w+\s+{name}\s*=\s*([0-9.eE+-]+)\s*;", (ROOT / "csrc" / header).read_text())
    assert found, f"csrc/{header}: no constexpr {name}"
    return float(found.group(1))


@pytest.mark.parametrize("header, cpp, python", [("checks.h", "kMaxBoxes", "MAX_BOXES"),
                                                  ("checks.h", "kMaxSide", "OP_MAX_SIDE"),
                                                  ("affine_smooth.h", "kThetaLimit", "THETA_LIMIT")])
def test_the_kernels_limits_are_pythons(header, cpp, python):
    """The limits the C++ kernels check are dmfast.limits' (the one Python owner, which config, the CLI and the
    ops' wrappers read)."""
    from dmfast import limits

    assert _cpp_constant(header, cpp) == getattr(limits, python)


# Folders and the modules each may import (besides its own folder's): data/ is below config, the stages and
# everything that draws or computes on images; the leaves import nothing of dmfast.
LEAVES = {"dmfast.errors", "dmfast.limits"}
FOLDER_MAY_IMPORT = {"dmfast.data": LEAVES | {"dmfast.io"}}


def test_leaves_import_no_dmfast_module_but_each_other():
    for leaf in LEAVES:
        assert GRAPH[leaf] <= LEAVES, f"{leaf} imports {sorted(GRAPH[leaf] - LEAVES)}"


@pytest.mark.parametrize("folder", sorted(FOLDER_MAY_IMPORT))
def test_folders_depend_only_downward(folder):
    """A folder's modules import its own modules and the ones listed: so no loop runs through a folder (config
    imports data/, so nothing in data/ imports config; the phantom generator, which draws with the ops and the
    anatomy, lives beside them, not in data/)."""
    allowed = FOLDER_MAY_IMPORT[folder]
    for module in (m for m in FILES if m == folder or m.startswith(folder + ".")):
        outside = {m for m in GRAPH[module] if not m.startswith(folder + ".") and m != folder} - allowed
        assert not outside, f"{module} imports {sorted(outside)}"


def test_setup_builds_the_cpu_variants_dmfast_loads():
    """setup.py's variants are dmfast.cpu_variants' (read from that file: the list is written once)."""
    from dmfast import cpu_variants

    source = (ROOT / "setup.py").read_text()
    namespace = {"__file__": str(ROOT / "setup.py")}
    exec(compile(source.split("\ndef cpu_variants")[0], "setup.py", "exec"), namespace)  # up to the build itself
    assert namespace["X86_VARIANTS"] == cpu_variants.COMPILE_FLAGS and tuple(cpu_variants.COMPILE_FLAGS) == \
        cpu_variants.VARIANTS


def test_setup_installs_every_package():
    """setup.py's package list names every folder of dmfast/ with an __init__.py (an editable install would hide
    one left out: a wheel would lack it)."""
    import re

    listed = set(re.search(r"packages=\[([^\]]*)\]", (ROOT / "setup.py").read_text()).group(1).replace('"', "")
                 .replace(" ", "").split(","))
    folders = {".".join(("dmfast", *p.parent.relative_to(ROOT / "dmfast").parts)) for p in (ROOT / "dmfast").rglob(
        "__init__.py")}
    assert folders <= listed and "dmfast.cli" in listed, sorted(folders - listed)
