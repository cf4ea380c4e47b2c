"""Hugging Face-side LLaVA-OneVision-1.5 model (``transformers`` classes).

Written from the model's published description: docs/model-reference.md.

- :mod:`.remote_code`: the code shipped next to every export (``auto_map`` points at it); it
  imports nothing of this package, only ``transformers``, ``torch`` and each other.
- :mod:`.remote_code.configuration_llavaonevision1_5`: ``RiceViTConfig``,
  ``LLaVAOneVision1_5_Config``.
- :mod:`.remote_code.modeling_llavaonevision1_5`: ``RiceViTModel`` (ViT + merger),
  ``LLaVAOneVision1_5_ForConditionalGeneration``. Self-contained (copied next to exports).
- :mod:`.remote_code.processing_llavaonevision1_5`: ``LLaVAOneVision1_5_ImageProcessor``
  (Qwen2-VL PIL image processor with our settings and a longest-side cap),
  ``LLaVAOneVision1_5_Processor``
  (image processor + tokenizer, no video processor). Self-contained (copied next to exports).
- :mod:`.export`: ``save_pretrained_with_code`` / ``write_hf_assets`` (``auto_map``, code files,
  tokenizer, chat template, processor and generation config).
"""

from .export import (
    AUTO_MAP,
    add_auto_map,
    save_pretrained_with_code,
    write_hf_assets,
    write_model_code,
)
from .remote_code.configuration_llavaonevision1_5 import (
    QWEN3_4B_TEXT_CONFIG,
    QWEN3_8B_TEXT_CONFIG,
    LLaVAOneVision1_5_Config,
    RiceViTConfig,
)
from .remote_code.modeling_llavaonevision1_5 import (
    ALTERNATE_KEY_MAPPING,
    LLaVAOneVision1_5_ForConditionalGeneration,
    LLaVAOneVision1_5_PreTrainedModel,
    RiceViTModel,
    merge_order_positions,
)

__all__ = [
    "ALTERNATE_KEY_MAPPING",
    "AUTO_MAP",
    "QWEN3_4B_TEXT_CONFIG",
    "QWEN3_8B_TEXT_CONFIG",
    "LLaVAOneVision1_5_Config",
    "LLaVAOneVision1_5_ForConditionalGeneration",
    "LLaVAOneVision1_5_PreTrainedModel",
    "RiceViTConfig",
    "RiceViTModel",
    "add_auto_map",
    "merge_order_positions",
    "save_pretrained_with_code",
    "write_hf_assets",
    "write_model_code",
]
