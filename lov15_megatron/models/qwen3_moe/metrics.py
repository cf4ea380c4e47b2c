"""Mixture-of-experts losses for the training log (Megatron-Core's aux-loss tracker).

Every MoE router adds its load-balancing loss (divided by its coefficient: the plain
Switch-Transformer balance term, 1.0 when tokens are spread evenly) and its z-loss to
Megatron-Core's layer-wise tracker on each micro-batch. :func:`step_moe_losses` reduces them over
pipeline stages and data-parallel ranks (Megatron's ``track_moe_metrics``; the z-loss averaged
over the ranks holding different tokens, which Megatron leaves rank-local), averages over
micro-batches and layers, and clears the tracker for the next step. Every rank must call it, so
the logged values are the same at every parallel layout.
"""

from __future__ import annotations

from lov15_megatron.config import RunConfig


def step_moe_losses(cfg: RunConfig, num_microbatches: int) -> dict[str, float]:
    """``{"load_balancing_loss": …, "z_loss": …}`` of the last step (empty for a dense model)."""
    if cfg.model.language.num_experts is None:
        return {}
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import (
        get_moe_layer_wise_logging_tracker,
        track_moe_metrics,
    )

    z_loss = get_moe_layer_wise_logging_tracker().get("z_loss")
    if z_loss is not None and z_loss.get("avg_group") is None:
        # Megatron records each rank's z-loss over its own tokens and never reduces it: average
        # over every rank that holds different tokens (DP × CP, and TP under sequence parallel).
        z_loss["avg_group"] = parallel_state.get_tensor_and_data_parallel_group(
            with_context_parallel=True
        )
    totals: dict = {}
    track_moe_metrics(
        loss_scale=1.0 / num_microbatches,
        iteration=0,
        total_loss_dict=totals,
        num_layers=cfg.model.language.num_layers,
    )
    return {name: float(value) for name, value in totals.items()}


def discard_moe_losses() -> None:
    """Drop what forward passes outside a training step (validation) added to the tracker."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()
