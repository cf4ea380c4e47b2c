"""Layer specs of the Rice ViT and its patch merger: which module class goes where.

Kept apart from the modules (``rice_vit.py``), as Megatron-Core keeps ``vit_layer_specs.py``
apart from its vision models. A spec here is a tree of classes only; the numbers
(``TransformerConfig``: widths, heads, norms, parallel sizes) are built from the run config next
to the builders that use them (``rice_vit.py``: ``rice_vit_transformer_config``,
``patch_merger_transformer_config``), as the Qwen3 family keeps its config beside its builder
in ``qwen3/model.py`` and its specs in ``qwen3/specs.py``.

The Transformer Engine spec and the local spec have one layer tree (:func:`rice_vit_layer_spec`);
what differs between them is one row of :class:`VitModules` per backend (:func:`vit_modules`):
TE fuses each pre-LN LayerNorm into the following column-parallel linear, the local spec has
separate norms and linears and files those norms under TE's fused-norm checkpoint keys, so one
distributed checkpoint serves both. The core attention (TE's or
:class:`~lov15_megatron.models.attention.PackedSequenceAttention`, ``model.attention_backend``)
is the caller's choice for either backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from lov15_megatron.models.norms import TorchNormFactory

#: The local spec's norms under TE's fused-norm names (as in Megatron-Core's GPT local spec).
LOCAL_NORM_KEYS_MAP: Mapping[str, str] = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


@dataclass(frozen=True)
class VitModules:
    """The module classes in which the TE and the local specs differ."""

    #: A stand-alone LayerNorm: the tower's ``pre_layernorm`` and the merger's ``layernorm``.
    norm: type
    #: A layer's ``input_layernorm`` / ``pre_mlp_layernorm``: ``IdentityOp`` where the norm is
    #: fused into the next linear.
    layer_norm: type
    #: ``linear_qkv`` and ``linear_fc1`` of a layer: column-parallel, after that layer norm.
    norm_column_linear: type
    #: The merger's ``linear_fc1`` (its LayerNorm is ``norm``, outside the MLP).
    column_linear: type
    #: ``linear_proj``, the layers' and the merger's ``linear_fc2``.
    row_linear: type
    #: The layer's ``sharded_state_dict_keys_map``.
    keys_map: Mapping[str, str] = field(default_factory=dict)


def vit_modules(use_te: bool) -> VitModules:
    """The Transformer Engine row (imported only when asked for) or the local row."""
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        return VitModules(
            norm=TENorm,
            layer_norm=IdentityOp,
            norm_column_linear=TELayerNormColumnParallelLinear,
            column_linear=TEColumnParallelLinear,
            row_linear=TERowParallelLinear,
        )
    return VitModules(
        norm=TorchNormFactory,
        layer_norm=TorchNormFactory,
        norm_column_linear=ColumnParallelLinear,
        column_linear=ColumnParallelLinear,
        row_linear=RowParallelLinear,
        keys_map=LOCAL_NORM_KEYS_MAP,
    )


def rice_vit_layer_spec(use_te: bool, core_attention: type) -> ModuleSpec:
    """One pre-LN Rice ViT layer on TE or local modules (:func:`vit_modules`) with the given core
    attention, which gets THD ``cu_seqlens`` and a padding-type mask: with ``cu_seqlens`` that
    means bidirectional within each image (not causal)."""
    m = vit_modules(use_te)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=m.layer_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.padding},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=m.norm_column_linear,
                    core_attention=core_attention,
                    linear_proj=m.row_linear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=m.layer_norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=m.norm_column_linear, linear_fc2=m.row_linear),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(m.keys_map),
        ),
    )


def rice_vit_block_spec(
    config: TransformerConfig, use_te: bool, core_attention: type
) -> TransformerBlockSubmodules:
    """All ``config.num_layers`` layers (the tower is never split over pipeline stages), no final
    norm."""
    layer = rice_vit_layer_spec(use_te, core_attention)
    return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=None)


def patch_merger_submodules(use_te: bool) -> MLPSubmodules:
    """The merger MLP: column-parallel fc1, row-parallel fc2 (TE or local linears)."""
    m = vit_modules(use_te)
    return MLPSubmodules(linear_fc1=m.column_linear, linear_fc2=m.row_linear)
