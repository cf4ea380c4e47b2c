"""tools/pack_offline.py as separate tasks (a Slurm job array): measure and write split over 3
tasks, one of each SIGKILLed mid-way and run again, give the one-process run's bytes."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from data_fixtures import (
    build_mixed_sources,
    kill_when_blocked_on,
    pack,
    pack_command,
    packed_tree,
    run_tool,
)

from lov15_megatron.data.offline_packing import (
    PackConfig,
    PackingError,
    Task,
    finalise,
    measure,
    partial_path,
    plan,
    write,
)
from lov15_megatron.data.sources import discover_sources, plan_units

TASKS = 3
#: The report's keys before the packer had phases: all kept.
REPORT_KEYS_BEFORE_PHASES = (
    "samples_in samples_packed samples_skipped skipped_examples packs packs_lower_bound shards "
    "seq_len kind min_pixels max_pixels algorithm tokens samples_per_pack fill_efficiency "
    "padding_compression length_histogram vision_patches_per_pack shards_written_this_run "
    "wall_time_s"
).split()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The four layouts, each given twice (30 samples, 6 packs), and the one-process run."""
    root = tmp_path_factory.mktemp("tasks")
    inputs = build_mixed_sources(root / "src") * 2
    pack(inputs, root / "ref")
    return root, inputs


def test_split_tasks_killed_and_rerun_match_one_process(sources, tmp_path):
    root, inputs = sources
    output = tmp_path / "out"
    config = PackConfig(
        tuple(inputs), str(output), "qwen-offline", seq_len=256, max_packs_per_shard=1,
        records_per_unit=1,
    )  # fmt: skip
    work = partial_path(output) / "work"
    units = len(plan_units(discover_sources(inputs), 1))
    mine = Task(1, TASKS).select(units)
    assert units == 20 and len(mine) >= 3

    # measure: the three tasks at once, as a job array runs them; task 1 is killed while
    # storing its 2nd unit
    command = pack_command(inputs, output, "--records-per-unit", "1")
    work.joinpath("measure").mkdir(parents=True)
    others = [
        subprocess.Popen(
            command + ["--phase", "measure", "--task-index", str(index), "--num-tasks", "3"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in (0, 2)
    ]
    fifo = work / "measure" / f"u{mine[1]:07d}.npy.tmp"
    task_1 = ["--task-index", "1", "--num-tasks", "3"]
    kill_when_blocked_on(command + ["--phase", "measure", *task_1], fifo)
    for process in others:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    with pytest.raises(PackingError, match=f"{len(mine) - 1} of 20 work units not measured"):
        plan(config, progress=False)
    done = sorted(path.name for path in (work / "measure").glob("*.npy"))
    assert f"u{mine[0]:07d}.npy" in done and f"u{mine[1]:07d}.npy" not in done
    assert len(done) == units - len(mine) + 1
    # run again as the array element would: index and count from Slurm's variables
    slurm = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    rerun = run_tool(command + ["--phase", "measure"], env=slurm)
    assert "units_done_before 1" in rerun.stdout and "task 1/3" in rerun.stdout

    info = plan(config, progress=False)
    assert info["shards"] == 6
    shards = Task(1, TASKS).select(info["shards"])
    for index in (0, 2):
        write(config, Task(index, TASKS), progress=False)
    with pytest.raises(PackingError, match="2 of 6 shards not written"):
        finalise(config, progress=False)

    # write: task 1 killed while writing its 2nd shard, then run again
    fifo = partial_path(output) / "dataset" / "shards" / f"pack-{shards[1]:06d}.tar.tmp"
    kill_when_blocked_on(command + ["--phase", "write", *task_1], fifo)
    written = {path.name for path in fifo.parent.glob("*.tar")}
    assert f"pack-{shards[0]:06d}.tar" in written and f"pack-{shards[1]:06d}.tar" not in written
    run_tool(command + ["--phase", "write", *task_1])

    report = finalise(config, progress=False)
    assert not partial_path(output).exists()
    assert packed_tree(output) == packed_tree(root / "ref")
    assert report["measure_tasks"] == TASKS and report["write_tasks"] == TASKS
    assert set(report["wall_time_s"]) == {"measure", "plan", "write", "finalise", "total"}
    assert set(REPORT_KEYS_BEFORE_PHASES) < set(report)
    assert report["peak_rss_bytes"]["max"] > 0 and report["peak_rss_bytes"]["per_sample"] > 0


def test_plan_is_a_file_and_tasks_check_their_run(sources, tmp_path):
    root, inputs = sources
    config = PackConfig(tuple(inputs), str(tmp_path / "out"), "qwen-offline", seq_len=256)
    measure(config, Task(0, 1), progress=False)
    info = plan(config, progress=False)
    plan_dir = partial_path(tmp_path / "out") / "work" / "plan"
    members = np.load(plan_dir / "members.npy")
    offsets = np.load(plan_dir / "pack_offsets.npy")
    assert sorted(members.tolist()) == list(range(30)) and len(offsets) == info["packs"] + 1
    assert json.loads((plan_dir / "plan.json").read_text()) == info
    other = PackConfig(tuple(inputs), str(tmp_path / "out"), "qwen-offline", seq_len=300)
    with pytest.raises(PackingError, match="other inputs/arguments"):
        write(other, Task(0, 1), progress=False)
    with pytest.raises(ValueError, match="--task-index: 3 is not in 0..2"):
        Task(3, 3)


def test_submit_script_chains_the_phases_with_arrays(tmp_path):
    """examples/pack_offline/submit.sh against a recording ``sbatch`` (no cluster here)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    log = tmp_path / "calls"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\necho $(( $(wc -l < {log}) + 100 ))\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    script = root / "examples" / "pack_offline" / "submit.sh"
    args = ["--input", "/d/raw", "--output", "/d/packed"]
    result = subprocess.run(
        ["bash", str(script), "3", "--", *args], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "measure",
        "101",
        "plan",
        "102",
        "write",
        "103",
        "finalise",
        "104",
    ]
    job = str(root / "examples" / "pack_offline" / "pack_phase.sbatch")
    tail = " ".join(args)
    assert log.read_text().splitlines() == [
        f"--parsable --array=0-2 {job} --phase measure --num-tasks 3 {tail}",
        f"--parsable --dependency=afterok:101 --cpus-per-task=2 {job} --phase plan {tail}",
        f"--parsable --array=0-2 --dependency=afterok:102 {job} --phase write --num-tasks 3 {tail}",
        f"--parsable --dependency=afterok:103 {job} --phase finalise {tail}",
    ]
    bad = subprocess.run(["bash", str(script), "x", "--"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("submit.sh: error: usage")
