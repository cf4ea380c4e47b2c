"""LLaVA-OneVision-1.5: the HF ⇄ Megatron mapping rows (Rice ViT, merger, then the language
family's) and the vision-config translation.

The rows are written with prefixes so that the vision-language model composes them with the
Qwen3 rows: HF ``visual.…`` (the release's on-disk names) ⇄ Megatron ``vision_model.…``
(:class:`~lov15_megatron.models.llava_ov.rice_vit.RiceViT`) and ``vision_projection.…``
(:class:`~lov15_megatron.models.llava_ov.rice_vit.PatchMerger`). Megatron names are the TP=1
names of the local spec, plus the Transformer Engine spec's fused-norm names
(``linear_qkv.layer_norm_{weight,bias}``, ``linear_fc1.layer_norm_{weight,bias}``) as aliases
of the same HF tensors, so the table serves whichever spec the model was built with.

Every transform only reorders rows, so round trips are bit-exact: the patch-embedding weight
keeps the ``Conv2d`` layout ``[hidden, C, P, P]`` on both sides, and the fused ViT qkv
(HF rows ``[Q; K; V]``) becomes Megatron's per-head ``[q_h; k_h; v_h]`` through
``GroupedQKV(heads, heads, head_dim, stacked=True)`` for the weight and the bias.
"""

from __future__ import annotations

from typing import Any

from lov15_megatron.config import RunConfig, VisionModelConfig
from lov15_megatron.convert.mapping import ConversionError, GroupedQKV, ParamMapping
from lov15_megatron.hf.remote_code.configuration_llavaonevision1_5 import RELEASE_VISION_ROPE_THETA

# HF ``vision_config`` field → our VisionModelConfig field.
_HF_VISION_FIELDS = {
    "depth": "num_layers",
    "embed_dim": "hidden_size",
    "intermediate_size": "ffn_hidden_size",
    "num_heads": "num_attention_heads",
    "patch_size": "patch_size",
    "in_channels": "in_channels",
    "spatial_merge_size": "spatial_merge_size",
    "layer_norm_eps": "norm_epsilon",
}


def vision_config_from_hf(hf: dict[str, Any]) -> VisionModelConfig:
    """Our vision config from a ``rice_vit`` ``vision_config`` (the merger is ``hidden·m²``
    wide in the release, so ``merger_hidden_size`` stays ``None``)."""
    missing = [k for k in _HF_VISION_FIELDS if k not in hf]
    if missing:
        raise ConversionError(f"config.json vision_config lacks field(s) {missing}")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(
            f"config.json vision_config: hidden_act={hf['hidden_act']!r}, Rice ViT uses 'gelu'"
        )
    if hf.get("temporal_patch_size", 1) != 1:
        raise ConversionError(
            f"config.json vision_config: temporal_patch_size={hf['temporal_patch_size']} "
            "is not supported (LLaVA-OneVision-1.5 uses 1)"
        )
    if hf.get("hidden_size", hf["embed_dim"]) != hf["embed_dim"]:
        raise ConversionError(
            f"config.json vision_config: hidden_size {hf['hidden_size']} differs from embed_dim "
            f"{hf['embed_dim']} (the release's Rice ViT is hidden_size wide, ours embed_dim)"
        )
    values = {ours: hf[theirs] for theirs, ours in _HF_VISION_FIELDS.items()}
    values["rope_theta"] = float(hf.get("rope_theta", RELEASE_VISION_ROPE_THETA))
    return VisionModelConfig(**values)


def hf_vision_config(v: VisionModelConfig, text_hidden_size: int) -> dict[str, Any]:
    """The ``vision_config`` dict (model_type ``rice_vit``) for ``v``."""
    if v.merger_hidden_size not in (None, v.hidden_size * v.spatial_merge_size**2):
        raise ConversionError(
            f"model.vision.merger_hidden_size={v.merger_hidden_size} cannot be expressed in the "
            f"HF layout (its merger is hidden_size x spatial_merge_size^2 wide)"
        )
    out = {theirs: getattr(v, ours) for theirs, ours in _HF_VISION_FIELDS.items()}
    out.update(
        model_type="rice_vit",
        hidden_size=v.hidden_size,
        hidden_act="gelu",
        temporal_patch_size=1,
        rope_theta=v.rope_theta,
        text_hidden_size=text_hidden_size,
    )
    return out


def vision_of(cfg: RunConfig) -> VisionModelConfig:
    """``cfg.model.vision``; a config without a vision tower is a ConversionError."""
    if cfg.model.vision is None:
        raise ConversionError("model.vision is not set: the config has no vision tower")
    return cfg.model.vision


def rice_vit_rows(
    cfg: RunConfig,
    mcore_vision: str = "vision_model.",
    mcore_merger: str = "vision_projection.",
    hf: str = "visual.",
) -> list[ParamMapping]:
    """Rows for the Rice ViT (Megatron prefix ``mcore_vision``) and the merger
    (``mcore_merger``); HF prefix ``hf``."""
    v = vision_of(cfg)
    heads = v.num_attention_heads
    qkv = GroupedQKV(heads, heads, v.hidden_size // heads, stacked=True)
    layer, block = f"{mcore_vision}decoder.layers.*.", f"{hf}blocks.*."
    rows = [
        ParamMapping(f"{mcore_vision}patch_embed.weight", (f"{hf}patch_embed.proj.weight",)),
        ParamMapping(f"{mcore_vision}class_embedding", (f"{hf}class_embedding",)),
        ParamMapping(f"{mcore_vision}class_pos_emb", (f"{hf}class_pos_emb",)),
    ]
    for p in ("weight", "bias"):
        rows += [
            ParamMapping(f"{mcore_vision}pre_layernorm.{p}", (f"{hf}pre_layernorm.{p}",)),
            # local spec names, then the Transformer Engine spec's fused-norm names
            ParamMapping(f"{layer}input_layernorm.{p}", (f"{block}norm1.{p}",)),
            ParamMapping(
                f"{layer}self_attention.linear_qkv.layer_norm_{p}", (f"{block}norm1.{p}",)
            ),
            ParamMapping(f"{layer}self_attention.linear_qkv.{p}", (f"{block}attn.qkv.{p}",), qkv),
            ParamMapping(f"{layer}self_attention.linear_proj.{p}", (f"{block}attn.proj.{p}",)),
            ParamMapping(f"{layer}pre_mlp_layernorm.{p}", (f"{block}norm2.{p}",)),
            ParamMapping(f"{layer}mlp.linear_fc1.layer_norm_{p}", (f"{block}norm2.{p}",)),
            ParamMapping(f"{layer}mlp.linear_fc1.{p}", (f"{block}mlp.fc1.{p}",)),
            ParamMapping(f"{layer}mlp.linear_fc2.{p}", (f"{block}mlp.fc2.{p}",)),
            ParamMapping(f"{mcore_merger}layernorm.{p}", (f"{hf}merger.ln_q.{p}",)),
            ParamMapping(f"{mcore_merger}encoder.linear_fc1.{p}", (f"{hf}merger.mlp.0.{p}",)),
            ParamMapping(f"{mcore_merger}encoder.linear_fc2.{p}", (f"{hf}merger.mlp.2.{p}",)),
        ]
    return rows


def llava_ov_rows(cfg: RunConfig) -> list[ParamMapping]:
    """The whole model's rows: the Rice ViT and merger, then the language family's rows under
    ``language_model.`` (Megatron) and ``model.`` (HF)."""
    from lov15_megatron.models.registry import language_family

    family = language_family(cfg.model.language)
    return rice_vit_rows(cfg) + family.rows(cfg, mcore="language_model.", hf="model.")
