"""How a (packed) vision-language training micro-batch becomes the LLaVA-OV-1.5 model's inputs.

The batch is the task encoder's: ``input_ids``, ``labels`` (already shifted), ``loss_mask``,
``position_ids`` ``[b, s]``, ``pixel_values``, ``image_grid_thw`` and, for packed rows,
``cu_seqlens`` over the flattened ``[b·s]`` stream. It reaches the model as one THD stream
(:func:`~lov15_megatron.models.packed_seq.thd_model_inputs`): the flattened rows, or under
context parallelism this CP rank's load-balanced part of every sub-sample, with the image
features each CP rank needs (``image_feature_index``).
"""

from __future__ import annotations

from typing import Any


def vlm_model_inputs(
    batch: dict[str, Any],
    layout: dict[str, int],
    image_token_id: int,
    video_token_id: int | None = None,
) -> dict[str, Any]:
    """The VLM's keyword arguments for ``batch`` (already on the model's device);
    ``image_token_id`` / ``video_token_id`` are the config's ``model.vision`` ids (under context
    parallelism they say which tokens take vision features).

    Video frames ride in ``pixel_values`` as images (the task encoder's layout), so the
    ``<|image_pad|>`` and ``<|video_pad|>`` tokens together take the features in stream order.
    Under context parallelism the ``<|video_pad|>`` ids are handed to the model as
    ``<|image_pad|>``, so that ``image_feature_index`` counts both kinds of slot: the embedding of
    either id is replaced by its feature, never read, so the model computes the same thing.
    """
    import torch

    from lov15_megatron.models.packed_seq import thd_model_inputs

    if layout.get("cp", 1) > 1 and video_token_id is not None:
        ids = batch["input_ids"]
        batch = {**batch, "input_ids": torch.where(ids == video_token_id, image_token_id, ids)}
    batch = thd_model_inputs(batch, image_token_id=image_token_id, **layout)
    return {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": None,
        "pixel_values": batch.get("pixel_values"),
        "image_grid_thw": batch.get("image_grid_thw"),
        "packed_seq_params": batch["packed_seq_params"],
        "labels": batch["labels"],
        "loss_mask": batch["loss_mask"],
        "image_feature_index": batch.get("image_feature_index"),
    }
