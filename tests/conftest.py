"""Shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

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


def _convert_in_rank(model: str, hf_dir: str, save_dir: str) -> str:
    """Runs in one rank: ``hf-to-mcore`` as the CLI does it, without the CLI's own process."""
    from lov15_megatron.convert import core
    from lov15_megatron.models.registry import get_family
    from lov15_megatron.runtime import distributed

    distributed.initialize(core.converter_runtime_config())
    try:
        return core.hf_to_mcore(get_family(model), hf_dir, save_dir).line()
    finally:
        distributed.shutdown()


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny random LLaVA-OV-1.5 (``helpers.make_hf_vlm``, seed 0) and its Megatron
    checkpoint, built once per session; ``(hf_dir, mcore_dir)``, read-only for tests (copy
    before writing). The CLI's own ``hf-to-mcore`` is tested in test_convert_qwen3.py and
    test_released_checkpoint.py."""
    from helpers import make_hf_vlm

    from lov15_megatron.runtime.launch import run_ranks

    root = tmp_path_factory.mktemp("tiny_vlm")
    make_hf_vlm(root / "hf")
    (line,) = run_ranks(1, _convert_in_rank, "llava-ov-1.5", str(root / "hf"), str(root / "mcore"))
    assert "hf-to-mcore: wrote" in line, line
    return root / "hf", root / "mcore"
