"""Import rules of ``attnrw/kernels``, checked on the AST of every module (no module is imported).

* a kernel package (``sparse``, ``condense``, ``merge``, ``attention``, any
  other but ``common``) imports only ``attnrw.kernels.common``,
  ``attnrw.kernels.dispatch`` and itself; ``common`` imports no kernel package;
* no ``triton.py`` imports its own package's ``reference.py``, directly or
  through another module of that package (what both need goes to
  ``layout.py`` or ``common``);
* nothing under ``attnrw/kernels`` imports ``attnrw.masking``,
  ``attnrw.patterns``, ``attnrw.rewriter``, ``attnrw.export`` or the root
  package ``attnrw`` itself.

Imports inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "attnrw" / "kernels"
PREFIX = "attnrw.kernels"
#: Layers above the kernels, which the kernels must not know.
FORBIDDEN = ("attnrw.masking", "attnrw.patterns", "attnrw.rewriter", "attnrw.export")
#: What every kernel package may import besides itself.
SHARED = ("common", "dispatch")


def module_name(path: Path) -> str:
    parts = path.relative_to(KERNELS.parents[1]).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(KERNELS.rglob("*.py"))}


def imports(path: Path, name: str | None = None) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, relative imports resolved; ``from a import b`` gives ``a.b``.

    ``name`` is the module's dotted name (by default from its path under
    attnrw/kernels). ``a.b`` may name a module or just an attribute of ``a``;
    the rules below judge by the prefix, which is right either way.
    """
    name = module_name(path) if name is None else name
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def package_of(module: str) -> str | None:
    """The kernel package (``sparse``, ``common``, ...) or top module (``dispatch``) ``module`` lies in, if any."""
    if not module.startswith(PREFIX + "."):
        return None
    return module[len(PREFIX) + 1 :].split(".")[0]


def own_modules(module: str) -> set[str]:
    """The modules of its own package ``module`` imports, directly or through others of that package."""
    pkg = package_of(module)
    seen: set[str] = set()
    todo = [module]
    while todo:
        for _, target in imports(MODULES[todo.pop()]):
            for candidate in (target, target.rpartition(".")[0]):
                if candidate in MODULES and package_of(candidate) == pkg and candidate not in seen:
                    seen.add(candidate)
                    todo.append(candidate)
    return seen


def test_the_rules_see_every_kernel_package():
    packages = {package_of(m) for m in MODULES} - {None, "", "dispatch"}
    assert {"common", "attention", "sparse", "condense", "merge"} <= packages, packages
    assert any(p.name == "triton.py" for p in MODULES.values())


def sibling_violations(module: str, found: list[tuple[int, str]]) -> list[str]:
    """The imports of ``module`` (a kernel module) that reach a kernel package it may not import."""
    pkg = package_of(module)
    if pkg in (None, "", "dispatch"):
        return []  # attnrw.kernels itself and dispatch: may name every package
    allowed = {pkg} if pkg == "common" else {pkg, *SHARED}
    return [
        f"line {line}: {target}"
        for line, target in found
        if (package_of(target) is not None and package_of(target) not in allowed) or target == PREFIX
    ]


def layer_violations(found: list[tuple[int, str]]) -> list[str]:
    """The imports of a layer above the kernels, or of the root package ``attnrw``."""
    return [
        f"line {line}: {target}"
        for line, target in found
        if target == "attnrw"
        or target.startswith(FORBIDDEN)
        # ``from attnrw import x`` / ``import attnrw.x``: the root package's namespace
        or (target.startswith("attnrw.") and target.count(".") == 1 and target.split(".")[1] not in ("kernels", "errors"))
    ]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_kernel_packages_import_no_sibling(module):
    bad = sibling_violations(module, imports(MODULES[module]))
    assert not bad, f"{module} may import only from common, dispatch and its own package: {bad}"


@pytest.mark.parametrize("module", sorted(m for m, p in MODULES.items() if p.name == "triton.py"))
def test_triton_does_not_import_its_reference(module):
    reference = module.rpartition(".")[0] + ".reference"
    via = own_modules(module)
    assert reference not in via, (
        f"{module} reaches {reference} (through {sorted(via)}); put what both need in layout.py or common"
    )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_kernels_import_no_upper_layer_nor_the_root(module):
    bad = layer_violations(imports(MODULES[module]))
    assert not bad, f"{module} imports a layer above the kernels or the root package: {bad}"


def test_the_rules_catch_bad_imports(tmp_path):
    """The checks above flag what they should on a module written here (and pass what is allowed)."""
    path = tmp_path / "reference.py"
    path.write_text(
        "import attnrw\n"
        "from attnrw import config\n"
        "from attnrw.rewriter.replace import run_passes\n"
        "from attnrw.errors import ConfigError\n"
        "from ..sparse.layout import cdiv\n"
        "from .layout import Geometry\n"
        "from attnrw.kernels.common.shapes import as_4d\n"
        "def f():\n"
        "    from attnrw.patterns import sdpa\n"
    )
    found = imports(path, "attnrw.kernels.condense.reference")
    assert [line for line, _ in found] == [1, 2, 3, 4, 5, 6, 7, 9]
    assert sibling_violations("attnrw.kernels.condense.reference", found) == ["line 5: attnrw.kernels.sparse.layout.cdiv"]
    assert sibling_violations("attnrw.kernels.common.shapes", found) == [
        "line 5: attnrw.kernels.sparse.layout.cdiv",
        "line 6: attnrw.kernels.condense.layout.Geometry",
    ]
    assert [v.split(":")[0] for v in layer_violations(found)] == ["line 1", "line 2", "line 3", "line 9"]
