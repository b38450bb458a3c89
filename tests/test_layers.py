"""Each package imports only the layers below it: no library module imports experiments/,
benchmarks/ or drills/, and no two packages import each other."""

import ast
from pathlib import Path

from conftest import REPO

# lower rank = lower layer; a package may import its own modules and those of lower ranks
RANKS = {
    "errors": 0,  # the exception types and exit codes every layer reports through
    "progress": 1, "config": 1,
    "core": 2,
    "cluster": 3,
    "models": 4, "comm": 4, "data": 4,
    "parallel": 5, "observe": 5, "io": 5,
    "train": 6,
    "plan": 7, "launch": 7,
}


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # also imports inside functions
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_every_library_import_goes_to_a_lower_layer_or_its_own_package():
    wrong = []
    for path in sorted((REPO / "jaxdist").rglob("*.py")):
        relative = path.relative_to(REPO / "jaxdist")
        package = relative.parts[0].removesuffix(".py")
        if package == "__init__":
            continue  # the public API re-exports every layer
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] in ("experiments", "benchmarks", "drills"):
                wrong.append(f"{relative} imports {module}")
            if parts[0] != "jaxdist" or len(parts) < 2 or parts[1] == package:
                continue
            if parts[1] not in RANKS:
                wrong.append(f"{relative} imports {module}: unknown layer {parts[1]!r}")
            elif RANKS[parts[1]] >= RANKS[package]:
                wrong.append(f"{relative} ({package}) imports {module} (not a lower layer)")
    assert not wrong, "\n".join(wrong)
