"""Stage configs (release hyperparameters, layouts) and the Slurm / local launchers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lov15_megatron.config import ConfigError, load_config, validate_world_size

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "examples" / "llava_ov_1_5").glob("*.s*")) + [
    ROOT / "scripts/run_local.sh"
]
STAGES = ("stage1_alignment", "stage1_5_mid_training", "stage2_instruct")
# data-and-stages.md §4: trainable, lr, min lr, weight decay, beta2, iterations, global batch
RELEASE = {
    "stage1_alignment": (["merger"], 1e-4, 1e-6, 0.0, 0.99, 2500, 8),
    "stage1_5_mid_training": (None, 1e-5, 1e-6, 0.01, 0.95, 20000, 16),
    "stage2_instruct": (None, 1e-5, 1e-6, 0.0, 0.99, 3500, 224),
}
# GPUs each stage is laid out for (8-GPU nodes)
GPUS = {("4b", "stage1_alignment"): 8, ("4b", "stage1_5_mid_training"): 16,
        ("4b", "stage2_instruct"): 112, ("8b", "stage1_alignment"): 16,
        ("8b", "stage1_5_mid_training"): 32, ("8b", "stage2_instruct"): 64}  # fmt: skip


@pytest.mark.parametrize("size", ["4b", "8b"])
@pytest.mark.parametrize("stage", STAGES)
def test_stage_configs_follow_the_release(size, stage):
    cfg = load_config(ROOT / f"configs/llava_ov_1_5/{size}/{stage}.yaml", ["data.path=/data"])
    o, t = cfg.optimizer, cfg.train
    got = (t.trainable, o.lr, o.min_lr, o.weight_decay, o.adam_beta2, t.train_iters,
           t.global_batch_size)  # fmt: skip
    assert got == RELEASE[stage]
    assert (o.adam_eps, o.clip_grad, cfg.model.init_method_std) == (1e-5, 1.0, 0.02)
    assert cfg.scheduler.warmup_fraction == 0.002 and cfg.scheduler.decay_style == "cosine"
    assert cfg.model.params_dtype == "bfloat16" and t.recompute == "full"
    lm, v = cfg.model.language, cfg.model.vision
    assert lm.untie_embeddings_and_output_weights and lm.vocab_size == 151936
    assert (lm.hidden_size, lm.rotary_base) == ((2560, 5e6) if size == "4b" else (4096, 1e6))
    assert (v.num_layers, v.hidden_size, v.num_attention_heads) == (24, 1024, 16)
    dp = validate_world_size(cfg, GPUS[(size, stage)])
    assert t.global_batch_size % dp == 0


def test_stage_configs_need_a_data_path():
    with pytest.raises(ConfigError, match="data.path"):
        load_config(ROOT / "configs/llava_ov_1_5/4b/stage1_alignment.yaml")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def _fake_slurm(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\nprintf "gpu-node-07\\ngpu-node-08\\n"\n')
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOV15_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_NODELIST="gpu-node-[07-08]",
               SLURM_NNODES="2", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT),
               LOV15_DATA="/data/llava558k_packed", LOV15_SAVE=str(tmp_path / "ckpt/stage1"),
               LOV15_PRETRAINED="/ckpt/stage0_mcore", **extra)  # fmt: skip
    return env


def test_sbatch_dry_run_resolves_torchrun_command(tmp_path):
    env = _fake_slurm(tmp_path, LOV15_SIZE="8b")
    script = ROOT / "examples/llava_ov_1_5/stage1_alignment.sbatch"
    out = subprocess.run(["bash", str(script), "--dry-run", "train.train_iters=10"], env=env,
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "==== resolved RunConfig" in text and "tensor_model_parallel_size: 2" in text
    assert "train_iters: 10" in text and "- merger" in text
    command = text.split("launch command:")[1]
    for piece in ("srun --nodes 2", "--nnodes 2", "--nproc-per-node 8", "--rdzv-backend c10d",
                  "--rdzv-endpoint gpu-node-07:29500", "--rdzv-id 4242",
                  "configs/llava_ov_1_5/8b/stage1_alignment.yaml",
                  "data.path=/data/llava558k_packed", "checkpoint.pretrained=/ckpt/stage0_mcore",
                  f"checkpoint.save={tmp_path / 'ckpt/stage1'}",
                  "train.train_iters=10"):  # fmt: skip
        assert piece in command, piece
    assert not (tmp_path / "ckpt").exists(), "a dry run must not create anything"


@pytest.mark.parametrize("missing", ["LOV15_DATA", "LOV15_SAVE", "LOV15_PRETRAINED"])
def test_missing_inputs_fail_clearly(tmp_path, missing):
    env = _fake_slurm(tmp_path)
    del env[missing]
    script = ROOT / "examples/llava_ov_1_5/stage2_instruct.sbatch"
    out = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True,
                         text=True, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and missing in out.stderr, out.stderr


def test_run_local_dry_run(tmp_path):
    env = {**os.environ, "NPROC": "2"}
    out = subprocess.run(["bash", "scripts/run_local.sh", "configs/tiny_gpt.yaml", "--dry-run",
                          "train.train_iters=3"], env=env, capture_output=True, text=True,
                         cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "train_iters: 3" in out.stdout
    assert "--standalone --nproc-per-node 2 -m lov15_megatron.train" in out.stdout
