"""The language-model loss: per-token cross entropy over the true vocabulary, at loss positions.

Megatron's ``GPTModel.forward(labels=...)`` returns per-token losses ``[b, s]``; so does
:class:`LossPositionsGPTModel`, with two differences that its training callers rely on:

- **The padded vocabulary is excluded.** Megatron pads the vocabulary to a multiple of
  128 × TP and lets the padded columns into the softmax, so its loss depends on TP and differs
  from Hugging Face's. :func:`token_losses` masks them.
- **Logits are computed only where ``loss_mask`` is set.** The output layer and the softmax over
  the 151,936-token vocabulary are the largest single cost of a small model, and in instruction
  tuning most positions (system/user turns, image tokens, padding) carry no loss. The hidden
  states at the loss positions are gathered (all of them under sequence parallelism, as
  Megatron's own last-token inference path does) and only those go through the output layer.
  Positions outside the mask get a loss of 0.

Without ``labels`` (inference, conversion checks) the model is Megatron's ``GPTModel`` unchanged
and returns full logits. The two Megatron-Core internals this relies on (the ``_postprocess``
hook and the output layer's ``sequence_parallel`` switch) go through
:mod:`lov15_megatron.models.mcore_private`, which checks them against the installed release.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from lov15_megatron.models import mcore_private


def token_losses(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token cross entropy ``[b, s]`` from vocab-parallel logits ``[b, s, V_padded/TP]``.

    Columns at ids ≥ ``vocab_size`` (Megatron's padding) are excluded from the softmax; labels
    outside the vocabulary (e.g. -100) give a finite value that the loss mask removes. Like
    Megatron's own loss path, Megatron's cross entropy may reuse ``logits``' memory in place:
    pass a copy if the logits are needed afterwards.
    """
    shard = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * shard
    logits = logits.transpose(0, 1).float().contiguous()  # [s, b, v]
    if first + shard > vocab_size:
        ids = torch.arange(first, first + shard, device=logits.device)
        logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
    target = labels.transpose(0, 1).clamp(0, vocab_size - 1).contiguous()
    return tensor_parallel.vocab_parallel_cross_entropy(logits, target).transpose(0, 1)


class LossPositionsGPTModel(GPTModel):
    """``GPTModel`` whose loss path masks the vocab padding and skips non-loss positions.

    ``true_vocab_size`` is the tokenizer's vocabulary (the output layer has the padded one).
    """

    def __init__(self, *args, true_vocab_size: int, **kwargs) -> None:
        mcore_private.check_assumptions()
        super().__init__(*args, **kwargs)
        self.true_vocab_size = true_vocab_size

    def _postprocess(self, *args, **kwargs):
        call = mcore_private.postprocess_arguments(self, args, kwargs)
        labels, loss_mask = call["labels"], call["loss_mask"]
        if not self.post_process or labels is None:
            return super()._postprocess(*args, **kwargs)
        if loss_mask is None:
            raise ValueError("the training loss needs loss_mask together with labels")
        if self.config.mtp_num_layers is not None or call["mtp_in_postprocess"]:
            raise NotImplementedError("multi-token prediction is not supported")
        return self.masked_token_losses(call["hidden_states"], labels, loss_mask)

    def masked_token_losses(
        self, hidden_states: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
    ) -> torch.Tensor:
        """Per-token losses ``[b, s]`` (0 outside ``loss_mask``) from final hidden states."""
        sequence_parallel = self.output_layer.sequence_parallel
        if sequence_parallel:
            # Every TP rank needs the whole sequence to pick the loss positions. The gradient
            # reaching the gather is complete on every rank (the non-SP output layer
            # all-reduces it), so its backward only splits: tensor_parallel_output_grad=False.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False
            )
        b, s = labels.shape
        selected = loss_mask.reshape(b, s) > 0
        empty = not bool(selected.any())
        if empty:
            # Keep the output layer's collectives and parameters in the graph: compute one
            # position and zero its loss.
            selected[0, 0] = True
        hidden = hidden_states.transpose(0, 1)[selected].unsqueeze(1)  # [n, 1, h]
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else None
        )
        with mcore_private.without_sequence_parallel(self.output_layer):
            logits, _ = self.output_layer(hidden, weight=weight)  # [n, 1, V_padded/TP]
        targets = labels[selected].unsqueeze(0)  # [1, n]
        picked = token_losses(logits.transpose(0, 1), targets, self.true_vocab_size)
        if empty:
            picked = picked * 0.0
        losses = torch.zeros((b, s), dtype=picked.dtype, device=picked.device)
        losses[selected] = picked[0]
        return losses
