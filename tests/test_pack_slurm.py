"""The packer as a chain of real Slurm jobs: ``examples/pack_offline/submit.sh`` submits measure
(a 3-element ``sbatch --array``), plan, write (3 elements) and finalise to the test cluster
(``scripts/slurm_cluster.sh up``), and the result is byte-identical to the one-process run.
Without the cluster this is skipped (failed with ``CI=true``), like ``tests/test_slurm.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_fixtures import build_mixed_sources, pack, packed_tree

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = Path(os.environ.get("LOV15_SLURM_DIR", "/tmp/lov15-slurm"))


def _slurm_env() -> dict[str, str]:
    conf = CLUSTER_DIR / "slurm.conf"
    reason = None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOV15_"))}
    env.update(SLURM_CONF=str(conf), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    if not conf.is_file():
        reason = f"no test Slurm cluster ({conf} does not exist)"
    else:
        try:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True,
                timeout=30,
            )  # fmt: skip
            if out.returncode or "idle" not in out.stdout:
                reason = f"the test cluster has no idle node (sinfo: {out.stdout or out.stderr!r})"
        except FileNotFoundError:
            reason = "Slurm is not installed (no sinfo)"
    if reason:
        message = f"{reason}; start the test cluster with: sudo bash scripts/slurm_cluster.sh up"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true needs the Slurm cluster: {message}", pytrace=False)
        pytest.skip(message)
    return env


def test_submit_script_on_the_test_cluster_matches_one_process(tmp_path):
    env = _slurm_env()
    inputs = build_mixed_sources(tmp_path / "src") * 2
    pack(inputs, tmp_path / "ref")
    logs = tmp_path / "logs"
    logs.mkdir()
    env["SBATCH_ARGS"] = f"--cpus-per-task=1 --mem=0 --output={logs}/%x-%A_%a.out"
    output = tmp_path / "out"
    args = ["--input", *inputs, "--output", str(output), "--tokenizer", "qwen-offline"]
    args += ["--seq-len", "256", "--max-packs-per-shard", "1"]
    script = ROOT / "examples" / "pack_offline" / "submit.sh"
    submitted = subprocess.run(
        ["bash", str(script), "3", "--", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    jobs = submitted.stdout.split()[1::2]
    deadline = time.monotonic() + 600
    while not (output / "pack_report.json").is_file():
        queue = subprocess.run(
            ["squeue", "-h", "-j", ",".join(jobs), "-o", "%i %T %r"], env=env,
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        failed = "DependencyNeverSatisfied" in queue.stdout
        if failed or not queue.stdout.strip() or time.monotonic() > deadline:
            time.sleep(5)  # the last job may just have finished
            if (output / "pack_report.json").is_file():
                break
            subprocess.run(["scancel", *jobs], env=env, timeout=30)
            log_text = "\n".join(p.read_text()[-2000:] for p in sorted(logs.glob("*.out")))
            raise AssertionError(f"the job chain did not finish: {queue.stdout}\n{log_text}")
        time.sleep(2)
    assert len(list(logs.glob("lov15-pack-*.out"))) == 8  # 3 + 1 + 3 + 1 jobs
    assert packed_tree(output) == packed_tree(tmp_path / "ref")
