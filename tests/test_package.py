"""The package's shape: layered imports at module level, no cycles, small modules.

The layers are the ones the package docstring (``jaxlora/__init__.py``) lists; every
module has one in :data:`LAYERS`, imports only from its own layer or below, imports
nothing (of jaxlora or not) below module level, and the library below ``plan`` imports
neither the reference models nor the apps.
"""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

import jaxlora

ROOT = pathlib.Path(jaxlora.__file__).parent
MAX_LINES = 450

# module or subpackage -> layer. A subpackage's entry covers its modules (the longest
# matching entry wins); a module entry, and the package's own "jaxlora", cover that module
# only, so a new top-level module has no layer until it is listed here.
LAYERS = {
    "jaxlora._hosts": 0,
    "jaxlora._paths": 0,
    "jaxlora._config": 0,
    "jaxlora._constant": 0,
    "jaxlora._node": 0,
    "jaxlora._delta": 0,
    "jaxlora._placement": 0,
    "jaxlora._checks": 0,
    "jaxlora.quant": 1,
    "jaxlora._split": 2,
    "jaxlora._merge": 2,
    "jaxlora._counts": 2,
    "jaxlora._engine": 3,
    "jaxlora._apply": 4,
    "jaxlora.multi": 5,
    "jaxlora.variants": 5,
    "jaxlora.sharding": 5,
    "jaxlora.io": 5,
    "jaxlora.memory": 5,
    "jaxlora.plan": 6,
    "jaxlora": 7,  # the package's __init__: re-exports
    "jaxlora.models": 8,
    "jaxlora.apps": 9,
    "jaxlora.__main__": 9,
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _entry(module: str) -> str | None:
    """The entry of :data:`LAYERS` that gives ``module`` its layer, or ``None``."""
    packages = {m for m, path in _modules().items() if path.name == "__init__.py"}
    matches = [
        entry
        for entry in LAYERS
        if module == entry
        or (entry != "jaxlora" and entry in packages and module.startswith(entry + "."))
    ]
    return max(matches, key=len, default=None)


def _layer(module: str) -> int:
    entry = _entry(module)
    if entry is None:
        pytest.fail(f"{module} has no layer: list it in LAYERS (tests/test_package.py)")
    return LAYERS[entry]


@functools.cache
def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, ast.AST]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names if a.name.startswith("jaxlora")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name.startswith("jaxlora"):
                # `from jaxlora import memory` imports the submodule jaxlora.memory
                subs = [f"{name}.{a.name}" for a in node.names]
                known = _modules()
                targets = [s for s in subs if s in known] or [name]
                out += [(t, node) for t in targets]
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        graph[module] = {t for t, _ in _imports(tree, module, path.name == "__init__.py")}
    return graph


def test_every_module_is_in_the_layer_table():
    missing = sorted(m for m in _modules() if _entry(m) is None)
    assert not missing, f"modules with no layer: {missing}; list them in LAYERS"
    stale = sorted(entry for entry in LAYERS if entry not in _modules())
    assert not stale, f"LAYERS lists {stale}, which are not modules of jaxlora"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_go_down_the_layers(module):
    path = _modules()[module]
    tree = ast.parse(path.read_text())
    layer = _layer(module)  # fails for a module missing from LAYERS
    for target, _ in _imports(tree, module, path.name == "__init__.py"):
        assert _layer(target) <= layer, (
            f"{module} (layer {layer}) imports {target} (layer {_layer(target)}); "
            "imports go down the layers listed in jaxlora/__init__.py"
        )


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_are_at_module_level(module):
    """Any import (jaxlora's, the standard library's, a third party's) is at the top.

    Allowed besides top-level statements: an ``if TYPE_CHECKING:`` block and a top-level
    ``try`` that handles ``ImportError`` (or ``ModuleNotFoundError``), for optional
    dependencies.
    """
    tree = ast.parse(_modules()[module].read_text())
    allowed = set()
    for top in tree.body:
        if _is_type_checking(top) or _handles_import_error(top):
            allowed |= {id(n) for n in ast.walk(top)}
        else:
            allowed.add(id(top))
    misplaced = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in allowed
    ]
    assert not misplaced, f"{module} imports below module level: {misplaced}; import at the top"


def _is_type_checking(top: ast.stmt) -> bool:
    return isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test)


def _handles_import_error(top: ast.stmt) -> bool:
    if not isinstance(top, ast.Try):
        return False
    caught = [ast.unparse(h.type) for h in top.handlers if h.type is not None]
    return any("ImportError" in c or "ModuleNotFoundError" in c for c in caught)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            # importing a package's submodule runs the package first: not a cycle of ours
            if target not in graph or module.startswith(target + "."):
                continue
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_library_imports_no_variant_models_or_apps():
    graph = _graph()
    for module, targets in graph.items():
        if _layer(module) >= _layer("jaxlora.plan") or module.startswith("jaxlora.variants"):
            continue
        bad = sorted(t for t in targets if t.startswith(("jaxlora.variants", "jaxlora.models",
                                                          "jaxlora.apps")))  # fmt: skip
        assert not bad, f"{module} imports {bad}: the core imports no variant, model or app"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_modules_are_small(module):
    lines = len(_modules()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by concept (<= {MAX_LINES})"


def test_layers_are_documented_in_the_package_docstring():
    doc = jaxlora.__doc__
    for name in ("paths", "quant", "split", "engine", "apply", "variants", "plan", "apps"):
        assert name in doc
