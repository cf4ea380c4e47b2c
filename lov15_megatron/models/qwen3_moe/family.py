"""The ``qwen3-moe`` family: ``Qwen3MoeForCausalLM`` ⇄ Megatron-Core (Qwen3 with routed experts).

Everything but the config translation, the MLP rows and the router losses is Qwen3's.
"""

from __future__ import annotations

from typing import Any

from lov15_megatron.config import LanguageModelConfig, RunConfig
from lov15_megatron.convert.mapping import ParamMapping
from lov15_megatron.models.qwen3.family import Qwen3
from lov15_megatron.models.qwen3.hf_mapping import lm_rows
from lov15_megatron.models.qwen3_moe.hf_mapping import (
    MOE_TE_NAMES,
    moe_hf_config_from_language,
    moe_language_config_from_hf,
    moe_mlp_rows,
)
from lov15_megatron.models.registry import register_family


@register_family
class Qwen3Moe(Qwen3):
    name = "qwen3-moe"
    summary = "Qwen3MoeForCausalLM (mixture of experts: 30B-A3B, ...)"
    hf_architecture = "Qwen3MoeForCausalLM"
    hf_model_type = "qwen3_moe"

    def hf_model_class(self) -> type:
        from transformers import Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM

    def step_losses(self, cfg: RunConfig, num_microbatches: int) -> dict[str, float]:
        from lov15_megatron.models.qwen3_moe.metrics import step_moe_losses

        return step_moe_losses(cfg, num_microbatches)

    def discard_step_losses(self) -> None:
        from lov15_megatron.models.qwen3_moe.metrics import discard_moe_losses

        discard_moe_losses()

    def matches(self, lm: LanguageModelConfig) -> bool:
        return lm.num_experts is not None

    def language_config(self, hf: dict[str, Any]) -> LanguageModelConfig:
        return moe_language_config_from_hf(hf)

    def hf_text_config(self, lm: LanguageModelConfig, template: dict[str, Any]) -> dict[str, Any]:
        return moe_hf_config_from_language(lm, template)

    def rows(
        self, cfg: RunConfig, mcore: str = "", hf: str = "model.", head: str = "lm_head."
    ) -> list[ParamMapping]:
        return lm_rows(cfg, moe_mlp_rows, MOE_TE_NAMES, mcore, hf, head)
