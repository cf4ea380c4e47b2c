"""The ``qwen3`` family: ``Qwen3ForCausalLM`` ⇄ Megatron-Core, trained as a language model.

Its methods are what the registry's users ask (``models/registry.py``); the vision-language
model also takes its config translation and rows for its language model.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from lov15_megatron.config import LanguageModelConfig, RunConfig
from lov15_megatron.convert.converter import conversion_run_config
from lov15_megatron.convert.mapping import ParamMapping
from lov15_megatron.models.qwen3.hf_mapping import (
    hf_config_from_language,
    language_config_from_hf,
    qwen3_rows,
)
from lov15_megatron.models.registry import ModelFamily, register_family


@register_family
class Qwen3(ModelFamily):
    name = "qwen3"
    summary = "Qwen3ForCausalLM (dense Qwen3 LM: 4B, 8B, 14B, ...)"
    hf_architecture = "Qwen3ForCausalLM"
    hf_model_type = "qwen3"
    is_language_model = True

    # What the registry's users ask.
    def accepts(self, cfg: RunConfig) -> bool:
        return cfg.model.vision is None and self.matches(cfg.model.language)

    def build_model(self, cfg: RunConfig, vp_stage: int | None = None) -> torch.nn.Module:
        from lov15_megatron.models.qwen3.model import build_qwen3_model

        return build_qwen3_model(cfg, vp_stage=vp_stage)

    def forward_inputs(
        self, cfg: RunConfig, batch: dict[str, Any], layout: dict[str, int]
    ) -> dict[str, Any]:
        from lov15_megatron.models.qwen3.step import language_model_inputs

        return language_model_inputs(batch, layout)

    def run_config(self, hf_config: dict[str, Any], tp: int = 1, pp: int = 1) -> RunConfig:
        lm = self.language_config(hf_config)
        return conversion_run_config({"language": asdict(lm)}, tp, pp)

    def hf_config(self, cfg: RunConfig, template: dict[str, Any]) -> dict[str, Any]:
        out = self.hf_text_config(cfg.model.language, template)
        out.setdefault("model_type", self.hf_model_type)
        out["architectures"] = [self.hf_architecture]
        return out

    def ignorable_hf_tensor(self, name: str, cfg: RunConfig) -> bool:
        """A tied checkpoint's ``lm_head.weight`` is the embedding again: nothing to convert."""
        tied = not cfg.model.language.untie_embeddings_and_output_weights
        return tied and name == "lm_head.weight"

    def hf_model_class(self) -> type:
        from transformers import Qwen3ForCausalLM

        return Qwen3ForCausalLM

    # What the vision-language model asks of its language family.
    def matches(self, lm: LanguageModelConfig) -> bool:
        return lm.num_experts is None

    def language_config(self, hf: dict[str, Any]) -> LanguageModelConfig:
        return language_config_from_hf(hf)

    def hf_text_config(self, lm: LanguageModelConfig, template: dict[str, Any]) -> dict[str, Any]:
        return hf_config_from_language(lm, template)

    def rows(
        self, cfg: RunConfig, mcore: str = "", hf: str = "model.", head: str = "lm_head."
    ) -> list[ParamMapping]:
        return qwen3_rows(cfg, mcore, hf, head)
