"""The Qwen3 language model as a Megatron-Core ``GPTModel``.

RMSNorm (eps from config, 1e-6 for Qwen3), SwiGLU MLP, grouped-query attention with QK-norm
(RMSNorm over the head dim, one weight shared by all heads), rotate-half RoPE over the full head
dim with the configured base, no biases, tied or untied embeddings. The layer spec is
Megatron-Core's own: the Transformer Engine spec on GPU, the local spec on CPU
(``model.transformer_impl``: ``auto`` picks TE when it is importable and a GPU is present).

Both specs store their checkpoints under the same keys: the local spec's
``sharded_state_dict_keys_map`` files ``input_layernorm`` / ``pre_mlp_layernorm`` under TE's
fused names (``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``), so one
distributed checkpoint serves either spec.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from lov15_megatron.config import RunConfig
from lov15_megatron.models.lm_loss import LossPositionsGPTModel
from lov15_megatron.models.norms import LocalNorm

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of ``divisible_by × TP``.

    The padded size depends on TP (151936 → 151936 at TP=1, 152064 at TP=2/4, 152576 at TP=8);
    embedding and output weights are stored with ``allow_shape_mismatch`` in distributed
    checkpoints, so a checkpoint still loads at another TP, and :func:`zero_vocab_padding`
    makes the rows past the real vocabulary deterministic afterwards.
    """
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def model_vocab_size(cfg: RunConfig) -> int:
    lm = cfg.model.language
    tp = cfg.parallel.tensor_model_parallel_size
    return padded_vocab_size(lm.vocab_size, lm.make_vocab_size_divisible_by, tp)


@torch.no_grad()
def zero_vocab_padding(model: torch.nn.Module, vocab_size: int) -> None:
    """Zero embedding / output rows at ids ≥ ``vocab_size`` on this TP rank's vocab shard."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in model.named_parameters():
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            # Both are split over TP into contiguous vocab shards of equal size.
            first_pad = max(vocab_size - tp_rank * param.shape[0], 0)
            if first_pad < param.shape[0]:
                param[first_pad:].zero_()


def use_transformer_engine(cfg: RunConfig) -> bool:
    impl = cfg.model.transformer_impl
    if impl == "auto":  # TE where it can run: a GPU run (not runtime.device=cpu) with TE
        return runs_on_gpu(cfg) and _te_importable()
    return impl == "transformer_engine"


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def runs_on_gpu(cfg: RunConfig) -> bool:
    return torch.cuda.is_available() and cfg.runtime.device != "cpu"


def fused_kernels(cfg: RunConfig) -> bool:
    """Fused kernels come with Transformer Engine on GPU; the local spec uses plain torch ops."""
    return runs_on_gpu(cfg) and use_transformer_engine(cfg)


def device_config_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """``TransformerConfig`` fields decided by dtype and device, shared by the LM and the ViT."""
    dtype = _DTYPES[cfg.model.params_dtype]
    on_gpu, te = runs_on_gpu(cfg), fused_kernels(cfg)
    return {
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "use_cpu_initialization": not on_gpu,
        "masked_softmax_fusion": te,
        "persist_layer_norm": te,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
    }


def qwen3_transformer_config(cfg: RunConfig) -> TransformerConfig:
    """Megatron ``TransformerConfig`` of the Qwen3 language model for ``cfg``."""
    lm, p = cfg.model.language, cfg.parallel
    on_gpu = runs_on_gpu(cfg)
    recompute = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                 "recompute_num_layers": 1},
    }[cfg.train.recompute]  # fmt: skip
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.ffn_hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        kv_channels=lm.kv_channels or lm.hidden_size // lm.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=lm.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=lm.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.model.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        calculate_per_token_loss=True,
        bias_activation_fusion=fused_kernels(cfg),
        # gloo matches point-to-point messages between two ranks in posting order; a batched
        # isend/irecv under virtual pipelining can pair an activation with a gradient of the
        # same shape. The unbatched path orders sends and receives by rank parity.
        batch_p2p_comm=on_gpu,
        **recompute,
        **device_config_kwargs(cfg),
    )


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
    if dataclasses.is_dataclass(spec):
        changes = {
            f.name: swap_modules(getattr(spec, f.name), mapping) for f in dataclasses.fields(spec)
        }
        return dataclasses.replace(spec, **changes)
    return spec


def qwen3_layer_spec(cfg: RunConfig) -> ModuleSpec:
    """The transformer-layer spec: TE on GPU; on CPU Megatron-Core's local spec with
    sequence-parallel-capable norms (:class:`~lov15_megatron.models.norms.LocalNorm`)."""
    qk = cfg.model.language.qk_layernorm
    if use_transformer_engine(cfg):
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk)
    local = get_gpt_layer_local_spec(qk_layernorm=qk, normalization="RMSNorm")
    return swap_modules(local, {WrappedTorchNorm: LocalNorm})


def qwen3_block_spec(
    cfg: RunConfig, config: TransformerConfig, vp_stage: int | None
) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder-block spec for this pipeline chunk (layers plus the final norm)."""
    layer = qwen3_layer_spec(cfg)
    if use_transformer_engine(cfg):
        return layer  # TransformerBlock picks TENorm for the final norm itself
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=LocalNorm)


def build_qwen3_model(
    cfg: RunConfig,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    config: TransformerConfig | None = None,
    position_embedding_type: str = "rope",
    scatter_embedding_sequence_parallel: bool = True,
) -> LossPositionsGPTModel:
    """One pipeline chunk of the Qwen3 model (stage flags derived from parallel state).

    The VLM builds its language model with ``scatter_embedding_sequence_parallel=False`` (it
    scatters after merging image features) and, on the local spec, ``"mrope"`` with three equal
    position rows — plain 1-D RoPE at explicit positions that restart per packed sub-sample.
    """
    ps = parallel_state
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    lm = cfg.model.language
    config = config or qwen3_transformer_config(cfg)
    model = LossPositionsGPTModel(
        config=config,
        transformer_layer_spec=qwen3_block_spec(cfg, config, vp_stage),
        vocab_size=model_vocab_size(cfg),
        max_sequence_length=lm.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not lm.untie_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        rotary_base=lm.rotary_base,
        scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
        vp_stage=vp_stage,
        true_vocab_size=lm.vocab_size,  # the loss masks the padded logit columns
    )
    return model
