"""The package's layers, as tools/imports.py writes them down: no import cycle (imports inside
functions counted), each module importing only downward, and an import inside a function only
where it keeps a heavy library off a light path (which tests/unit/test_cli.py's import probes
check from the other side: config errors load no torch)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("ftdist_imports", REPO / "tools" / "imports.py")
imports = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = imports  # dataclasses look their module up
spec.loader.exec_module(imports)


@pytest.fixture(scope="module")
def problems() -> list[str]:
    return imports.problems(imports.load())


def test_no_import_cycle_between_ftdist_modules():
    assert imports.cycles(imports.load()) == []


def test_every_module_imports_only_its_own_package_or_the_layers_below(problems):
    assert [p for p in problems if p.startswith("layers:")] == []


def test_an_import_inside_a_function_keeps_a_heavy_library_off_a_light_path(problems):
    assert [p for p in problems if p.startswith("inner import:")] == []


def test_the_check_finds_what_it_is_for(tmp_path, monkeypatch):
    """A cycle through an import inside a function, an upward import, and a needless inner import
    are each reported: the three rules can fail."""
    package = tmp_path / "ftdist"
    (package / "io").mkdir(parents=True)
    (package / "training").mkdir()
    for init in (package / "__init__.py", package / "io" / "__init__.py", package / "training" / "__init__.py"):
        init.write_text("")
    (package / "io" / "store.py").write_text("def f():\n    from ftdist.training import loop\n")
    (package / "training" / "loop.py").write_text("from ftdist.io import store\n\n\ndef g():\n"
                                                   "    from ftdist.io import store as again\n")
    monkeypatch.setattr(imports, "ROOT", tmp_path)
    found = imports.problems(imports.load())
    assert any(p.startswith("cycle: ftdist.io.store <-> ftdist.training.loop") for p in found), found
    assert any(p.startswith("layers: ftdist.io.store imports ftdist.training.loop, above it") for p in found), found
    assert any(p.startswith("inner import: ftdist/io/store.py:2 imports ftdist.training.loop") for p in found), found


def test_the_command_anyone_can_run_says_the_same():
    result = subprocess.run([sys.executable, "tools/imports.py"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ", 0 cycles," in result.stdout
