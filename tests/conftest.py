"""Shared fixtures."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture
def isolated_hf_modules(tmp_path, monkeypatch):
    """A private ``trust_remote_code`` modules cache for one test.

    transformers imports remote code as the package ``transformers_modules`` from its cache
    folder; once imported, that package keeps pointing at the first folder. Each test gets its
    own folder and a fresh import, and ``~/.cache`` is never written.
    """
    import transformers.dynamic_module_utils as dynamic

    cache = tmp_path / "hf_modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", [*sys.path])
    for name in [
        m
        for m in sys.modules
        if m == "transformers_modules" or m.startswith("transformers_modules.")
    ]:
        monkeypatch.delitem(sys.modules, name)
    return cache
