"""The 14B and 30B-A3B configs, the MoE and FP8 settings' validation (no ranks started).

The model files must describe the released LMs (checked against transformers' own model built
on ``meta`` from our HF config translation: parameter counts), every stage config must load and
fit its documented node counts, and settings that cannot run are one-line config errors.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lov15_megatron.config import ConfigError, load_config, validate_world_size
from lov15_megatron.models.registry import language_family

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("stage1_alignment", "stage1_5_mid_training", "stage2_instruct", "stage2_instruct_packed")


def _lm_params(config_file: str) -> tuple[dict, int]:
    lm = load_config(ROOT / "configs/models" / config_file).model.language
    family = language_family(lm)
    hf = family.hf_text_config(lm, {"model_type": family.hf_model_type})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
    return hf, sum(p.numel() for p in model.parameters())


def test_30b_a3b_is_the_released_lm():
    hf, params = _lm_params("qwen3_30b_a3b.yaml")
    facts = {"num_hidden_layers": 48, "hidden_size": 2048, "num_attention_heads": 32,
             "num_key_value_heads": 4, "head_dim": 128, "num_experts_per_tok": 8,
             "moe_intermediate_size": 768, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
             "vocab_size": 151936, "decoder_sparse_step": 1, "mlp_only_layers": []}  # fmt: skip
    assert {k: hf[k] for k in facts} == facts
    assert hf["num_experts"] == 128 and hf["rope_theta"] == 1e6
    assert abs(params - 30.532e9) < 0.01e9, params  # Qwen3-30B-A3B: 30.5 B


def test_14b_is_the_released_lm():
    hf, params = _lm_params("qwen3_14b.yaml")
    assert (hf["num_hidden_layers"], hf["hidden_size"], hf["intermediate_size"]) == (
        40,
        5120,
        17408,
    )
    assert abs(params - 14.768e9) < 0.01e9, params  # Qwen3-14B: 14.8 B


@pytest.mark.parametrize("size,stage,world,expected", [
    ("30b_a3b", "stage1_alignment", 8, (1, 8)),
    ("30b_a3b", "stage1_5_mid_training", 32, (1, 8)),
    ("30b_a3b", "stage2_instruct", 32, (1, 8)),
    ("14b", "stage1_5_mid_training", 8, (4, 1)),
    ("14b", "stage2_instruct", 32, (4, 1)),
])  # fmt: skip
def test_stage_configs_fit_their_node_counts(size, stage, world, expected):
    cfg = load_config(ROOT / f"configs/llava_ov_1_5/{size}/{stage}.yaml", ["data.path=/data"])
    p = cfg.parallel
    validate_world_size(cfg, world)
    assert (p.tensor_model_parallel_size, p.expert_model_parallel_size) == expected
    if size == "30b_a3b":
        assert cfg.model.language.num_experts == 128 and cfg.model.vision is not None


@pytest.mark.parametrize("overrides,message", [
    (["parallel.expert_model_parallel_size=2"], "needs a mixture-of-experts model"),
    (["model.language.moe_aux_loss_coeff=0.01"], "has no effect on a dense model"),
    (["model.language.num_experts=8", "parallel.expert_model_parallel_size=3"],
     "does not divide model.language.num_experts=8"),
    (["model.language.num_experts=8", "model.language.moe_router_topk=9"], "exceeds"),
    (["model.language.num_experts=8", "parallel.tensor_model_parallel_size=2"],
     "needs parallel.sequence_parallel=true"),
    (["model.fp8_recipe=tensorwise"], "has no effect unless model.fp8 is set"),
])  # fmt: skip
def test_moe_and_fp8_settings_that_cannot_work_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/tiny_gpt.yaml", overrides)


def test_fp8_is_refused_without_transformer_engine_in_one_line(tmp_path):
    """No TE here (and no GPU): the trainer stops before starting anything, exit 2."""
    save = f"checkpoint.save={tmp_path / 'c'}"
    cmd = [sys.executable, "-m", "lov15_megatron.train", "--config", "configs/tiny_gpt.yaml",
           "model.fp8=hybrid", "runtime.device=cpu", save]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == (
        "config error: model.fp8='hybrid' needs Transformer Engine, which is not importable"
    ), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
