"""The house's import rules (docs/design.md, "Packages and what each may import"), checked over
every import of every module of the package, at module level and inside functions: each
subpackage imports only the ones below it, third-party libraries only where they belong, and
no module imports another that imports it back.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/integration/test_layers.py``.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "hubert_ray"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

# Each subpackage and the subpackages it may import (all of them lower in the house).
MAY_IMPORT = {
    "core": set(),
    "io": {"core"},
    "corpus": {"core", "io"},
    "dataset": {"core", "io", "corpus"},
    "units": {"core", "io", "corpus", "dataset"},
    "model": {"core", "io", "units"},
    "stages": {"core", "io", "corpus", "dataset", "units", "model"},
    "backend": {"core", "io", "corpus", "dataset", "units", "model", "stages"},
    "testing": {"core", "io", "corpus", "dataset", "units", "model"},
    "cli": {"core", "io", "corpus", "dataset", "units", "model", "stages", "backend", "testing"},
    "": {"core", "dataset", "units"},  # hubert_ray/__init__.py: the public readers
}
# Third-party libraries each subpackage may import (besides the standard library and numpy).
THIRD_PARTY = {
    "core": set(),
    "io": {"fsspec", "s3fs", "botocore", "aiobotocore", "aiohttp"},
    "corpus": {"pyarrow", "soundfile", "soxr", "fsspec"},
    "dataset": {"pyarrow", "fsspec"},
    "units": {"pyarrow", "torch", "sklearn", "fsspec", "safetensors"},
    "model": {"torch", "transformers", "safetensors"},
    "stages": {"pyarrow", "torch"},
    "backend": {"ray", "pyarrow"},
    "testing": {"soundfile", "transformers", "torch", "pyarrow"},
    "cli": {"yaml", "pyarrow", "fsspec"},
    "": set(),
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in the file, at any depth."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((node.lineno, base))
            # ``from hubert_ray.x import y``: y may be a module of its own
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    """The subpackage a module of hubert_ray belongs to (``""``: the package's own __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_what_its_layer_may(module):
    layer = _layer(module)
    assert layer in MAY_IMPORT, f"{module}: a subpackage the rules do not know"
    wrong = []
    for line, imported in _imports(module, MODULES[module]):
        top = imported.split(".")[0]
        if top == "hubert_ray":
            target = _layer(imported)
            if target and target != layer and target not in MAY_IMPORT[layer]:
                wrong.append(f"line {line}: {imported} ({target} is not below {layer or 'root'})")
        elif top not in STDLIB and top != "numpy" and top not in THIRD_PARTY[layer]:
            wrong.append(f"line {line}: {imported} (third-party, not allowed in {layer})")
    assert not wrong, f"{module}:\n" + "\n".join(wrong)


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        edges = set()
        for _, imported in _imports(module, path):
            while imported and imported not in MODULES:
                imported = imported.rpartition(".")[0]
            if imported and imported != module and not module.startswith(imported + "."):
                edges.add(imported)
        graph[module] = edges
    return graph


def test_no_import_cycles():
    """No module reaches itself through the modules it imports (a package's ``__init__`` is
    not counted as importing its own submodules' importers)."""
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_product_code_never_imports_the_testing_package():
    """Only the demo command generates data; the fault hooks are loaded by name, when a test
    sets one (backend.actor)."""
    users = {
        module
        for module, path in MODULES.items()
        for _, imported in _imports(module, path)
        if _layer(imported) == "testing" and _layer(module) not in ("testing",)
    }
    assert users <= {"hubert_ray.cli.demo"}, users
