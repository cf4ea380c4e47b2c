"""Normalisation modules for the local (non-Transformer-Engine) specs.

Megatron-Core's ``WrappedTorchNorm`` refuses sequence parallelism. Ours is the same torch module
with one addition: with sequence parallelism on, its parameters carry ``sequence_parallel=True``,
which is how Megatron-Core's ``finalize_model_grads`` knows to all-reduce their gradients across
the tensor-parallel group (each TP rank saw only its slice of the sequence). The math is
``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm``, as in the TE spec's ``TENorm``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class LocalNorm:
    """Spec-compatible factory: ``LocalNorm(config, hidden_size, eps)`` → a torch norm module."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object):
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
