"""The Qwen3 language model as a Megatron-Core ``GPTModel``.

RMSNorm (eps from config, 1e-6 for Qwen3), SwiGLU MLP, grouped-query attention with QK-norm
(RMSNorm over the head dim, one weight shared by all heads), rotate-half RoPE over the full head
dim with the configured base, no biases, tied or untied embeddings. This module builds its
``TransformerConfig`` (dense, or Qwen3-MoE's experts) and the model; the layer and block specs
(Megatron-Core's TE or local GPT spec) are in ``specs.py``, kept apart as Megatron-Core keeps
its layer specs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from lov15_megatron.config import ConfigError, RunConfig
from lov15_megatron.models.backend import (
    device_config_kwargs,
    fp8_config_kwargs,
    fused_kernels,
    moe_loss_scale_per_token,
    recompute_config_kwargs,
    runs_on_gpu,
    use_transformer_engine,
)
from lov15_megatron.models.lm_loss import LossPositionsGPTModel
from lov15_megatron.models.qwen3.specs import qwen3_block_spec


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


def qwen3_transformer_config(cfg: RunConfig) -> TransformerConfig:
    """Megatron ``TransformerConfig`` of the Qwen3 language model for ``cfg``."""
    lm, p = cfg.model.language, cfg.parallel
    on_gpu = runs_on_gpu(cfg)
    pipelined = p.pipeline_model_parallel_size > 1
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
        # an uneven split as Megatron's layout (ParallelConfig.pipeline_layout says why)
        pipeline_model_parallel_layout=p.pipeline_layout(lm.num_layers),
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        calculate_per_token_loss=cfg.train.loss_weighting == "token",
        bias_activation_fusion=fused_kernels(cfg),
        # gloo matches point-to-point messages between two ranks in posting order; a batched
        # isend/irecv under virtual pipelining can pair an activation with a gradient of the
        # same shape. The unbatched path orders sends and receives by rank parity.
        batch_p2p_comm=on_gpu,
        # Context-parallel THD streams are padded per sub-sample, so their length varies from
        # micro-batch to micro-batch: pipeline stages then exchange shapes before activations.
        variable_seq_lengths=pipelined and p.context_parallel_size > 1,
        **moe_config_kwargs(cfg),
        **fp8_config_kwargs(cfg),
        **recompute_config_kwargs(cfg),
        **device_config_kwargs(cfg),
    )


def moe_config_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """``TransformerConfig`` fields of a Qwen3-MoE language model (none for a dense one).

    Qwen3-MoE's router is softmax over all experts → top-k → (``norm_topk_prob``) renormalise
    the k weights. Megatron's default order, top-k on the logits then softmax over the k, is the
    same function: softmax is monotone, so it keeps the same k experts, and the softmax of k
    logits equals their full-softmax probabilities divided by their sum. Without
    ``norm_topk_prob`` the weights are the unnormalised probabilities: Megatron's pre-softmax
    order. Routing runs in fp32 (``moe_router_dtype``); tokens are never dropped.
    """
    lm, p = cfg.model.language, cfg.parallel
    if lm.num_experts is None:
        # Megatron refuses variable lengths with its default all-gather MoE dispatcher, even
        # for a dense model (where the dispatcher is unused).
        return {"moe_token_dispatcher_type": "alltoall"}
    # The all-to-all dispatcher stages its device-to-host copies on a side CUDA stream; on the
    # CPU the all-gather dispatcher (all-gather over TP×EP, local experts, reduce-scatter) runs
    # the same experts on gloo. It needs equal token counts per rank: fixed-length micro-batches.
    dispatcher = "alltoall" if runs_on_gpu(cfg) else "allgather"
    if (
        dispatcher == "allgather"
        and p.pipeline_model_parallel_size > 1
        and p.context_parallel_size > 1
    ):
        raise ConfigError(
            "a mixture-of-experts model on the CPU cannot combine pipeline and context "
            "parallelism (variable-length micro-batches need the GPU's all-to-all dispatcher)"
        )
    # Under sequence (and context) parallelism each rank routes its own slice of the tokens;
    # megatron-core 0.16.1 then scales the per-token aux/z-loss gradients to 1/(TP·CP) of the
    # TP=CP=1 run's (fixed in later releases): see moe_loss_scale_per_token. Checked by
    # tests/test_qwen3_moe.py (TP=2+SP+EP=2 against EP=1) on 0.16.1 and 0.19.2.
    scale = 1
    if cfg.train.loss_weighting == "token":
        scale = moe_loss_scale_per_token(p.tensor_model_parallel_size * p.context_parallel_size)
    z_loss = lm.moe_z_loss_coeff
    return {
        "moe_token_dispatcher_type": dispatcher,
        "num_moe_experts": lm.num_experts,
        "moe_ffn_hidden_size": lm.moe_ffn_hidden_size or lm.ffn_hidden_size,
        "moe_router_topk": lm.moe_router_topk,
        "moe_router_pre_softmax": not lm.moe_norm_topk_prob,
        "moe_router_score_function": "softmax",
        "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": lm.moe_aux_loss_coeff * scale,
        "moe_z_loss_coeff": None if z_loss is None else z_loss * scale,
        "moe_grouped_gemm": use_transformer_engine(cfg),
        "expert_model_parallel_size": p.expert_model_parallel_size,
        "expert_tensor_parallel_size": p.expert_tensor_parallel_size,
    }


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
    if lm.num_experts is not None:
        experts_in_own_optimizer(model)
    return model


def experts_in_own_optimizer(model: torch.nn.Module) -> None:
    """Give expert weights their expert-data-parallel gradient buffers and optimizer at EP=1 too.

    Megatron marks expert weights ``allreduce=False`` only under expert parallelism; at EP=1
    they would share the dense optimizer, and the optimizer checkpoint would change structure
    between EP=1 and EP>1. Marked here at every EP size (at EP=1 the expert-data-parallel group
    is the data-parallel group, so the arithmetic is the same), a checkpoint resumes at another
    EP size.
    """
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False
