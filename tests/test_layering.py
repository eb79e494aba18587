"""The package's layers, read statically from every import statement (top level and inside functions alike):
the model imports nothing above it, and what serves evaluation and rollouts never imports the trainer."""

import ast
from pathlib import Path

import pytest

import zaya_train

PACKAGE = Path(zaya_train.__file__).parent

# module or package (relative to zaya_train) -> packages of zaya_train it must never import
FORBIDDEN = {
    "kernels": ("model", "train", "rl", "rollout", "rsa", "data", "rewards", "loading", "metrics", "hf", "cli"),
    "model": ("train", "rl", "rollout", "rsa", "data", "rewards", "loading", "metrics", "hf", "cli"),
    "rollout": ("train", "rl", "cli"),
    "rsa": ("train", "rl", "cli"),
    "rewards": ("train", "rl", "cli"),
    "data": ("train", "rl", "cli"),
    "loading.py": ("train", "rl", "cli"),
    "metrics.py": ("train", "rl", "cli"),
    "hf.py": ("train", "rl", "cli"),
}


def imported_modules(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module of `package`, relative imports resolved."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module))
            # `from zaya_train import train` imports a subpackage by name
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def files_of(layer: str) -> list[Path]:
    target = PACKAGE / layer
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_never_imports_the_layers_above_it(layer):
    files = files_of(layer)
    assert files and all(f.is_file() for f in files), f"{layer} is not part of the package any more"
    violations = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path in files
        for line, module in imported_modules(path.read_text(), ["zaya_train", *path.relative_to(PACKAGE).parent.parts])
        for above in FORBIDDEN[layer]
        if module == f"zaya_train.{above.removesuffix('.py')}"
        or module.startswith(f"zaya_train.{above.removesuffix('.py')}.")
    ]
    assert not violations, "\n".join(violations)


def test_the_reader_sees_lazy_and_relative_imports():
    """The check above would pass vacuously if the reader missed imports inside functions or relative ones."""
    source = "def f():\n    import zaya_train.train.export\n\nfrom ..train import config\nfrom . import core\n"
    modules = {m for _, m in imported_modules(source, ["zaya_train", "rsa"])}
    assert {"zaya_train.train.export", "zaya_train.train", "zaya_train.train.config", "zaya_train.rsa.core"} <= modules
