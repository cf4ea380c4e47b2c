"""The project's housekeeping files agree with each other: one version (pyproject.toml) that
the package reports and the changelog names, the docs index listing every page, the pre-commit
hook at the pinned ruff, the type check's module list, the licence."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import lov15_megatron

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
VERSION = PYPROJECT["project"]["version"]


def test_package_reports_the_pyproject_version():
    assert lov15_megatron.__version__ == VERSION, (
        "the installed metadata is stale: reinstall (scripts/_venv.sh does when pyproject changes)"
    )


def test_uninstalled_checkout_reads_the_version_from_pyproject(monkeypatch):
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(lov15_megatron, "version", not_installed)
    assert lov15_megatron._version() == VERSION


def test_changelog_names_the_version_in_preparation_and_each_release():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[([^\]]+)\](.*)$", changelog, flags=re.MULTILINE)
    assert headings[0][0] == "Unreleased", "the newest section is Unreleased"
    release = re.sub(r"\.dev\d+$", "", VERSION)
    if release == VERSION:  # a release: its own section, dated
        assert any(v == VERSION and re.search(r"\d{4}-\d\d-\d\d", rest) for v, rest in headings)
    else:  # in preparation: Unreleased says which release it becomes
        assert f"({release})" in headings[0][1], headings[0]
        assert release not in [v for v, _ in headings], "a dev version of a released version"


def test_docs_index_lists_every_page_once():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    listed = re.findall(r"^- `docs/([\w-]+\.md)`", index, flags=re.MULTILINE)
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md")
    assert sorted(listed) == pages, "docs/README.md lists each page of docs/ exactly once"


def test_pre_commit_runs_the_pinned_ruff():
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    (ruff_repo,) = [r for r in config["repos"] if r["repo"].endswith("/ruff-pre-commit")]
    (pin,) = [d for d in PYPROJECT["project"]["optional-dependencies"]["dev"] if "ruff" in d]
    assert ruff_repo["rev"] == "v" + pin.split("==")[1]
    hooks = {h["id"]: h.get("args", []) for h in ruff_repo["hooks"]}
    assert hooks == {"ruff-check": [], "ruff-format": ["--check"]}  # what scripts/test.sh runs


@pytest.mark.parametrize("path", PYPROJECT["tool"]["mypy"]["files"])
def test_type_checked_modules_exist(path):
    assert (ROOT / path).exists(), f"[tool.mypy] files names {path}, which does not exist"


def test_licence_is_the_declared_one():
    declared = PYPROJECT["project"]["license"]
    assert (declared if isinstance(declared, str) else declared["text"]) == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.lstrip().startswith("Apache License\n")
    assert "Version 2.0, January 2004" in text
    assert "Copyright 2026 the lov15-megatron authors" in text
