"""Every module imports, and the code is ruff-clean."""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import kto_scale

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(m.name for m in pkgutil.walk_packages(kto_scale.__path__, "kto_scale.")))
def test_module_imports(name):
    importlib.import_module(name)


@pytest.mark.e2e
def test_ruff_clean():
    # As a module of this interpreter: the venv's bin/ need not be on PATH.
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
