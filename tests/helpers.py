"""Helpers shared by test modules (``tests/`` is on ``sys.path`` under pytest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVERT = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``tools/convert_checkpoint.py`` with these arguments (one thread, repo root)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CONVERT, *args], capture_output=True, text=True, env=env, cwd=ROOT)


def ok(*args: str) -> str:
    """``cli`` that must succeed; returns its stdout."""
    out = cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
