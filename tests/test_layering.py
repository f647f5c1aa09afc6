"""The package's layer rules, checked on the AST of every module under ``attnrw/``.

* ``patterns`` imports nothing from ``rewriter``, ``kernels`` or ``export``;
* ``kernels`` imports nothing from ``patterns``, ``rewriter`` or ``export``;
* ``export`` does not import the package root (``import attnrw``, ``from attnrw import <name>``);
* no import cycle among modules at module level (imports inside functions and
  under ``TYPE_CHECKING`` are not module level);
* outside ``patterns`` (which reads aten nodes) and ``kernels`` (which owns the ops),
  no code indexes a node's ``.args`` by an integer: op arguments are bound by name
  (:mod:`attnrw.opargs`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "attnrw"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(module: str, *, module_level: bool) -> list[tuple[str, int, bool]]:
    """``(imported module, line, is_root_name_import)`` for each import of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.extend((a.name, node.lineno, a.name == "attnrw") for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in MODULES:
                        out.append((sub, node.lineno, False))
                    else:
                        out.append((base, node.lineno, base == "attnrw"))
            elif isinstance(node, ast.If) and module_level and _is_type_checking(node):
                visit(node.orelse)
            elif module_level and isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []) or []:
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])
            elif not module_level and hasattr(node, "body"):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []) or [])

    if module_level:
        visit(tree.body)
    else:
        visit([n for n in ast.walk(tree) if isinstance(n, ast.stmt)])
    return out


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


RULES = [
    ("attnrw.patterns", ("attnrw.rewriter", "attnrw.kernels", "attnrw.export")),
    ("attnrw.kernels", ("attnrw.patterns", "attnrw.rewriter", "attnrw.export")),
]


@pytest.mark.parametrize("layer,forbidden", RULES, ids=[r[0] for r in RULES])
def test_layer_imports(layer: str, forbidden: tuple[str, ...]) -> None:
    bad = [
        f"{m}:{line} imports {imp}"
        for m in MODULES
        if _in(m, layer)
        for imp, line, _ in _imports(m, module_level=False)
        if any(_in(imp, f) for f in forbidden)
    ]
    assert not bad, "\n".join(bad)


def test_export_does_not_import_the_package_root() -> None:
    bad = [
        f"{m}:{line}"
        for m in MODULES
        if _in(m, "attnrw.export")
        for imp, line, root in _imports(m, module_level=False)
        if root
    ]
    assert not bad, "attnrw.export imports the package root at " + ", ".join(bad)


def test_no_module_level_import_cycle() -> None:
    graph = {m: {imp for imp, _, _ in _imports(m, module_level=True) if imp in MODULES and imp != m} for m in MODULES}
    # A package's __init__ running is implied by importing any submodule; that edge is not a cycle.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _int_index_into_args(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)):
            continue
        if node.value.attr != "args":
            continue
        index = node.slice
        if isinstance(index, ast.Slice):
            bounds = [index.lower, index.upper]
            if any(isinstance(b, ast.Constant) or isinstance(b, ast.UnaryOp) for b in bounds if b is not None):
                lines.append(node.lineno)
        elif isinstance(index, ast.Constant) and isinstance(index.value, int):
            lines.append(node.lineno)
        elif isinstance(index, ast.UnaryOp) and isinstance(index.operand, ast.Constant):
            lines.append(node.lineno)
    return lines


def test_no_integer_index_into_node_args() -> None:
    bad = [
        f"{m}:{line}"
        for m, path in MODULES.items()
        if not (_in(m, "attnrw.patterns") or _in(m, "attnrw.kernels"))
        for line in _int_index_into_args(ast.parse(path.read_text()))
    ]
    assert not bad, "integer index into .args (bind by name with attnrw.opargs): " + ", ".join(bad)


def test_the_index_check_sees_an_index() -> None:
    # The check above must be able to fail.
    assert _int_index_into_args(ast.parse("x = node.args[8]\ny = node.args[:4]\nz = node.args")) == [1, 2]
