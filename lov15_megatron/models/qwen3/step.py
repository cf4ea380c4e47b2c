"""How a language-model training micro-batch becomes the Qwen3 model's inputs.

Every pipeline stage reads the batch (``input_ids``, ``position_ids``, ``labels``, ``loss_mask``
``[b, s]``). Under context parallelism the rows reach the model as one THD stream holding this CP
rank's load-balanced part of every row (:func:`~lov15_megatron.models.packed_seq.thd_model_inputs`).
"""

from __future__ import annotations

from typing import Any


def language_model_inputs(batch: dict[str, Any], layout: dict[str, int]) -> dict[str, Any]:
    """The GPT model's keyword arguments for ``batch`` (already on the model's device)."""
    if layout["cp"] > 1:
        from lov15_megatron.models.packed_seq import thd_model_inputs

        batch = thd_model_inputs(batch, **layout)
    return {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": None,
        "packed_seq_params": batch.get("packed_seq_params"),
        "labels": batch["labels"],
        "loss_mask": batch["loss_mask"],
    }
