"""One optimizer step through Megatron-Core's pipeline schedules.

The loss of a step weighs tokens in one of two ways (``train.loss_weighting``):

- ``token`` (default): the sum of the masked per-token losses over the whole global batch
  divided by the number of loss tokens in it (Megatron's ``calculate_per_token_loss``):
  micro-batches and DP ranks are weighted by their token counts, so every parallel layout and
  every micro-batch size optimises the same objective;
- ``micro_batch`` (the release's Megatron-LM default): each micro-batch's mean over its loss
  tokens, averaged over the micro-batches and DP ranks of the step. A token in a micro-batch
  with few loss tokens weighs more; the objective depends on how samples are grouped.

The per-token losses come from the model (:mod:`lov15_megatron.models.lm_loss`: the padded
vocabulary is kept out of the softmax, and logits are computed only at loss positions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from lov15_megatron.config import RunConfig
from lov15_megatron.models.registry import ModelFamily


@dataclass
class StepResult:
    loss: float  # mean loss of the global batch as train.loss_weighting weighs it (every rank)
    num_tokens: int  # loss tokens in the global batch
    grad_norm: float | None
    lr: float
    skipped: bool  # the optimizer skipped the update (inf/nan grads)
    loss_scale: float | None = None  # fp16 dynamic loss scale (None in bf16/fp32)


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron loss function (``loss_weighting=token``): (sum of masked losses, token count,
    values to report). ``output_tensor`` is the model's per-token losses ``[b, s]``."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.float(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def micro_batch_mean_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron loss function (``loss_weighting=micro_batch``): this micro-batch's mean loss
    over its loss tokens, and values to report.

    Under context parallelism each CP rank holds part of the micro-batch: the token count (and,
    for the report, the loss sum) is summed over the CP group, and this rank returns its share
    ``local sum / micro-batch tokens``; Megatron's schedule multiplies by the CP size and DDP
    averages gradients over DP×CP, which together give the micro-batch mean.
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    local_sum = torch.sum(losses * mask)
    totals = torch.stack([local_sum.detach(), mask.sum()])
    cp = max(parallel_state.get_context_parallel_world_size(), 1)  # 0 before initialisation
    if cp > 1:
        dist.all_reduce(totals, group=parallel_state.get_context_parallel_group())
    tokens = totals[1].clamp(min=1)
    # Reported once per micro-batch: each CP rank adds 1/cp of it.
    report = torch.stack([totals[0] / tokens, torch.ones_like(tokens), totals[1]]) / cp
    return local_sum / tokens, {"lm loss": report}


def _loss_func(model: torch.nn.Module, loss_mask: torch.Tensor):
    from megatron.core.utils import get_model_config

    per_token = get_model_config(model).calculate_per_token_loss
    return partial(masked_token_loss if per_token else micro_batch_mean_loss, loss_mask)


def _layout(model: torch.nn.Module) -> dict[str, int]:
    """This rank's context-parallel size and rank, and the THD total's required multiple."""
    from megatron.core.utils import get_model_config

    ps = parallel_state
    cp = ps.get_context_parallel_world_size()
    # Under sequence parallelism each CP rank's tokens are split again over TP.
    tp = ps.get_tensor_model_parallel_world_size()
    sp = tp if get_model_config(model).sequence_parallel else 1
    return {"cp": cp, "cp_rank": ps.get_context_parallel_rank(), "total_multiple_of": cp * sp}


def uses_thd(cfg: RunConfig) -> bool:
    """Whether micro-batches reach the model as one THD stream ``[1, t]`` (else ``[b, s]``).

    Always for the VLM (packed or not); for the language model only under context parallelism.
    """
    return cfg.model.vision is not None or cfg.parallel.context_parallel_size > 1


def schedule_shape(cfg: RunConfig) -> tuple[int, int]:
    """``(seq_length, micro_batch_size)`` for Megatron's pipeline schedule.

    Pipeline stages exchange ``[seq_length / cp (/ tp under SP), micro_batch_size, hidden]``. A
    THD stream holds the ``b`` rows as ``b·s`` tokens of one sequence, so the schedule is told
    ``(b·s, 1)``. Under CP the padded stream's length varies; the stages then exchange shapes
    first (``variable_seq_lengths``, set in the model config).
    """
    s, b = cfg.data.seq_length, cfg.train.micro_batch_size
    return (b * s, 1) if uses_thd(cfg) else (s, b)


def make_forward_step(family: ModelFamily, cfg: RunConfig) -> Callable:
    """Megatron's forward-step function for ``family``'s model: this micro-batch moved to the
    model's device, turned into the model's inputs by the family (``forward_inputs``: e.g. one
    THD stream for the VLM or under context parallelism), and the loss function that weighs the
    returned per-token losses as ``train.loss_weighting`` says."""

    def forward_step(data_iterator: Iterator, model: torch.nn.Module):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        inputs = family.forward_inputs(cfg, batch, _layout(model))
        return model(**inputs), _loss_func(model, inputs["loss_mask"])

    return forward_step


def _reduce_loss(loss_dicts: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """[weighted loss sum, weight, loss tokens] over micro-batches and DP (×CP) ranks, available
    on every rank. The step's loss is the first over the second."""
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for d in loss_dicts:
            totals += d["lm loss"].to(totals)
        dist.all_reduce(
            totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            totals,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return totals


def _loss_scale(optimizer: MegatronOptimizer) -> float | None:
    if not getattr(optimizer, "config", None) or not optimizer.config.fp16:
        return None
    return float(optimizer.get_loss_scale())


def train_step(
    cfg: RunConfig,
    data_iterator: Iterator | list[Iterator],
    model: list,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    num_microbatches: int,
    forward_step: Callable | None = None,
) -> StepResult:
    """Zero grads, run forward/backward over all micro-batches, step optimizer and scheduler.

    ``forward_step`` defaults to the registered family's (:func:`make_forward_step`)."""
    if forward_step is None:
        from lov15_megatron.models.registry import family_for_config

        forward_step = make_forward_step(family_for_config(cfg), cfg)
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    device = next(model[0].parameters()).device
    seq_length, micro_batch_size = schedule_shape(cfg)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,  # one iterator per chunk under virtual pipelining
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    # Step i (1-based) runs at the scheduler's lr for i: warmup never spends a step at lr 0.
    scheduler.step(increment=1)
    # The lr of the base schedule (groups with an optimizer.lr_mult have their own).
    groups = optimizer.param_groups
    lr = next((g["lr"] for g in groups if g.get("default_config", True)), groups[0]["lr"])
    updated, grad_norm, _ = optimizer.step()
    totals = _reduce_loss(losses, device)
    loss_sum, weight, tokens = totals.tolist()
    return StepResult(
        loss=loss_sum / max(weight, 1e-12) if weight else 0.0,
        num_tokens=round(tokens),
        grad_norm=None if grad_norm is None else float(grad_norm),
        lr=lr,
        skipped=not updated,
        loss_scale=_loss_scale(optimizer),
    )
