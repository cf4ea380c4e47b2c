"""Layer and block specs of the Qwen3 language model (dense and Qwen3-MoE): which module class
goes where.

Kept apart from the builder (``model.py``, which builds the ``TransformerConfig`` and the
model), as Megatron-Core keeps its layer specs apart from its models. The specs are
Megatron-Core's own GPT specs: the Transformer Engine spec on GPU, the local spec on CPU
(``model.transformer_impl``: ``auto`` picks TE when it is importable and a GPU is present), with
the core attention swapped for ``model.attention_backend``'s and, on the local spec, the norms
for sequence-parallel-capable ones (:class:`~lov15_megatron.models.norms.TorchNormFactory`).

Both specs store their checkpoints under the same keys: the local spec's
``sharded_state_dict_keys_map`` files ``input_layernorm`` / ``pre_mlp_layernorm`` under TE's
fused names (``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``), so one
distributed checkpoint serves either spec.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from lov15_megatron.config import RunConfig
from lov15_megatron.models.backend import (
    core_attention_module,
    moe_without_transformer_engine,
    use_transformer_engine,
)
from lov15_megatron.models.norms import TorchNormFactory


def swap_modules(spec: Any, mapping: dict[type, type]) -> Any:
    """Copy of a spec tree with module classes replaced according to ``mapping``."""
    if isinstance(spec, type):
        return mapping.get(spec, spec)
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(
            spec,
            module=mapping.get(spec.module, spec.module),
            submodules=swap_modules(spec.submodules, mapping),
        )
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):  # types: returned above
        changes = {
            f.name: swap_modules(getattr(spec, f.name), mapping) for f in dataclasses.fields(spec)
        }
        return dataclasses.replace(spec, **changes)
    return spec


def qwen3_layer_spec(cfg: RunConfig) -> ModuleSpec:
    """The transformer-layer spec: TE on GPU; on CPU Megatron-Core's local spec with
    sequence-parallel-capable norms (:class:`~lov15_megatron.models.norms.TorchNormFactory`).
    The core attention is ``model.attention_backend``'s (:mod:`lov15_megatron.models.backend`):
    TE's, or our packed-sequence attention in place of Megatron's dense-mask
    ``DotProductAttention``."""
    qk = cfg.model.language.qk_layernorm
    experts = cfg.model.language.num_experts
    core = core_attention_module(cfg)
    if use_transformer_engine(cfg):
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        # MoE: TE's grouped-GEMM experts (TEGroupedMLP); pre_mlp_layernorm stays a TENorm.
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=experts is not None, qk_layernorm=qk
        )
        return swap_modules(spec, {TEDotProductAttention: core})
    if experts is not None:
        moe_without_transformer_engine()
    # MoE: experts as a SequentialMLP of local MLPs (checkpoints interchangeable with TE's).
    local = get_gpt_layer_local_spec(
        num_experts=experts, moe_grouped_gemm=False, qk_layernorm=qk, normalization="RMSNorm"
    )
    if experts is not None:
        # TE's MoE spec keeps pre_mlp_layernorm unfused: store it under its own name as TE does.
        keys = dict(local.submodules.sharded_state_dict_keys_map)
        keys.pop("pre_mlp_layernorm.")
        local = dataclasses.replace(
            local,
            submodules=dataclasses.replace(local.submodules, sharded_state_dict_keys_map=keys),
        )
    return swap_modules(local, {WrappedTorchNorm: TorchNormFactory, DotProductAttention: core})


def qwen3_block_spec(
    cfg: RunConfig, config: TransformerConfig, vp_stage: int | None
) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder-block spec for this pipeline chunk (layers plus the final norm)."""
    layer = qwen3_layer_spec(cfg)
    if use_transformer_engine(cfg):
        return layer  # TransformerBlock picks TENorm for the final norm itself
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=TorchNormFactory)
