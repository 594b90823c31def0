"""The whole package type-checks (mypy, pinned in .ci/constraints.txt; settings in pyproject.toml
[tool.mypy]), so `.ci/run` fails on a type error like on a failing test."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_type_checks():
    # the cache (.mypy_cache, ignored by git) makes a rerun take seconds instead of ~20 s
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-color-output"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"mypy found problems:\n{done.stdout}{done.stderr}"
    assert "no issues found" in done.stdout
