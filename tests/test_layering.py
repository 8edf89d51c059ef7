"""Imports flow one way: geometry <- optim <- fisher <- distributed <- fora <- (data, cli).

A module may import from its own layer and from earlier layers only, so the core never
depends on the frontend.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stiefel_peft"
LAYERS = {
    "geometry": 0, "optim": 1, "fisher": 2, "distributed": 2.5, "fora": 3, "data": 4, "cli": 5,
    "__main__": 6,
}  # fmt: skip


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "stiefel_peft" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[str]:
    package = ".".join(("stiefel_peft", *path.relative_to(PACKAGE).with_suffix("").parts))
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = (
                    package.split(".")[: -node.level]
                    if path.name != "__init__.py"
                    else package.split(".")[: len(package.split(".")) - node.level + 1]
                )
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append(module)
            found.extend(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_core_modules_never_import_later_layers() -> None:
    violations = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        own = relative.parts[0].removesuffix(".py")
        if own not in LAYERS:
            continue
        for module in _imports(path):
            target = _layer(module)
            if target in LAYERS and LAYERS[target] > LAYERS[own]:
                violations.append(f"{relative} imports {module}")
    assert not violations, "layering violated:\n" + "\n".join(violations)


def test_every_subpackage_has_a_layer() -> None:
    names = {
        p.name.removesuffix(".py")
        for p in PACKAGE.iterdir()
        if not p.name.startswith("_") or p.name == "__main__.py"
    }
    names = {n for n in names if n not in {"__pycache__"}}
    assert names <= set(LAYERS), f"add {names - set(LAYERS)} to LAYERS in tests/test_layering.py"
