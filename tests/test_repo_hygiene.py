"""Repository rules that no other test would notice breaking."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:  # not a git checkout (e.g. an sdist): look at the tree
        return [p for pattern in patterns for p in ROOT.glob(pattern)]
    return [ROOT / line for line in out.stdout.splitlines()]


def test_tests_share_code_through_helpers_not_other_test_modules():
    importing = re.compile(r"^\s*(from|import)\s+test_\w+", re.MULTILINE)
    offenders = [
        p.name for p in _tracked("tests/*.py") if importing.search(p.read_text(encoding="utf-8"))
    ]
    assert offenders == [], f"import shared test code from tests/helpers.py: {offenders}"


def test_docs_and_code_do_not_point_outside_the_repository():
    """Users do not have the developers' shared spec folder: the docs carry the facts."""
    outside = "/".join(("shared", "spec"))  # spelled so that this file does not match itself
    files = _tracked("*.md", "*.py", "*.sh", "*.yaml")
    offenders = [
        str(p.relative_to(ROOT)) for p in files if outside in p.read_text(encoding="utf-8")
    ]
    assert offenders == [], offenders
