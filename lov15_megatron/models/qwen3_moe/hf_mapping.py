"""Qwen3-MoE (``Qwen3MoeForCausalLM``, e.g. Qwen3-30B-A3B): config translation and rows.

The attention, norms, embeddings and head are Qwen3's (``models/qwen3/hf_mapping.py``); every
layer's MLP is a sparse block: the router ``mlp.gate`` ⇄ Megatron's ``mlp.router``, and expert
``e``'s ``gate_proj``/``up_proj``/``down_proj`` ⇄ ``mlp.experts.local_experts.e.linear_fc1``/``fc2``
(the SequentialMLP of the local spec; TE's grouped GEMM names them ``linear_fc1.weight<e>``).
The converter writes the experts at EP=1; Megatron's distributed checkpoint reshards them over
any expert-parallel size at load (each expert is one slice of a stacked tensor).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lov15_megatron.config import LanguageModelConfig, RunConfig
from lov15_megatron.convert.mapping import Concat, ConversionError, ParamMapping
from lov15_megatron.models.qwen3.hf_mapping import (
    TE_NAMES,
    hf_config_from_language,
    language_config_from_hf,
)

# HF field → ours (the dense fields are Qwen3's).
_MOE_FIELDS = {
    "moe_intermediate_size": "moe_ffn_hidden_size",
    "num_experts_per_tok": "moe_router_topk",
    "norm_topk_prob": "moe_norm_topk_prob",
    "router_aux_loss_coef": "moe_aux_loss_coeff",
}

# Layer-relative TE names of the MoE layer: TE's MoE spec keeps pre_mlp_layernorm unfused, and
# TEGroupedMLP holds expert e's weights as ``linear_fc1.weight<e>``.
MOE_TE_NAMES = {
    "input_layernorm.weight": TE_NAMES["input_layernorm.weight"],
    "mlp.experts.local_experts.*.linear_fc1.weight": "mlp.experts.linear_fc1.weight*",
    "mlp.experts.local_experts.*.linear_fc2.weight": "mlp.experts.linear_fc2.weight*",
}


def _num_experts(hf: dict[str, Any]) -> int:
    # transformers ≥ 5 writes num_local_experts; the released config.json says num_experts.
    for key in ("num_experts", "num_local_experts"):
        if hf.get(key) is not None:
            return int(hf[key])
    raise ConversionError("config.json lacks num_experts: not a Qwen3-MoE config")


def moe_language_config_from_hf(hf: dict[str, Any]) -> LanguageModelConfig:
    """Our language-model config from a Qwen3-MoE ``config.json`` (or a VLM's text config)."""
    dense = dict(hf)
    dense.setdefault("intermediate_size", hf.get("moe_intermediate_size"))
    lm = language_config_from_hf(dense)
    missing = [k for k in ("moe_intermediate_size", "num_experts_per_tok") if k not in hf]
    if missing:
        raise ConversionError(f"config.json lacks Qwen3-MoE field(s) {missing}")
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ConversionError(
            "config.json: mlp_only_layers/decoder_sparse_step make some layers dense; only "
            "all-sparse Qwen3-MoE models are supported (decoder_sparse_step 1, mlp_only_layers [])"
        )
    if hf.get("shared_expert_intermediate_size"):
        raise ConversionError("config.json: shared experts are not Qwen3-MoE")
    values = {ours: hf[theirs] for theirs, ours in _MOE_FIELDS.items() if theirs in hf}
    values["moe_aux_loss_coeff"] = float(values.get("moe_aux_loss_coeff", 0.0))
    return replace(lm, num_experts=_num_experts(hf), **values)


def moe_hf_config_from_language(
    lm: LanguageModelConfig, template: dict[str, Any]
) -> dict[str, Any]:
    """A Qwen3-MoE ``config.json`` for ``lm`` (the template's other fields kept)."""
    out = hf_config_from_language(lm, template)
    for theirs, ours in _MOE_FIELDS.items():
        out[theirs] = getattr(lm, ours)
    key = "num_local_experts" if "num_local_experts" in template else "num_experts"
    out[key] = lm.num_experts
    out.update(decoder_sparse_step=1, mlp_only_layers=[])
    return out


def moe_mlp_rows(cfg: RunConfig, layer: str, hl: str) -> list[ParamMapping]:
    lm = cfg.model.language
    ffn = lm.moe_ffn_hidden_size or lm.ffn_hidden_size
    expert, hexpert = f"{layer}mlp.experts.local_experts.*.", f"{hl}mlp.experts.*."
    return [
        ParamMapping(f"{layer}mlp.router.weight", (f"{hl}mlp.gate.weight",)),
        ParamMapping(
            f"{expert}linear_fc1.weight",
            (f"{hexpert}gate_proj.weight", f"{hexpert}up_proj.weight"),
            Concat((ffn, ffn)),
        ),
        ParamMapping(f"{expert}linear_fc2.weight", (f"{hexpert}down_proj.weight",)),
    ]
