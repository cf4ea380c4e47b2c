"""The trainer's answer to a user's mistake: one line naming the field, exit 2, no traceback."""

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
    errors = [line for line in res.stderr.splitlines() if line.startswith("config error")]
    assert len(errors) == 1 and errors[0].startswith(f"config error: {field}={path}: "), errors
    assert message in errors[0]
    assert "Traceback" not in res.stderr
