"""The layer rule: core <- privacy <- {data, models, client, server} <- runtime <- experiments <- apps <- api
<- deploy <- cli. A module imports only from its own package or from lower layers, even inside a
function; the four method-and-data packages do not import one another."""

from __future__ import annotations

import ast
from pathlib import Path

import fedmi

ROOT = Path(fedmi.__file__).parent
LAYERS = [("core",), ("privacy",), ("data", "models", "client", "server"), ("runtime",), ("experiments",), ("apps",), ("api",),
          ("deploy",), ("cli",)]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
PART_OF = {"errors": "core", "__main__": "cli"}  # top-level modules that belong to a layer's package


def _package(module: str) -> str:
    """'fedmi.runtime.flower.grid' -> 'runtime'; 'fedmi' itself -> '' (the public face, lazy)."""
    parts = module.split(".")
    return PART_OF.get(parts[1], parts[1]) if len(parts) > 1 else ""


def _imports(path: Path, module: str):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("fedmi"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else \
                    module.split(".")[: len(module.split(".")) - node.level + 1]
                yield ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("fedmi"):
                yield node.module


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield path, ".".join(parts)


def test_every_package_has_a_layer():
    packages = {_package(m) for _, m in _modules()} - {""}
    assert packages <= set(RANK), f"packages without a layer: {packages - set(RANK)}"


def test_imports_point_down_only():
    bad = []
    for path, module in _modules():
        source = _package(module)
        if source == "":
            continue  # fedmi/__init__.py: the public API, imported lazily on first use
        for target in _imports(path, module):
            dest = _package(target)
            if dest == source:
                continue
            if dest == "" or RANK[dest] >= RANK[source]:
                bad.append(f"{module} imports {target}")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)
