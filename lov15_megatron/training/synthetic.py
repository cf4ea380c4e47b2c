"""A deterministic, learnable token stream for smoke runs and parallel-equivalence tests.

Each sample is an arithmetic progression modulo the vocabulary with a random start and stride,
so a small model can learn to continue it after two tokens. Sample ``i`` depends only on
``(seed, i)``, which makes the stream identical under any data-parallel split.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from megatron.core import parallel_state

from lov15_megatron.config import RunConfig


def synthetic_sample(seed: int, index: int, seq_length: int, vocab_size: int) -> torch.Tensor:
    """``seq_length + 1`` tokens of sample ``index`` (inputs and shifted labels)."""
    rng = np.random.default_rng([seed, index])
    start = int(rng.integers(vocab_size))
    stride = int(rng.integers(1, 8))
    return torch.from_numpy((start + stride * np.arange(seq_length + 1)) % vocab_size)


def synthetic_batches(
    cfg: RunConfig, start_iteration: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches for this data-parallel rank, in schedule order, from ``start_iteration``.

    Global batch ``g`` holds samples ``[g*G, (g+1)*G)``; DP rank ``r`` gets the contiguous slice
    ``[r*G/DP, (r+1)*G/DP)`` of it, cut into micro-batches.
    """
    t = cfg.train
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = t.global_batch_size // dp
    seq, vocab, seed = cfg.data.seq_length, cfg.model.language.vocab_size, cfg.data.seed
    iteration = start_iteration
    while True:
        base = iteration * t.global_batch_size + dp_rank * per_rank
        for first in range(0, per_rank, t.micro_batch_size):
            tokens = torch.stack(
                [
                    synthetic_sample(seed, base + first + j, seq, vocab)
                    for j in range(t.micro_batch_size)
                ]
            )
            yield {
                "input_ids": tokens[:, :-1].contiguous(),
                "labels": tokens[:, 1:].contiguous(),
                "loss_mask": torch.ones(t.micro_batch_size, seq, dtype=torch.float32),
                "position_ids": torch.arange(seq).expand(t.micro_batch_size, seq).contiguous(),
            }
        iteration += 1
