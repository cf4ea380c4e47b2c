"""The dtypes that configs, checkpoints and command lines name, by their one spelling.

``model.params_dtype``, ``--dtype`` of the converters and the ``dtype`` recorded in
``lov15_model.json`` all use these names; ``auto`` (where a command accepts it) means "as the
source checkpoint declares".
"""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of :data:`TORCH_DTYPES`)."""
    return str(dtype).removeprefix("torch.")


__all__ = ["TORCH_DTYPES", "dtype_name"]
