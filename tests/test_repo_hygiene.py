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


SECTION = "\u00a7"  # the section sign, spelled so that this file matches none of the patterns
DOCS_AND_CODE = ("*.md", "*.py", "*.sh", "*.yaml", "*.sbatch")


def test_docs_and_code_do_not_cite_the_private_spec():
    """Citations name our own docs (e.g. the model reference's section 7), never the developers'
    spec files or a bare spec section."""
    private = re.compile(
        r"(?<![\w/-])(?:model|data-and-stages|cpu-megatron|slurm-on-one-machine)\.md"
        r"|\bspec\s+`?" + SECTION
    )
    offenders = [
        f"{p.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for p in _tracked(*DOCS_AND_CODE)
        for text in [p.read_text(encoding="utf-8")]
        for m in private.finditer(text)
    ]
    assert offenders == [], offenders


def test_doc_citations_name_docs_and_sections_that_exist():
    """Every ``docs/<name>.md`` named in the tree exists, and every section number cited after it
    (the section sign and a number, or several joined by commas / "and") is a numbered heading
    (``## 7. …``) of that doc."""
    number = SECTION + r"\d+"
    cite = re.compile(
        r"docs/([\w-]+\.md)(?:`?\s*\(?(" + number + r"(?:(?:,\s*|\s+and\s+)" + number + r")*))?"
    )
    heading = re.compile(r"^#{2,6}\s+(\d+)\.\s", re.MULTILINE)
    sections: dict[str, set[str]] = {}
    bad = []
    for path in _tracked(*DOCS_AND_CODE):
        text = path.read_text(encoding="utf-8")
        for m in cite.finditer(text):
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            doc = ROOT / "docs" / m.group(1)
            if not doc.is_file():
                bad.append(f"{where}: {m.group(0)}: no such doc")
                continue
            if m.group(1) not in sections:
                sections[m.group(1)] = set(heading.findall(doc.read_text(encoding="utf-8")))
            missing = [
                n for n in re.findall(r"\d+", m.group(2) or "") if n not in sections[m.group(1)]
            ]
            if missing:
                bad.append(f"{where}: {m.group(0)}: no numbered section {missing} in that doc")
    assert bad == [], bad
    assert {"1", "7", "10"} <= sections.get("model-reference.md", set())  # the check has teeth
