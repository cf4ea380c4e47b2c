"""A user's mistake: one line naming the field on stderr and nothing else (no traceback, no
library warning such as Megatron-Core's Transformer Engine / Apex fallback notices), exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lov15_megatron.train", "--config", "configs/tiny/model.yaml",
           "runtime.device=cpu", *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)


@pytest.mark.parametrize(
    ("make", "field", "message"),
    [
        (lambda d: d / "missing", "data.path", "no such file or directory"),
        (lambda d: d, "data.path", "not an Energon dataset (no .nv-meta/dataset.yaml)"),
        (lambda d: d / "notes.txt", "data.path", "a file, but not a metadataset YAML"),
        (lambda d: d, "data.valid_path", "not an Energon dataset"),
    ],
)
def test_dataset_paths_are_checked_before_training(tmp_path, make, field, message):
    (tmp_path / "notes.txt").write_text("not a dataset\n")
    (tmp_path / "ok" / ".nv-meta").mkdir(parents=True)
    (tmp_path / "ok" / ".nv-meta" / "dataset.yaml").write_text("{}\n")
    path = make(tmp_path)
    overrides = [f"{field}={path}"]
    if field != "data.path":
        overrides.append(f"data.path={tmp_path / 'ok'}")
    res = _train(*overrides)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = res.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"config error: {field}={path}: "), errors
    assert message in errors[0]


def test_unknown_config_key_is_one_line() -> None:
    res = _train("optimizer.lrr=1")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.splitlines() == [
        "config error: unknown key 'optimizer.lrr' in override 'optimizer.lrr=1'; "
        "did you mean 'lr'?"
    ]


def test_converter_error_after_importing_megatron_is_one_line(tmp_path) -> None:
    # The converter imports megatron.core before it looks at its input: on CPU that import warns
    # about the missing Transformer Engine / Apex unless the package silences those notices.
    missing = tmp_path / "missing"
    cmd = [sys.executable, "-m", "lov15_megatron.cli.convert_checkpoint", "hf-to-mcore",
           "--model", "llava-ov-1.5", "--hf-dir", str(missing),
           "--save-dir", str(tmp_path / "out")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.splitlines() == [
        f"error: Hugging Face checkpoint directory {missing} does not exist"
    ], res.stderr[-2000:]
