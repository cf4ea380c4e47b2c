"""The training loop on real packed Energon shards: learning, exact resume, SIGTERM, stages,
parallel layouts, export.

Shared set-up (module fixture): the procedural shapes data set is packed with
``tools/pack_offline.py``; the session's tiny random LLaVA-OV-1.5 (conftest ``tiny_vlm``,
converted once) is the "stage-0" every run starts from.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import watchdog
from tolerances import assert_close_training, log_sum_exp_len

from lov15_megatron.runtime.launch import run_ranks

ROOT = Path(__file__).resolve().parents[1]
SEQ = 256
# Longest reduction of the tiny model's step: the Qwen vocabulary's cross entropy
# (log_sum_exp_len(151936) = 1068) over the 512 tokens a weight gradient sums over (2 × 256).
REDUCTION_LEN = max(log_sum_exp_len(151936), 2 * SEQ)


def _run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory, tiny_vlm):
    from lov15_megatron.demo.shapes_dataset import generate_shapes_dataset

    root = tmp_path_factory.mktemp("train")
    data = generate_shapes_dataset(root / "raw", seed=0, n_caption=40, n_instruct=40, n_eval=4)
    for split in ("caption", "instruct"):
        _run("tools/pack_offline.py", "--input", *data[split]["sources"], "--output",
             str(root / split), "--tokenizer", "qwen-offline", "--seq-len", str(SEQ),
             "--workers", "1", "--kind", data[split]["kind"], "--no-progress")  # fmt: skip
    hf, stage0 = tiny_vlm  # the session's converted tiny VLM, only read here
    (root / "hf").symlink_to(hf, target_is_directory=True)
    (root / "stage0").symlink_to(stage0, target_is_directory=True)
    return root


def _cfg(root: Path, overrides: list[str]):
    from lov15_megatron.config import apply_override, validate
    from lov15_megatron.convert.core import run_config_of_checkpoint

    cfg = run_config_of_checkpoint(root / "stage0")
    for override in [
        "data.loader=energon", f"data.path={root / 'caption'}", f"data.seq_length={SEQ}",
        "train.micro_batch_size=1", "train.global_batch_size=2", "optimizer.lr=3e-3",
        "optimizer.min_lr=3e-4", "scheduler.warmup_iters=1", "logging.log_interval=1",
        f"checkpoint.pretrained={root / 'stage0'}", "runtime.device=cpu", *overrides,
    ]:  # fmt: skip
        apply_override(cfg, override)
    validate(cfg)
    return cfg


def train_runs(root: str, runs: dict[str, list[str]]) -> dict[str, dict]:
    """Runs inside ranks: each named run is a ``train()`` call with these overrides."""
    from lov15_megatron.train import train

    out = {}
    for name, overrides in runs.items():
        result = train(_cfg(Path(root), overrides))
        out[name] = {
            "losses": result.losses,
            "grad_norms": result.grad_norms,
            "valid": result.valid_losses,
            "valid_ids": result.valid_sample_ids,
            "first": result.first_iteration,
            "last": result.last_iteration,
            "ids": result.consumed_sample_ids,
            "checkpoint": result.checkpoint,
        }
    return out


def _cli(config: Path) -> subprocess.Popen:
    """The trainer in a process group of its own (see :func:`_kill_all`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lov15_megatron.train", "--config", str(config)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the trainer and every process it started (the checkpoint writer's helpers
    would otherwise outlive it), as a node failure would."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(500):  # the group's other members are reaped by init shortly after
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"processes of the killed trainer (group {proc.pid}) are still alive")


def _drain(proc: subprocess.Popen, lines: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    thread.start()
    return thread


def _weights(*paths: Path) -> list[dict[str, torch.Tensor]]:
    """Model tensors of each checkpoint, read at TP=1 with the converter's streaming reader
    (one launch for all)."""
    (read,) = run_ranks(1, _read_weights, [str(p) for p in paths])
    return [dict(tensors) for tensors in read]


def _read_weights(paths: list[str]) -> list[list]:
    from lov15_megatron.checkpoint_dir import resolve
    from lov15_megatron.convert import core
    from lov15_megatron.convert.mcore_io import build_on_meta, load_streaming
    from lov15_megatron.models.registry import get_family
    from lov15_megatron.runtime import distributed

    distributed.initialize(core.converter_runtime_config())
    out = []
    for path in paths:
        cfg = core.run_config_of_checkpoint(resolve(path))
        model = build_on_meta(lambda cfg=cfg: get_family("llava-ov-1.5").build_model(cfg))
        out.append(list(load_streaming(model, resolve(path))))
    return out


STRAIGHT = ["train.train_iters=6"]  # the uninterrupted run every resume test is compared with


@pytest.fixture(scope="module")
def straight(setup_dirs) -> dict:
    """6 iterations without interruption; final checkpoint in ``root/a``."""
    root = setup_dirs
    (out,) = run_ranks(
        1, train_runs, str(root), {"a": [*STRAIGHT, f"checkpoint.save={root / 'a'}"]}
    )
    return out["a"]


@pytest.mark.compat
def test_learns_resumes_exactly_and_freezes(setup_dirs, straight):
    root = setup_dirs
    runs = {
        "part1": [*STRAIGHT, "train.exit_interval=2", f"checkpoint.save={root / 'b'}"],
        "part2": [*STRAIGHT, f"checkpoint.save={root / 'b'}"],
        "learn": ["train.train_iters=24", "optimizer.lr=1e-2", f"data.path={root / 'instruct'}"],
        "lr_mult": [
            "train.train_iters=1",
            "optimizer.lr_mult={vision: 0.25}",
            f"checkpoint.save={root / 'lr_mult'}",
        ],
        "stage1": [
            "train.train_iters=2",
            "train.trainable=[merger]",
            f"checkpoint.save={root / 's1'}",
        ],
    }
    (out,) = run_ranks(1, train_runs, str(root), runs)

    a, b1, b2 = straight, out["part1"], out["part2"]
    assert (b1["first"], b1["last"], b2["first"], b2["last"]) == (0, 2, 2, 6)
    assert b1["losses"] + b2["losses"] == a["losses"], "resumed losses must equal the straight run"
    assert b1["ids"] + b2["ids"] == a["ids"], "the data stream must continue exactly"
    # 6 steps × 2 packs, each pack one or more samples (ids are the samples inside the packs)
    assert len(a["ids"]) >= 6 * 2 and len(b1["ids"]) >= 2 * 2
    wa, wb, w0, w_mult, w_s1 = _weights(*(root / d for d in ("a", "b", "stage0", "lr_mult", "s1")))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights must be bit-identical"

    learn = out["learn"]["losses"]
    assert all(math.isfinite(x) for x in learn)
    assert sum(learn[-4:]) / 4 < 0.6 * learn[0], learn

    # Adam's first update moves every parameter with a gradient by ±lr: 3e-3 × lr_mult.
    for group, lr in (("vision_model", 0.25 * 3e-3), ("language_model", 3e-3)):
        step = torch.cat([(w_mult[k] - w0[k]).abs().flatten() for k in w0 if k.startswith(group)])
        assert math.isclose(float(step[step > 0].median()), lr, rel_tol=0.05), (group, lr)

    changed = {k.split(".")[0] for k in w0 if not torch.equal(w0[k], w_s1[k])}
    assert changed == {"vision_projection"}, changed


def test_validation_on_held_out_samples_survives_resume(setup_dirs):
    """Validation every 2 iterations and at the end, on another data set than training; a run
    stopped at iteration 2 and resumed reports the same validation losses as a straight run.
    Also: training on unpacked samples consumes exactly the global batch of samples per step."""
    root = setup_dirs
    valid = ["train.train_iters=4", "train.eval_interval=2", "train.eval_iters=2",
             f"data.valid_path={root / 'instruct'}"]  # fmt: skip
    # Stage 2 as the release runs it: unpacked samples (one per row), longest side capped.
    from data_fixtures import write_tar

    from lov15_megatron.data.energon_dataset import prepare_raw_webdataset

    raw = root / "raw_wds"
    raw.mkdir(exist_ok=True)
    write_tar(raw / "wds.tar", count=8)
    prepare_raw_webdataset(raw, ["wds.tar"], kind="instruct")
    runs = {
        "straight": [*valid, f"checkpoint.save={root / 'v1'}"],
        "part1": [*valid, "train.exit_interval=2", f"checkpoint.save={root / 'v2'}"],
        "part2": [*valid, f"checkpoint.save={root / 'v2'}"],
        "unpacked": [
            "train.train_iters=2",
            "train.global_batch_size=4",
            f"data.path={raw}",
            "data.max_image_side=56",
            "train.loss_weighting=micro_batch",
        ],  # fmt: skip
    }
    (out,) = run_ranks(1, train_runs, str(root), runs)
    unpacked = out["unpacked"]
    assert len(unpacked["ids"]) == 2 * 4  # samples per step = the global batch
    assert set(unpacked["ids"]) <= {f"sample{i:03d}" for i in range(8)}, unpacked["ids"]
    assert all(math.isfinite(x) for x in unpacked["losses"])
    straight, part1, part2 = out["straight"], out["part1"], out["part2"]
    assert [i for i, _ in straight["valid"]] == [2, 4]
    assert all(math.isfinite(v) for _, v in straight["valid"])
    assert part1["valid"] + part2["valid"] == straight["valid"]  # bit-identical after resume
    held_out, trained = set(straight["valid_ids"]), set(straight["ids"])
    assert len(held_out) == len(straight["valid_ids"]) > 0  # 2 global batches, no repeats
    assert not held_out & trained, "validation samples must not be training samples"
    summary = json.loads((root / "v1" / "train_summary.json").read_text())
    assert summary["last_valid_loss"] == straight["valid"][-1][1]


def test_sigkill_mid_save_and_mid_step_resume_exactly(setup_dirs, straight, tmp_path):
    """Real kills (SIGKILL: no handler runs): during a checkpoint save, then during a step; each
    next run starts from the last complete checkpoint and the end result is bit-identical to the
    uninterrupted run."""
    from lov15_megatron.checkpoint_dir import LATEST, resolve
    from lov15_megatron.config import config_to_yaml

    root = setup_dirs
    save = tmp_path / "killed"
    cfg = _cfg(root, [*STRAIGHT, f"checkpoint.save={save}", "checkpoint.save_interval=1"])
    config = tmp_path / "run.yaml"
    config.write_text(config_to_yaml(cfg))

    # 1. Kill while iteration >= 2 is being written (its directory still has the .tmp name).
    proc, lines = _cli(config), []
    _drain(proc, lines)
    half_written = None
    with watchdog(proc):
        while proc.poll() is None and half_written is None:
            tmp = sorted(save.glob("iter_*.tmp")) if save.exists() else []
            if tmp and int(tmp[-1].name[5:12]) >= 2:
                _kill_all(proc)
                half_written = tmp[-1]
            time.sleep(0.002)
    proc.wait()
    assert half_written is not None, "the run ended before a save could be caught: " + "".join(
        lines[-10:]
    )
    complete = int((save / LATEST).read_text())
    assert complete < int(half_written.name[5:12])  # the half-written one is not "latest"
    assert (resolve(save) / "metadata.json").exists() and resolve(save).name.endswith(
        f"{complete:07d}"
    )

    # 2. Resume, and kill in the middle of a later step.
    proc, lines = _cli(config), []
    with watchdog(proc):
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"iter {complete + 2}/"):
                time.sleep(0.3)  # the next step is running
                _kill_all(proc)
                break
    proc.wait()
    log = "".join(lines)
    assert f"resumed from {save} at iteration {complete}" in log, log[-2000:]

    # 3. Resume to the end: bit-identical to the uninterrupted run.
    proc, lines = _cli(config), []
    with watchdog(proc):
        lines.extend(proc.stdout)
    assert proc.wait() == 0, "".join(lines[-30:])
    assert "resumed from" in "".join(lines)
    assert int((save / LATEST).read_text()) == 6
    wa, wk = _weights(root / "a", save)
    assert all(torch.equal(wa[k], wk[k]) for k in wa), (
        "resumed weights differ from the straight run"
    )


def test_resume_at_another_data_parallel_size(setup_dirs, tmp_path):
    """Saved at DP=2, resumed at DP=1: a one-line error naming both, or (opt-in) a run that
    restarts the data order and says so."""
    from lov15_megatron.config import config_to_yaml

    root = setup_dirs
    save = tmp_path / "dp2"
    common = ["train.train_iters=4", f"checkpoint.save={save}"]
    run_ranks(2, train_runs, str(root), {"dp2": [*common, "train.exit_interval=2"]})
    config = tmp_path / "run.yaml"
    config.write_text(config_to_yaml(_cfg(root, common)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lov15_megatron.train", "--config", str(config)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("config error")]
    assert errors == [
        f"config error: checkpoint {save}: saved at data-parallel size 2 with 0 data workers per "
        "rank, this run has data-parallel size 1 with 0; the data-loader position cannot be "
        "restored at another layout. Resume with the saved layout, or set "
        "checkpoint.allow_data_restart=true to start the data order over"
    ], out.stderr[-2000:]
    assert "Traceback" not in out.stderr

    out = subprocess.run([*cmd, "checkpoint.allow_data_restart=true"], capture_output=True,
                         text=True, env=env, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "the data order restarts from the beginning" in out.stdout
    assert "up to 4 samples seen before may be seen again" in out.stdout
    assert f"resumed from {save} at iteration 2" in out.stdout
    assert int((save / "latest_checkpointed_iteration.txt").read_text()) == 4


@pytest.mark.compat
def test_parallel_layouts_match_single_rank(setup_dirs):
    root = setup_dirs
    common = ["train.train_iters=3"]
    (single,) = run_ranks(1, train_runs, str(root), {"single": common})
    mb2 = "train.micro_batch_size=2"
    vit_stage = "parallel.num_layers_in_first_pipeline_stage=0"
    layouts = {  # every layout runs the packed THD stream through the torch attention core
        "tp2": [*common, "parallel.tensor_model_parallel_size=2"],
        "pp2": [*common, "parallel.pipeline_model_parallel_size=2"],
        "pp2_mb2": [*common, "parallel.pipeline_model_parallel_size=2", mb2],
        # a vision-only first stage: 0 LM layers (the embedding, the ViT and the merger)
        "pp2_vit_stage": [*common, "parallel.pipeline_model_parallel_size=2", vit_stage],
        "cp2": [*common, "parallel.context_parallel_size=2"],
        "cp2_mb2": [*common, "parallel.context_parallel_size=2", mb2],
    }
    per_rank = run_ranks(2, train_runs, str(root), layouts)
    ref = single["single"]
    assert len(ref["losses"]) == 3
    assert all(math.isfinite(x) for x in ref["losses"] + ref["grad_norms"]), ref
    for name in layouts:
        got = per_rank[0][name]
        for key in ("losses", "grad_norms"):  # the global loss and grad norm on every rank
            assert got[key] == per_rank[1][name][key], (name, key)
        assert_close_training(ref["losses"], got["losses"], REDUCTION_LEN, f"{name} loss")
        assert_close_training(ref["grad_norms"], got["grad_norms"], REDUCTION_LEN,
                              f"{name} grad norm", grad_norm=True)  # fmt: skip


@pytest.mark.e2e
def test_sigterm_stage_chain_and_export(setup_dirs, tmp_path, isolated_hf_modules):
    from lov15_megatron.config import config_to_yaml

    root = setup_dirs
    save = tmp_path / "stage1_5"
    cfg = _cfg(root, ["train.train_iters=40", f"checkpoint.save={save}"])
    (tmp_path / "run.yaml").write_text(config_to_yaml(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lov15_megatron.train", "--config", str(tmp_path / "run.yaml")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    with watchdog(proc):  # a hang ends in a kill (exit -9), not in a timing assertion
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("iter 2/"):
                proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, "".join(lines[-30:])
    log = "".join(lines)
    assert "SIGTERM received" in log and "saved checkpoint" in log
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= stopped < 40

    # stage 2 starts from the stage-1.5 result: weights only, fresh optimizer, iteration 0
    stage2 = [f"checkpoint.pretrained={save}", f"checkpoint.save={tmp_path / 'stage2'}"]
    runs = {"stage2": ["train.train_iters=2", *stage2, f"data.path={root / 'instruct'}"]}
    (out,) = run_ranks(1, train_runs, str(root), runs)
    assert out["stage2"]["first"] == 0 and out["stage2"]["last"] == 2

    export = tmp_path / "hf_export"
    _run("tools/convert_checkpoint.py", "mcore-to-hf", "--model", "llava-ov-1.5", "--load-dir",
         str(tmp_path / "stage2"), "--save-dir", str(export),
         "--hf-template", str(root / "hf"))  # fmt: skip
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        export, trust_remote_code=True, dtype=torch.float32
    )
    ids = torch.tensor([[11, 12, 151652, 151655, 151653, 13]])
    generated = model.generate(input_ids=ids, pixel_values=torch.randn(4, 588),
                               image_grid_thw=torch.tensor([[1, 2, 2]]), max_new_tokens=2,
                               min_new_tokens=2, do_sample=False)  # fmt: skip
    assert generated.shape == (1, 8)
    assert json.loads((export / "config.json").read_text())["model_type"] == "llavaonevision1_5"
