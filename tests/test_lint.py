"""House style is checked with the tests: ruff on everything, mypy strict on the server code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.processes import ROOT

BIN = Path(sys.executable).parent


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which(args[0], path=str(BIN)) or args[0]
    return subprocess.run([tool, *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)


LINTED = ("server", "handlers", "models", "tests", "bench", "run.py")


def test_ruff_is_clean():
    result = run_tool("ruff", "check", *LINTED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied():
    """The house format is ruff's: run `.venv/bin/ruff format` before committing."""
    result = run_tool("ruff", "format", "--check", *LINTED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean():
    result = run_tool("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_hold():
    """models/ imports nothing from server/ or handlers/; server/ reaches handlers/ only in app.py."""
    result = run_tool("lint-imports", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
