"""The model registry: families register themselves from their folders, exactly one family takes
each shipped config, and the shipped HF remote code stands alone.

A family that forgot ``@register_family``, two families accepting the same config, a catalog
(names read without importing) that disagrees with the registered classes, a converter ``--help``
or unknown ``--model`` that imports torch, or remote code importing the package (which an
export's user does not have) fail here.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lov15_megatron.config import load_config
from lov15_megatron.convert.mapping import ConversionError
from lov15_megatron.models import catalog, registry

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "lov15_megatron" / "models"


def test_every_family_folder_registers_itself():
    folders = {p.parent.name for p in MODELS.glob("*/family.py")}
    assert folders == {"qwen3", "qwen3_moe", "llava_ov"}
    found = registry.families()
    # each folder's family.py registered exactly one family, defined in that folder
    assert {type(f).__module__.split(".")[-2] for f in found.values()} == folders
    assert list(found) == ["qwen3", "qwen3-moe", "llava-ov-1.5"]  # language models first
    for family in found.values():
        assert isinstance(family, registry.ModelFamily)
        assert family.summary and family.hf_architecture
    language = {f.name for f in found.values() if f.is_language_model}
    assert language == {"qwen3", "qwen3-moe"}


def test_catalog_reads_what_the_families_register():
    """The catalog's names, summaries and order come from the source; they are the classes'."""
    read = {
        name: (e.summary, e.is_language_model, e.module) for name, e in catalog.catalog().items()
    }
    registered = {
        name: (f.summary, f.is_language_model, type(f).__module__)
        for name, f in registry.families().items()
    }
    assert read == registered
    assert list(read) == list(registered) == list(registry.model_names())
    assert read["qwen3-moe"][1]  # inherited from Qwen3, not stated in its class


def test_catalog_refuses_a_name_it_cannot_read(monkeypatch, tmp_path):
    source = tmp_path / "family.py"
    source.write_text(
        textwrap.dedent(
            """
            from lov15_megatron.models.registry import ModelFamily, register_family

            NAME = "computed"

            @register_family
            class Computed(ModelFamily):
                name = NAME
                summary = "a summary"
            """
        )
    )
    monkeypatch.setattr(catalog, "family_modules", lambda: {"fake.family": source})
    with pytest.raises(TypeError, match=r"class Computed must state name as a str literal"):
        catalog.catalog.__wrapped__()


# Runs in a fresh interpreter: this one has imported torch already.
_LIGHT_CLI = """
import contextlib, io, sys
from lov15_megatron.cli.convert_checkpoint import main

out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0, e.code
    try:  # a usage error: --save-dir missing
        main(["hf-to-mcore", "--model", "qwen3", "--hf-dir", "x"])
    except SystemExit as e:
        assert e.code == 2, e.code
    status = main(["hf-to-mcore", "--model", "nosuch", "--hf-dir", "x", "--save-dir", "y"])
heavy = [m for m in ("torch", "megatron", "transformers") if m in sys.modules]
print(status, heavy)
print(out.getvalue())
print(err.getvalue())
"""


def test_converter_help_and_argument_errors_import_no_model():
    env = {**os.environ, "COLUMNS": "1000"}  # argparse wraps its help to the terminal's width
    run = subprocess.run(
        [sys.executable, "-c", _LIGHT_CLI], capture_output=True, text=True, cwd=ROOT, env=env,
        check=True,
    )  # fmt: skip
    first, *rest = run.stdout.splitlines()
    assert first == "2 []"  # the unknown name's exit status; none of the heavy modules imported
    text = "\n".join(rest)
    for family in catalog.catalog().values():  # the registered ones (the test above)
        assert f"{family.name}: {family.summary}" in text
    assert "the following arguments are required: --save-dir" in text
    assert (
        "error: unknown --model 'nosuch'; registered models: qwen3, qwen3-moe, llava-ov-1.5" in rest
    )


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("configs/tiny_gpt.yaml", "qwen3"),
        ("configs/models/qwen3_8b.yaml", "qwen3"),
        ("configs/models/qwen3_30b_a3b.yaml", "qwen3-moe"),
        ("configs/tiny/stage2.yaml", "llava-ov-1.5"),
        ("configs/llava_ov_1_5/4b/stage2_instruct.yaml", "llava-ov-1.5"),
        ("configs/models/llava_ov_1_5_30b_a3b.yaml", "llava-ov-1.5"),
    ],
)
def test_exactly_one_family_takes_each_shipped_config(config: str, expected: str, tmp_path):
    # stage configs take their data from the command line, as their launchers give it
    stage = "/stage" in config
    data = [f"data.path={tmp_path}", "data.tokenizer=unused"] if stage else []
    cfg = load_config(ROOT / config, data)
    accepting = [f.name for f in registry.families().values() if f.accepts(cfg)]
    assert accepting == [expected]
    assert registry.family_for_config(cfg).name == expected
    # the VLM is built over the language family its model.language describes
    lm_family = registry.language_family(cfg.model.language)
    assert lm_family.name == ("qwen3-moe" if cfg.model.language.num_experts else "qwen3")


def test_unknown_model_name_lists_the_registered_ones():
    with pytest.raises(ConversionError, match="registered models: qwen3, qwen3-moe, llava-ov-1.5"):
        registry.get_family("qwen2")


def test_language_family_of_hf_model_types():
    assert registry.language_family_of_hf({"model_type": "qwen3"}).name == "qwen3"
    assert registry.language_family_of_hf({"model_type": "qwen3_moe"}).name == "qwen3-moe"
    # the release's text model_type is qwen3, or qwen3-moe when the config has experts
    released = {"model_type": "LLaVAOneVision1_5_text", "num_experts": 0}
    assert registry.language_family_of_hf(released).name == "qwen3"
    with pytest.raises(ConversionError, match="not registered"):
        registry.language_family_of_hf({"model_type": "llama"})


def test_remote_code_imports_nothing_of_the_package():
    """Exports carry hf/remote_code/*.py; their users have transformers, not lov15_megatron."""
    from lov15_megatron.hf.remote_code import CODE_FILES

    folder = ROOT / "lov15_megatron" / "hf" / "remote_code"
    assert {p.name for p in CODE_FILES} == {
        p.name for p in folder.glob("*.py") if p.name != "__init__.py"
    }
    for path in CODE_FILES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("lov15_megatron"), (path, node.module)
            if isinstance(node, ast.ImportFrom) and node.level:
                # relative imports stay among the shipped files
                assert f"{node.module}.py" in {p.name for p in CODE_FILES}, (path, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("lov15_megatron") for a in node.names), path
