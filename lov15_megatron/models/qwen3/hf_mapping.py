"""Qwen3: the HF ⇄ Megatron mapping rows and the HF config ⇄ ``LanguageModelConfig`` translation.

The rows are written with prefixes so that the vision-language model reuses them for its
language model (``language_model.`` on the Megatron side).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lov15_megatron.config import LanguageModelConfig, RunConfig
from lov15_megatron.convert.mapping import (
    Concat,
    ConversionError,
    GroupedQKV,
    PaddedRows,
    ParamMapping,
)
from lov15_megatron.models.qwen3.model import model_vocab_size

# HF config field → our LanguageModelConfig field.
_HF_FIELDS = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "head_dim": "kv_channels",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "rope_theta": "rotary_base",
    "rms_norm_eps": "norm_epsilon",
}


def _rope_theta(hf: dict[str, Any]) -> float:
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise ConversionError(f"rope type {params['rope_type']!r} is not supported (config.json)")
    if "rope_theta" not in params:
        raise ConversionError("config.json has no rope_theta")
    return float(params["rope_theta"])


def language_config_from_hf(hf: dict[str, Any]) -> LanguageModelConfig:
    """Our language-model config from a Qwen3 ``config.json`` (or a VLM's ``text_config``)."""
    missing = [k for k in _HF_FIELDS if k not in hf and k != "rope_theta"]
    if missing:
        raise ConversionError(f"config.json lacks Qwen3 field(s) {missing}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConversionError("config.json: attention_bias/mlp_bias=true is not Qwen3")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json: hidden_act={hf['hidden_act']!r}, Qwen3 uses 'silu'")
    values = {ours: hf[theirs] for theirs, ours in _HF_FIELDS.items() if theirs != "rope_theta"}
    values["rotary_base"] = _rope_theta(hf)
    values["untie_embeddings_and_output_weights"] = not hf.get("tie_word_embeddings", False)
    values["qk_layernorm"] = True
    return LanguageModelConfig(**values)


def hf_config_from_language(lm: LanguageModelConfig, template: dict[str, Any]) -> dict[str, Any]:
    """A Qwen3 ``config.json`` for ``lm``: the template's other fields kept, ours written."""
    out = dict(template)
    for theirs, ours in _HF_FIELDS.items():
        if theirs != "rope_theta":
            out[theirs] = getattr(lm, ours)
    if isinstance(out.get("rope_parameters"), dict):  # transformers ≥ 5 spelling
        out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": lm.rotary_base}
    else:
        out["rope_theta"] = lm.rotary_base
    out["head_dim"] = lm.kv_channels or lm.hidden_size // lm.num_attention_heads
    out["tie_word_embeddings"] = not lm.untie_embeddings_and_output_weights
    out.update(attention_bias=False, hidden_act="silu")
    return out


# The Transformer Engine spec's name for a tensor of the local spec (layer-relative; the local
# spec's ``sharded_state_dict_keys_map`` files the norms under these names in checkpoints).
TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def with_te_names(rows: list[ParamMapping], te_names: dict[str, str]) -> list[ParamMapping]:
    """``rows`` plus, for each layer row with a TE counterpart, the same row under TE's name."""
    out = list(rows)
    for row in rows:
        prefix, sep, local = row.megatron.rpartition("decoder.layers.*.")
        if sep and local in te_names:
            out.append(dataclasses.replace(row, megatron=f"{prefix}{sep}{te_names[local]}"))
    return out


def attention_rows(cfg: RunConfig, layer: str, hl: str) -> list[ParamMapping]:
    """Per-layer attention rows (Megatron layer prefix ``layer``, HF layer prefix ``hl``)."""
    lm = cfg.model.language
    head_dim = lm.kv_channels or lm.hidden_size // lm.num_attention_heads
    qkv = GroupedQKV(lm.num_attention_heads, lm.num_query_groups, head_dim)
    attn, hattn = f"{layer}self_attention.", f"{hl}self_attn."
    return [
        ParamMapping(f"{layer}input_layernorm.weight", (f"{hl}input_layernorm.weight",)),
        ParamMapping(
            f"{attn}linear_qkv.weight", tuple(f"{hattn}{p}_proj.weight" for p in "qkv"), qkv
        ),
        ParamMapping(f"{attn}linear_proj.weight", (f"{hattn}o_proj.weight",)),
        ParamMapping(f"{attn}q_layernorm.weight", (f"{hattn}q_norm.weight",)),
        ParamMapping(f"{attn}k_layernorm.weight", (f"{hattn}k_norm.weight",)),
        ParamMapping(f"{layer}pre_mlp_layernorm.weight", (f"{hl}post_attention_layernorm.weight",)),
    ]


def dense_mlp_rows(cfg: RunConfig, layer: str, hl: str) -> list[ParamMapping]:
    ffn = cfg.model.language.ffn_hidden_size
    return [
        ParamMapping(
            f"{layer}mlp.linear_fc1.weight",
            (f"{hl}mlp.gate_proj.weight", f"{hl}mlp.up_proj.weight"),
            Concat((ffn, ffn)),
        ),
        ParamMapping(f"{layer}mlp.linear_fc2.weight", (f"{hl}mlp.down_proj.weight",)),
    ]


def lm_rows(
    cfg: RunConfig, mlp_rows, te_names: dict[str, str], mcore: str, hf: str, head: str
) -> list[ParamMapping]:
    """The rows of a Qwen3-style LM: embeddings, head, final norm, attention and ``mlp_rows``."""
    lm = cfg.model.language
    vocab = PaddedRows(lm.vocab_size, model_vocab_size(cfg))
    layer, hl = f"{mcore}decoder.layers.*.", f"{hf}layers.*."
    rows = [
        ParamMapping(
            f"{mcore}embedding.word_embeddings.weight", (f"{hf}embed_tokens.weight",), vocab
        ),
        ParamMapping(f"{mcore}output_layer.weight", (f"{head}weight",), vocab),
        ParamMapping(f"{mcore}decoder.final_layernorm.weight", (f"{hf}norm.weight",)),
        *attention_rows(cfg, layer, hl),
        *mlp_rows(cfg, layer, hl),
    ]
    return with_te_names(rows, te_names)


def qwen3_rows(
    cfg: RunConfig, mcore: str = "", hf: str = "model.", head: str = "lm_head."
) -> list[ParamMapping]:
    """Rows for the Qwen3 LM (Megatron prefix ``mcore``, HF prefixes ``hf`` and ``head``)."""
    return lm_rows(cfg, dense_mlp_rows, TE_NAMES, mcore, hf, head)
