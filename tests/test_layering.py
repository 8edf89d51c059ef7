"""Three homes, imports pointing one way.

- The library, ``stiefel_peft`` minus ``cli``: ``geometry`` <- ``optim`` <- ``distributed``,
  ``fisher``, then ``fora`` on top. A module imports from its own layer and earlier ones.
- The application, ``stiefel_peft.cli`` (and ``python -m stiefel_peft``): the library only.
- The experiments, ``experiments/``: the library and the application, public names only.

The library never imports the application or the experiments; nothing imports the experiments
except themselves.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stiefel_peft"
EXPERIMENTS = ROOT / "experiments"
LIBRARY_LAYERS = {"geometry": 0, "optim": 1, "fisher": 2, "distributed": 2.5, "fora": 3}
APPLICATION = {"cli", "__main__"}


def _imports(path: Path, package: str) -> Iterator[tuple[str, list[str]]]:
    """``(module, imported names)`` of every import in ``path`` (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + (path.name == "__init__.py")]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield module, [alias.name for alias in node.names]


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _home(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "experiments":
        return "experiments"
    if parts[0] != "stiefel_peft":
        return None
    if len(parts) > 1 and parts[1] in APPLICATION:
        return "application"
    return "library"


def test_library_layers_point_one_way_and_never_at_the_application() -> None:
    violations = []
    for path in PACKAGE.rglob("*.py"):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if top in APPLICATION:
            continue
        own = LIBRARY_LAYERS.get(top, -1)  # the package's __init__ sits below every layer
        for module, _ in _imports(path, _package_of(path)):
            home = _home(module)
            if home in ("application", "experiments"):
                violations.append(f"{path.relative_to(ROOT)} imports the {home}: {module}")
                continue
            parts = module.split(".")
            later = len(parts) > 1 and LIBRARY_LAYERS.get(parts[1], -1) > own >= 0
            if home == "library" and later:
                violations.append(f"{path.relative_to(ROOT)} imports a later layer: {module}")
    assert not violations, "layering violated:\n" + "\n".join(violations)


def test_the_application_imports_the_library_but_never_the_experiments() -> None:
    violations = [
        f"{path.relative_to(ROOT)} imports {module}"
        for folder in (PACKAGE / "cli",)
        for path in folder.rglob("*.py")
        for module, _ in _imports(path, _package_of(path))
        if _home(module) == "experiments"
    ]
    assert not violations, "\n".join(violations)


def test_the_experiments_use_public_names_only() -> None:
    violations = []
    for path in EXPERIMENTS.rglob("*.py"):
        for module, names in _imports(path, _package_of(path)):
            if _home(module) not in ("library", "application"):
                continue
            private = [part for part in module.split(".") if part.startswith("_")]
            private += [name for name in names if name.startswith("_")]
            if private:
                violations.append(f"{path.relative_to(ROOT)}: {module} {private}")
    assert not violations, "experiments reach into private names:\n" + "\n".join(violations)


def test_nothing_outside_the_experiments_imports_them() -> None:
    violations = []
    for folder in (PACKAGE, ROOT / "benchmarks", ROOT / "examples"):
        for path in folder.rglob("*.py"):
            for module, _ in _imports(path, _package_of(path)):
                if _home(module) == "experiments":
                    violations.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not violations, "\n".join(violations)


def test_every_subpackage_has_a_home() -> None:
    names = {
        p.name.removesuffix(".py")
        for p in PACKAGE.iterdir()
        if (p.is_dir() and p.name != "__pycache__") or p.name == "__main__.py"
    }
    assert names <= set(LIBRARY_LAYERS) | APPLICATION, names - set(LIBRARY_LAYERS) - APPLICATION
