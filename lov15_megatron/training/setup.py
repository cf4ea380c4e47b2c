"""Assemble the Megatron-Core training components for a config.

Model chunks (one per virtual pipeline stage) wrapped in Megatron-Core's
``DistributedDataParallel``, the Megatron optimizer (distributed optimizer when configured) and
the learning-rate scheduler. Parallelism lives in these components; the training loop only
calls them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import (
    MegatronOptimizer,
    OptimizerConfig,
    ParamGroupOverride,
    ParamKey,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import MegatronModule

from lov15_megatron.config import RunConfig
from lov15_megatron.models.llava_ov.model import GROUP_MODULES

ModelProvider = Callable[[RunConfig, int | None], MegatronModule]
"""``provider(cfg, vp_stage) -> module`` builds one pipeline chunk on this rank."""


def build_model_chunks(cfg: RunConfig, provider: ModelProvider) -> list[MegatronModule]:
    """Unwrapped model chunks for this rank: one per virtual pipeline stage, with LoRA adapters
    on the targeted layers (all else frozen) when ``cfg.peft`` is set."""
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    stages = [None] if vpp is None else list(range(vpp))
    chunks = [provider(cfg, vp) for vp in stages]
    if cfg.peft is not None:
        apply_peft(cfg, chunks)
    if torch.cuda.is_available() and cfg.runtime.device != "cpu":
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    return chunks


def apply_peft(cfg: RunConfig, chunks: list[MegatronModule]) -> int:
    """Put ``cfg.peft``'s LoRA adapters into every chunk (before DDP wrapping, so that only the
    adapters get gradient buffers and reach the optimizer); returns this rank's adapter count.

    The towers are the registered family's (``ModelFamily.tower_prefixes``).
    With activation recomputation on, every transformer block's input is made to require a
    gradient (:func:`~lov15_megatron.models.lora.require_grad_at_block_inputs`): a recomputed
    layer whose input needs none would hand its adapters no gradient.
    """
    from lov15_megatron.models.lora import apply_lora, require_grad_at_block_inputs
    from lov15_megatron.models.registry import family_for_config

    assert cfg.peft is not None
    prefixes = family_for_config(cfg).tower_prefixes()
    adapted = sum(len(apply_lora(c, cfg.peft, prefixes, cfg.runtime.seed)) for c in chunks)
    if cfg.train.recompute.granularity != "none":
        for chunk in chunks:
            require_grad_at_block_inputs(chunk)
    return adapted


def wrap_ddp(cfg: RunConfig, chunks: list[MegatronModule]) -> list[DistributedDataParallel]:
    """Wrap chunks in Megatron-Core DDP (fp32 grad buffers, contiguous, bucketed)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    wrapped = [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # Bucketing only pays off for overlap; chunk 0 keeps one bucket per Megatron-LM.
            disable_bucketing=i > 0,
        )  # fmt: skip
        for i, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()
    return wrapped


def build_optimizer(cfg: RunConfig, chunks: list[DistributedDataParallel]) -> MegatronOptimizer:
    """Megatron optimizer (distributed when ``parallel.use_distributed_optimizer``)."""
    o = cfg.optimizer
    bf16 = cfg.model.params_dtype == "bfloat16"
    opt_config = OptimizerConfig(
        optimizer=o.name,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    overrides = lr_overrides(cfg, opt_config)
    optimizer = get_megatron_optimizer(opt_config, chunks, config_overrides=overrides)
    # Hooks the pipeline schedules call: grad sync, per-token loss scaling, loss scaling.
    for chunk in chunks:
        config = chunk.config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        config.no_sync_func = [c.no_sync for c in chunks]
        if len(chunks) == 1:
            config.no_sync_func = config.no_sync_func[0]
    return optimizer


def lr_overrides(cfg: RunConfig, opt_config: OptimizerConfig) -> dict:
    """Megatron's default param-group overrides plus ``optimizer.lr_mult`` per module group.

    Each listed group gets its own ``max_lr``/``min_lr``; the scheduler applies warmup and
    decay to every group relative to those.
    """
    overrides = get_standard_config_overrides(opt_config)
    o = cfg.optimizer
    for group, mult in sorted(o.lr_mult.items()):
        key = ParamKey(name=f"*{GROUP_MODULES[group]}.*")
        overrides[key] = ParamGroupOverride(max_lr=o.lr * mult, min_lr=o.min_lr * mult)
    return overrides


def build_scheduler(cfg: RunConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """Warmup then constant/linear/cosine decay to ``optimizer.min_lr``, stepped per iteration."""
    s, o = cfg.scheduler, cfg.optimizer
    decay = s.decay_iters or cfg.train.train_iters
    warmup = s.warmup_iters
    if s.warmup_fraction is not None:  # the release's "warmup fraction" of the decay length
        warmup = max(1, round(s.warmup_fraction * decay))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(decay, warmup + 1),
        lr_decay_style=s.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
    )


def num_microbatches(cfg: RunConfig) -> int:
    """Micro-batches per rank per step: global / (micro × DP)."""
    dp = parallel_state.get_data_parallel_world_size()
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
