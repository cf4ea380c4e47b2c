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


class TorchNormFactory:
    """Builds the torch norm a local spec asks for: ``TorchNormFactory(config, hidden_size, eps)``
    returns a ``torch.nn.RMSNorm`` or ``torch.nn.LayerNorm`` (by ``config.normalization``),
    not an instance of this class.

    It is a class only because Megatron-Core's ``build_module`` calls classes but hands plain
    functions back uncalled; Megatron's own ``WrappedTorchNorm`` is built the same way. The
    torch module is returned unwrapped so that its parameters keep the names ``weight``/``bias``
    that the checkpoint tables use.
    """

    def __new__(  # type: ignore[misc]  # returns a torch module by design (see above)
        cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object
    ) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
