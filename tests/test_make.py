"""`make test` is idempotent: once installed, nothing is reinstalled until pyproject or constraints change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAMP = ROOT / ".venv" / ".sllm-faas-installed"


@pytest.mark.skipif(not STAMP.exists() or Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="not running inside the venv that `make` manages")
def test_second_make_run_installs_nothing():
    plan = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "pip install" not in plan and "-m venv" not in plan
    assert subprocess.run(["make", "-q", "install"], cwd=ROOT).returncode == 0
