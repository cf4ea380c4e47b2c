"""Validation loss on held-out samples during and at the end of a run.

``data.valid_path`` is an Energon dataset of held-out samples, made like the training data
(``tools/pack_offline.py`` on a held-out split). Every evaluation reads it **from the beginning,
in its stored order** (Energon's validation mode: no shuffling, no repetition), sharded over the
data-parallel ranks as training is, ``train.eval_iters`` global batches of it (fewer if it runs
out), through the training forward step under ``torch.no_grad()`` in Megatron's forward-only
schedule. The loss is weighed as ``train.loss_weighting`` says, like the training loss, so the
two are comparable; because the order is fixed and the weights are the only state involved, a
run and its resumed continuation report identical validation losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from lov15_megatron.config import RunConfig


@dataclass
class ValidationResult:
    iteration: int
    loss: float
    tokens: int  # loss tokens evaluated (whole global batches)
    batches: int  # global batches evaluated
    sample_ids: list[str]  # this DP rank's samples, in order


def _valid_batches(cfg: RunConfig, sample_ids: list[str]) -> Iterator[dict]:
    from lov15_megatron.training.data import energon_batches, energon_loader

    # A generator: the loader is built when the first batch is asked for.
    yield from energon_batches(energon_loader(cfg, "valid"), sample_ids)


def validation_loss(
    cfg: RunConfig,
    model: list,
    forward_step: Callable,
    num_microbatches: int,
    iteration: int,
) -> ValidationResult:
    """Validation loss of ``model`` on ``train.eval_iters`` global batches of held-out data."""
    from lov15_megatron.training.step import _reduce_loss, schedule_shape

    device = next(model[0].parameters()).device
    sample_ids: list[str] = []
    stream = _valid_batches(cfg, sample_ids)
    seq_length, micro_batch_size = schedule_shape(cfg)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    batches = 0
    for chunk in model:
        chunk.eval()
    try:
        for _ in range(cfg.train.eval_iters):
            step = [b for _, b in zip(range(num_microbatches), stream, strict=False)]
            # Every rank must run the schedule the same number of times.
            full = torch.tensor([len(step) == num_microbatches], dtype=torch.int32, device=device)
            dist.all_reduce(full, op=dist.ReduceOp.MIN)
            if not int(full):
                break
            iterators = iter(step) if len(model) == 1 else [iter(list(step)) for _ in model]
            with torch.no_grad():
                losses = get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=iterators,
                    model=model,
                    num_microbatches=num_microbatches,
                    seq_length=seq_length,
                    micro_batch_size=micro_batch_size,
                    forward_only=True,
                )
            totals += _reduce_loss(losses, device)
            batches += 1
    finally:
        for chunk in model:
            chunk.train()
    loss_sum, weight, tokens = totals.tolist()
    return ValidationResult(
        iteration=iteration,
        loss=loss_sum / weight if weight else float("nan"),
        tokens=round(tokens),
        batches=batches,
        sample_ids=sample_ids,
    )
