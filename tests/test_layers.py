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


def test_help_and_option_errors_load_no_torch_dali_or_faiss():
    """Each command imports the heavy packages inside its function: `--help` answers at once."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from cli.app import app\n"
            "for args in (['--help'], ['train', '--help'], ['mine', '--help'], ['eval', 'knn', '--help'],\n"
            "             ['shard', '--help'], ['demo', '--help'], ['train']):\n"
            "    CliRunner().invoke(app, args)\n"
            "print(sorted(m for m in ('torch', 'nvidia.dali', 'faiss') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
