"""The package's shape: layered imports at module level, no cycles, small modules.

The layers are the ones the package docstring (``jaxlora/__init__.py``) lists; a module
imports only from its own layer or below, never from a function body, and the library
below ``plan`` imports neither the reference models nor the apps.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import jaxlora

ROOT = pathlib.Path(jaxlora.__file__).parent
MAX_LINES = 450

# module prefix -> layer (the longest matching prefix wins)
LAYERS = {
    "jaxlora._hosts": 0,
    "jaxlora._paths": 0,
    "jaxlora._config": 0,
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


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


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


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_go_down_the_layers_at_module_level(module):
    path = _modules()[module]
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    for target, node in _imports(tree, module, path.name == "__init__.py"):
        assert id(node) in top_level or _in_type_checking(tree, node), (
            f"{module} imports {target} inside a function (line {node.lineno}); import at "
            "the top of the module"
        )
        assert _layer(target) <= _layer(module), (
            f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)}); "
            "imports go down the layers listed in jaxlora/__init__.py"
        )


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for top in tree.body:
        if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test):
            if any(n is node for n in ast.walk(top)):
                return True
    return False


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
