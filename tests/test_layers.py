"""The packages import one way: cli -> clim_fast -> dali_pipelines -> shards (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("shards", "dali_pipelines", "clim_fast", "cli")  # each may import only those before it


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ORDER)
def test_a_package_imports_only_the_packages_below_it(package):
    above = set(ORDER[ORDER.index(package) + 1:])
    wrong = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & above)
             for path in (ROOT / package).rglob("*.py")}
    assert {path: names for path, names in wrong.items() if names} == {}
