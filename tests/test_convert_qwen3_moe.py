"""Qwen3-MoE and the MoE VLM through the real CLI, checked against transformers.

A tiny random ``Qwen3MoeForCausalLM`` (2 layers, 8 experts, top-2, every parameter perturbed)
and a tiny LLaVA-OV-1.5 over a Qwen3-MoE text model (transformers' ``Qwen3MoeModel`` + our
Rice ViT, loaded with our remote code) are converted with ``tools/convert_checkpoint.py``;
``verify`` runs the Megatron model at TP=2×EP=2 and PP=2 (LM) and EP=2 (VLM)
against the HF model (fp32, max abs logit difference within ``fp32_abs_tol`` of
``tests/tolerances.py`` at the largest logit); the round trips back to HF are
bit-exact and the exports load in transformers (the VLM with ``trust_remote_code``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    cli,
    make_hf_tiny_lm,
    make_hf_vlm,
    ok,
    read_safetensors,
    verify_layouts,
)
from tolerances import within_fp32
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

# Longest reductions (docs/tolerances.md): the LM's hidden 64 (experts of 32, sequences ≤ 16);
# the VLM's patch embedding, 3·14·14 inputs.
LM_REDUCTION_LEN, VLM_REDUCTION_LEN = 64, 3 * 14 * 14
EXPERTS = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)


def make_hf_qwen3_moe(path: Path, seed: int = 0) -> None:
    make_hf_tiny_lm(path, Qwen3MoeConfig, Qwen3MoeForCausalLM, seed, tie_word_embeddings=False,
                    **EXPERTS)  # fmt: skip


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    make_hf_qwen3_moe(root / "hf")
    line = ok("hf-to-mcore", "--model", "qwen3-moe", "--hf-dir", str(root / "hf"),
              "--save-dir", str(root / "mc"), "--tp", "2", "--pp", "2", "--ep", "2")  # fmt: skip
    assert "hf-to-mcore: wrote" in line
    return root / "hf", root / "mc"


@pytest.fixture(scope="module")
def converted_vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_vlm")
    make_hf_vlm(root / "hf", text={"model_type": "qwen3_moe", **EXPERTS})
    ok("hf-to-mcore", "--model", "llava-ov-1.5", "--hf-dir", str(root / "hf"),
       "--save-dir", str(root / "mc"))  # fmt: skip
    return root / "hf", root / "mc"


def _verify(model: str, hf: Path, mc: Path, tp: int, pp: int, ep: int) -> dict:
    layout = ["--tp", str(tp), "--pp", str(pp), "--ep", str(ep)]
    out = ok("verify", "--model", model, "--hf-dir", str(hf), "--load-dir", str(mc), *layout)
    return json.loads(out.strip().splitlines()[-1])


# TP 2 × EP 2 (expert TP 1) runs on 2 ranks; PP 2 on 2 ranks (TP 1 × PP 1: docs/conversion.md)
VERIFY_LAYOUTS = [(2, 1, 2), (1, 2, 1)]


@pytest.fixture(scope="module")
def verified(converted):
    """``verify`` at both layouts in one launch of ranks."""
    return verify_layouts("qwen3-moe", *converted, VERIFY_LAYOUTS)


@pytest.mark.parametrize("tp,pp,ep", VERIFY_LAYOUTS)
def test_logit_parity_with_transformers(verified, tp, pp, ep):
    result = verified[tp, pp, ep]
    assert result["shape"] == [2, 16, 250] and (result["tp"], result["pp"], result["ep"]) == (
        tp, pp, ep)  # fmt: skip
    assert within_fp32(result["max_abs_diff"], result["max_rel_diff"], LM_REDUCTION_LEN), result
    assert result["top1_agreement"] == 1.0, result


def test_round_trip_is_bit_exact(converted, tmp_path):
    hf_dir, mc_dir = converted
    back = tmp_path / "back"
    ok("mcore-to-hf", "--model", "qwen3-moe", "--load-dir", str(mc_dir), "--save-dir", str(back),
       "--hf-template", str(hf_dir))  # fmt: skip
    original, exported = read_safetensors(hf_dir), read_safetensors(back)
    assert sorted(original) == sorted(exported)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in exported
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
    config = json.loads((back / "config.json").read_text())
    source = json.loads((hf_dir / "config.json").read_text())
    moe_keys = ("num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                "norm_topk_prob", "router_aux_loss_coef", "model_type")  # fmt: skip
    for key in moe_keys:
        assert config[key] == source[key], key
    reloaded = Qwen3MoeForCausalLM.from_pretrained(back, dtype=torch.float32)
    reference = Qwen3MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.arange(12).view(1, 12)
    assert torch.equal(reloaded(ids).logits, reference(ids).logits)


def test_vlm_logit_parity_at_ep2(converted_vlm):
    result = _verify("llava-ov-1.5", *converted_vlm, 1, 1, 2)
    assert result["shape"][-1] == 151936
    assert within_fp32(result["max_abs_diff"], result["max_rel_diff"], VLM_REDUCTION_LEN), result
    assert result["top1_agreement"] == 1.0, result


def test_vlm_round_trip_loads_with_remote_code(converted_vlm, tmp_path, isolated_hf_modules):
    hf_dir, mc_dir = converted_vlm
    back = tmp_path / "export"
    ok("mcore-to-hf", "--model", "llava-ov-1.5", "--load-dir", str(mc_dir), "--save-dir",
       str(back), "--hf-template", str(hf_dir))  # fmt: skip
    original, exported = read_safetensors(hf_dir), read_safetensors(back)
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    text = json.loads((back / "config.json").read_text())["text_config"]
    assert text["model_type"] == "qwen3_moe" and text["num_experts_per_tok"] == 2

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(back, trust_remote_code=True, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(
        hf_dir, trust_remote_code=True, dtype=torch.float32
    )
    assert type(model.model).__name__ == "Qwen3MoeModel"
    ids = torch.tensor([[11, 12, VISION_START, IMAGE_PAD, VISION_END, 13]])
    inputs = {"input_ids": ids, "pixel_values": torch.randn(4, 588),
              "image_grid_thw": torch.tensor([[1, 2, 2]])}  # fmt: skip
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)


def test_help_lists_registered_models_and_unknown_name_is_one_line():
    out = cli("hf-to-mcore", "--help")
    assert out.returncode == 0
    for name in ("qwen3", "qwen3-moe", "llava-ov-1.5"):
        assert name in out.stdout
    bad = cli("hf-to-mcore", "--model", "mixtral", "--hf-dir", "x", "--save-dir", "y")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert lines == ["error: unknown --model 'mixtral'; registered models: qwen3, qwen3-moe, "
                     "llava-ov-1.5"], bad.stderr  # fmt: skip
