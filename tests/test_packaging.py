"""What ships, and who may import whom.

The wheel is built from a copy of the repository's files (a checkout without its caches and
virtualenv), as `pip wheel .` builds it from a checkout, so the build writes no build/ or
*.egg-info into the working tree. It must hold the product and the demo's token server
(`refresher/localidp.py`) and nothing of the test doubles (`testdoubles/`: the fault
injector, the Kubernetes API double, the scripted TLS server). The image is built from that
wheel, with only `refresher/` copied in (tests/test_image_recipe.py checks the recipe).

The source tree is read too: the benchmarks use no `sys.path` tricks, the tests and the
benchmarks do not import each other, and neither the product nor the doubles import either.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from refresher import __version__

ROOT = Path(__file__).resolve().parent.parent

# What a working tree holds besides the repository's own files.
NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".tools",
    ".hypothesis",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.py[cod]",
)

# Code that only the test doubles have: none of it may ship.
DOUBLE_MARKERS = [b"class Fault", b"fail_next", b"set_fault", b"FakeKubeAPI", b"ScriptedServer"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Every file in the wheel built from the repository, by name."""
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES, symlinks=True)
    command = ["pip", "wheel", "--no-deps", "--no-cache-dir", "--wheel-dir", str(folder / "out")]
    built = subprocess.run(
        [sys.executable, "-m", *command, str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    (path,) = (folder / "out").glob("refresher-*.whl")
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_the_wheel_ships_the_product_and_the_demo_token_server(wheel: dict[str, bytes]) -> None:
    top_level = {name.split("/", 1)[0] for name in wheel}
    assert top_level == {"refresher", f"refresher-{__version__}.dist-info"}
    assert {"refresher/localidp.py", "refresher/loopback.py", "refresher/demo.py"} <= set(wheel)


def test_the_wheel_holds_no_test_double(wheel: dict[str, bytes]) -> None:
    assert not [name for name in wheel if "testdoubles" in name or "kubeapi" in name]
    for name, content in wheel.items():
        found = [marker.decode() for marker in DOUBLE_MARKERS if marker in content]
        assert not found, f"{name} holds test-double code: {found}"


# ------------------------------------------------------------------ the source tree


def python_files(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    return files


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports (absolute imports, anywhere in the module)."""
    packages: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            packages.update(alias.name.split(".", 1)[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            packages.add(node.module.split(".", 1)[0])
    return packages


def test_the_benchmarks_leave_sys_path_alone() -> None:
    for path in python_files("bench"):
        text = path.read_text()
        assert "sys.path" not in text, path
        assert "E402" not in text, path  # the noqa that came with an import after a path trick


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("tests", {"bench"}),
        ("bench", {"tests"}),
        ("testdoubles", {"tests", "bench"}),
        ("refresher", {"tests", "bench", "testdoubles"}),
    ],
)
def test_who_imports_whom(folder: str, forbidden: set[str]) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & forbidden)
        for path in python_files(folder)
    }
    assert {path: found for path, found in offenders.items() if found} == {}
