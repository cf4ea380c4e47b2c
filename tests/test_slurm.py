"""The stage scripts on a real Slurm cluster: sbatch → launch.sh → srun → on_node.sh → torchrun →
rendezvous → lov15_megatron.train, on 2 nodes × 1 rank (gloo on CPU).

The cluster is the one ``scripts/slurm_cluster.sh up`` starts on this machine (two ``slurmd -N``
node daemons, GPUs declared as a GRES so that the scripts' ``--gpus-per-node`` is accepted). With
``CI=true`` a missing cluster fails these tests; elsewhere they are skipped, saying how to start
one. Jobs are submitted exactly as a user does (``sbatch examples/llava_ov_1_5/<stage>.sbatch
tiny ...``); the only ``sbatch`` options added fit the allocation to this machine: 2 nodes,
``--gpus-per-node=1`` (one rank per node) and ``--cpus-per-task=1``.

Shared set-up (module fixture): the procedural shapes captions packed at 512 tokens (the tiny
configs' ``data.seq_length``), a tiny random stage-0 (the quickstart's sources and
``make_stage0``) converted with ``tools/convert_checkpoint.py hf-to-mcore`` to where stage 1
looks for it: ``$LOV15_CKPT_ROOT/tiny/stage0``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "llava_ov_1_5"
CLUSTER_DIR = Path(os.environ.get("LOV15_SLURM_DIR", "/tmp/lov15-slurm"))
# fits the jobs to this machine: 2 nodes x 1 rank, 1 CPU each
FIT = ["--nodes=2", "--gpus-per-node=1", "--cpus-per-task=1"]
# every run: 2 packs per step, a log line per step, no TensorBoard (not a dependency)
COMMON = ["train.global_batch_size=2", "logging.log_interval=1", "logging.tensorboard_dir=null"]
STAGE1_5 = ["train.train_iters=5", "parallel.pipeline_model_parallel_size=2"]  # PP=2 over nodes
JOB_TIMEOUT = 240  # s; a job that hangs fails the test instead of stalling the suite
LOSS_LINE = re.compile(r"^iter (\d+)/\d+ (loss=\S+ lr=\S+ grad_norm=\S+)", re.M)


def no_cluster(reason: str) -> None:
    message = f"{reason}; start the test cluster with: sudo bash scripts/slurm_cluster.sh up"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true needs the Slurm cluster: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """The environment jobs are submitted with (SLURM_CONF of the test cluster)."""
    conf = CLUSTER_DIR / "slurm.conf"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOV15_"))}
    env.update(SLURM_CONF=str(conf), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env["PYTHON"] = sys.executable
    if not conf.is_file():
        no_cluster(f"no test Slurm cluster ({conf} does not exist)")
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True,
                             text=True, timeout=30)  # fmt: skip
    except FileNotFoundError:
        no_cluster("Slurm is not installed (no sinfo)")
    idle = [line.split()[0] for line in out.stdout.splitlines() if line.endswith(" idle")]
    if out.returncode or len(idle) < 2:
        no_cluster(f"the test cluster has not 2 idle nodes (sinfo: {out.stdout or out.stderr!r})")
    return env


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Packed shapes captions and the converted tiny stage-0 under ``ckpt/tiny/stage0``."""
    from data_fixtures import pack
    from helpers import ok

    from lov15_megatron.demo.quickstart import make_sources
    from lov15_megatron.demo.shapes_dataset import generate_shapes_dataset
    from lov15_megatron.models.llava_ov.stage0 import make_stage0

    root = tmp_path_factory.mktemp("slurm")
    data = generate_shapes_dataset(root / "raw", seed=0, n_caption=40, n_instruct=4, n_eval=2)
    pack(data["caption"]["sources"], root / "packed", seq_len=512, kind="caption",
         max_packs_per_shard=8)  # fmt: skip
    vit, llm, _ = make_sources(root / "sources", Path(data["instruct"]["scenes"]),
                               Path(data["eval"]["path"]), vision_steps=20)  # fmt: skip
    make_stage0(vit, llm, root / "stage0_hf", progress=False)
    ok("hf-to-mcore", "--model", "llava-ov-1.5", "--hf-dir", str(root / "stage0_hf"),
       "--save-dir", str(root / "ckpt" / "tiny" / "stage0"))  # fmt: skip
    return root


class Job:
    """One ``sbatch --wait`` submission of a stage script, started in the background."""

    def __init__(self, env: dict[str, str], log: Path, stage: str, overrides: list[str],
                 ckpt_root: Path, data: Path, prev: Path | None = None) -> None:  # fmt: skip
        self.log = log
        self.env = env = {**env, "LOV15_DATA": str(data), "LOV15_CKPT_ROOT": str(ckpt_root)}
        if prev is not None:
            env["LOV15_PREV_CKPT"] = str(prev)
        self.proc = subprocess.Popen(
            ["sbatch", "--wait", "--parsable", *FIT, f"--output={log}",
             str(EXAMPLES / f"{stage}.sbatch"), "tiny", *COMMON, *overrides],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.id = self.proc.stdout.readline().strip().split(";")[0]
        assert self.id.isdigit(), self.proc.stderr.read()
        self.save = ckpt_root / "tiny" / stage

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=JOB_TIMEOUT)
        except subprocess.TimeoutExpired:
            subprocess.run(["scancel", self.id], env=self.env)
            raise

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for_line(self, prefix: str) -> None:
        """Poll the job log until a line starts with ``prefix`` (or the job ends)."""
        import time

        while self.proc.poll() is None:
            if re.search(rf"^{re.escape(prefix)}", self.text(), re.M):
                return
            time.sleep(0.2)
        raise AssertionError(f"job {self.id} ended before {prefix!r}:\n{self.text()[-3000:]}")

    def losses(self) -> dict[int, str]:
        return {int(i): rest for i, rest in LOSS_LINE.findall(self.text())}

    def latest(self) -> int:
        return int((self.save / "latest_checkpointed_iteration.txt").read_text())


def run_job(*args, **kwargs) -> Job:
    job = Job(*args, **kwargs)
    job.wait()
    return job


def assert_two_node_run(job: Job, layout: str) -> None:
    log = job.text()
    assert job.proc.returncode == 0, log[-4000:]
    assert "node n1: node rank 0 of 2, starting torchrun" in log
    assert "node n2: node rank 1 of 2, starting torchrun" in log
    assert "--nnodes 2 --nproc-per-node 1 --master-addr n1 --master-port" in log
    assert f"layout: world 2 = {layout}" in log
    assert "runtime: device=cpu backend=gloo world=2" in log  # the rendezvous completed


def job_processes(job_id: str) -> list[tuple[int, dict[str, str], list[bytes]]]:
    """(pid, environment, argv) of the processes of this test-cluster job on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_CONF") == str(
            CLUSTER_DIR / "slurm.conf"
        ):
            found.append((int(entry.name), env, cmdline))
    return found


def kill_rank(job_id: str, node: str) -> int:
    """SIGKILL the training process (a torchrun worker) of this job on this node."""
    for pid, env, cmdline in job_processes(job_id):
        if env.get("SLURMD_NODENAME") == node and "LOCAL_RANK" in env:
            if b"lov15_megatron.train" in cmdline:
                os.kill(pid, signal.SIGKILL)
                return int(env["RANK"])
    raise AssertionError(f"no training process of job {job_id} on {node}")


def stop_leftovers(job_id: str) -> None:
    """A killed rank orphans its helper processes (Megatron's checkpoint-writer manager):
    proctrack/linuxproc loses them, proctrack/cgroup on a real cluster would not."""
    for pid, _, _ in job_processes(job_id):
        os.kill(pid, signal.SIGKILL)


def test_preflight_refusal_through_sbatch(slurm_env, inputs, tmp_path):
    """A global batch that 2 data-parallel ranks cannot split: the job stops in the launcher's
    pre-flight, before srun, with the launcher's message."""
    job = run_job(slurm_env, tmp_path / "refused.out", "stage1_alignment",
                  ["train.global_batch_size=3"], inputs / "ckpt", inputs / "packed")  # fmt: skip
    log = job.text()
    assert job.proc.returncode == 2, log
    assert "launch.sh: error: train.global_batch_size=3 is not divisible" in log, log
    assert "srun " not in log and "node n1" not in log, "nothing was launched"


@pytest.fixture(scope="module")
def stage_chain(slurm_env, inputs, tmp_path_factory) -> dict[str, Job]:
    """Stage 1 (DP=2) → stage 1.5 (PP=2) → stage 2 (DP=2), each from the previous stage's
    checkpoint at its default place, each a 2-node job."""
    logs, ckpt, data = tmp_path_factory.mktemp("chain_logs"), inputs / "ckpt", inputs / "packed"
    plan = [
        ("stage1_alignment", ["train.train_iters=2"]),
        ("stage1_5_mid_training", STAGE1_5),
        ("stage2_instruct", ["train.train_iters=2"]),
    ]
    jobs = {}
    for stage, overrides in plan:
        jobs[stage] = run_job(slurm_env, logs / f"{stage}.out", stage, overrides, ckpt, data)
        assert jobs[stage].proc.returncode == 0, jobs[stage].text()[-4000:]
    return jobs


def test_three_stages_in_order_on_two_nodes(stage_chain, inputs):
    ckpt = inputs / "ckpt" / "tiny"
    previous = {"stage1_alignment": "stage0", "stage1_5_mid_training": "stage1_alignment",
                "stage2_instruct": "stage1_5_mid_training"}  # fmt: skip
    layouts = {"stage1_alignment": "TP 1 x PP 1 x CP 1 x DP 2",
               "stage1_5_mid_training": "TP 1 x PP 2 x CP 1 x DP 1",
               "stage2_instruct": "TP 1 x PP 1 x CP 1 x DP 2"}  # fmt: skip
    iters = {"stage1_alignment": 2, "stage1_5_mid_training": 5, "stage2_instruct": 2}
    for stage, job in stage_chain.items():
        assert_two_node_run(job, layouts[stage])
        log = job.text()
        assert f"start: weights only from {ckpt / previous[stage]}" in log
        assert f"loaded weights from {ckpt / previous[stage]} (fresh optimizer)" in log
        # checkpoints where docs/cluster-guide.md says: $LOV15_CKPT_ROOT/SIZE/STAGE/iter_N
        n = iters[stage]
        assert job.latest() == n and (ckpt / stage / f"iter_{n:07d}").is_dir()
        assert sorted(job.losses()) == list(range(1, n + 1))
        assert f"==== {stage} finished: last checkpoint iteration {n} in {ckpt / stage}" in log


def test_dead_rank_and_preemption_resume_exactly(stage_chain, slurm_env, inputs, tmp_path):
    """Stage 1.5 again, in a second checkpoint root, from the same stage-1 checkpoint:

    1. ``kill -9`` of the rank on n2 after the checkpoint of iteration 2: the job fails, naming
       rank 1, and the checkpoint of iteration 2 is the latest;
    2. the same command resumes from it; ``scancel --signal=TERM`` mid-run: the ranks save and
       stop, the job says so (exit status 75);
    3. the same command resumes again and finishes.

    The losses of the three jobs together equal the uninterrupted stage 1.5 of the chain."""
    straight = stage_chain["stage1_5_mid_training"].losses()
    assert sorted(straight) == [1, 2, 3, 4, 5]
    stage1 = inputs / "ckpt" / "tiny" / "stage1_alignment"
    overrides = [*STAGE1_5, "checkpoint.save_interval=2"]
    args = ("stage1_5_mid_training", overrides, tmp_path / "ckpt", inputs / "packed", stage1)

    killed = Job(slurm_env, tmp_path / "killed.out", *args)
    killed.wait_for_line("iter 3/")  # iteration 2's checkpoint is complete by then
    assert kill_rank(killed.id, "n2") == 1
    try:
        assert killed.wait() != 0
    finally:
        stop_leftovers(killed.id)
    log = killed.text()
    assert "launch.sh: error: stage1_5_mid_training failed (srun exit status" in log, log[-3000:]
    assert "first failed rank 1 (exit code -9" in log and "SIGKILL" in log, log[-3000:]
    assert f"the last complete checkpoint is iteration 2 in {killed.save}" in log
    assert killed.latest() == 2

    preempted = Job(slurm_env, tmp_path / "preempted.out", *args)
    preempted.wait_for_line("iter 3/")
    subprocess.run(["scancel", "--signal=TERM", preempted.id], env=slurm_env, check=True)
    assert preempted.wait() == 75, preempted.text()[-3000:]
    log = preempted.text()
    assert f"resume: {preempted.save} holds iteration 2" in log
    stopped = preempted.latest()
    assert 3 <= stopped < 5, log[-3000:]
    assert f"SIGTERM received: saving at iteration {stopped} and stopping" in log
    assert f"stopped by SIGTERM (preemption or time limit): checkpoint iteration {stopped}" in log

    resumed = run_job(slurm_env, tmp_path / "resumed.out", *args)
    assert_two_node_run(resumed, "TP 1 x PP 2 x CP 1 x DP 1")
    assert f"resume: {resumed.save} holds iteration {stopped}" in resumed.text()
    assert resumed.latest() == 5

    parts = {i: v for i, v in killed.losses().items() if i <= 2}
    parts |= preempted.losses()
    parts |= resumed.losses()
    assert sorted(preempted.losses()) == list(range(3, stopped + 1))
    assert sorted(resumed.losses()) == list(range(stopped + 1, 6))
    assert parts == straight, "resumed losses must equal the uninterrupted run's"
