"""The two loss weightings (train.loss_weighting) on a hand-computed example.

Two micro-batches of per-token losses: [1, 2, 3] with loss mask [1, 1, 0] (sum 3 over 2 tokens,
mean 1.5) and [4, 5, 6, 7] with mask [1, 1, 1, 1] (sum 22 over 4 tokens, mean 5.5).

- token: every loss token weighs the same: (3 + 22) / 6 = 25/6;
- micro_batch (the release's): the mean of the micro-batch means: (1.5 + 5.5) / 2 = 3.5.
"""

from __future__ import annotations

import math

import torch

from lov15_megatron.training.step import masked_token_loss, micro_batch_mean_loss

BATCHES = [
    (torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 1.0, 0.0]])),
    (torch.tensor([[4.0, 5.0, 6.0, 7.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0]])),
]


def _step_loss(reports: list[torch.Tensor]) -> tuple[float, int]:
    """What train_step does with the reports: sum, then weighted sum / weight."""
    loss_sum, weight, tokens = torch.stack(reports).sum(0).tolist()
    return loss_sum / weight, round(tokens)


def test_token_weighting():
    outs = [masked_token_loss(mask, losses) for losses, mask in BATCHES]
    # What Megatron backpropagates (calculate_per_token_loss): sums, divided once by all tokens.
    assert [float(o[0]) for o in outs] == [3.0, 22.0]
    assert [int(o[1]) for o in outs] == [2, 4]
    loss, tokens = _step_loss([o[2]["lm loss"] for o in outs])
    assert math.isclose(loss, 25 / 6) and tokens == 6


def test_micro_batch_weighting():
    outs = [micro_batch_mean_loss(mask, losses) for losses, mask in BATCHES]
    # What Megatron backpropagates (legacy path): each micro-batch's mean, / micro-batches.
    assert [float(o[0]) for o in outs] == [1.5, 5.5]
    loss, tokens = _step_loss([o[1]["lm loss"] for o in outs])
    assert math.isclose(loss, 3.5) and tokens == 6
    # A micro-batch without loss tokens adds 0 to the mean's numerator (and counts as one).
    empty = micro_batch_mean_loss(torch.zeros(1, 2), torch.ones(1, 2))
    assert float(empty[0]) == 0.0
