"""The shipped Qwen3-4B / Qwen3-8B model configs build the right Megatron models."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lov15_megatron.config import load_config
from lov15_megatron.models.qwen3.hf_mapping import hf_config_from_language, language_config_from_hf
from lov15_megatron.runtime.launch import run_ranks

CONFIGS = {"4b": "configs/models/qwen3_4b.yaml", "8b": "configs/models/qwen3_8b.yaml"}


def _megatron_param_counts(paths: dict[str, str]) -> dict[str, int]:
    """Runs in one rank: build each model on the meta device and count its parameters."""
    from lov15_megatron.convert.mcore_io import build_on_meta
    from lov15_megatron.models.qwen3.model import build_qwen3_model
    from lov15_megatron.runtime import distributed

    counts = {}
    for name, path in paths.items():
        cfg = load_config(path, ["runtime.device=cpu"])
        distributed.initialize(cfg)
        model = build_on_meta(lambda cfg=cfg: build_qwen3_model(cfg))
        counts[name] = sum(p.numel() for p in model.parameters())
    return counts


def _hf_reference(path: str) -> Qwen3ForCausalLM:
    lm = load_config(path).model.language
    config = Qwen3Config(**hf_config_from_language(lm, {"model_type": "qwen3"}))
    with torch.device("meta"):
        return Qwen3ForCausalLM(config)


def test_param_counts_match_transformers_qwen3():
    (counts,) = run_ranks(1, _megatron_param_counts, CONFIGS)
    for name, path in CONFIGS.items():
        hf = _hf_reference(path)
        # tied HF models list the shared embedding once, as Megatron does
        expected = sum(p.numel() for p in hf.parameters())
        assert counts[name] == expected, name
    assert 4.0e9 < counts["4b"] < 4.1e9 and 8.1e9 < counts["8b"] < 8.3e9


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_config_translation_round_trips(name):
    lm = load_config(CONFIGS[name]).model.language
    hf = hf_config_from_language(lm, {"model_type": "qwen3"})
    assert language_config_from_hf(hf) == lm
    assert hf["num_key_value_heads"] == 8 and hf["head_dim"] == 128
